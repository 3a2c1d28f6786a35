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
AUX_LOSS_SCOPES = ("micro_batch", "sequence", "global_batch")  # see models/moe/balance.py
QK_NORMS = ("none", "head", "projection")  # see ModelConfig.qk_norm
ROPE_SCALINGS = ("none", "llama3")


# Upper bounds for sizes. Each is several times beyond the largest published model (vocabularies of
# ~256k tokens, widths of ~16k, ~130 layers, 1M-token contexts, 256 routed experts), so no real
# configuration meets it; what does is a typo (extra digits) that would otherwise fail deep inside
# torch or the tokenizer library, after minutes of data preparation.
MAX_VOCAB = 2**20
MAX_SEQ_LEN = 2**20
MAX_LAYERS = 1024
MAX_WIDTH = 2**16  # d_model
MAX_FFN = 2**20  # ffn_hidden, expert_ffn_hidden
MAX_EXPERTS = 2**16  # routed or shared experts per layer
MAX_SEED = 2**63 - 1  # a signed 64-bit integer: numpy, torch.manual_seed and W&B all take it


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_finite(name: str, value) -> None:
    """Any number must be finite: inf and nan pass every `<`/`>` comparison test one way or another."""
    if _is_number(value) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")


def require_number_in(
    name: str, value, low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> None:
    """`value` is a finite number in the interval [low, high] (ends open as asked; high None = no bound)."""
    ok = _is_number(value) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)
        )
    if not ok:
        if high is None:
            allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def require_non_negative_number(name: str, value) -> None:
    require_number_in(name, value, 0)


def require_positive_number(name: str, value) -> None:
    require_number_in(name, value, 0, low_open=True)


def require_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}")


