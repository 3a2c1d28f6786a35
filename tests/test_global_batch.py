"""train.global_batch: the same job on any number of processes trains the same run. Each rank's
micro-batches follow from it; the validation set does not depend on the layout; a checkpoint of
4 ranks resumed on 2 continues the uninterrupted curve."""

import pytest

from tests.jobs import TINY, read_metrics, run_job, start_from_checkpoint, train_losses, val_losses
from train.check import check_job, compose_job
from train.config import TrainConfig, batch_layout


@pytest.mark.parametrize(
    "global_batch, micro_batch, world_size, expected",
    [
        (16, 4, 4, (4, 1)),
        (16, 4, 2, (4, 2)),
        (16, 4, 1, (4, 4)),
        (16, 8, 8, (2, 1)),  # a share smaller than micro_batch: one micro-batch of the share
        (12, 8, 2, (6, 1)),  # the largest divisor of the share up to micro_batch
        (20, 3, 2, (2, 5)),
    ],
)
def test_each_rank_takes_an_equal_share_in_whole_micro_batches(global_batch, micro_batch, world_size, expected):
    t = TrainConfig(micro_batch=micro_batch, global_batch=global_batch)
    got = batch_layout(t, world_size)
    assert got == expected
    assert got[0] <= micro_batch and got[0] * got[1] * world_size == global_batch


def test_without_global_batch_the_micro_batch_is_per_rank():
    assert batch_layout(TrainConfig(micro_batch=4, grad_accum=3), 8) == (4, 3)


@pytest.mark.parametrize(
    "overrides, nproc, message",
    [
        (
            ["train.global_batch=10"],
            4,
            "train.global_batch=10 must be a multiple of the number of processes (4): each rank takes an equal share",
        ),
        (
            ["train.global_batch=16", "train.grad_accum=2"],
            1,
            "train.grad_accum=2: with train.global_batch set, grad_accum follows",
        ),
        (["train.global_batch=0"], 1, "train.global_batch"),
    ],
)
def test_a_global_batch_that_does_not_fit_is_one_line(overrides, nproc, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        check_job(compose_job([*TINY, *overrides]), nproc)
    assert str(err.value).startswith(message)


def test_four_ranks_resumed_on_two_continue_the_same_run(tmp_path, data_cache):
    common = [
        *TINY,
        "train.global_batch=16",
        "train.steps=8",
        "train.ckpt_interval=4",
        "train.eval_interval=4",
        "parallel.ep=2",
        "logging.sample_tokens=0",
    ]
    whole = run_job(tmp_path, data_cache, *common, "run_name=four", nproc=4)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "global batch 16 = 4 process(es) x 1 micro-batch(es) x 4 sequences" in whole.stdout
    start_from_checkpoint(tmp_path, "four", 4, "two")
    resumed = run_job(tmp_path, data_cache, *common, "run_name=two", "train.resume=true", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "global batch 16 = 2 process(es) x 2 micro-batch(es) x 4 sequences" in resumed.stdout
    assert "resumed from step 4 (resharded" in resumed.stdout
    four, two = read_metrics(tmp_path, "four"), read_metrics(tmp_path, "two")
    # The same weights give the same validation loss on 4 ranks and on 2 (up to fp32 summation order).
    assert val_losses(two)[4] == pytest.approx(val_losses(four)[4], rel=1e-6, abs=0)
    # ...and the same batches the same steps: the uninterrupted curve goes on.
    expected = {step: loss for step, loss in train_losses(four).items() if step > 4}
    got = train_losses(two)
    assert sorted(got) == sorted(expected) == [5, 6, 7, 8]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=0), (step, got, expected)
    assert val_losses(two)[8] == pytest.approx(val_losses(four)[8], rel=1e-5, abs=0)
