"""Stopping on a signal with a checkpoint: SIGTERM (schedulers, `scancel`, Kubernetes), SIGINT
(Ctrl-C) and SIGUSR1 (SLURM's lead time before the time limit, `--signal` in launch/slurm.sbatch).

Every rank installs the handler, which only notes the request. The training loop folds the note
into the flag all-reduce it already does for non-finite losses (parallel/collectives.py
any_rank_of), so the ranks agree at the same step boundary; there the job saves a checkpoint, logs
"preempted at step N, checkpoint saved" and exits with EXIT_PREEMPTED.

EXIT_PREEMPTED = 75 (EX_TEMPFAIL, "try again later"): not 0, so `torchrun --max-restarts` restarts
the workers (which then resume from the checkpoint: TORCHELASTIC_RESTART_COUNT > 0) and SLURM
counts the step as failed; a cluster that sets `RequeueExit=75` in slurm.conf requeues the job on
it, and launch/slurm.sbatch requeues itself when the lead-time signal reached it.

A second signal exits at once (exit 128 + signal number) without saving. Launchers forward the
signal they get (torchrun, srun), so a worker often receives the same signal twice within
milliseconds: a repeat within REPEAT_WINDOW_S counts as the same request.
"""

from __future__ import annotations

import os
import signal
import sys
import time

EXIT_PREEMPTED = 75
REPEAT_WINDOW_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

_requested: tuple[str, float] | None = None  # (signal name, time.monotonic()) of the first request


class Preempted(Exception):
    """The job stopped on a signal after saving its checkpoint at `step`."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"preempted at step {step}, checkpoint saved ({signal_name})")
        self.step, self.signal_name = step, signal_name


def _on_signal(signum: int, _frame) -> None:
    global _requested
    name = signal.Signals(signum).name
    now = time.monotonic()
    if _requested is None:
        _requested = (name, now)
        return
    if name == _requested[0] and now - _requested[1] < REPEAT_WINDOW_S:
        return  # the launcher forwarding the signal this process already got
    rank = os.environ.get("RANK", "0")
    print(f"switchyard: (rank {rank}) second signal ({name}): exiting now without saving", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def install() -> None:
    """Catch the stop signals in this process (the main thread: Python's rule for handlers)."""
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


def uninstall() -> None:
    """The default handlers again: a job that is failing has nothing to save, and a launcher's stop
    signal must end it at once."""
    for sig in SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


def requested() -> bool:
    """Whether this process got a stop signal; the ranks agree on it through the loop's all-reduce."""
    return _requested is not None


def signal_name() -> str:
    return _requested[0] if _requested is not None else "?"


def reset() -> None:
    """Forget a request (for tests and sweep jobs sharing a process)."""
    global _requested
    _requested = None
