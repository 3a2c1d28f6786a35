"""`python -m train.check [--nproc N] [overrides...]`: checking a job's settings without running it.

`check_job(job, world_size)` raises the one `ValueError` the job would stop with before any process
group exists: the pure settings checks, the pre-flight (files, places, packages) and the process
layout. Prints `switchyard: error: ...` (exit 2) or nothing (exit 0). The launchers call it before
starting torchrun, so that a bad setting stops with that one line instead of N failing workers and
torchrun's failure report.
"""

from __future__ import annotations

import argparse
import sys

from train.cli import compose_job, run_tool
from train.config import JobConfig, batch_layout
from train.preflight import preflight


def check_job(job: JobConfig, world_size: int = 1) -> None:
    """Everything checked before the first process group: settings, places, process layout."""
    from parallel.dims import validate_degrees  # imports torch.distributed: only where needed

    preflight(job)
    validate_degrees(world_size, job.parallel.ep, job.moe.num_experts)
    batch_layout(job.train, world_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=1, help="number of processes the job will have (world size)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m train")
    args = parser.parse_args(argv)
    return run_tool(lambda: check_job(compose_job(args.overrides), args.nproc))


if __name__ == "__main__":
    sys.exit(main())
