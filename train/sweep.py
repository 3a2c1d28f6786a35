"""Hydra sweeps: one row per job (its figures, or why it failed) and a summary table at the end.

Registered as a Hydra callback in conf/config.yaml; does nothing outside `-m` (multirun).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("switchyard")
ROWS = "sweep_results.jsonl"
SUMMARY = "sweep_summary.md"
_written: list[Path] = []  # the summary this process wrote last: a failed sweep's last line names it

COLUMNS = (
    ("val/loss", "val loss", "{:.4f}"),
    ("perf/tokens_per_s", "tokens/s", "{:,.0f}"),
    ("imbalance", "max/mean load", "{:.2f}"),
)


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def is_first_process() -> bool:
    """A multi-process sweep job (SLURM tasks) runs this callback in every task: rank 0 writes."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


class SweepSummary(Callback):
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not in_sweep() or not is_first_process():
            return
        row: dict = {"job": HydraConfig.get().job.num, "overrides": list(job_return.overrides)}
        if job_return.status == JobStatus.COMPLETED:
            row.update(status="ok", **(job_return.return_value or {}))
        else:
            row.update(status="failed", reason=str(job_return._return_value).splitlines()[0])
        sweep_dir = Path(config.hydra.sweep.dir)
        with open(sweep_dir / ROWS, "a") as f:
            f.write(json.dumps(row) + "\n")
        # Rewritten after every job: Hydra skips on_multirun_end when a job failed, and a SLURM
        # sweep may be read while it still runs.
        rows = sorted(
            (json.loads(line) for line in (sweep_dir / ROWS).read_text().splitlines()), key=lambda r: r["job"]
        )
        (sweep_dir / SUMMARY).write_text(render_table(rows) + "\n")
        _written[:] = [sweep_dir / SUMMARY]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = Path(config.hydra.sweep.dir) / SUMMARY
        if summary.exists():
            log.info("sweep summary (%s):\n%s", summary, summary.read_text())


def written_summary() -> Path | None:
    """The summary table this process wrote last (None outside a sweep, or before its first job ended)."""
    return _written[0] if _written else None


def swept(rows: list[dict]) -> list[list[str]]:
    """Each row's overrides, less those every job shares (the fixed part of the command line)."""
    common = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    return [[o for o in r["overrides"] if o not in common] for r in rows]


def render_table(rows: list[dict]) -> str:
    header = ["job", "overrides", *[title for _, title, _ in COLUMNS], "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, overrides in zip(rows, swept(rows)):
        figures = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in COLUMNS]
        status = "ok" if row["status"] == "ok" else f"failed: {row['reason']}"
        lines.append("| " + " | ".join([str(row["job"]), " ".join(overrides), *figures, status]) + " |")
    return "\n".join(lines)
