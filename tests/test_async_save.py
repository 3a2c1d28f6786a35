"""train.async_save: checkpoints written in the background (torch.distributed.checkpoint
async_save) hold exactly what a synchronous save of the same step holds, training is unchanged,
and crash safety is the same: a rank killed before the background save is published leaves the
previous checkpoint as the one a restart loads."""

import torch

from tests.jobs import TINY, fault_env, read_metrics, run_job, train_losses
from tests.test_checkpoint_resilience import EXACT
from train.checkpoint.manager import read_tensors

COMMON = [
    *TINY,
    *EXACT,
    "train.steps=12",
    "train.ckpt_interval=4",
    "parallel.ep=2",
    "deepspeed.zero_stage=1",
    "train.keep_checkpoints=3",
]


def test_background_saves_equal_synchronous_ones_and_training_is_unchanged(tmp_path, data_cache):
    sync = run_job(tmp_path, data_cache, *COMMON, "run_name=sync", nproc=2)
    assert sync.returncode == 0, sync.stderr[-3000:]
    background = run_job(tmp_path, data_cache, *COMMON, "run_name=async", "train.async_save=true", nproc=2)
    assert background.returncode == 0, background.stderr[-3000:]
    assert train_losses(read_metrics(tmp_path, "async")) == train_losses(read_metrics(tmp_path, "sync"))
    for step in (4, 8, 12):  # 4 and 8 in the background, 12 (the last) at once
        name = f"step_{step:06d}"
        got = read_tensors(tmp_path / "outputs/async/checkpoints" / name, ("model.", "optim."))
        expected = read_tensors(tmp_path / "outputs/sync/checkpoints" / name, ("model.", "optim."))
        assert got.keys() == expected.keys() and len(got) > 10
        for key in expected:
            assert torch.equal(got[key], expected[key]), (step, key)
    assert not list((tmp_path / "outputs/async/checkpoints").glob("*.tmp"))


def test_a_kill_before_a_background_save_is_published_resumes_from_the_one_before(tmp_path, data_cache):
    reference = run_job(tmp_path, data_cache, *COMMON, "run_name=reference", nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    # Rank 0 is SIGKILLed when step 8's background save is complete, before it is published.
    done = run_job(
        tmp_path,
        data_cache,
        *COMMON,
        "run_name=crash",
        "train.async_save=true",
        nproc=2,
        max_restarts=1,
        extra_env=fault_env(SWITCHYARD_TEST_KILL_IN_SAVE="8"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 4 (exact)" in done.stdout
    assert train_losses(read_metrics(tmp_path, "crash")) == train_losses(read_metrics(tmp_path, "reference"))
