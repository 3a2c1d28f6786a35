"""A Hugging Face model directory read as a Switchyard model: its config (`read_hf_config`), its
weights (`load_hf_weights`) and the settings that reproduce it (`training_overrides`), for
`python -m train.import_hf` and `model.init_from=hf:`."""


from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import GPTConfig
from train.data.tokenizer import Tokenizer
from train.hf.files import read_json, read_tokenizer, read_weights
from train.hf.mapping import from_hf_tensors, gpt_config_from_hf, moe_block_ids


@dataclass
class HFModel:
    cfg: GPTConfig
    model_type: str
    tokenizer: Tokenizer
    path: Path


def read_hf_config(hf_dir: Path | str) -> HFModel:
    """Config and tokenizer only (cheap: no weights read); every problem one ValueError."""
    hf_dir = Path(hf_dir).expanduser().resolve()
    if not hf_dir.is_dir():
        raise ValueError(f"HF_DIR {hf_dir} is not a directory")
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"HF_DIR {hf_dir} has no config.json: not a Hugging Face model directory")
    cfg, model_type = gpt_config_from_hf(read_json(hf_dir / "config.json"), str(hf_dir))
    tokenizer = read_tokenizer(hf_dir)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ValueError(
            f"{hf_dir}: mismatched vocab sizes: config.json has vocab_size={cfg.model.vocab_size} but tokenizer.json has "
            f"{tokenizer.vocab_size} tokens (Switchyard sizes the vocabulary from the tokenizer)"
        )
    return HFModel(cfg, model_type, tokenizer, hf_dir)


def load_hf_weights(hf_dir: Path | str) -> tuple[HFModel, dict[str, torch.Tensor]]:
    """The model and its Switchyard state dict (fp32, experts stacked [E, ...])."""
    model = read_hf_config(hf_dir)
    tensors = read_weights(model.path)
    return model, from_hf_tensors(tensors, model.cfg, model.model_type, str(model.path))


def shape_settings(cfg: GPTConfig) -> dict[str, object]:
    """The Hydra settings that must equal the source's for its weights to compute the same function."""
    m, moe = cfg.model, cfg.moe
    settings = {f"model.{k}": getattr(m, k) for k in ("n_layers", "d_model", "n_heads", "activation", "tie_embeddings", "rope_theta", "norm_eps")}
    moe_blocks = moe_block_ids(cfg)
    if len(moe_blocks) < m.n_layers:  # dense blocks exist
        settings["model.ffn_hidden"] = m.ffn_hidden
    if moe_blocks:
        settings.update({f"moe.{k}": getattr(moe, k) for k in ("num_experts", "top_k", "every", "expert_ffn_hidden", "num_shared_experts", "score", "normalize_topk")})
    else:
        settings["moe.every"] = m.n_layers + 1  # no MoE block
    return settings


def _hydra_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def training_overrides(model: HFModel) -> list[str]:
    overrides = [f"model.init_from=hf:{model.path}"]
    overrides += [f"{key}={_hydra_value(value)}" for key, value in shape_settings(model.cfg).items()]
    overrides += ["data.tokenizer.kind=file", f"data.tokenizer.path={model.path / 'tokenizer.json'}"]
    return overrides
