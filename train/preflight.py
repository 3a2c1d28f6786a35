"""The pre-flight: what the settings need of this machine, checked once before any process group
or heavy work, after the pure `JobConfig.validate()`. Shared by every entry point that takes a
job (`python -m train`, `python -m train.check`, `python -m train.plan`):

- the files the job reads exist and fit (tokenizer file, data files, the `model.init_from` source);
- the places it writes to take new files (data cache, run directory, checkpoints);
- optional packages and devices a setting needs (`moe.backend=megablocks`).

Each problem is one `ValueError` naming the setting.
"""

from __future__ import annotations

import os
import tempfile

from train.config import JobConfig
from train.data.prepare import check_data_files


def preflight(job: JobConfig) -> None:
    """Validate `job` and check it against this machine: one ValueError for the first problem."""
    job.validate()
    check_data_files(job.data)
    from train.hf.init_from import check_init_from  # reads the source's config: only when it is set

    check_init_from(job)
    if job.moe.backend == "megablocks":
        check_megablocks_available()
    check_writable_places(job)


def check_writable_places(job: JobConfig) -> None:
    """The places the job writes to, checked before any data is prepared or process started."""
    require_writable_dir("data.cache_dir", job.data.cache_dir, "set data.cache_dir or $SWITCHYARD_CACHE")
    where = "set run_name, hydra.run.dir or (sweeps) hydra.sweep.dir"
    require_writable_dir("run directory", job.run_dir, where)
    require_writable_dir("checkpoint directory", os.path.join(job.run_dir, "checkpoints"), where)


def require_writable_dir(name: str, path: str, remedy: str) -> None:
    """`path` is a directory the job can create files in, or one it can create: the nearest existing
    folder on the way must be a directory that takes a new file (tried with an unnamed temporary
    file, which also meets ACLs, read-only mounts and root squash, where mode bits would not)."""
    target = os.path.abspath(os.path.expanduser(str(path)))
    existing = target
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    problem = None
    if not os.path.isdir(existing):
        problem = f"{existing} is not a directory"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            problem = f"cannot create a file in {existing} ({err.strerror})"
    if problem:
        raise ValueError(f"{name}: cannot write to {target}: {problem} ({remedy} to a writable place)")


def check_megablocks_available() -> None:
    """MegaBlocks' grouped GEMM needs a CUDA device and the megablocks and grouped_gemm packages."""
    from models.moe.megablocks_experts import megablocks_unavailable_reason

    reason = megablocks_unavailable_reason()
    if reason is not None:
        raise ValueError(
            f"moe.backend=megablocks needs CUDA and the megablocks package (make setup-gpu); {reason}: "
            "use moe.backend=torch"
        )
