"""The training job end to end, in subprocesses: learning, exact resume, checkpoints, bad input."""

import json

import pytest

from tests.jobs import TINY, read_metrics, run_job, train_losses, val_losses
from tests.wandb_reader import history


def test_training_lowers_validation_loss(tmp_path, data_cache):
    done = run_job(
        tmp_path,
        data_cache,
        *TINY,
        "run_name=learn",
        "train.steps=300",
        "train.eval_interval=25",
        "train.ckpt_interval=300",
        "optim.warmup_steps=20",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(tmp_path, "learn")
    val = val_losses(records)
    # Byte-level: a uniform guess costs ln(257) = 5.55 nats, where the untrained model starts.
    assert abs(val[0] - 5.55) < 0.2, val
    assert val[300] < val[150] < val[25] < val[0], val
    assert val[300] < 2.95, val
    # A sampled continuation at each evaluation, for a person to read (bytes: up to 48 characters).
    samples = {r["step"]: r["samples/text"] for r in records if "samples/text" in r}
    assert sorted(samples) == list(range(25, 301, 25))
    assert all(text.startswith("ROMEO:") and len(text) > len("ROMEO:") for text in samples.values())
    assert f"step 300: sample: {samples[300]!r}" in done.stdout + done.stderr


def test_resume_gives_the_uninterrupted_losses(tmp_path, data_cache):
    common = [
        *TINY,
        "train.steps=16",
        "train.eval_interval=100",
        "train.ckpt_interval=100",
        "moe.jitter=0.1",
        "moe.bias_update_rate=0.01",
    ]
    whole = run_job(tmp_path, data_cache, *common, "run_name=whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = run_job(tmp_path, data_cache, *common, "run_name=split", "train.stop_at=8")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "outputs/split/checkpoints/step_000008/meta.json").is_file()
    second = run_job(tmp_path, data_cache, *common, "run_name=split", "train.resume=true")
    assert second.returncode == 0, second.stderr[-3000:]

    expected = train_losses(read_metrics(tmp_path, "whole"))
    resumed = train_losses(read_metrics(tmp_path, "split"))
    assert sorted(resumed) == list(range(1, 17))
    assert resumed == expected  # bit for bit: same batches, same RNG, same optimizer state


def test_fresh_run_keeps_earlier_checkpoints_aside(tmp_path, data_cache):
    for _ in range(2):
        done = run_job(tmp_path, data_cache, *TINY, "run_name=again", "train.steps=2", "train.eval_interval=2")
        assert done.returncode == 0, done.stderr[-3000:]
    kept = list((tmp_path / "outputs/again").glob("checkpoints.prev-*/step_000002/meta.json"))
    assert len(kept) == 1
    # ...and the earlier metrics: the same run twice, so the same records (but for the timings).
    earlier = list((tmp_path / "outputs/again").glob("metrics.prev-*.jsonl"))
    assert len(earlier) == 1
    first = [json.loads(line) for line in earlier[0].read_text().splitlines()]
    assert train_losses(first) == train_losses(read_metrics(tmp_path, "again"))
    assert sorted(train_losses(first)) == [1, 2]


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path, data_cache):
    done = run_job(tmp_path, data_cache, *TINY, "run_name=shape", "train.steps=2", "train.eval_interval=2")
    assert done.returncode == 0, done.stderr[-3000:]
    other = run_job(
        tmp_path, data_cache, *TINY, "run_name=shape", "train.steps=4", "train.resume=true", "moe.num_experts=8"
    )
    assert other.returncode == 2
    assert "moe.num_experts" in other.stderr.strip().splitlines()[-1]


def test_half_written_checkpoint_is_never_loaded(tmp_path, data_cache):
    done = run_job(
        tmp_path,
        data_cache,
        *TINY,
        "run_name=crash",
        "train.steps=4",
        "train.ckpt_interval=2",
        "train.eval_interval=4",
        "train.stop_at=2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "outputs/crash/checkpoints"
    # A crash while saving step 4 leaves a staging folder (and even a garbage file) behind.
    (ckpt / "step_000004.tmp").mkdir()
    (ckpt / "step_000004.tmp" / "rank0.pt").write_bytes(b"truncated")
    resumed = run_job(
        tmp_path,
        data_cache,
        *TINY,
        "run_name=crash",
        "train.steps=4",
        "train.ckpt_interval=2",
        "train.eval_interval=4",
        "train.resume=true",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = sorted(train_losses(read_metrics(tmp_path, "crash")))
    assert steps == [1, 2, 3, 4]  # resumed from step 2, the last complete checkpoint
    assert not (ckpt / "step_000004.tmp").exists()
    assert (ckpt / "latest").read_text() == "step_000004"


# The bad-input table (settings, data files, the token cache) is tests/test_bad_input.py.


def test_empty_corpus_is_refused(tmp_path, data_cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    done = run_job(
        tmp_path, data_cache, *TINY, "data=files", f"data.paths=[{empty}]", "data.tokenizer.kind=bytes", timeout=120
    )
    assert done.returncode == 2
    assert "empty" in done.stderr.strip().splitlines()[-1]


def test_wandb_offline_run_holds_what_the_jsonl_holds(tmp_path, data_cache):
    overrides = [o for o in TINY if not o.startswith("logging.wandb.mode")]
    done = run_job(
        tmp_path,
        data_cache,
        *overrides,
        "run_name=wb",
        "train.steps=3",
        "train.eval_interval=3",
        "logging.wandb.mode=offline",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "outputs/wb/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged = {}  # step -> everything W&B recorded for it
    for row in history(runs[0]):
        logged.setdefault(row["_step"], {}).update(row)
    records = read_metrics(tmp_path, "wb")
    assert any("moe/layer1/tokens_per_expert" in r for r in records)
    heatmap = logged[3]["moe/expert_load_heatmap/path"]
    assert logged[3]["moe/expert_load_heatmap/_type"] == "image-file"
    assert (runs[0].parent / "files" / heatmap).stat().st_size > 1000  # the PNG itself is in the run
    for record in records:
        row = logged[record["step"]]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, list):  # per-expert counts travel as a histogram over expert ids
                assert row[f"{key}/values"] == value and row[f"{key}/bins"] == list(range(len(value) + 1)), key
            else:
                assert row[key] == (value if isinstance(value, str) else pytest.approx(value)), key


def test_cpu_run_compiles_no_deepspeed_op(tmp_path, data_cache):
    """DeepSpeed's shared-memory op (inference all-reduce only) is not built: no gcc, no wait."""
    extensions = tmp_path / "torch_extensions"  # where torch would JIT-build it, empty like a fresh machine
    done = run_job(
        tmp_path,
        data_cache,
        *TINY,
        "run_name=noop",
        "train.steps=1",
        "train.eval_interval=1",
        extra_env={"TORCH_EXTENSIONS_DIR": str(extensions)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (extensions / "deepspeed_shm_comm").exists()
    assert "deepspeed_shm_comm" not in done.stdout + done.stderr
