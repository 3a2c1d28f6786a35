"""Decoder-only GPT with rotary embeddings, RMSNorm pre-norm, SDPA attention (multi-head, grouped-query
or multi-query; optional q/k RMSNorm and qkv biases), dense or MoE FFNs.

Shape legend: B batch, S sequence, D hidden, H query heads, Hkv key/value heads, Dh head size, V vocabulary.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.config import GPTConfig, ModelConfig, RopeScalingConfig
from models.ffn import FeedForward
from models.moe.layer import MoELayer, MoEStats


def rope_inverse_frequencies(head_size: int, theta: float, scaling: RopeScalingConfig | None = None) -> torch.Tensor:
    """[Dh/2] fp32 angle per position of each channel pair; Llama-3's scaling stretches the long wavelengths."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    if scaling is None or scaling.type == "none":
        return inv_freq
    # Llama-3 (rope_type "llama3" in transformers' modeling_rope_utils.py), step for step.
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(
    seq_len: int, head_size: int, theta: float, scaling: RopeScalingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [S, Dh/2] for rotating channel pairs (x[2i], x[2i+1])."""
    inv_freq = rope_inverse_frequencies(head_size, theta, scaling)
    angles_SH = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles_SH.cos(), angles_SH.sin()


def apply_rotary(x_BHSDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x_even, x_odd = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [B, H, S, Dh/2]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).to(x_BHSDh.dtype)


class LayerKV:
    """One block's keys and values for generation: [B, Hkv, max_seq_len, Dh] each (allocated at the
    first write, in the keys' dtype), filled up to `start` before the current forward."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k_BHSDh: torch.Tensor | None = None
        self.v_BHSDh: torch.Tensor | None = None
        self.start = 0

    def append(self, k_BHSDh: torch.Tensor, v_BHSDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions; return every key and value so far."""
        if self.k_BHSDh is None:
            B, Hkv, _, Dh = k_BHSDh.shape
            self.k_BHSDh = k_BHSDh.new_zeros(B, Hkv, self.max_len, Dh)
            self.v_BHSDh = v_BHSDh.new_zeros(B, Hkv, self.max_len, Dh)
        end = self.start + k_BHSDh.shape[2]
        self.k_BHSDh[:, :, self.start : end] = k_BHSDh
        self.v_BHSDh[:, :, self.start : end] = v_BHSDh
        return self.k_BHSDh[:, :, :end], self.v_BHSDh[:, :, :end]


class KVCache:
    """Keys and values of every block for incremental decoding (`GPT.forward(idx, cache)`): each
    forward appends its positions, which continue from `length`."""

    def __init__(self, cfg: ModelConfig):
        self.max_len = cfg.max_seq_len
        self.layers = [LayerKV(cfg.max_seq_len) for _ in range(cfg.n_layers)]
        self.length = 0


class CausalSelfAttention(nn.Module):
    """One fused projection to q | k | v (rows [H·Dh | Hkv·Dh | Hkv·Dh], head-major), optional q/k
    RMSNorm (model.qk_norm), RoPE, causal SDPA; K/V heads are shared by H/Hkv query heads without
    being repeated in memory (`enable_gqa`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_size = cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.q_width, self.kv_width = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
        self.qkv = nn.Linear(cfg.d_model, self.q_width + 2 * self.kv_width, bias=cfg.qkv_bias)
        self.proj = nn.Linear(self.q_width, cfg.d_model, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_size if per_head else self.q_width, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_size if per_head else self.kv_width, eps=cfg.norm_eps)

    def forward(
        self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None = None
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        if self.qk_norm == "projection":  # over all heads at once (OLMoE)
            q, k = self.q_norm(q), self.k_norm(k)
        q_BSHDh = q.view(B, S, self.n_heads, self.head_size)
        k_BSHDh = k.view(B, S, self.n_kv_heads, self.head_size)
        if self.qk_norm == "head":  # each head on its own, one gain for all (Qwen3)
            q_BSHDh, k_BSHDh = self.q_norm(q_BSHDh), self.k_norm(k_BSHDh)
        q_BHSDh = apply_rotary(q_BSHDh.transpose(1, 2), cos, sin)
        k_BHSDh = apply_rotary(k_BSHDh.transpose(1, 2), cos, sin)
        v_BHSDh = v.view(B, S, self.n_kv_heads, self.head_size).transpose(1, 2)
        if kv is None:
            y_BHSDh = attend(q_BHSDh, k_BHSDh, v_BHSDh, is_causal=True)
        else:
            start = kv.start
            k_BHLDh, v_BHLDh = kv.append(k_BHSDh, v_BHSDh)
            if start == 0 or S == 1:  # a prompt from position 0, or one new token that sees everything
                y_BHSDh = attend(q_BHSDh, k_BHLDh, v_BHLDh, is_causal=start == 0)
            else:  # new token i (position start + i) sees positions 0 .. start + i
                mask_SL = torch.ones(S, start + S, dtype=torch.bool, device=x_BSD.device).tril(start)
                y_BHSDh = attend(q_BHSDh, k_BHLDh, v_BHLDh, attn_mask=mask_SL)
        return self.proj(y_BHSDh.transpose(1, 2).reshape(B, S, self.q_width))

    def reset_parameters(self, init_std: float, num_layers: int) -> None:
        """The projections (the q/k norms are their own initialisation units)."""
        nn.init.normal_(self.qkv.weight, std=init_std)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        # The residual branch's output projection shrinks with depth (GPT-2).
        nn.init.normal_(self.proj.weight, std=init_std / (2 * num_layers) ** 0.5)


def attend(q_BHSDh: torch.Tensor, k_BHLDh: torch.Tensor, v_BHLDh: torch.Tensor, **mask) -> torch.Tensor:
    """SDPA (flash/fused kernel on CUDA) with `is_causal` or `attn_mask`; with fewer K/V heads than
    query heads, grouped-query attention without materialising the repeated K/V."""
    if k_BHLDh.shape[1] != q_BHSDh.shape[1]:
        return F.scaled_dot_product_attention(q_BHSDh, k_BHLDh, v_BHLDh, enable_gqa=True, **mask)
    return F.scaled_dot_product_attention(q_BHSDh, k_BHLDh, v_BHLDh, **mask)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, use_moe: bool):
        super().__init__()
        m = cfg.model
        self.attn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.attn = CausalSelfAttention(m)
        self.ffn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.ffn = (
            MoELayer(m.d_model, m.activation, cfg.moe)
            if use_moe
            else FeedForward(m.d_model, m.ffn_hidden, m.activation)
        )

    def forward(self, x_BSD, cos, sin, kv: LayerKV | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, kv)
        h = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoELayer):
            out, stats = self.ffn(h)
            return x_BSD + out, stats
        return x_BSD + self.ffn(h), None


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        m = cfg.model
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        # Block i (1-based) is MoE when i is a multiple of moe.every: every=2 gives dense, MoE, dense, MoE...
        self.blocks = nn.ModuleList(Block(cfg, use_moe=(i + 1) % cfg.moe.every == 0) for i in range(m.n_layers))
        self.norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(m.max_seq_len, m.head_size // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty_like(self.rope_cos), persistent=False)
        if self.embed.weight.device.type != "meta":  # on meta, parallelize() initialises after materialising
            self.init_weights()

    def tie_weights(self) -> None:
        """The output projection shares the embedding matrix (model.tie_embeddings); `to_empty`
        unties them, so materialising calls this again."""
        if self.cfg.model.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Every parameter and buffer from the global RNG: also after building on the meta device
        and materialising with `to_empty` (see parallel/parallelize.py)."""
        self.tie_weights()
        self.init_buffers()
        for _, init in self.init_units():
            init()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The model's own buffers (rotary tables): no random draw."""
        m = self.cfg.model
        cos, sin = rotary_tables(m.max_seq_len, m.head_size, m.rope_theta, m.rope_scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def init_units(self) -> list[tuple[nn.Module, Callable[[], None]]]:
        """The initialisation as (module, function that initialises the parameters under it that no
        earlier unit did), in the order of their draws from the global RNG. `init_weights` runs them
        all; a sharded set-up (parallel/parallelize.py) can materialise one unit at a time, keep its
        shard and free the rest, and still draw exactly these values."""
        m = self.cfg.model
        units: list[tuple[nn.Module, Callable[[], None]]] = [
            (self.embed, lambda: nn.init.normal_(self.embed.weight, std=m.init_std)),
        ]
        if not m.tie_embeddings:
            units.append((self.lm_head, lambda: nn.init.normal_(self.lm_head.weight, std=m.init_std)))
        norms = [module for module in self.modules() if isinstance(module, nn.RMSNorm)]  # q/k norms too
        units += [(norm, norm.reset_parameters) for norm in norms]  # ones: no draw
        for block in self.blocks:
            units.append((block.attn, partial(block.attn.reset_parameters, m.init_std, m.n_layers)))
            units.append((block.ffn, partial(block.ffn.reset_parameters, m.init_std, m.n_layers)))
        return units

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(
        self, idx_BS: torch.Tensor, cache: KVCache | None = None, logits: bool = True
    ) -> tuple[torch.Tensor | None, list[MoEStats]]:
        """Returns logits [B, S, V] (fp32) and the stats of every MoE layer, in depth order. With a
        `cache` (generation), idx_BS holds the positions after the cached ones, whose keys and values
        are reused, and the cache grows by S. `logits=False` stops after the blocks (None for
        logits): for a pass that only wants the routing."""
        S = idx_BS.shape[1]
        start = 0 if cache is None else cache.length
        if start + S > self.cfg.model.max_seq_len:
            raise ValueError(f"sequence length {start + S} exceeds model.max_seq_len ({self.cfg.model.max_seq_len})")
        cos, sin = self.rope_cos[start : start + S], self.rope_sin[start : start + S]
        x_BSD = self.embed(idx_BS)
        all_stats = []
        for i, block in enumerate(self.blocks):
            if cache is None:
                x_BSD, stats = block(x_BSD, cos, sin)
            else:  # positionally: activation checkpointing's wrapper takes no keywords
                cache.layers[i].start = start
                x_BSD, stats = block(x_BSD, cos, sin, cache.layers[i])
            if stats is not None:
                all_stats.append(stats)
        if cache is not None:
            cache.length = start + S
        if not logits:
            return None, all_stats
        return self.lm_head(self.norm(x_BSD)).float(), all_stats

    @torch.no_grad()
    def update_router_biases(self, tokens_per_expert: list[torch.Tensor]) -> None:
        """Aux-loss-free balancing step for each MoE layer, from its (globally reduced) load."""
        for layer, load_E in zip(self.moe_layers(), tokens_per_expert, strict=True):
            layer.router.update_bias(load_E)


def count_parameters(model: GPT) -> tuple[int, int]:
    """(total, active per token) of an unsharded model: active counts top_k routed experts, not all E."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in model.moe_layers():
        per_expert = sum(
            w.numel() for w in (layer.experts.w1_EDF, layer.experts.w2_EFD, layer.experts.w3_EDF) if w is not None
        )
        per_expert //= layer.experts.num_experts
        inactive += per_expert * (layer.experts.num_experts - layer.top_k)
    return total, total - inactive
