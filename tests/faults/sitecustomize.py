"""Fault injection for end-to-end tests, outside the training code: a test that puts this folder
first on PYTHONPATH gets it imported at interpreter start-up (Python's `sitecustomize` hook) in the
job's processes, where it wraps the functions below. Nothing in train/ knows about it.

    SWITCHYARD_TEST_NAN_STEPS=3,5      the loss of these steps (1-based) becomes NaN on every rank
    SWITCHYARD_TEST_KILL_IN_SAVE=8     rank 0 is SIGKILLed after every rank wrote step 8's files and
                                       before the checkpoint is published (first attempt only, so a
                                       torchrun restart can then finish the job)
"""

import os
import signal

_NAN_STEPS = {int(s) for s in os.environ.get("SWITCHYARD_TEST_NAN_STEPS", "").split(",") if s.strip()}
_KILL_STEP = os.environ.get("SWITCHYARD_TEST_KILL_IN_SAVE")


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


if _NAN_STEPS:
    _poison_steps()
if _KILL_STEP:
    _kill_before_publishing()
