"""Stopping on a signal (train/preemption.py): every rank stops after the same step with a
checkpoint and one line, exits 75, and torchrun's restart (or a resubmission) continues exactly
as the uninterrupted run; Ctrl-C prints no traceback; a second signal exits at once.
(Under real SLURM: tests/test_slurm.py.)"""

import os
import re
import signal
import subprocess
import sys
import time

import psutil

from tests.jobs import REPO, TINY, job_command, job_env, read_metrics, run_job, train_losses
from tests.test_checkpoint_resilience import EXACT
from train.__main__ import EXIT_PEER_FAILED
from train.preemption import EXIT_PREEMPTED

LONG = [*TINY, *EXACT, "train.steps=40", "train.ckpt_interval=100"]  # no periodic checkpoint before the end


def wait_for_steps(workdir, run_name: str, steps: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = workdir / "outputs" / run_name / "metrics.jsonl"
    while not (path.exists() and sum('"train/loss"' in line for line in path.read_text().split("\n")[:-1]) >= steps):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.2)


def workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "train" in " ".join(p.cmdline())]


def test_sigterm_on_every_rank_saves_and_torchrun_restart_continues_exactly(tmp_path, data_cache):
    common = [*LONG, "parallel.ep=2"]
    reference = run_job(tmp_path, data_cache, *common, "run_name=reference", nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    launcher = subprocess.Popen(
        job_command(*common, "run_name=stopped", nproc=2, max_restarts=1),
        cwd=tmp_path,
        env=job_env(data_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(tmp_path, "stopped", 6, launcher)
    for worker in workers(launcher):  # as a scheduler does: every process of the job gets the signal
        worker.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-3000:]
    log = out + err
    (stopped_at,) = [int(n) for n in re.findall(r"preempted at step (\d+), checkpoint saved", log)]
    assert 6 <= stopped_at < 40
    # torchrun took exit 75 for "run me again": it restarted the workers, which resumed by themselves.
    assert f"switchyard: resumed from step {stopped_at} (exact)" in log  # no step lost
    assert "Traceback" not in log.split("preempted at step")[0]  # no worker traceback before the stop
    assert train_losses(read_metrics(tmp_path, "stopped")) == train_losses(read_metrics(tmp_path, "reference"))


def test_ctrl_c_saves_without_a_traceback_and_a_resubmission_finishes_the_run(tmp_path, data_cache):
    job = subprocess.Popen(
        job_command(*LONG, "run_name=ctrl_c"),
        cwd=tmp_path,
        env=job_env(data_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(tmp_path, "ctrl_c", 4, job)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=300)
    assert job.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    (stopped_at,) = [int(n) for n in re.findall(r"preempted at step (\d+), checkpoint saved", out + err)]
    assert (tmp_path / f"outputs/ctrl_c/checkpoints/step_{stopped_at:06d}/meta.json").is_file()
    assert not (tmp_path / "outputs/ctrl_c/job.lock").exists()
    again = run_job(tmp_path, data_cache, *LONG, "run_name=ctrl_c", "train.resume=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {stopped_at} (exact)" in again.stdout
    whole = run_job(tmp_path, data_cache, *LONG, "run_name=whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert train_losses(read_metrics(tmp_path, "ctrl_c")) == train_losses(read_metrics(tmp_path, "whole"))


SECOND_SIGNAL = """
import os, signal, time
from train import preemption
preemption.install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # a launcher forwarding the same signal: the same request
assert preemption.requested() and preemption.signal_name() == "SIGTERM"
print("still running", flush=True)
time.sleep(preemption.REPEAT_WINDOW_S + 0.5)
os.kill(os.getpid(), signal.SIGINT)  # a second request: exit at once
time.sleep(5)
print("not reached")
"""


def test_a_second_signal_exits_at_once():
    done = subprocess.run(
        [sys.executable, "-c", SECOND_SIGNAL],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 128 + signal.SIGINT, done.stderr
    assert done.stdout == "still running\n"
    assert done.stderr == "switchyard: (rank 0) second signal (SIGINT): exiting now without saving\n"


def test_a_dead_rank_leaves_one_line_per_surviving_rank(tmp_path, data_cache):
    launcher = subprocess.Popen(
        job_command(*TINY, "train.steps=400", "run_name=dead", nproc=3),
        cwd=tmp_path,
        env=job_env(data_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(tmp_path, "dead", 3, launcher)
    victim = sorted(workers(launcher), key=lambda p: p.pid)[-1]
    victim.kill()
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    log = out + err
    lines = [line for line in log.splitlines() if line.startswith("switchyard: (rank")]
    assert 1 <= len(lines) <= 2, log[-3000:]  # at most one per surviving rank
    for line in lines:
        assert re.fullmatch(
            r"switchyard: \(rank [0-2]\) stopped: another rank failed \(.+\); the first failure is the "
            r"root cause torchrun names",
            line,
        ), line
    assert "pair.cc" not in log and "train/loop.py" not in log, log[-3000:]  # no gloo tracebacks from the survivors
    assert re.search(rf"exitcode\s*:\s*{EXIT_PEER_FAILED}", log), log[-3000:]  # the survivors' exit code says why
