"""`python -m train.torchrun [torchrun arguments]`: torchrun (`python -m torch.distributed.run`) as the
SLURM script starts it, with its endings said in one line instead of a Python traceback and a
failure report:

- stopped by a signal (scancel, a requeue, the time limit): `switchyard: torchrun stopped by SIGTERM`,
  exit 128 + signal;
- a worker failed: `switchyard: torchrun: worker rank R exited with code C` (the worker has printed
  its own line), exit C, so that a preempted job's 75 reaches SLURM (RequeueExit=75) as it is.

A module of the installed package, so that every node finds it wherever the job was submitted from.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed import run
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def main() -> int:
    try:
        run.main()
    except SignalException as err:
        print(f"switchyard: torchrun stopped by {signal.Signals(err.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(
            f"switchyard: torchrun: worker rank {rank} exited with code {failure.exitcode}", file=sys.stderr, flush=True
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
