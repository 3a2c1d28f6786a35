"""Multi-node launch on one machine: two torchrun "nodes" meeting over c10d give the single-process
loss curve; the SLURM script outside an allocation names what is missing. (The SLURM script under
real SLURM: tests/test_slurm.py.)"""

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
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", *rendezvous, "-m", "train", *STEPS, "run_name=nodes"]
    nodes = [subprocess.Popen(command, cwd=tmp_path, env=job_env(data_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    assert_same_curve(train_losses(read_metrics(tmp_path, "nodes")), expected)


def test_slurm_script_names_the_missing_variable(tmp_path, data_cache):
    env = {k: v for k, v in job_env(data_cache).items() if k not in ("SLURM_NNODES", "SLURM_JOB_NODELIST")}
    env["SLURM_JOB_ID"] = "1"
    done = subprocess.run(["bash", str(REPO / "launch/slurm.sbatch")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "SLURM_NNODES is not set" in done.stderr
