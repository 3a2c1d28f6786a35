"""Hydra's submitit SLURM launcher, with a submission SLURM refuses said in one line.

`conf/hydra/launcher/slurm.yaml` selects `SwitchyardSlurmLauncher`. When sbatch refuses the sweep's
jobs (more memory than a node has, an unknown partition, GPUs the nodes lack), submitit raises
with sbatch's stderr under a long traceback; this prints instead, and exits 2:

    switchyard: error: hydra.launcher.mem_gb=64: SLURM refused the job: Memory specification can not be satisfied; ...

Hydra imports every module under `hydra_plugins` at start-up: keep this one light (submitit is
imported only when a sweep is launched).
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
from typing import Any, Sequence

from hydra.core.utils import JobReturn

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

# Words of sbatch's refusal -> the launcher setting (hydra.launcher.*) that asked for it.
CULPRITS = (
    ("memory specification", "mem_gb"),
    ("partition", "partition"),
    ("generic resource", "gpus_per_node"),
    ("node count", "nodes"),
    ("time limit", "timeout_min"),
)
# What a refusal names when sbatch's words point at no one setting.
REQUEST = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "partition")


def refusal_line(sbatch_stderr: str, params: dict[str, Any]) -> str:
    """One line: the setting SLURM refused (or the whole request) and sbatch's own reason."""
    reason = "; ".join(
        line.strip().removeprefix("sbatch: error: ") for line in sbatch_stderr.splitlines() if line.strip()
    )
    lowered = reason.lower()
    for words, key in CULPRITS:
        if words in lowered and key in params:
            return f"hydra.launcher.{key}={params[key]}: SLURM refused the job: {reason}"
    request = " ".join(f"{key}={params.get(key)}" for key in REQUEST)
    return f"hydra.launcher ({request}): SLURM refused the job: {reason}"


def sbatch_refusal(err: BaseException) -> str | None:
    """sbatch's stderr when `err` is submitit reporting a failed sbatch call, else None."""
    cause = err.__cause__
    if isinstance(cause, subprocess.CalledProcessError) and cause.cmd and str(cause.cmd[0]).endswith("sbatch"):
        return cause.stderr or str(err)
    return None


class OnceFilter(logging.Filter):
    """Lets the first record holding `words` through and drops its repeats. submitit warns that job
    states "may be inaccurate" at every sacct call that fails (several per sweep on a cluster
    without accounting); once says it all."""

    def __init__(self, words: str):
        super().__init__()
        self.words, self.seen = words, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.words not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg, record.args = f"{record.getMessage()} (said once; submitit still collects every job's result)", ()
        return True


def say_sacct_failures_once(logger: logging.Logger) -> None:
    if not any(isinstance(f, OnceFilter) for f in logger.filters):
        logger.addFilter(OnceFilter("status may be inaccurate"))


class SwitchyardSlurmLauncher(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from submitit.core.logger import get_logger
        from submitit.core.utils import FailedJobError

        say_sacct_failures_once(get_logger())

        # submitit echoes a failed sbatch's stderr before raising: held back, and replayed unless
        # the one line below says it.
        held, refused = io.StringIO(), None
        try:
            with contextlib.redirect_stderr(held):
                return super().launch(job_overrides, initial_job_idx)
        except FailedJobError as err:
            refused = sbatch_refusal(err)
            if refused is None:
                raise
        finally:
            if refused is None:
                sys.stderr.write(held.getvalue())
        print(f"switchyard: error: {refusal_line(refused, self.params)}", file=sys.stderr)
        sys.exit(2)
