"""Checkpoints that a crash can never corrupt.

Layout under `<run_dir>/checkpoints/`:
    step_000200/rank0.pt ...   one file per rank (its expert shard, dense weights, optimizer, RNG)
    step_000200/meta.json      step, model shape, world layout: written last, by rank 0
    latest                     the name of the newest complete checkpoint

Every rank writes into `step_N.tmp/`; after a barrier rank 0 writes meta.json, renames the folder
and only then replaces `latest` (write + fsync + os.replace). Loading goes through `latest` alone,
so a half-written folder is never read; it is swept away by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

LATEST = "latest"
KEEP_LAST = 2
SHAPE_KEYS = {
    "model": ("vocab_size", "n_layers", "d_model", "n_heads", "ffn_hidden", "activation", "tie_embeddings"),
    "moe": ("num_experts", "every", "expert_ffn_hidden", "num_shared_experts"),
}


def model_signature(job) -> dict:
    """The settings that fix parameter shapes; a checkpoint only loads into a model with the same."""
    return {f"{section}.{key}": getattr(getattr(job, section), key) for section, keys in SHAPE_KEYS.items() for key in keys}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: Path, step: int, rank_state: dict, meta: dict, rank: int, barrier: Callable[[], None]) -> Path:
    name = f"step_{step:06d}"
    final, staging = ckpt_dir / name, ckpt_dir / f"{name}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    torch.save(rank_state, staging / f"rank{rank}.pt")
    barrier()
    if rank == 0:
        _write_atomic(staging / "meta.json", json.dumps({**meta, "step": step}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _write_atomic(ckpt_dir / LATEST, name)
        _prune(ckpt_dir, keep=name)
    barrier()
    return final


def _prune(ckpt_dir: Path, keep: str) -> None:
    """Drop stale staging folders and all but the newest KEEP_LAST complete checkpoints."""
    complete = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in complete[:-KEEP_LAST]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    marker = ckpt_dir / LATEST
    if not marker.is_file():
        return None
    path = ckpt_dir / marker.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load_checkpoint(ckpt_dir: Path, rank: int, expected_meta: dict) -> tuple[dict, dict]:
    """Returns (this rank's state, meta) of the latest complete checkpoint, after checking that it
    fits the current model and process layout."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise ValueError(f"train.resume=true but there is no complete checkpoint in {ckpt_dir}")
    meta = json.loads((path / "meta.json").read_text())
    for key, want in expected_meta.items():
        have = meta.get(key)
        if have != want:
            raise ValueError(f"train.resume=true: checkpoint {path} was saved with {key}={have!r}, this run has {key}={want!r}")
    state = torch.load(path / f"rank{rank}.pt", map_location="cpu", weights_only=True)
    return state, meta
