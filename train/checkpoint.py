"""Checkpoints that a crash can never corrupt, and that reshard across expert-parallel layouts.

Layout under `<run_dir>/checkpoints/step_000200/`:
    (DeepSpeed's files)    the engine: dense weights and their (ZeRO-partitioned) optimizer state
    dense.pt               the full dense weights (gathered under ZeRO-3), for resharding
    experts_ep{i}.pt       expert shard i: its weights per MoE layer and its optimizer state
    rng_rank{r}.pt         each rank's RNG state
    meta.json              step, model shape, process layout: written last, by rank 0
and `<run_dir>/checkpoints/latest` names the newest complete one.

Every rank writes into `step_N.tmp/`; after a barrier rank 0 writes meta.json, renames the folder
and only then replaces `latest` (write, fsync, os.replace). Loading goes through `latest` alone,
so a half-written folder is never read; the next save sweeps it away.

Resuming with the same layout (world size, `parallel.ep`, ZeRO stage) restores everything, and
the run continues bit for bit. Another layout restores the weights only (dense.pt + the expert
shards regrouped for the new `ep`); optimizer state then starts afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Callable

import torch

LATEST = "latest"
KEEP_LAST = 2
SHAPE_KEYS = {
    "model": ("vocab_size", "n_layers", "d_model", "n_heads", "ffn_hidden", "activation", "tie_embeddings"),
    "moe": ("num_experts", "every", "expert_ffn_hidden", "num_shared_experts"),
}
LAYOUT_KEYS = ("world_size", "parallel.ep", "deepspeed.zero_stage")
# Fault injection for the crash tests: SIGKILL rank 0 after it wrote its files for this step, before
# the checkpoint is published (first attempt only, so a torchrun restart can then finish the job).
KILL_IN_SAVE_ENV = "SWITCHYARD_FAULT_KILL_IN_SAVE"


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


def _maybe_inject_kill(step: int, rank: int) -> None:
    if rank == 0 and os.environ.get(KILL_IN_SAVE_ENV) == str(step) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(ckpt_dir: Path, step: int, write_files: Callable[[Path], None], meta: dict, rank: int, barrier: Callable[[], None]) -> Path:
    """`write_files(folder)` is called on every rank to write that rank's part into the staging folder."""
    name = f"step_{step:06d}"
    final, staging = ckpt_dir / name, ckpt_dir / f"{name}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    write_files(staging)
    _maybe_inject_kill(step, rank)
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


def open_checkpoint(ckpt_dir: Path, signature: dict) -> tuple[Path, dict]:
    """(folder, meta) of the latest complete checkpoint, after checking it fits this model."""
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise ValueError(f"train.resume=true but there is no complete checkpoint in {ckpt_dir}")
    meta = json.loads((path / "meta.json").read_text())
    for key, want in signature.items():
        have = meta["model_signature"].get(key)
        if have != want:
            raise ValueError(f"train.resume=true: checkpoint {path} was saved with {key}={have!r}, this run has {key}={want!r}")
    return path, meta


def same_layout(meta: dict, layout: dict) -> bool:
    return all(meta.get(key) == layout[key] for key in LAYOUT_KEYS)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def expert_shard_weights(path: Path, meta: dict, num_experts: int, first: int, count: int) -> list[dict[str, torch.Tensor]]:
    """Per MoE layer, the stacked weights of global experts [first, first + count), gathered from
    the shards of the saved layout (whatever its `parallel.ep`)."""
    saved_per_shard = num_experts // meta["parallel.ep"]
    shards = {}
    pieces: list[dict[str, list[torch.Tensor]]] = []
    for e in range(first, first + count):
        shard = e // saved_per_shard
        if shard not in shards:
            shards[shard] = load(path / f"experts_ep{shard}.pt")["weights"]
        for layer, weights in enumerate(shards[shard]):
            if layer == len(pieces):
                pieces.append({name: [] for name in weights})
            for name, w in weights.items():
                pieces[layer][name].append(w[e % saved_per_shard : e % saved_per_shard + 1])
    return [{name: torch.cat(parts) for name, parts in layer.items()} for layer in pieces]
