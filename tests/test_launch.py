"""Multi-node launch on one machine: two torchrun "nodes" meeting over c10d give the single-process
loss curve; the SLURM script outside an allocation names what is missing. (The SLURM script under
real SLURM: tests/test_slurm.py.)"""

import os
import subprocess
import sys

from tests.jobs import REPO, TINY, job_env, read_metrics, run_job, train_losses
from tests.ranks import free_port

STEPS = [*TINY, "train.steps=4", "train.eval_interval=4", "train.ckpt_interval=4", "parallel.ep=2"]


def single_process_losses(tmp_path, data_cache, num_ranks: int = 2):
    """The loss curve of STEPS on `num_ranks` ranks, from one process accumulating their micro-batches."""
    done = run_job(tmp_path, data_cache, *STEPS, "run_name=single", "parallel.ep=1", f"train.grad_accum={num_ranks}")
    assert done.returncode == 0, done.stderr[-3000:]
    return train_losses(read_metrics(tmp_path, "single"))


def assert_same_curve(got: dict[int, float], expected: dict[int, float]) -> None:
    """Same steps, same losses up to fp32 reduction order."""
    assert got.keys() == expected.keys()
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got, expected)


def test_two_torchrun_nodes_train_like_one_process(tmp_path, data_cache):
    expected = single_process_losses(tmp_path, data_cache)
    rendezvous = [f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_backend=c10d", "--rdzv_id=two-nodes"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        *rendezvous,
        "-m",
        "train",
        *STEPS,
        "run_name=nodes",
    ]
    nodes = [
        subprocess.Popen(
            command, cwd=tmp_path, env=job_env(data_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    assert_same_curve(train_losses(read_metrics(tmp_path, "nodes")), expected)


def test_slurm_script_names_the_missing_variable(tmp_path, data_cache):
    env = {k: v for k, v in job_env(data_cache).items() if k not in ("SLURM_NNODES", "SLURM_JOB_NODELIST")}
    env["SLURM_JOB_ID"] = "1"
    done = subprocess.run(
        ["bash", str(REPO / "launch/slurm.sbatch")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "SLURM_NNODES is not set" in done.stderr


def _recording_program(path, log):
    """An executable that appends its name and arguments to `log` and succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "{path.name} $*" >> "{log}"\n')
    path.chmod(0o755)


def _launch_checkout(tmp_path):
    """A checkout with the two launchers and a .venv whose python only records how it was called."""
    import shutil

    checkout = tmp_path / "checkout"
    (checkout / "launch").mkdir(parents=True)
    for script in ("torchrun.sh", "slurm.sbatch"):
        shutil.copy(REPO / "launch" / script, checkout / "launch" / script)
    log = tmp_path / "calls.log"
    _recording_program(checkout / ".venv/bin/python", log)
    bare = tmp_path / "bare-path"  # a PATH with bash and coreutils, no python, and srun/scontrol stand-ins
    bare.mkdir()
    for tool in ("bash", "dirname", "cat", "env"):
        (bare / tool).symlink_to(
            subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        )
    _recording_program(bare / "srun", log)
    (bare / "scontrol").write_text("#!/bin/sh\necho n1\necho n2\n")
    (bare / "scontrol").chmod(0o755)
    return checkout, log, str(bare)


def test_launchers_use_the_checkouts_venv_whatever_path_holds(tmp_path):
    checkout, log, bare = _launch_checkout(tmp_path)
    env = {"PATH": bare, "HOME": str(tmp_path)}
    done = subprocess.run(
        [f"{bare}/bash", "launch/torchrun.sh", "2", "model=tiny"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    venv = checkout / ".venv/bin/python"
    assert log.read_text().splitlines() == [
        "python -m train.check --quiet --nproc 2 -- model=tiny",
        "python -m torch.distributed.run --standalone --nproc_per_node=2 -m train model=tiny",
    ]
    # sbatch runs a copy of the script from its spool folder: the checkout is the submit directory.
    log.unlink()
    slurm = {
        **env,
        "SLURM_JOB_ID": "7",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_SUBMIT_DIR": str(checkout),
        "SWITCHYARD_PROCS_PER_NODE": "1",
    }
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "slurm_script").write_text((checkout / "launch/slurm.sbatch").read_text())
    done = subprocess.run(
        [f"{bare}/bash", str(spool / "slurm_script"), "model=tiny"],
        cwd=checkout,
        env=slurm,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "python -m train.check --quiet --nproc 2 -- model=tiny"
    assert calls[1].startswith(f"srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=1 {venv} -m train.torchrun")
    # SWITCHYARD_PYTHON wins over the checkout's .venv
    log.unlink()
    _recording_program(tmp_path / "mine/python3.12", log)
    done = subprocess.run(
        [f"{bare}/bash", "launch/torchrun.sh", "1"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "SWITCHYARD_PYTHON": str(tmp_path / "mine/python3.12")},
    )
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["python3.12", "python3.12"]


def test_slurm_torchrun_ends_in_one_line_with_the_workers_code(tmp_path):
    """train/torchrun.py (the SLURM script's torchrun): a stopping signal and a failed worker
    are one line each, no traceback; a worker's exit code (75: preempted) is torchrun's."""
    import signal
    import time

    quiet = [sys.executable, "-m", "train.torchrun", "--standalone", "--nproc_per_node=1"]
    (tmp_path / "exit75.py").write_text("import sys\nsys.exit(75)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*quiet, str(tmp_path / "exit75.py")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 75, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "worker rank 0 exited with code 75" in done.stderr, done.stderr

    (tmp_path / "sleep.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen(
        [*quiet, str(tmp_path / "sleep.py")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "up"  # the worker runs: torchrun is past its start-up
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "switchyard: torchrun stopped by SIGTERM" in err, err
