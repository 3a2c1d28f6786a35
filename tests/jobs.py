"""Run `python -m train` (or torchrun) as a user would, in a subprocess, and read what it wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Small and fast: a 2-layer model on the classics corpus with the byte tokenizer.
TINY = [
    "model=tiny",
    "moe.num_experts=4",
    "moe.expert_ffn_hidden=64",
    "data.tokenizer.kind=bytes",
    "train.seq_len=64",
    "train.micro_batch=4",
    "train.log_interval=1",
    "train.eval_batches=2",
    "logging.wandb.mode=disabled",
    "logging.progress_bar=false",
]


def job_env(cache_dir: Path) -> dict:
    env = {**os.environ, "SWITCHYARD_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    return env


FAULTS = Path(__file__).parent / "faults"


def fault_env(**faults: str) -> dict:
    """Environment that makes the job's processes load tests/faults/sitecustomize.py with these
    faults (see there), e.g. fault_env(SWITCHYARD_TEST_NAN_STEPS="3")."""
    return {"PYTHONPATH": f"{FAULTS}{os.pathsep}{REPO}", **faults}


def job_command(*overrides: str, nproc: int = 1, max_restarts: int = 0) -> list[str]:
    if nproc == 1 and max_restarts == 0:
        return [sys.executable, "-m", "train", *overrides]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, f"--max-restarts={max_restarts}", "-m", "train", *overrides]


def run_job(
    workdir: Path,
    cache_dir: Path,
    *overrides: str,
    nproc: int = 1,
    max_restarts: int = 0,
    timeout: int = 600,
    extra_env: dict | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        job_command(*overrides, nproc=nproc, max_restarts=max_restarts),
        cwd=workdir,
        env={**job_env(cache_dir), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(workdir: Path, run_name: str) -> list[dict]:
    path = workdir / "outputs" / run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def val_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in records if "val/loss" in r}


def start_from_checkpoint(workdir: Path, source_run: str, step: int, run_name: str) -> Path:
    """A new run directory whose only checkpoint is `source_run`'s at `step` (marked latest), so that
    `train.resume=true` continues from there: one uninterrupted run serves as both the reference
    curve and the checkpoint to resume."""
    name = f"step_{step:06d}"
    checkpoints = workdir / "outputs" / run_name / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(workdir / "outputs" / source_run / "checkpoints" / name, checkpoints / name)
    (checkpoints / "latest").write_text(name)
    return checkpoints.parent
