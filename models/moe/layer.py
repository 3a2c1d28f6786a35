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
from models.moe.dispatch import Dispatcher, LocalDispatcher
from models.moe.experts import GroupedExperts
from models.moe.router import TopKRouter


class MoEStats(NamedTuple):
    """One MoE layer's step: returned from forward, never kept in globals."""

    tokens_per_expert: torch.Tensor  # [E] int64, copies routed to each expert (before capacity drops)
    aux_loss: torch.Tensor  # scalar, differentiable
    z_loss: torch.Tensor  # scalar, differentiable
    router_entropy: torch.Tensor  # scalar, detached
    num_dropped: torch.Tensor  # scalar int64, copies dropped by capacity
    bytes_sent: int  # all-to-all bytes this rank sent to other ranks: its tokens, then others' results
    all_to_all_seconds: float  # wall time of the forward exchanges (CPU/gloo; 0 where not measured)


class MoELayer(nn.Module):
    def __init__(self, d_model: int, activation: str, cfg: MoEConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.router = TopKRouter(d_model, cfg)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.expert_ffn_hidden, activation, cfg.backend)
        self.shared_experts = (
            FeedForward(d_model, cfg.num_shared_experts * cfg.expert_ffn_hidden, activation)
            if cfg.num_shared_experts > 0
            else None
        )
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

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        routing = self.router(x_TD)
        x_ND, counts_local, state = self.dispatcher.dispatch(x_TD, routing.expert_ids_TK)
        y_ND = self.experts(x_ND, counts_local)
        out_TD = self.dispatcher.combine(y_ND, routing.weights_TK, state)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        stats = MoEStats(
            tokens_per_expert=state.plan.routed_per_expert_E.detach(),
            aux_loss=routing.aux_loss,
            z_loss=routing.z_loss,
            router_entropy=routing.entropy,
            num_dropped=state.plan.num_dropped,
            bytes_sent=state.bytes_sent,
            all_to_all_seconds=state.comm_seconds,
        )
        return out_TD.view_as(x_BSD), stats


def router_losses(stats: list[MoEStats], cfg: MoEConfig) -> torch.Tensor:
    """aux_loss_coef · Σ aux + z_loss_coef · Σ z over the MoE layers of one forward."""
    if not stats:
        return torch.zeros(())
    aux = torch.stack([s.aux_loss for s in stats]).sum()
    z = torch.stack([s.z_loss for s in stats]).sum()
    return cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
