"""The MoE feed-forward: router -> dispatcher.dispatch -> experts -> dispatcher.combine (+ shared experts).

Shape legend: B batch, S sequence, T = B·S tokens, D hidden, K experts per token,
E experts, N routed token copies.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from models.config import MoEConfig
from models.ffn import FeedForward
from models.moe.balance import routing_summary
from models.moe.dispatch import Dispatcher, LocalDispatcher
from models.moe.experts import GroupedExperts, compute_dtype
from models.moe.router import TopKRouter


class MoEStats(NamedTuple):
    """One MoE layer's step: returned from forward, never kept in globals. The balance loss is
    formed from it by models/moe/balance.py, in the scope the job asks for."""

    tokens_per_expert: torch.Tensor  # [E] int64, copies routed to each expert (before capacity drops)
    selected_BE: torch.Tensor  # [B, E] int64, the same per sequence
    prob_mean_BE: torch.Tensor  # [B, E] fp32, mean router probability per sequence, differentiable
    z_loss: torch.Tensor  # scalar, differentiable
    router_entropy: torch.Tensor  # scalar, detached
    num_dropped: torch.Tensor  # scalar int64, copies dropped by capacity
    bytes_sent: int  # all-to-all bytes this rank sent to other ranks: its tokens, then others' results
    all_to_all_seconds: float  # wall time of the forward exchanges (CPU/gloo; 0 where not measured)


def tokens_per_expert_LE(stats: list[MoEStats]) -> torch.Tensor:
    """[L, E] int64 copies routed to each expert of each MoE layer in one forward ([0, 0] without
    MoE layers)."""
    if not stats:
        return torch.zeros(0, 0, dtype=torch.int64)
    return torch.stack([s.tokens_per_expert for s in stats])


class MoELayer(nn.Module):
    def __init__(self, d_model: int, activation: str, cfg: MoEConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.aux_loss_scope = cfg.aux_loss_scope
        self.router = TopKRouter(d_model, cfg)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.expert_ffn_hidden, activation, cfg.backend)
        self.shared_experts = (
            FeedForward(d_model, cfg.num_shared_experts * cfg.expert_ffn_hidden, activation)
            if cfg.num_shared_experts > 0
            else None
        )
        # moe.shared_expert_gate: sigmoid(x · g) scales the shared experts' output per token (Qwen-MoE).
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_expert_gate else None
        # Not a submodule: expert parallelism swaps in an all-to-all dispatcher (parallel/).
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.num_experts, cfg.top_k, cfg.capacity_factor)

    def reset_parameters(self, init_std: float, num_layers: int) -> None:
        nn.init.normal_(self.router.gate_ED, std=init_std)
        self.router.expert_bias.zero_()
        # One draw from the global stream seeds this layer's experts, whatever shard is local.
        expert_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.experts.reset_parameters(init_std, num_layers, expert_seed)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(init_std, num_layers)
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, std=init_std)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        if x_BSD.dim() != 3 and self.aux_loss_scope == "sequence":
            raise ValueError(
                f"moe.aux_loss_scope='sequence' balances each sequence, but this MoE layer got inputs of shape "
                f"{tuple(x_BSD.shape)} with no sequence dimension; use 'micro_batch' or 'global_batch'"
            )
        D = x_BSD.shape[-1]
        x_TD = x_BSD.reshape(-1, D)
        B, S = (x_BSD.shape[0], x_BSD.shape[1]) if x_BSD.dim() == 3 else (1, x_TD.shape[0])  # [T, D]: one sequence
        routing = self.router(x_TD)  # fp32 logits, whatever the input's dtype
        # Tokens are dispatched, exchanged and combined in the compute dtype: under autocast the
        # RMSNorm before this layer still returns fp32, which would double the all-to-all's bytes.
        x_TD = x_TD.to(compute_dtype(x_TD, x_TD))  # autocast's dtype, else the input's own
        x_ND, counts_local, state = self.dispatcher.dispatch(x_TD, routing.expert_ids_TK)
        y_ND = self.experts(x_ND, counts_local, state.host_counts_E)
        out_TD = self.dispatcher.combine(y_ND, routing.weights_TK, state)
        if self.shared_expert_gate is not None:
            out_TD = out_TD + torch.sigmoid(self.shared_expert_gate(x_TD)) * self.shared_experts(x_TD)
        elif self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        # Explicit sizes, not -1: a batch of 0 tokens has no size to infer.
        E, K = self.router.num_experts, self.top_k
        selected_BE, prob_mean_BE = routing_summary(
            routing.probs_TE.view(B, S, E), routing.expert_ids_TK.view(B, S, K), E
        )
        stats = MoEStats(
            tokens_per_expert=state.plan.routed_per_expert_E.detach(),
            selected_BE=selected_BE,
            prob_mean_BE=prob_mean_BE,
            z_loss=routing.z_loss,
            router_entropy=routing.entropy,
            num_dropped=state.plan.num_dropped,
            bytes_sent=state.bytes_sent,
            all_to_all_seconds=state.comm_seconds,
        )
        return out_TD.view(x_BSD.shape), stats
