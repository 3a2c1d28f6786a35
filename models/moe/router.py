"""Token-choice top-k router.

Shape legend: T tokens, D hidden, E experts, K experts chosen per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.config import MoEConfig


class RouterOutput(NamedTuple):
    # A NamedTuple (not a dataclass): ZeRO-3 hooks module outputs it can walk (tuples, lists,
    # dicts) to re-gather parameters in the backward pass.
    expert_ids_TK: torch.Tensor  # int64, the k experts of each token
    weights_TK: torch.Tensor  # fp32 combine weights
    probs_TE: torch.Tensor  # fp32 routing distribution per token (sums to 1), for the balance loss
    z_loss: torch.Tensor  # scalar, mean squared log-partition of the logits
    entropy: torch.Tensor  # scalar, mean entropy of the routing distribution (no grad)


class TopKRouter(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.score = cfg.score
        self.normalize_topk = cfg.normalize_topk
        self.jitter = cfg.jitter
        self.bias_update_rate = cfg.bias_update_rate
        # A bare parameter rather than nn.Linear: the logits are computed in fp32 from it directly,
        # and ZeRO-3 gathers a module's own parameters when that module's forward runs.
        self.gate_ED = nn.Parameter(torch.empty(cfg.num_experts, d_model))  # set by MoELayer.reset_parameters
        # Aux-loss-free balancing (DeepSeek-V3): this bias shifts which experts are *selected*,
        # never the combine weights, and is trained by `update_bias`, not by gradients.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        # Routing decisions are made in fp32 whatever the autocast dtype: bf16 logits flip top-k ties.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.gate_ED.float())
        if self.score == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()

        _, expert_ids_TK = torch.topk(scores_TE + self.expert_bias, self.top_k, dim=-1)
        weights_TK = scores_TE.gather(-1, expert_ids_TK)
        if self.normalize_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        # The balance loss (models/moe/balance.py) uses per-token distributions that sum to one
        # (sigmoid scores are normalised for it, as in DeepSeek-V3's sequence-wise balance loss).
        probs_TE = scores_TE if self.score == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
        # Means over tokens that stay finite (0) for a rank that received no token.
        num_tokens = max(x_TD.shape[0], 1)
        z_loss = torch.logsumexp(logits_TE, dim=-1).square().sum() / num_tokens
        with torch.no_grad():
            entropy = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum() / num_tokens
        return RouterOutput(expert_ids_TK, weights_TK, probs_TE, z_loss, entropy)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """One aux-loss-free balancing step: raise the bias of under-loaded experts, lower it for
        over-loaded ones. Callers pass the load counted over the whole (global) batch so that every
        replica applies the same update."""
        if self.bias_update_rate <= 0:
            return
        load_E = tokens_per_expert_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
