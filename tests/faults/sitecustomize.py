"""Fault injection for end-to-end tests, outside the training code: a test that puts this folder
first on PYTHONPATH gets it imported at interpreter start-up (Python's `sitecustomize` hook) in the
job's processes, where it wraps the functions below. Nothing in train/ knows about it.

    SWITCHYARD_TEST_NAN_STEPS=3,5      the loss of these steps (1-based) becomes NaN on every rank
    SWITCHYARD_TEST_KILL_IN_SAVE=8     rank 0 is SIGKILLed after every rank wrote step 8's files and
                                       before the checkpoint is published (first attempt only, so a
                                       torchrun restart can then finish the job)
    SWITCHYARD_TEST_COUNT_SYNCS=DIR    the job computes on `cpu:0` and counts the device->host syncs
                                       of its training steps (tests/sync_counter.py; evaluation,
                                       samples and checkpoints not counted); each rank writes
                                       DIR/rank<R>.json: {"steps": ..., "events": [[what, where], ...]}
    SWITCHYARD_TEST_ENOSPC_IN_SAVE=4   writing step 4's checkpoint fails with ENOSPC after part of a
                                       data file is written, as on a full disk
    SWITCHYARD_TEST_FREE_BYTES=1000    the file system of the checkpoints reports this much free space
"""

import errno
import os
import signal

_NAN_STEPS = {int(s) for s in os.environ.get("SWITCHYARD_TEST_NAN_STEPS", "").split(",") if s.strip()}
_KILL_STEP = os.environ.get("SWITCHYARD_TEST_KILL_IN_SAVE")
_COUNT_SYNCS = os.environ.get("SWITCHYARD_TEST_COUNT_SYNCS")
_ENOSPC_STEP = os.environ.get("SWITCHYARD_TEST_ENOSPC_IN_SAVE")
_FREE_BYTES = os.environ.get("SWITCHYARD_TEST_FREE_BYTES")


def _poison_steps() -> None:
    import train.loop as loop

    run_step, forward_loss = loop.run_step, loop.forward_loss

    def poisoned_forward_loss(*args):
        loss, *rest = forward_loss(*args)
        return (loss * float("nan"), *rest)

    def run_step_with_faults(run, sampler, step, window):
        if step + 1 not in _NAN_STEPS:
            return run_step(run, sampler, step, window)
        loop.forward_loss = poisoned_forward_loss
        try:
            return run_step(run, sampler, step, window)
        finally:
            loop.forward_loss = forward_loss

    loop.run_step = run_step_with_faults


def _kill_before_publishing() -> None:
    from train.checkpoint.manager import CheckpointManager

    publish = CheckpointManager._publish

    def publish_or_die(self, staging, final, meta):
        if str(meta["step"]) == _KILL_STEP and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        publish(self, staging, final, meta)

    CheckpointManager._publish = publish_or_die


def _count_syncs(out_dir: str) -> None:
    import functools
    import json

    import train.loop as loop
    import train.setup as setup
    from tests.sync_counter import COMPUTE_DEVICE, SyncCounter
    from train.checkpoint.manager import CheckpointManager

    counter = SyncCounter()
    setup.pick_device = lambda job: COMPUTE_DEVICE

    def paused(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with counter.pause():
                return fn(*args, **kwargs)

        return call

    loop.evaluate, loop.sample = paused(loop.evaluate), paused(loop.sample)
    CheckpointManager.save = paused(CheckpointManager.save)
    train_steps = loop.train_steps

    def counted_train_steps(run, logger):
        # AdamW's step counters stay on the host on a GPU too (torch keeps them there unless capturable).
        optimizers = [run.trainer.dense.client_optimizer, run.trainer.expert_optimizer]
        host = [
            state["step"] for opt in optimizers if opt is not None for state in opt.state.values() if "step" in state
        ]
        counter.seed(host)
        with counter.counting():
            summary = train_steps(run, logger)
        steps = min(run.job.train.steps, run.job.train.stop_at or run.job.train.steps) - run.start_step
        with open(os.path.join(out_dir, f"rank{run.dims.rank}.json"), "w") as f:
            json.dump({"steps": steps, "events": counter.events}, f)
        return summary

    loop.train_steps = counted_train_steps


def _disk_full_in_save() -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    write_data = FileSystemWriter.write_data

    def write_data_or_enospc(self, plan, planner):
        if f"step_{int(_ENOSPC_STEP):06d}.tmp" in str(self.path):
            with open(os.path.join(str(self.path), "__0_0.distcp"), "wb") as f:
                f.write(b"\0" * 4096)  # a partial file, as the write that ran out of space leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = write_data_or_enospc


def _little_free_space() -> None:
    import shutil

    disk_usage = shutil.disk_usage

    def reported(path):
        usage = disk_usage(path)
        return usage._replace(free=int(_FREE_BYTES)) if "checkpoints" in str(path) else usage

    shutil.disk_usage = reported


if _NAN_STEPS:
    _poison_steps()
if _KILL_STEP:
    _kill_before_publishing()
if _COUNT_SYNCS:
    _count_syncs(_COUNT_SYNCS)
if _ENOSPC_STEP:
    _disk_full_in_save()
if _FREE_BYTES:
    _little_free_space()
