"""Decoder-only GPT with rotary embeddings, RMSNorm pre-norm, SDPA attention, dense or MoE FFNs.

Shape legend: B batch, S sequence, D hidden, H heads, Dh head size, V vocabulary.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.config import GPTConfig, ModelConfig
from models.ffn import FeedForward
from models.moe.layer import MoELayer, MoEStats


def rotary_tables(seq_len: int, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [S, Dh/2] for rotating channel pairs (x[2i], x[2i+1])."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles_SH = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles_SH.cos(), angles_SH.sin()


def apply_rotary(x_BHSDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x_even, x_odd = x_BHSDh.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [B, H, S, Dh/2]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).to(x_BHSDh.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3×[B, H, S, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y_BHSDh = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash/fused kernel on CUDA
        return self.proj(y_BHSDh.transpose(1, 2).reshape(B, S, D))

    def reset_parameters(self, init_std: float, num_layers: int) -> None:
        nn.init.normal_(self.qkv.weight, std=init_std)
        # The residual branch's output projection shrinks with depth (GPT-2).
        nn.init.normal_(self.proj.weight, std=init_std / (2 * num_layers) ** 0.5)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, use_moe: bool):
        super().__init__()
        m = cfg.model
        self.attn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.attn = CausalSelfAttention(m)
        self.ffn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.ffn = MoELayer(m.d_model, m.activation, cfg.moe) if use_moe else FeedForward(m.d_model, m.ffn_hidden, m.activation)

    def forward(self, x_BSD, cos, sin) -> tuple[torch.Tensor, MoEStats | None]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin)
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
        self.register_buffer("rope_cos", torch.empty(m.max_seq_len, m.d_model // m.n_heads // 2), persistent=False)
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
        cos, sin = rotary_tables(m.max_seq_len, m.d_model // m.n_heads, m.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def init_units(self) -> list[tuple[nn.Module, Callable[[], None]]]:
        """The initialisation as (module, function that initialises every parameter and buffer
        under it), in the order of their draws from the global RNG. `init_weights` runs them all;
        a sharded set-up (parallel/parallelize.py) can materialise one unit at a time, keep its
        shard and free the rest, and still draw exactly these values."""
        m = self.cfg.model
        units: list[tuple[nn.Module, Callable[[], None]]] = [
            (self.embed, lambda: nn.init.normal_(self.embed.weight, std=m.init_std)),
        ]
        if not m.tie_embeddings:
            units.append((self.lm_head, lambda: nn.init.normal_(self.lm_head.weight, std=m.init_std)))
        norms = [module for module in self.modules() if isinstance(module, nn.RMSNorm)]
        units += [(norm, norm.reset_parameters) for norm in norms]  # ones: no draw
        for block in self.blocks:
            units.append((block.attn, partial(block.attn.reset_parameters, m.init_std, m.n_layers)))
            units.append((block.ffn, partial(block.ffn.reset_parameters, m.init_std, m.n_layers)))
        return units

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, idx_BS: torch.Tensor, logits: bool = True) -> tuple[torch.Tensor | None, list[MoEStats]]:
        """Returns logits [B, S, V] (fp32) and the stats of every MoE layer, in depth order.
        `logits=False` stops after the blocks (None for logits): for a pass that only wants the routing."""
        S = idx_BS.shape[1]
        if S > self.cfg.model.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len ({self.cfg.model.max_seq_len})")
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x_BSD = self.embed(idx_BS)
        all_stats = []
        for block in self.blocks:
            x_BSD, stats = block(x_BSD, cos, sin)
            if stats is not None:
                all_stats.append(stats)
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
        per_expert = sum(w.numel() for w in (layer.experts.w1_EDF, layer.experts.w2_EFD, layer.experts.w3_EDF) if w is not None)
        per_expert //= layer.experts.num_experts
        inactive += per_expert * (layer.experts.num_experts - layer.top_k)
    return total, total - inactive
