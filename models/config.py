"""Model dataclasses. They double as Hydra structured configs (see train/config.py).

`validate()` raises one `ValueError` naming the setting and its allowed values; it runs once,
before any process group or heavy work exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

SCORE_FUNCTIONS = ("softmax", "sigmoid")
ACTIVATIONS = ("swiglu", "gelu")
EXPERT_BACKENDS = ("torch", "megablocks")


def require_non_negative_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def require_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    every: int = 1  # an MoE feed-forward in every `every`-th block (1 = all, 2 = alternate)
    expert_ffn_hidden: int = 512
    num_shared_experts: int = 0  # always-on experts, each of width expert_ffn_hidden
    score: str = "softmax"  # "softmax" | "sigmoid"
    normalize_topk: bool = True  # renormalise the k selected weights to sum to 1
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # router z-loss
    jitter: float = 0.0  # multiplicative input noise U(1-j, 1+j) on the router input, training only
    bias_update_rate: float = 0.0  # aux-loss-free balancing step (DeepSeek-V3); 0 = off
    capacity_factor: Optional[float] = None  # None = dropless; else per-expert capacity, overflow dropped
    backend: str = "torch"  # "torch" (grouped GEMM / loop) | "megablocks" (CUDA)

    def validate(self) -> None:
        require_positive_int("moe.num_experts", self.num_experts)
        require_positive_int("moe.every", self.every)
        require_positive_int("moe.expert_ffn_hidden", self.expert_ffn_hidden)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe.top_k must be an integer between 1 and moe.num_experts ({self.num_experts}); got {self.top_k!r}"
            )
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"moe.num_shared_experts must be an integer >= 0; got {self.num_shared_experts!r}")
        require_choice("moe.score", self.score, SCORE_FUNCTIONS)
        require_choice("moe.backend", self.backend, EXPERT_BACKENDS)
        for name in ("aux_loss_coef", "z_loss_coef", "jitter", "bias_update_rate"):
            require_non_negative_number(f"moe.{name}", getattr(self, name))
        if self.jitter >= 1:
            raise ValueError(f"moe.jitter must be in [0, 1); got {self.jitter!r}")
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not math.isfinite(cf) or cf <= 0:
                raise ValueError(f"moe.capacity_factor must be null (dropless) or a number > 0; got {cf!r}")


@dataclass
class ModelConfig:
    vocab_size: int = 8192  # overwritten from the tokenizer by the training job
    max_seq_len: int = 256
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    ffn_hidden: int = 1024  # dense feed-forward width (blocks without MoE)
    activation: str = "swiglu"  # "swiglu" | "gelu", for dense FFN and experts alike
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Initial weights of a fresh run: null (random), "hf:<dir>" or "upcycle:<dir>" (train/init_from.py).
    init_from: Optional[str] = None

    def validate(self) -> None:
        for name in ("vocab_size", "max_seq_len", "n_layers", "d_model", "n_heads", "ffn_hidden"):
            require_positive_int(f"model.{name}", getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.d_model / model.n_heads must be even for rotary embeddings; got head size {self.d_model // self.n_heads}"
            )
        require_choice("model.activation", self.activation, ACTIVATIONS)
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            require_non_negative_number(f"model.{name}", value)


@dataclass
class GPTConfig:
    """What `models.gpt.GPT` is built from: the model and its MoE settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def validate(self) -> None:
        self.model.validate()
        self.moe.validate()
