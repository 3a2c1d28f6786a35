"""`python -m train.check [--nproc N] [overrides...]`: checking a job's settings without running it.

`check_job(job, world_size)` raises the one `ValueError` the job would stop with before any process
group exists: the pure settings checks, the pre-flight (files, places, packages) and the process
layout. Prints `switchyard: error: ...` (exit 2) or what it checked (exit 0; `--quiet`: nothing).
The launchers call it before starting torchrun, so that a bad setting stops with that one line
instead of N failing workers and torchrun's failure report.
"""

from __future__ import annotations

import sys

from train.cli import compose_job, run_tool, tool_parser, wants_help
from train.config import JobConfig, process_layout
from train.preflight import preflight


def check_job(job: JobConfig, world_size: int = 1) -> None:
    """Everything checked before the first process group: settings, places, process layout."""
    preflight(job)
    process_layout(job, world_size)


def checked_summary(job: JobConfig, world_size: int, overrides: list[str]) -> str:
    """What a successful check covered, in one line."""
    data = job.data.corpus
    if job.data.corpus == "files":
        data += f" ({len(job.data.paths)} file(s) found and readable)"
    return (
        f"switchyard: ok: {len(overrides)} override(s) composed with conf/; every setting of the schema checked "
        f"against its allowed values; layout: {world_size} process(es), "
        + (f"parallel.pp={job.parallel.pp} x " if job.parallel.pp > 1 else "")
        + f"parallel.ep={job.parallel.ep} dividing "
        f"them and moe.num_experts={job.moe.num_experts}; data: {data}; writable: run directory {job.run_dir}, "
        f"its checkpoints/ and data.cache_dir {job.data.cache_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    from train.help import job_settings_epilog

    argv = sys.argv[1:] if argv is None else argv
    parser = tool_parser("python -m train.check", __doc__, epilog=job_settings_epilog() if wants_help(argv) else None)
    parser.add_argument("--nproc", type=int, default=1, help="number of processes the job will have (world size)")
    parser.add_argument("--quiet", action="store_true", help="print nothing when all is well (the launchers' use)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m train (listed below)")
    args = parser.parse_args(argv)

    def check() -> None:
        job = compose_job(args.overrides)
        check_job(job, args.nproc)
        if not args.quiet:
            print(checked_summary(job, args.nproc, args.overrides))

    return run_tool(check)


if __name__ == "__main__":
    sys.exit(main())
