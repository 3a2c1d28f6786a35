"""Where figures go: console progress bar, JSONL in the run directory, W&B (offline by default).

The progress bar is drawn only on a terminal; when the output goes to a file (make, SLURM logs,
a pipe) the same figures come as one plain line per logged step, without carriage returns.

Only the main rank builds a RunLogger; every other rank gets a silent one.

Nothing a run wrote is lost when the run directory is used again:
- a fresh run moves an earlier `metrics.jsonl` (and `wandb_run_id`) aside to
  `metrics.prev-<time>.jsonl` (`wandb_run_id.prev-<time>`), as setup does with checkpoints;
- a run resumed from step R keeps the history up to R and moves what the crashed attempt logged
  after R (which the resumed run logs again) to `metrics.replaced-<time>.jsonl`, so that
  `metrics.jsonl` holds each (step, key) once. The resumed run's first record (the validation loss
  at R) replaces those figures of an earlier record of step R (the rest of it, e.g. the sampled
  text, stays). The file is rewritten (atomically) at
  the resumed run's first record, so an attempt that dies before logging changes nothing.
- W&B cannot rewind an offline run (rewinding, `resume_from`, is a server-side preview feature):
  a resumed run keeps the run id, and its offline run starts with a replay of the kept history
  (without the per-step heatmap images, which stay in the earlier offline run), so the newest
  offline run holds the whole history, each step once. Online, W&B resumes the run by id
  (`resume="allow"`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from train.checkpoint.files import write_atomic

log = logging.getLogger("switchyard")
METRICS = "metrics.jsonl"
WANDB_ID = "wandb_run_id"


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        job_dict: dict,
        total_steps: int,
        first_step: int,
        wandb_cfg,
        progress_bar: bool,
        enabled: bool,
    ):
        self.enabled = enabled
        self.wandb_run = None
        self.bar = None
        self.plain_progress = False  # progress as lines, for output that is not a terminal
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir, self.offline = run_dir, wandb_cfg.mode == "offline"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if first_step == 0:
            for name in (METRICS, WANDB_ID):
                move_aside(run_dir / name, "prev", stamp)
        self.resumed_history = _ResumedHistory(run_dir / METRICS, first_step, stamp) if first_step > 0 else None
        # A fresh run starts the file; a resumed one rewrites it at its first record (see above).
        self.jsonl = open(run_dir / METRICS, "a") if first_step == 0 else None
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
                # Offline, each offline run is a whole history (replayed on resume), so no W&B resume.
                resume="allow" if first_step > 0 and not self.offline else None,
                id=_wandb_run_id(run_dir, first_step),
            )
        if progress_bar and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True)
        elif progress_bar:
            self.plain_progress = True
            self.total_steps, self.first_step, self.started = total_steps, first_step, time.perf_counter()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:  # the first record of a resumed run
            kept = self.resumed_history.settle(step, metrics)
            self.jsonl = open(self.run_dir / METRICS, "a")
            if self.wandb_run is not None and self.offline:
                for record in kept:
                    self.wandb_run.log(_for_wandb(_without_step(record), images=False), step=record["step"])
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(_for_wandb(metrics), step=step)

    def progress(self, step: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=True)
        elif self.plain_progress:
            print(
                progress_line(step, self.total_steps, self.first_step, time.perf_counter() - self.started, postfix),
                flush=True,
            )

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        elif self.plain_progress:
            print(message, flush=True)
        else:
            log.info(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def progress_line(step: int, total: int, first_step: int, elapsed_s: float, figures: dict) -> str:
    """`train: step 20/400 (5%), loss=3.952, tok/s=1,714, 0:29 elapsed, eta 9:09`: the bar's figures as a line."""
    done = step - first_step
    eta = _clock(elapsed_s / done * (total - step)) if done > 0 else "?"
    parts = [
        f"train: step {step}/{total} ({100 * step // max(total, 1)}%)",
        *(f"{k}={v}" for k, v in figures.items()),
        f"{_clock(elapsed_s)} elapsed, eta {eta}",
    ]
    return ", ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _ResumedHistory:
    """metrics.jsonl of a run resumed from `resume_step`, settled at the resumed run's first record."""

    def __init__(self, path: Path, resume_step: int, stamp: str):
        self.path, self.resume_step, self.stamp = path, resume_step, stamp

    def settle(self, step: int, metrics: dict) -> list[dict]:
        """Keep records up to the resume step, less the figures of that step that the first new
        record logs again (whatever else the earlier record carries, e.g. `samples/text` beside
        `val/loss`); move the others (and any line that is not a record, e.g. cut by a crash)
        aside. Returns the kept records."""
        if not self.path.is_file():
            return []
        kept, lines, replaced = [], [], []
        for line in self.path.read_text(errors="replace").splitlines():
            record = _parse_record(line)
            if record is None or record["step"] > self.resume_step:
                replaced.append(line)
                continue
            resumed_step = record["step"] == step == self.resume_step
            repeated = metrics.keys() & record.keys() - {"step"} if resumed_step else set()
            if repeated:
                replaced.append(json.dumps({"step": record["step"], **{k: record[k] for k in record if k in repeated}}))
                record = {k: v for k, v in record.items() if k not in repeated}
                if record.keys() == {"step"}:
                    continue
                line = json.dumps(record)
            kept.append(record)
            lines.append(line)
        if replaced:
            aside = _free_name(self.path, "replaced", self.stamp)
            aside.write_text("".join(f"{line}\n" for line in replaced))
            write_atomic(self.path, "".join(f"{line}\n" for line in lines))
            log.info(
                "resumed at step %d: %d record(s) the earlier attempt logged after it moved to %s",
                self.resume_step,
                len(replaced),
                aside,
            )
        return kept


def _parse_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _without_step(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step"}


def move_aside(path: Path, why: str, stamp: str) -> Path | None:
    """`metrics.jsonl` -> `metrics.<why>-<stamp>.jsonl` (a free name), if it exists and is not empty."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    aside = _free_name(path, why, stamp)
    os.replace(path, aside)
    log.info("kept the earlier %s as %s", path.name, aside.name)
    return aside


def _free_name(path: Path, why: str, stamp: str) -> Path:
    for n in range(1000):
        candidate = path.with_name(f"{path.stem}.{why}-{stamp}{'' if n == 0 else f'-{n}'}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(candidate)


def _wandb_run_id(run_dir: Path, first_step: int) -> str:
    """One W&B run per run directory: a resumed job continues the same run."""
    id_file = run_dir / WANDB_ID
    if first_step > 0 and id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return run_id


def _for_wandb(metrics: dict, images: bool = True) -> dict:
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
    if loads and images:
        from train.plots import expert_load_figure, plt

        load_LE = np.stack(loads)
        figure = expert_load_figure(load_LE / np.maximum(load_LE.sum(axis=1, keepdims=True), 1))
        out["moe/expert_load_heatmap"] = wandb.Image(figure)
        plt.close(figure)
    return out


def quiet_third_party_logs() -> None:
    """Third-party banners silenced at their source, before the libraries are imported (they read
    these variables at import time)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed warns "Setting accelerator to CPU ..." on every rank when it finds no GPU; naming the
    # accelerator it would pick anyway silences it (the one-line INFO it logs instead is below its level).
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # datasets' progress bars (tokenizing) are for terminals; in a log file they are carriage returns.
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # DeepSpeed probes its ops by compiling test programs; the compiler's INFO lines are not ours.
    logging.getLogger("compilers").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls these torch collectives on every step; torch 2.13 deprecates their names.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
