"""One job per run folder: `<run_dir>/job.lock`, taken by rank 0 before the job reads or moves
anything in the folder, released when the job ends.

The lock holds who owns the folder (host, pid, SLURM job id and restart count, start time). A
second job finds it and stops at start-up with one line naming the holder. A lock whose holder is
gone is taken over, with a line saying so:
- same host and its pid no longer runs (a killed job, a torchrun restart's earlier worker);
- the same SLURM job, an earlier attempt (SLURM ended it before requeueing the job);
- no heartbeat for STALE_AFTER_S: the holder touches the file every HEARTBEAT_S from a thread, so a
  holder on another host that died without releasing (node failure) is recognised too.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK = "job.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


def this_holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


def why_stale(holder: dict | None, age_s: float, me: dict) -> str | None:
    """Why the holder of a lock is known to be gone (None: it may be alive)."""
    if holder is None:
        return "the lock file is damaged"
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return "its process no longer runs"
    if (
        holder.get("slurm_job_id")
        and holder.get("slurm_job_id") == me["slurm_job_id"]
        and holder.get("slurm_restart") != me["slurm_restart"]
    ):
        return "it was an earlier attempt of this SLURM job"
    if age_s > STALE_AFTER_S:
        return f"it has not been refreshed for {age_s:.0f} s"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """Taken with `acquire()` (raises ValueError naming the holder), released with `release()`."""

    def __init__(self, run_dir: Path | str):
        self.path = Path(run_dir) / LOCK
        self.holder: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a line to print when a dead holder's lock was taken over."""
        me = this_holder()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(3):  # tried again after a dead holder's lock is removed
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age_s = self._read()
                if holder == {}:  # released in between: try again
                    continue
                reason = why_stale(holder, age_s, me)
                if reason is None:
                    raise ValueError(
                        f"{self.path.parent} is in use by another job ({describe(holder)}): "
                        f"wait for it to end, or use another run_name"
                    ) from None
                note = f"switchyard: took over {self.path} from a job that is gone ({reason}: {describe(holder or {})})"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.holder = me
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return note
        raise ValueError(f"{self.path}: another job took the lock at the same moment: use another run_name")

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if self.holder is None:
            return
        self._stop.set()
        holder, _ = self._read()
        if holder is not None and holder.get("pid") == self.holder["pid"] and holder.get("host") == self.holder["host"]:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def _read(self) -> tuple[dict | None, float]:
        try:
            age_s = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}, 0.0
        except (OSError, ValueError):
            return None, 0.0
        return (holder if isinstance(holder, dict) else None), age_s

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return
