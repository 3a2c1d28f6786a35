"""The run folder belongs to one job and changes only once a job passed every check: a refused
start rewrites nothing (the tools still read the settings the run trained with); a second job on a
folder in use stops with one line naming the holder; a lock left by a dead job is taken over."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.jobs import TINY, job_env, run_job
from train.run_lock import LOCK, RunLock, this_holder, why_stale

SHORT = [*TINY, "train.steps=2", "train.eval_interval=2", "train.ckpt_interval=2"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its bytes and its modification time."""
    return {
        str(p.relative_to(folder)): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_refused_start_changes_nothing_in_the_run_folder(tmp_path, data_cache):
    done = run_job(tmp_path, data_cache, *SHORT, "run_name=r")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "outputs/r"
    assert "top_k: 2" in (run / ".hydra/config.yaml").read_text()
    before = snapshot(run)
    for refused in (["moe.top_k=9"], ["moe.top_k=9", "train.resume=true"], ["model.n_layers=3", "train.resume=true"]):
        done = run_job(tmp_path, data_cache, *SHORT, "run_name=r", *refused)
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("switchyard: error: "), done.stderr
        assert snapshot(run) == before, refused
    assert not (run / LOCK).exists()
    # The tools read the settings the run trained with.
    command = [sys.executable, "-m", "train.generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "5"]
    generate = subprocess.run(command, env=job_env(data_cache), capture_output=True, text=True, timeout=300)
    assert generate.returncode == 0, generate.stderr[-3000:]
    assert generate.stdout.startswith("ROMEO:")
    export = subprocess.run(
        [sys.executable, "-m", "train.export_hf", str(run), str(tmp_path / "hf")],
        env=job_env(data_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert json.loads((tmp_path / "hf/config.json").read_text())["num_experts_per_tok"] == 2


def test_a_second_job_on_a_folder_in_use_stops_with_one_line(tmp_path, data_cache):
    run = tmp_path / "outputs/busy"
    holder = RunLock(run)
    assert holder.acquire() is None  # this test process stands for a job that is alive
    try:
        done = run_job(tmp_path, data_cache, *SHORT, "run_name=busy")
        assert done.returncode == 2
        line = done.stderr.strip()
        assert "\n" not in line and line.startswith("switchyard: error: "), done.stderr
        holder_words = f"(pid {os.getpid()} on {socket.gethostname()}, started "
        assert f"outputs/busy is in use by another job {holder_words}" in line, line
        assert not (run / "checkpoints").exists() and not (run / ".hydra").exists()
    finally:
        holder.release()
    assert not (run / LOCK).exists()


def test_a_lock_left_by_a_dead_job_is_taken_over(tmp_path, data_cache):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = tmp_path / "outputs/orphan"
    run.mkdir(parents=True)
    (run / LOCK).write_text(json.dumps({**this_holder(), "pid": int(dead.stdout)}))
    done = run_job(tmp_path, data_cache, *SHORT, "run_name=orphan")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "took over" in done.stdout and "its process no longer runs" in done.stdout, done.stdout
    assert not (run / LOCK).exists()  # released at the end


def test_stale_locks_are_recognised():
    me = {"host": "a", "pid": os.getpid(), "slurm_job_id": "7", "slurm_restart": 1, "started": ""}
    alive_here = {**me, "slurm_restart": 1}
    assert why_stale(alive_here, 0.0, me) is None
    assert why_stale({**me, "host": "b"}, 10.0, me) is None  # another host: alive until its heartbeat stops
    assert "not been refreshed" in why_stale({**me, "host": "b"}, 1e6, me)
    assert "earlier attempt" in why_stale({**me, "host": "b", "slurm_restart": 0}, 10.0, me)
    assert "damaged" in why_stale(None, 0.0, me)
