"""Resharding the whole training state: a checkpoint saved by 4 ranks with ep=2 and ZeRO-2 resumes
on 1 rank (ep=1, ZeRO-0), 2 ranks (ep=2, ZeRO-3), 4 ranks (ep=4, ZeRO-1), and in pipelines (pp=2
with ep=2 and ZeRO-1 on 4 ranks, pp=2 with ZeRO-2 on 2); a pipeline's checkpoint (pp=2 x ep=2)
resumes on one rank. Each resumed run holds exactly the saved weights and AdamW state (compared
tensor by tensor after regrouping) and continues the uninterrupted run's loss curve."""

import subprocess
import sys

import pytest
import torch

from tests.jobs import REPO, TINY, job_env, read_metrics, run_job, start_from_checkpoint, train_losses
from train.checkpoint.manager import read_tensors

# Same global batch on every layout: 16 rows per step as micro_batch 4 x ranks x grad_accum.
COMMON = [*TINY, "train.steps=8", "train.eval_interval=100", "optim.warmup_steps=2", "moe.bias_update_rate=0.01"]
LAYOUTS = {  # name: (processes, overrides)
    "one_rank_ep1_zero0": (1, ["parallel.ep=1", "deepspeed.zero_stage=0", "train.grad_accum=4"]),
    "two_ranks_ep2_zero3": (2, ["parallel.ep=2", "deepspeed.zero_stage=3", "train.grad_accum=2"]),
    "four_ranks_ep4_zero1": (4, ["parallel.ep=4", "deepspeed.zero_stage=1"]),
    "four_ranks_pp2_ep2_zero1": (4, ["parallel.pp=2", "parallel.ep=2", "deepspeed.zero_stage=1", "train.grad_accum=2"]),
    "two_ranks_pp2_zero2": (2, ["parallel.pp=2", "deepspeed.zero_stage=2", "train.grad_accum=4"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_cache):
    """4 ranks, ep=2, ZeRO-2, 8 steps with checkpoints at 4 and 8: the uninterrupted curve."""
    workdir = tmp_path_factory.mktemp("reshard")
    done = run_job(
        workdir,
        data_cache,
        *COMMON,
        "run_name=source",
        "train.ckpt_interval=4",
        "parallel.ep=2",
        "deepspeed.zero_stage=2",
        nproc=4,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, train_losses(read_metrics(workdir, "source"))


@pytest.fixture(scope="module")
def saved_by_pipeline(tmp_path_factory, data_cache):
    """The same run by a pipeline: 4 ranks, pp=2 x ep=2, ZeRO-1."""
    workdir = tmp_path_factory.mktemp("reshard_pp")
    nproc, overrides = LAYOUTS["four_ranks_pp2_ep2_zero1"]
    done = run_job(workdir, data_cache, *COMMON, "run_name=source", "train.ckpt_interval=4", *overrides, nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, train_losses(read_metrics(workdir, "source"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_on_another_layout_keeps_the_whole_state(saved, data_cache, layout):
    check_resume(saved, data_cache, layout)


def test_pipeline_checkpoint_resumes_on_one_rank(saved_by_pipeline, saved, data_cache):
    check_resume(saved_by_pipeline, data_cache, "one_rank_ep1_zero0")
    # The pipeline trained the same run as the 4 ranks without pipeline (fp32 tolerance).
    pipeline_curve, plain_curve = saved_by_pipeline[1], saved[1]
    assert sorted(pipeline_curve) == sorted(plain_curve)
    for step in plain_curve:
        assert pipeline_curve[step] == pytest.approx(plain_curve[step], rel=1e-5), step


def check_resume(saved, data_cache, layout):
    workdir, uninterrupted = saved
    nproc, overrides = LAYOUTS[layout]
    source = workdir / "outputs/source/checkpoints/step_000004"
    run_dir = start_from_checkpoint(workdir, "source", 4, layout)
    side = workdir / f"{layout}-loaded"

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [
        *launcher,
        str(REPO / "tests/reshard_probe.py"),
        str(side),
        str(run_dir),
        *COMMON,
        "train.ckpt_interval=100",
        *overrides,
    ]
    done = subprocess.run(command, cwd=workdir, env=job_env(data_cache), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 4 (resharded from" in done.stdout and "optimizer state kept" in done.stdout

    # What the new layout loaded, saved again from it, equals what the old layout saved.
    before = read_tensors(source, prefixes=("model.", "optim."))
    after = read_tensors(side / "step_000004", prefixes=("model.", "optim."))
    assert before.keys() == after.keys()
    assert any(k.startswith("optim.exp_avg_sq.blocks.1.ffn.experts") for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key

    # And training continues the uninterrupted curve.
    got = train_losses(read_metrics(workdir, layout))
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-5), (layout, step, got, uninterrupted)
