"""Where figures go: console progress bar, JSONL in the run directory, W&B (offline by default).

Only the main rank builds a RunLogger; every other rank gets a silent one.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
from tqdm import tqdm

log = logging.getLogger("switchyard")


class RunLogger:
    def __init__(self, run_dir: Path, job_dict: dict, total_steps: int, first_step: int, wandb_cfg, progress_bar: bool, enabled: bool):
        self.enabled = enabled
        self.wandb_run = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Append on resume: the file keeps the whole curve, one JSON object per logged step.
        self.jsonl = open(run_dir / "metrics.jsonl", "a" if first_step > 0 else "w")
        if wandb_cfg.mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                group=wandb_cfg.group,
                tags=list(wandb_cfg.tags),
                mode=wandb_cfg.mode,
                dir=str(run_dir),
                name=run_dir.name,
                config=job_dict,
                resume="allow" if first_step > 0 else None,
                id=_wandb_run_id(run_dir, first_step),
            )
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(_for_wandb(metrics), step=step)

    def progress(self, step: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=True)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_run_id(run_dir: Path, first_step: int) -> str:
    """One W&B run per run directory: a resumed job continues the same run."""
    id_file = run_dir / "wandb_run_id"
    if first_step > 0 and id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return run_id


def _for_wandb(metrics: dict) -> dict:
    """Lists of per-expert counts become W&B histograms whose bins are expert ids, plus one
    layers × experts heatmap image per logged step (W&B's step slider plays it over time)."""
    import wandb

    out, loads = {}, []
    for key, value in metrics.items():
        if isinstance(value, list):
            counts = np.asarray(value, dtype=np.float64)
            out[key] = wandb.Histogram(np_histogram=(counts, np.arange(len(counts) + 1)))
            loads.append(counts)
        else:
            out[key] = value
    if loads:
        from train.report import expert_load_figure, plt

        load_LE = np.stack(loads)
        figure = expert_load_figure(load_LE / np.maximum(load_LE.sum(axis=1, keepdims=True), 1))
        out["moe/expert_load_heatmap"] = wandb.Image(figure)
        plt.close(figure)
    return out


def quiet_third_party_logs() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
