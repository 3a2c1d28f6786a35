"""Training under DeepSpeed ZeRO 0-3 with expert parallelism equals the single-process run.

4 processes, parallel.ep=2, 20 steps; the reference is one process with ZeRO-0 running the same
global batches as 4 accumulated micro-batches.
"""

import pytest

from tests.jobs import TINY, read_metrics, run_job, train_losses

STEPS = ["train.steps=20", "train.eval_interval=20", "train.ckpt_interval=20", "optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, data_cache):
    workdir = tmp_path_factory.mktemp("zero-reference")
    done = run_job(workdir, data_cache, *TINY, *STEPS, "run_name=single", "train.grad_accum=4")
    assert done.returncode == 0, done.stderr[-3000:]
    return train_losses(read_metrics(workdir, "single"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_with_ep2_matches_single_process(tmp_path, data_cache, single_process_losses, stage):
    done = run_job(tmp_path, data_cache, *TINY, *STEPS, "run_name=zero", "parallel.ep=2", f"deepspeed.zero_stage={stage}", nproc=4)
    assert done.returncode == 0, done.stderr[-3000:]
    got = train_losses(read_metrics(tmp_path, "zero"))
    assert sorted(got) == list(range(1, 21))
    for step, want in single_process_losses.items():
        assert got[step] == pytest.approx(want, rel=2e-5, abs=1e-6), (stage, step, got[step], want)
    assert got[20] < got[1] - 0.5  # and it learns


def test_unknown_zero_stage_is_refused(tmp_path, data_cache):
    done = run_job(tmp_path, data_cache, *TINY, "deepspeed.zero_stage=4", timeout=120)
    assert done.returncode == 2
    assert "deepspeed.zero_stage must be one of 0, 1, 2, 3; got 4" in done.stderr
