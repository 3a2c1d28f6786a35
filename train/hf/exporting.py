"""A run's model written as a Hugging Face directory (`export_hf`, `write_hf_model`), for
`python -m train.export_hf`: see that module for what is written and why it is exact."""


from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from models.config import GPTConfig
from train.checkpoint.run_weights import load_run_weights
from train.data.tokenizer import Tokenizer
from train.checkpoint.files import follow_umask
from train.hf.files import DEFAULT_MAX_SHARD_BYTES, fsync_tree, write_json, write_tokenizer, write_weights
from train.hf.mapping import choose_model_type, has_selection_bias, hf_config, to_hf_tensors


def export_hf(run_dir: Path | str, out_dir: Path | str, step: int | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Export `run_dir` at `step` (None: latest) to `out_dir`; returns the transformers model_type."""
    out_dir = _check_out_dir(Path(out_dir))
    weights = load_run_weights(run_dir, step)
    return write_hf_model(weights.job.gpt_config(), weights.state_dict, weights.tokenizer, out_dir, max_shard_bytes)


def write_hf_model(cfg: GPTConfig, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer, out_dir: Path | str,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Write a Switchyard model (config + state dict + tokenizer) as a transformers directory."""
    out_dir = _check_out_dir(Path(out_dir))
    if max_shard_bytes < 1:
        raise ValueError(f"--max-shard-mb must be > 0; got {max_shard_bytes / 1e6:g}")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"mismatched vocab sizes: the tokenizer has {tokenizer.vocab_size} tokens, model.vocab_size={cfg.model.vocab_size}")
    model_type = choose_model_type(cfg, has_selection_bias(state_dict))  # refuses before anything is written
    tensors = to_hf_tensors({k: v.detach().cpu().float() for k, v in state_dict.items()}, cfg, model_type)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        write_json(staging / "config.json", hf_config(cfg, model_type, tokenizer.eot_id))
        write_json(staging / "generation_config.json", {"bos_token_id": None, "eos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.eot_id})
        write_tokenizer(tokenizer, staging, cfg.model.max_seq_len)
        write_weights(tensors, staging, max_shard_bytes)
        follow_umask(staging)  # mkdtemp made it private; the team should read the export
        fsync_tree(staging)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename needs it gone
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return model_type


def _check_out_dir(out_dir: Path) -> Path:
    out_dir = out_dir.expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"OUT_DIR {out_dir} exists and is not an empty directory; choose a new one")
    return out_dir
