"""Training under ZeRO 0-3 (DeepSpeed for the dense weights, FSDP2 for the experts) with expert
parallelism equals the single-process run: losses and the one global gradient norm.

4 processes, parallel.ep=2, 20 steps; the reference is one process with ZeRO-0 running the same
global batches as 4 accumulated micro-batches.
"""

import pytest

from tests.jobs import TINY, read_metrics, run_job, train_losses

STEPS = [
    "train.steps=20",
    "train.eval_interval=20",
    "train.ckpt_interval=20",
    "optim.warmup_steps=5",
    "optim.grad_clip=0.5",
]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, data_cache):
    workdir = tmp_path_factory.mktemp("zero-reference")
    done = run_job(workdir, data_cache, *TINY, *STEPS, "run_name=single", "train.grad_accum=4")
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(workdir, "single")
    return train_losses(records), grad_norms(records)


def grad_norms(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/grad_norm"] for r in records if "train/grad_norm" in r}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_with_ep2_matches_single_process(tmp_path, data_cache, single_process_losses, stage):
    done = run_job(
        tmp_path, data_cache, *TINY, *STEPS, "run_name=zero", "parallel.ep=2", f"deepspeed.zero_stage={stage}", nproc=4
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(tmp_path, "zero")
    got = train_losses(records)
    assert sorted(got) == list(range(1, 21))
    want_losses, want_norms = single_process_losses
    for step, want in want_losses.items():
        assert got[step] == pytest.approx(want, rel=2e-5, abs=1e-6), (stage, step, got[step], want)
    # One gradient norm over dense and expert gradients, equal to the single process's, every step
    # (clipping at optim.grad_clip=0.5 is active in most steps, so a wrong norm would also move the losses).
    norms = grad_norms(records)
    assert sorted(norms) == list(range(1, 21))
    for step, want in want_norms.items():
        assert norms[step] == pytest.approx(want, rel=2e-5), (stage, step, norms[step], want)
    assert sum(n > 0.5 for n in norms.values()) >= 10
    assert got[20] < got[1] - 0.5  # and it learns


def test_unknown_zero_stage_is_refused(tmp_path, data_cache):
    done = run_job(tmp_path, data_cache, *TINY, "deepspeed.zero_stage=4", timeout=120)
    assert done.returncode == 2
    assert "deepspeed.zero_stage must be one of 0, 1, 2, 3; got 4" in done.stderr
