"""A real two-node SLURM cluster on this one machine, for the tests.

munged, slurmctld and two slurmd (nodes n1 and n2, both 127.0.0.1) run in the foreground as our
children, configured, logged and kept in one temporary folder, on free ports and with their own
munge socket, so they never meet a system SLURM or a cluster left over by another test session.
Needs root and Debian's slurmd slurmctld slurm-client munge (SLURM 22.05): `make setup-slurm`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.ranks import free_port

NODES = ("n1", "n2")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
ENABLE = (
    "run `make setup-slurm` (or `make setup`) as root: "
    "it installs slurmd slurmctld slurm-client munge and maps n1 n2 to 127.0.0.1"
)
# Daemons live in sbin, which is not on every PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

SLURM_CONF = """\
ClusterName=switchyard-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# The nodes are what this file says (1 CPU, 10000 MB), whatever the machine has: no node is
# drained for "low memory" on a smaller CI machine, and the tests' refusals do not depend on it.
SlurmdParameters=config_overrides
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd-%n.log
SlurmctldPidFile={folder}/run/slurmctld.pid
SlurmdPidFile={folder}/run/slurmd-%n.pid
{node_lines}
PartitionName=test Nodes={nodes} Default=YES MaxTime=INFINITE State=UP
"""


def which(command: str) -> str | None:
    return shutil.which(command, path=SEARCH_PATH)


def unavailable_reason() -> str | None:
    """Why this machine cannot run the test cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the SLURM test cluster runs its daemons as root: run the tests as root after `make setup-slurm`"
    missing = [c for c in COMMANDS if which(c) is None]
    if missing:
        return f"SLURM is not installed (no {', '.join(missing)}): {ENABLE}"
    for node in NODES:
        try:
            address = socket.gethostbyname(node)
        except OSError:
            return f"the test node name {node} does not resolve: {ENABLE}"
        if address != "127.0.0.1":
            return f"the test node name {node} resolves to {address}, not 127.0.0.1: {ENABLE}"
    return None


def run(
    *command: str, env: dict, cwd: Path | None = None, timeout: float = 30, check: bool = True
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [which(command[0]) or command[0], *command[1:]],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


class SlurmCluster:
    """Start with `running_cluster(folder)`; submit with `sbatch`, watch with `job_state` / `wait_for`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.daemons: dict[str, subprocess.Popen] = {}

    def env(self, base: dict | None = None, **extra: str) -> dict:
        """An environment whose SLURM commands talk to this cluster (and to no enclosing allocation)."""
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith("SLURM_")}
        return {
            **env,
            "SLURM_CONF": str(self.conf),
            "PATH": os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"]),
            **extra,
        }

    # -- life cycle --------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        munge = self.folder / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)  # private to the user munged runs as (root here, so root owns it)
        # --force: the socket's folder is a private temporary one, which munged would otherwise refuse.
        self._spawn(
            "munged",
            "munged",
            "-F",
            "--force",
            f"--key-file={key}",
            f"--socket={munge / 'munge.socket'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
        )
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged did not create its socket")
        ports = {node: free_port() for node in NODES}
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={port} "
            "CPUs=1 RealMemory=10000"
            for node, port in ports.items()
        )
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname(),
                ctld_port=free_port(),
                munge_socket=munge / "munge.socket",
                folder=self.folder,
                node_lines=node_lines,
                nodes=",".join(NODES),
            )
        )
        self._spawn("slurmctld", "slurmctld", "-D", "-c", "-f", str(self.conf))
        for node in NODES:
            self._spawn(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(self.conf))
        self._wait(self._all_idle, timeout, "the nodes did not become idle (sinfo -N)")

    def stop(self) -> None:
        """Cancel what still runs, then end every daemon we started, by pid (TERM, then KILL)."""
        with contextlib.suppress(Exception):
            if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
                job_ids = run("squeue", "-h", "-o", "%A", env=self.env()).stdout.split()
                if job_ids:
                    run("scancel", *job_ids, env=self.env(), check=False)
                    self._wait(lambda: not run("squeue", "-h", "-o", "%A", env=self.env()).stdout.split(), 30, "")
        for name in reversed(list(self.daemons)):  # slurmds, slurmctld, then munged
            process = self.daemons[name]
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(timeout=15)

    def _spawn(self, name: str, *command: str) -> None:
        log = open(self.folder / "log" / f"{name}.out", "w")
        self.daemons[name] = subprocess.Popen(
            [which(command[0]), *command[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
        )
        log.close()

    def _all_idle(self) -> bool:
        states = run("sinfo", "-N", "-h", "-o", "%N %t", env=self.env(), check=False).stdout.split("\n")
        return sorted(line.strip() for line in states if line.strip()) == [f"{node} idle" for node in NODES]

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [name for name, p in self.daemons.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"SLURM test cluster: {', '.join(dead)} exited\n{self.logs()}")
            time.sleep(0.2)
        if what:
            raise RuntimeError(f"SLURM test cluster: {what} within {timeout:.0f} s\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon's log, for failure messages."""
        parts = []
        for path in sorted((self.folder / "log").glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- jobs --------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict, cwd: Path) -> str:
        done = run("sbatch", "--parsable", *args, env=env, cwd=cwd, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = run("scontrol", "show", "job", "-o", job_id, env=self.env(), check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def job_state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_for(self, job_id: str, states: set[str] = FINISHED, timeout: float = 300) -> str:
        """Waits until the job is in one of `states`; a finished job also until its processes are
        gone (squeue no longer lists it), so that what it wrote can be read."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states and (state not in FINISHED or not self.listed(job_id)):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout:.0f} s (waiting for {sorted(states)})\n{self.logs()}"
                )
            time.sleep(0.3)

    def listed(self, job_id: str) -> bool:
        """Whether squeue still lists the job (pending, running or completing)."""
        return bool(run("squeue", "-h", "-j", job_id, "-o", "%T", env=self.env(), check=False).stdout.strip())


@contextlib.contextmanager
def running_cluster(folder: Path):
    cluster = SlurmCluster(folder)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
