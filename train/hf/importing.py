"""A Hugging Face model directory read as a Switchyard model: its config (`read_hf_config`), its
weights (`load_hf_weights`) and the settings that reproduce it (`training_overrides`), for
`python -m train.import_hf` and `model.init_from=hf:`."""


from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import GPTConfig
from train.data.tokenizer import Tokenizer
from train.hf.files import SafetensorsWeights, read_json, read_tokenizer
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


def load_hf_weights(hf_dir: Path | str, lazy_experts: bool = False) -> tuple[HFModel, dict[str, torch.Tensor]]:
    """The model and its Switchyard state dict (fp32, experts stacked [E, ...]). With `lazy_experts`
    the routed experts are train.hf.mapping.ExpertRows, read from the files only for the experts a
    rank slices out (the job's import under expert parallelism)."""
    model = read_hf_config(hf_dir)
    weights = SafetensorsWeights(model.path)
    return model, from_hf_tensors(weights, model.cfg, model.model_type, str(model.path), lazy_experts)


MODEL_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "qk_norm", "qkv_bias", "activation", "tie_embeddings",
              "rope_theta", "norm_eps")
ROPE_SCALING_KEYS = ("type", "factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")


def model_settings(cfg: GPTConfig) -> dict[str, object]:
    """The model.* settings (not the FFN widths) that must equal the source's for its weights to
    compute the same function; rope_scaling flattened, its fields only when it is on."""
    m = cfg.model
    settings = {f"model.{k}": getattr(m, k) for k in MODEL_KEYS}
    keys = ROPE_SCALING_KEYS if m.rope_scaling.type != "none" else ("type",)
    settings.update({f"model.rope_scaling.{k}": getattr(m.rope_scaling, k) for k in keys})
    return settings


def shape_settings(cfg: GPTConfig) -> dict[str, object]:
    """The Hydra settings that must equal the source's for its weights to compute the same function."""
    m, moe = cfg.model, cfg.moe
    settings = model_settings(cfg)
    moe_blocks = moe_block_ids(cfg)
    if len(moe_blocks) < m.n_layers:  # dense blocks exist
        settings["model.ffn_hidden"] = m.ffn_hidden
    if moe_blocks:
        settings.update({f"moe.{k}": getattr(moe, k) for k in ("num_experts", "top_k", "every", "expert_ffn_hidden", "num_shared_experts", "shared_expert_gate", "score", "normalize_topk")})
    else:
        settings["moe.every"] = m.n_layers + 1  # no MoE block
    return settings


def _hydra_value(value: object) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def training_overrides(model: HFModel) -> list[str]:
    overrides = [f"model.init_from=hf:{model.path}"]
    overrides += [f"{key}={_hydra_value(value)}" for key, value in shape_settings(model.cfg).items()]
    overrides += ["data.tokenizer.kind=file", f"data.tokenizer.path={model.path / 'tokenizer.json'}"]
    return overrides