def require_int_in(name: str, value, low: int, high: int | None = None, high_name: str | None = None) -> None:
    """An integer in [low, high]; `high_name` names the setting the upper bound comes from."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        if high is None:
            allowed = f"an integer >= {low}"
        elif high_name:
            allowed = f"an integer between {low} and {high_name} ({high})"
        else:
            allowed = f"an integer between {low} and {high}"
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def require_positive_int(name: str, value, high: int | None = None) -> None:
    require_int_in(name, value, 1, high)


@dataclass
class MoEConfig:
    num_experts: int = 8  # routed experts per MoE layer
    top_k: int = 2  # experts each token is sent to (1 … num_experts)
    every: int = 1  # an MoE feed-forward in every `every`-th block (1 = all, 2 = alternate)
    expert_ffn_hidden: int = 512  # hidden width of each expert's feed-forward
    num_shared_experts: int = 0  # always-on experts, each of width expert_ffn_hidden
    score: str = "softmax"  # router scores: "softmax" over the experts | "sigmoid" per expert (DeepSeek-V3)
    normalize_topk: bool = True  # renormalise the k selected weights to sum to 1
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    aux_loss_scope: str = "global_batch"  # over "micro_batch" | "sequence" | "global_batch" (models/moe/balance.py)
    z_loss_coef: float = 0.001  # router z-loss
    jitter: float = 0.0  # multiplicative input noise U(1-j, 1+j) on the router input, training only
    bias_update_rate: float = 0.0  # aux-loss-free balancing step (DeepSeek-V3); 0 = off
    capacity_factor: Optional[float] = None  # None = dropless; else per-expert capacity, overflow dropped
    backend: str = "torch"  # expert GEMMs: "torch" (grouped_mm, else a loop) | "megablocks" (CUDA, bf16)
    # Scale the shared experts' output by sigmoid(w · x), one learnt gate per token (Qwen1.5/2-MoE); false = ungated.
    shared_expert_gate: bool = False

    def validate(self) -> None:
        require_positive_int("moe.num_experts", self.num_experts, MAX_EXPERTS)
        require_positive_int("moe.every", self.every)
        require_positive_int("moe.expert_ffn_hidden", self.expert_ffn_hidden, MAX_FFN)
        require_int_in("moe.top_k", self.top_k, 1, self.num_experts, "moe.num_experts")
        require_int_in("moe.num_shared_experts", self.num_shared_experts, 0, MAX_EXPERTS)
        require_choice("moe.score", self.score, SCORE_FUNCTIONS)
        require_choice("moe.aux_loss_scope", self.aux_loss_scope, AUX_LOSS_SCOPES)
        require_choice("moe.backend", self.backend, EXPERT_BACKENDS)
        if not isinstance(self.shared_expert_gate, bool):
            raise ValueError(f"moe.shared_expert_gate must be true or false; got {self.shared_expert_gate!r}")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError(
                "moe.shared_expert_gate=true gates the shared experts, but moe.num_shared_experts=0; "
                "set moe.num_shared_experts >= 1 or moe.shared_expert_gate=false"
            )
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            require_non_negative_number(f"moe.{name}", getattr(self, name))
        require_number_in("moe.jitter", self.jitter, 0, 1, high_open=True)
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if not _is_number(cf) or not math.isfinite(cf) or cf <= 0:
                raise ValueError(f"moe.capacity_factor must be null (dropless) or a number > 0; got {cf!r}")


@dataclass
class RopeScalingConfig:
    """Llama-3's rotary frequency scaling (transformers' rope_type "llama3"): wavelengths longer than
    original_max_seq_len / low_freq_factor are stretched by `factor`, shorter than
    original_max_seq_len / high_freq_factor kept, and those between interpolated smoothly."""

    type: str = "none"  # "none" (plain RoPE) | "llama3" (Llama-3.1's frequency scaling, shaped by the fields below)
    factor: float = 8.0  # llama3: how much longer the context is than the original one
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_seq_len / this are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_seq_len / this are kept
    original_max_seq_len: int = 8192  # llama3: the context length the model was first trained at

    def validate(self) -> None:
        require_choice("model.rope_scaling.type", self.type, ROPE_SCALINGS)
        if self.type == "none":
            return
        require_number_in("model.rope_scaling.factor", self.factor, 1)
        require_positive_number("model.rope_scaling.low_freq_factor", self.low_freq_factor)
        require_positive_number("model.rope_scaling.high_freq_factor", self.high_freq_factor)
        if self.high_freq_factor <= self.low_freq_factor:  # the smoothing divides by their difference
            raise ValueError(
                f"model.rope_scaling.high_freq_factor ({self.high_freq_factor:g}) must be greater than "
                f"model.rope_scaling.low_freq_factor ({self.low_freq_factor:g})"
            )
        require_positive_int("model.rope_scaling.original_max_seq_len", self.original_max_seq_len, MAX_SEQ_LEN)


@dataclass
class ModelConfig:
    vocab_size: int = 8192  # overwritten from the tokenizer by the training job
    max_seq_len: int = 256  # longest sequence the rotary tables cover (conf/ sets it to train.seq_len)
    n_layers: int = 4  # transformer blocks
    d_model: int = 256  # width of the residual stream (divisible by n_heads, with an even head size)
    n_heads: int = 4  # attention (query) heads
    # Key/value heads: null = n_heads (multi-head attention); fewer = grouped-query attention, each shared
    # by n_heads / n_kv_heads query heads (1 = multi-query). Must divide n_heads.
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None  # channels per attention head; null = d_model / n_heads
    # RMSNorm on queries and keys before RoPE: "none", "head" (over each head's head_dim channels, one gain
    # shared by all heads: Qwen3, GLM-4.5) or "projection" (over all of q and all of k: OLMoE).
    qk_norm: str = "none"
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen1.5/2/2.5); the output projection has none
    ffn_hidden: int = 1024  # dense feed-forward width (blocks without MoE)
    activation: str = "swiglu"  # "swiglu" | "gelu", for dense FFN and experts alike
    tie_embeddings: bool = True  # the output projection shares the token embedding's weights
    rope_theta: float = 10000.0  # base of the rotary position embedding's frequencies
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # e.g. model.rope_scaling.type=llama3
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    init_std: float = 0.02  # standard deviation of the random initial weights
    # Initial weights of a fresh run: null (random), "hf:<dir>" or "upcycle:<dir>" (train/hf/init_from.py).
    init_from: Optional[str] = None

    def validate(self) -> None:
        require_positive_int("model.vocab_size", self.vocab_size, MAX_VOCAB)
        require_positive_int("model.max_seq_len", self.max_seq_len, MAX_SEQ_LEN)
        require_positive_int("model.n_layers", self.n_layers, MAX_LAYERS)
        require_positive_int("model.d_model", self.d_model, MAX_WIDTH)
        require_positive_int("model.n_heads", self.n_heads)
        require_positive_int("model.ffn_hidden", self.ffn_hidden, MAX_FFN)
        if self.n_kv_heads is not None:
            require_int_in("model.n_kv_heads", self.n_kv_heads, 1, self.n_heads, "model.n_heads")
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads}): "
                    "each key/value head serves the same number of query heads"
                )
        if self.head_dim is not None:
            require_positive_int("model.head_dim", self.head_dim, MAX_WIDTH)
            if self.head_dim % 2:
                raise ValueError(f"model.head_dim must be even for rotary embeddings; got {self.head_dim}")
        else:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}) "
                    "(or set model.head_dim)"
                )
            if (self.d_model // self.n_heads) % 2:
                raise ValueError(
                    "model.d_model / model.n_heads must be even for rotary embeddings; "
                    f"got head size {self.d_model // self.n_heads}"
                )
        require_choice("model.qk_norm", self.qk_norm, QK_NORMS)
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"model.qkv_bias must be true or false; got {self.qkv_bias!r}")
        self.rope_scaling.validate()
        require_choice("model.activation", self.activation, ACTIVATIONS)
        require_positive_number("model.rope_theta", self.rope_theta)  # 0 divides by zero in the rotary table
        require_positive_number("model.norm_eps", self.norm_eps)  # 0 turns an all-zero row into nan
        require_non_negative_number("model.init_std", self.init_std)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim


@dataclass
class GPTConfig:
    """What `models.gpt.GPT` is built from: the model and its MoE settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def validate(self) -> None:
        self.model.validate()
        self.moe.validate()
