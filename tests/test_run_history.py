"""A run directory never loses what was logged into it: a fresh run keeps the earlier metrics aside,
a run resumed after a crash keeps the history up to its checkpoint and replaces (not duplicates)
what the crashed attempt logged after it, in metrics.jsonl and in the offline W&B run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf.message import DecodeError

from tests.wandb_reader import history, records
from train.logging import RunLogger


def wandb_cfg(mode: str) -> SimpleNamespace:
    return SimpleNamespace(mode=mode, project="switchyard-test", entity=None, group=None, tags=[])


def attempt(run_dir: Path, first_step: int, logged: list[tuple[int, dict]], mode: str = "offline") -> None:
    """One invocation of the job, as train/loop.py drives its RunLogger."""
    logger = RunLogger(run_dir, {"run": "test"}, 10, first_step, wandb_cfg(mode), progress_bar=False, enabled=True)
    for step, metrics in logged:
        logger.log(step, metrics)
    logger.close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train(step: int, loss: float) -> tuple[int, dict]:
    return step, {"train/loss": loss, "moe/layer0/tokens_per_expert": [step, 10 - step]}


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline runs' transaction logs, oldest first (their folders are named by start time),
    each once wandb's service has written all of it: `finish()` may return before."""
    return [
        finished(path) for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    ]


def finished(path: Path, timeout_s: float = 60) -> Path:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in records(path)):
                return path
        except DecodeError:  # a record still being written
            pass
        assert time.monotonic() < deadline, f"{path}: wandb did not finish writing it"
        time.sleep(0.1)


def wandb_rows(path: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for row in history(path):
        assert row["_step"] not in rows, f"step {row['_step']} logged twice"
        rows[row["_step"]] = row
    return rows


def run_id(path: Path) -> str:
    return next(r.run.run_id for r in records(path) if r.WhichOneof("record_type") == "run")


def test_resume_after_a_crash_keeps_the_history_and_replaces_the_repeated_steps(tmp_path):
    run_dir = tmp_path / "run"
    # First attempt: checkpoint at step 4 (after its validation), then steps 5 and 6, then a crash
    # that cuts the last line.
    first = [
        (0, {"val/loss": 5.5}),
        *(train(s, 5.0 - s / 10) for s in range(1, 5)),
        (4, {"val/loss": 4.8}),
        train(5, 4.5),
        train(6, 4.4),
    ]
    attempt(run_dir, 0, first)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')
    before = (run_dir / "metrics.jsonl").read_bytes()

    # An attempt that dies before logging anything changes nothing.
    RunLogger(run_dir, {}, 10, 4, wandb_cfg("disabled"), progress_bar=False, enabled=True).close()
    assert (run_dir / "metrics.jsonl").read_bytes() == before

    # The resumed run: the load-point validation loss at 4, then 5..8 again (other values).
    second = [(4, {"val/loss": 4.81}), *(train(s, 4.0 - s / 10) for s in range(5, 9)), (8, {"val/loss": 3.2})]
    attempt(run_dir, 4, second)

    got = read_jsonl(run_dir / "metrics.jsonl")
    expected = [{"step": s, **m} for s, m in first[:5] + second]  # the history to step 4, then the resumed run
    assert got == expected
    keys = [(r["step"], k) for r in got for k in r if k != "step"]
    assert len(keys) == len(set(keys))  # each (step, figure) once
    replaced = list(run_dir.glob("metrics.replaced-*.jsonl"))
    assert len(replaced) == 1
    lines = replaced[0].read_text().splitlines()
    assert [json.loads(line) for line in lines[:3]] == [
        {"step": 4, "val/loss": 4.8},
        *({"step": s, **m} for s, m in first[6:]),
    ]
    assert lines[3] == '{"step": 7, "train/lo'  # nothing is lost, not even a cut line

    # W&B: the same run id; the newest offline run holds the whole history, each step once.
    old, new = offline_runs(run_dir)
    assert run_id(old) == run_id(new) == (run_dir / "wandb_run_id").read_text()
    assert sorted(wandb_rows(old)) == [0, 1, 2, 3, 4, 5, 6]  # the crashed attempt's run is left as it was
    rows = wandb_rows(new)
    assert sorted(rows) == list(range(9))
    for record in got:
        row = rows[record["step"]]
        assert row.get("train/loss", row.get("val/loss")) is not None
        for key, value in record.items():
            if key == "moe/layer0/tokens_per_expert":
                assert row[f"{key}/values"] == value
            elif key != "step":
                assert row[key] == (value if isinstance(value, str) else pytest.approx(value)), (record["step"], key)
    assert (
        "moe/expert_load_heatmap/path" in rows[6] and "moe/expert_load_heatmap/path" not in rows[3]
    )  # replay: no images


def test_resume_replaces_only_the_repeated_figures_of_the_resumed_step(tmp_path):
    """The resumed step's validation record also carried the sampled text: `val/loss` is logged
    again by the resumed run, the text is kept, and no (step, key) appears twice."""
    run_dir = tmp_path / "run"
    first = [
        (0, {"val/loss": 5.5, "samples/text": "a"}),
        train(1, 4.9),
        train(2, 4.8),
        (2, {"val/loss": 4.7, "samples/text": "b"}),
        train(3, 4.6),
    ]
    attempt(run_dir, 0, first, mode="disabled")
    second = [(2, {"val/loss": 4.7}), train(3, 4.6)]
    attempt(run_dir, 2, second, mode="disabled")
    got = read_jsonl(run_dir / "metrics.jsonl")
    keys = [(r["step"], k) for r in got for k in r if k != "step"]
    assert len(keys) == len(set(keys)), got
    assert {"step": 2, "samples/text": "b"} in got and {"step": 2, "val/loss": 4.7} in got
    assert sorted(keys) == sorted({(s, k) for s, m in first for k in m})
    (replaced,) = run_dir.glob("metrics.replaced-*.jsonl")
    assert read_jsonl(replaced) == [{"step": 2, "val/loss": 4.7}, {"step": 3, **train(3, 4.6)[1]}]


def test_fresh_run_in_a_used_directory_keeps_the_earlier_metrics_and_run_id(tmp_path):
    run_dir = tmp_path / "run"
    attempt(run_dir, 0, [train(1, 5.0), train(2, 4.9)], mode="disabled")
    (run_dir / "wandb_run_id").write_text("earlier-id")
    attempt(run_dir, 0, [train(1, 6.0)], mode="disabled")
    assert read_jsonl(run_dir / "metrics.jsonl") == [{"step": 1, **train(1, 6.0)[1]}]
    (kept,) = run_dir.glob("metrics.prev-*.jsonl")
    assert read_jsonl(kept) == [{"step": s, **m} for s, m in (train(1, 5.0), train(2, 4.9))]
    (kept_id,) = run_dir.glob("wandb_run_id.prev-*")
    assert kept_id.read_text() == "earlier-id"
