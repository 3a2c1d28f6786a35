"""Under real SLURM: a two-node cluster on this machine (tests/slurm_cluster.py, one per session).
`launch/slurm.sbatch` on 2 nodes x 2 processes gives the single-process loss curve; the Hydra
submitit sweep runs its valid combinations and reports the bad one; a cancelled job resubmitted
with train.resume=true and a requeued job continue exactly; a submission SLURM refuses is one
line; a job stopped by SIGTERM (or by the lead-time USR1 the script asks for) saves the step it
reached and its requeue resumes from there, no step lost. Skipped, with the reason, where the
cluster cannot run (`make setup-slurm` as root)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_plugins.switchyard_launcher.slurm import refusal_line
from tests.jobs import REPO, TINY, job_env, read_metrics, run_job, train_losses
from tests.ranks import free_port
from tests.slurm_cluster import FINISHED, SlurmCluster, run
from tests.test_checkpoint_resilience import EXACT
from tests.test_launch import STEPS, assert_same_curve, single_process_losses

SBATCH = REPO / "launch/slurm.sbatch"
# The script asks for 8 GPUs and 32 CPUs per node; each test node has one CPU and no GPU.
TEST_NODES = ["--gpus-per-node=0", "--cpus-per-task=1"]
CKPT_INTERVAL = 10
# Interrupted after its first checkpoint, a job still has some 85 steps (seconds) to go: time for
# scancel or a requeue to land. EXACT makes the RNG and the router bias part of what a resume restores.
RESUMABLE = [*TINY, *EXACT, "train.steps=100", f"train.ckpt_interval={CKPT_INTERVAL}"]
SWEEP_ON_TEST_NODES = [
    "hydra/launcher=slurm",
    "hydra.launcher.tasks_per_node=1",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
]


@pytest.fixture(scope="module")
def python_on_path(tmp_path_factory) -> Path:
    """A folder holding only `python` (this interpreter), for the sbatch script's `python`. Not the
    interpreter's whole bin/: a venv's `ninja` (1.13) taking over from the system's (1.11) would
    make every switch between them rebuild DeepSpeed's JIT-compiled op (a minute of CPU)."""
    folder = tmp_path_factory.mktemp("python-on-path")
    (folder / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (folder / "python").chmod(0o755)
    return folder


def submit(
    cluster: SlurmCluster,
    python_on_path: Path,
    workdir: Path,
    data_cache: Path,
    *overrides: str,
    nodes: int = 1,
    procs_per_node: int = 1,
) -> str:
    """`sbatch launch/slurm.sbatch OVERRIDES` as the README says, sized for the test nodes."""
    env = cluster.env(
        job_env(data_cache), SWITCHYARD_PROCS_PER_NODE=str(procs_per_node), SWITCHYARD_RDZV_PORT=str(free_port())
    )
    env["PATH"] = os.pathsep.join([str(python_on_path), env["PATH"]])
    return cluster.sbatch(
        f"--nodes={nodes}",
        *TEST_NODES,
        f"--output={workdir}/slurm-%j.out",
        str(SBATCH),
        *overrides,
        env=env,
        cwd=workdir,
    )


def job_log(workdir: Path, job_id: str, whole: bool = False) -> str:
    """The job's output (its last 3000 characters unless `whole`)."""
    path = workdir / f"slurm-{job_id}.out"
    text = path.read_text(errors="replace") if path.exists() else "(no job log)"
    return text if whole else text[-3000:]


def assert_completed(cluster: SlurmCluster, workdir: Path, job_id: str) -> None:
    state = cluster.wait_for(job_id)
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{job_log(workdir, job_id)}\n{cluster.logs()}"


def logged_steps(workdir: Path, run_name: str) -> int:
    """Training steps in metrics.jsonl so far (complete lines only: the job is still writing)."""
    path = workdir / "outputs" / run_name / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return sum('"train/loss"' in line for line in lines)


def wait_past_a_checkpoint(
    cluster: SlurmCluster, workdir: Path, job_id: str, run_name: str, timeout: float = 300
) -> None:
    """Until the running job has a checkpoint and has trained beyond it."""
    latest = workdir / "outputs" / run_name / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while not (latest.exists() and logged_steps(workdir, run_name) >= CKPT_INTERVAL + 3):
        state = cluster.job_state(job_id)
        assert state not in FINISHED, (
            f"job {job_id} ended {state} before it could be interrupted:\n{job_log(workdir, job_id)}"
        )
        assert time.monotonic() < deadline, (
            f"job {job_id} made no checkpoint in {timeout} s:\n{job_log(workdir, job_id)}"
        )
        time.sleep(0.2)


def assert_resumed_from_a_checkpoint(workdir: Path, run_name: str, log: str) -> None:
    """One resume, exactly (same layout), said in the job's log, from the step the job stopped at:
    SLURM's SIGTERM (scancel, requeue) makes it save the step it reached (train/preemption.py),
    so no step is lost; a fresh start would have set the earlier checkpoints aside."""
    resumed = [int(m) for m in re.findall(r"switchyard: resumed from step (\d+) \(exact\)", log)]
    assert len(resumed) == 1 and resumed[0] > CKPT_INTERVAL, (resumed, log[-3000:])
    assert not list((workdir / "outputs" / run_name).glob("checkpoints.prev-*"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache) -> dict[int, float]:
    """RESUMABLE's loss curve, run in one go without SLURM."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    done = run_job(workdir, data_cache, *RESUMABLE, "run_name=whole")
    assert done.returncode == 0, done.stderr[-3000:]
    return train_losses(read_metrics(workdir, "whole"))


def test_sbatch_on_two_nodes_with_two_processes_each_trains_like_one_process(
    slurm_cluster, python_on_path, tmp_path, data_cache
):
    job_id = submit(
        slurm_cluster, python_on_path, tmp_path, data_cache, *STEPS, "run_name=slurm", nodes=2, procs_per_node=2
    )
    assert_completed(slurm_cluster, tmp_path, job_id)
    assert "4 process(es), ep=2" in job_log(tmp_path, job_id)
    assert slurm_cluster.job(job_id)["NodeList"] == "n[1-2]"
    assert_same_curve(
        train_losses(read_metrics(tmp_path, "slurm")), single_process_losses(tmp_path, data_cache, num_ranks=4)
    )


def test_scancel_then_resubmit_with_resume_continues_exactly(
    slurm_cluster, python_on_path, tmp_path, data_cache, uninterrupted
):
    first = submit(slurm_cluster, python_on_path, tmp_path, data_cache, *RESUMABLE, "run_name=cancelled")
    wait_past_a_checkpoint(slurm_cluster, tmp_path, first, "cancelled")
    run("scancel", first, env=slurm_cluster.env())
    assert slurm_cluster.wait_for(first) == "CANCELLED"
    second = submit(
        slurm_cluster, python_on_path, tmp_path, data_cache, *RESUMABLE, "run_name=cancelled", "train.resume=true"
    )
    assert_completed(slurm_cluster, tmp_path, second)
    assert_resumed_from_a_checkpoint(tmp_path, "cancelled", job_log(tmp_path, second, whole=True))
    stopped_at = stopped_step(job_log(tmp_path, first, whole=True))  # SIGTERM from scancel: the step reached was saved
    assert f"resumed from step {stopped_at} (exact)" in job_log(tmp_path, second, whole=True)
    assert train_losses(read_metrics(tmp_path, "cancelled")) == uninterrupted


def test_requeued_job_resumes_by_itself(slurm_cluster, python_on_path, tmp_path, data_cache, uninterrupted):
    job_id = submit(slurm_cluster, python_on_path, tmp_path, data_cache, *RESUMABLE, "run_name=requeued")
    wait_past_a_checkpoint(slurm_cluster, tmp_path, job_id, "requeued")
    run("scontrol", "requeue", job_id, env=slurm_cluster.env())
    # SLURM 22.05 holds a requeued job back for two minutes (its BeginTime): let it go at once.
    if slurm_cluster.wait_for(job_id, {"PENDING", "RUNNING"}) == "PENDING":
        run("scontrol", "update", f"JobId={job_id}", "StartTime=now", env=slurm_cluster.env())
    assert_completed(slurm_cluster, tmp_path, job_id)
    assert slurm_cluster.job(job_id)["Restarts"] == "1"
    assert "DUE TO JOB REQUEUE" in job_log(tmp_path, job_id, whole=True)  # one log, both attempts (--open-mode=append)
    assert_resumed_from_a_checkpoint(tmp_path, "requeued", job_log(tmp_path, job_id, whole=True))
    assert train_losses(read_metrics(tmp_path, "requeued")) == uninterrupted


def stopped_step(log: str) -> int:
    """The step the job stopped after on a signal, from its one line (train/preemption.py)."""
    (step,) = [int(n) for n in re.findall(r"preempted at step (\d+), checkpoint saved", log)]
    return step


def release_requeued(cluster: SlurmCluster, job_id: str, avoid_node: str | None = None, timeout: float = 120) -> None:
    """Waits until the job was requeued, then lets it start at once (SLURM 22.05 holds it back).
    `avoid_node`: a job requeued as it ends must start on the other node: the node it ended on
    still holds its revoked credential for a while ("Job credential revoked"), which SLURM's own
    hold on requeued jobs outlasts."""
    deadline = time.monotonic() + timeout
    while cluster.job(job_id).get("Restarts") != "1":
        assert time.monotonic() < deadline, f"job {job_id} was not requeued: {cluster.job(job_id)}"
        time.sleep(0.3)
    if cluster.wait_for(job_id, {"PENDING", "RUNNING"}) == "PENDING":
        other = [f"ExcNodeList={avoid_node}"] if avoid_node else []
        run("scontrol", "update", f"JobId={job_id}", "StartTime=now", *other, env=cluster.env())


def assert_continued_from(workdir: Path, run_name: str, log: str, step: int, uninterrupted: dict[int, float]) -> None:
    """The requeued attempt resumed from the step the signal stopped at: no step lost, and the
    whole curve is the uninterrupted run's."""
    assert (workdir / "outputs" / run_name / "checkpoints/latest").read_text() == "step_000100"
    assert re.findall(r"switchyard: resumed from step (\d+) \(exact\)", log) == [str(step)], log[-3000:]
    assert train_losses(read_metrics(workdir, run_name)) == uninterrupted


def test_sigterm_saves_the_step_and_a_requeue_resumes_with_no_step_lost(
    slurm_cluster, python_on_path, tmp_path, data_cache, uninterrupted
):
    job_id = submit(slurm_cluster, python_on_path, tmp_path, data_cache, *RESUMABLE, "run_name=term")
    wait_past_a_checkpoint(slurm_cluster, tmp_path, job_id, "term")
    run("scancel", "--signal=TERM", job_id, env=slurm_cluster.env())  # every process of the job's step
    slurm_cluster.wait_for(job_id)
    node = slurm_cluster.job(job_id)["NodeList"]
    step = stopped_step(job_log(tmp_path, job_id, whole=True))
    assert step > CKPT_INTERVAL, job_log(tmp_path, job_id)
    assert (tmp_path / "outputs/term/checkpoints/latest").read_text() == f"step_{step:06d}"
    run("scontrol", "requeue", job_id, env=slurm_cluster.env())
    release_requeued(slurm_cluster, job_id, avoid_node=node)
    assert_completed(slurm_cluster, tmp_path, job_id)
    assert_continued_from(tmp_path, "term", job_log(tmp_path, job_id, whole=True), step, uninterrupted)


def test_lead_time_signal_saves_and_the_job_requeues_itself(
    slurm_cluster, python_on_path, tmp_path, data_cache, uninterrupted
):
    job_id = submit(slurm_cluster, python_on_path, tmp_path, data_cache, *RESUMABLE, "run_name=lead")
    wait_past_a_checkpoint(slurm_cluster, tmp_path, job_id, "lead")
    node = slurm_cluster.job(job_id)["NodeList"]
    # What `#SBATCH --signal=B:USR1@120` does before the time limit: USR1 to the batch script.
    run("scancel", "--batch", "--signal=USR1", job_id, env=slurm_cluster.env())
    release_requeued(slurm_cluster, job_id, avoid_node=node)
    assert_completed(slurm_cluster, tmp_path, job_id)
    log = job_log(tmp_path, job_id, whole=True)
    assert "launch/slurm.sbatch: requeueing job" in log, log[-3000:]
    assert_continued_from(tmp_path, "lead", log, stopped_step(log), uninterrupted)


def test_submitit_sweep_runs_the_valid_combinations_and_reports_the_bad_one(slurm_cluster, tmp_path, data_cache):
    overrides = [o for o in TINY if not o.startswith("moe.num_experts")]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "-m",
            *SWEEP_ON_TEST_NODES,
            "hydra.launcher.mem_gb=4",
            "moe.num_experts=2,4",
            "moe.top_k=1,4",
            *overrides,
            "train.steps=2",
            "train.eval_interval=2",
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        env=slurm_cluster.env(job_env(data_cache)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0, done.stderr[-3000:]  # the sweep as a whole reports its failed job
    results = tmp_path / "sweep/sweep_results.jsonl"
    assert results.exists(), f"{done.stderr[-3000:]}\n{slurm_cluster.logs()}"
    rows = {tuple(r["overrides"][:2]): r for r in map(json.loads, results.read_text().splitlines())}
    assert len(rows) == 4
    bad = ("moe.num_experts=2", "moe.top_k=4")
    assert rows[bad]["status"] == "failed"
    assert rows[bad]["reason"] == "moe.top_k must be an integer between 1 and moe.num_experts (2); got 4"
    for key, row in rows.items():
        if key != bad:
            assert (
                row["status"] == "ok" and row["val/loss"] < 6 and row["perf/tokens_per_s"] > 0 and row["imbalance"] >= 1
            ), row
    table = (tmp_path / "sweep/sweep_summary.md").read_text()
    assert "| 1 | moe.num_experts=2 moe.top_k=4 |" in table and "failed: moe.top_k must be" in table
    # Each job ran as a task of one SLURM array job, and wrote its own run directory.
    assert len(list((tmp_path / "sweep/.submitit").glob("*_[0-3]/*_log.out"))) == 4
    assert all((tmp_path / f"sweep/{job}/metrics.jsonl").is_file() for job in (0, 2, 3))


def test_a_submission_slurm_refuses_is_one_line_naming_the_setting(slurm_cluster, tmp_path, data_cache):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "-m",
            *SWEEP_ON_TEST_NODES,
            "hydra.launcher.mem_gb=64",
            *TINY,
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        env=slurm_cluster.env(job_env(data_cache)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == (  # the nodes have 10000 MB
        "switchyard: error: hydra.launcher.mem_gb=64: SLURM refused the job: "
        "Memory specification can not be satisfied; "
        "Batch job submission failed: Requested node configuration is not available"
    )


# sbatch's words for refusals the test cluster cannot produce on demand, as SLURM 22.05 prints them.
@pytest.mark.parametrize(
    "sbatch_stderr, expected",
    [
        (
            "sbatch: error: invalid partition specified: gpu\n"
            "sbatch: error: Batch job submission failed: Invalid partition name specified",
            "hydra.launcher.partition=gpu: SLURM refused the job: invalid partition specified: gpu; "
            "Batch job submission failed: Invalid partition name specified",
        ),
        (
            "sbatch: error: Invalid generic resource (gres) specification",
            "hydra.launcher.gpus_per_node=8: SLURM refused the job: Invalid generic resource (gres) specification",
        ),
        (
            "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy",
            "hydra.launcher (nodes=1 tasks_per_node=8 gpus_per_node=8 cpus_per_task=8 mem_gb=256 partition=gpu): "
            "SLURM refused the job: Batch job submission failed: Job violates accounting/QOS policy",
        ),
    ],
)
def test_refusal_names_the_setting_sbatch_points_at(sbatch_stderr, expected):
    params = {
        "nodes": 1,
        "tasks_per_node": 8,
        "gpus_per_node": 8,
        "cpus_per_task": 8,
        "mem_gb": 256,
        "partition": "gpu",
        "qos": None,
    }
    assert refusal_line(sbatch_stderr, params) == expected
