"""Hydra sweeps: every combination runs, an invalid one fails alone with its one-line reason, and
a summary table is written; the SLURM launcher composes."""

import json
import subprocess
import sys

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from hydra_plugins.switchyard_launcher.slurm import SwitchyardSlurmLauncher
from tests.jobs import TINY, job_env

SWEEP = ["moe.num_experts=2,4", "moe.top_k=1,4"]


def test_sweep_runs_every_valid_combination_and_reports_the_invalid_one(tmp_path, data_cache):
    overrides = [o for o in TINY if not o.startswith("moe.num_experts")]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "-m",
            *SWEEP,
            *overrides,
            "train.steps=2",
            "train.eval_interval=2",
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        env=job_env(data_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0  # the sweep as a whole reports its failed job
    last = done.stderr.rstrip().splitlines()[-1]  # and says where its summary is
    assert last.startswith("switchyard: error: at least one sweep job failed") and last.endswith(
        "every job's result is in sweep/sweep_summary.md"
    ), done.stderr[-2000:]
    rows = {
        tuple(r["overrides"][:2]): r
        for r in map(json.loads, (tmp_path / "sweep/sweep_results.jsonl").read_text().splitlines())
    }
    assert len(rows) == 4
    bad = rows[("moe.num_experts=2", "moe.top_k=4")]
    assert bad["status"] == "failed"
    assert bad["reason"] == "moe.top_k must be an integer between 1 and moe.num_experts (2); got 4"
    for key, row in rows.items():
        if key != ("moe.num_experts=2", "moe.top_k=4"):
            assert (
                row["status"] == "ok" and row["val/loss"] < 6 and row["perf/tokens_per_s"] > 0 and row["imbalance"] >= 1
            ), row
    table = (tmp_path / "sweep/sweep_summary.md").read_text()
    assert "| 1 | moe.num_experts=2 moe.top_k=4 |" in table and "failed: moe.top_k must be" in table
    assert (tmp_path / "sweep/3/metrics.jsonl").is_file()  # each job has its own run directory


def test_slurm_launcher_composes(tmp_path, data_cache):
    done = subprocess.run(
        [sys.executable, "-m", "train", "hydra/launcher=slurm", "--cfg", "hydra"],
        cwd=tmp_path,
        env=job_env(data_cache),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "_target_: hydra_plugins.switchyard_launcher.slurm.SwitchyardSlurmLauncher" in done.stdout
    # submitit's launcher, with refusals said in one line. By name: Hydra's plugin scan (run by any
    # in-process compose in this worker) executes the plugin modules again, making new class objects.
    assert any(
        f"{c.__module__}.{c.__qualname__}" == f"{SlurmLauncher.__module__}.SlurmLauncher"
        for c in SwitchyardSlurmLauncher.__mro__
    )
    assert "export MASTER_ADDR" in done.stdout
