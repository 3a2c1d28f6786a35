"""Load-balancing losses over three scopes, and the router z-loss total.

Shape legend: B sequences, S tokens per sequence, E experts, K experts chosen per token,
L MoE layers.

The Switch loss is E · Σ_e f_e · P_e: f_e the share of token copies routed to expert e (a count,
not differentiable), P_e the mean router probability of e (differentiable). It is 1 for uniform
routing. What differs between scopes is which tokens f and P are taken over:

    micro_batch    f and P over this rank's micro-batch (Switch Transformer, GShard)
    sequence       f and P per sequence, the loss averaged over sequences (DeepSeek-V3)
    global_batch   f over the whole step (every micro-batch of every data-parallel rank), P over
                   this micro-batch (Megatron-Core's global aux loss; Qwen, arXiv 2501.11873).
                   Summed over micro-batches and ranks with the job's 1/(ranks · micro-batches)
                   gradient averaging, it is exactly the loss of one process taking the whole
                   global batch at once.

Each MoE layer reports `selected_BE` (copies per sequence and expert) and `prob_mean_BE` (mean
probability per sequence and expert); the global counts come from the caller (train/loop.py
reduces them over ranks and micro-batches: models/ never talks to other processes).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RouterLosses(NamedTuple):
    total: torch.Tensor  # scalar: aux_loss_coef · Σ_layers aux + z_loss_coef · Σ_layers z
    aux_L: torch.Tensor  # [L] each layer's balance loss (detached, for metrics)
    z_L: torch.Tensor  # [L] each layer's z-loss (detached)


def routing_summary(
    probs_BSE: torch.Tensor, expert_ids_BSK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected_BE int64 copies per sequence and expert, prob_mean_BE mean probability per
    sequence and expert) of one layer."""
    B, S, K = expert_ids_BSK.shape
    ids_BN = expert_ids_BSK.reshape(B, S * K)
    selected_BE = torch.zeros(B, num_experts, dtype=torch.int64, device=expert_ids_BSK.device)
    selected_BE.scatter_add_(1, ids_BN, torch.ones_like(ids_BN))
    prob_mean_BE = probs_BSE.sum(dim=1) / max(S, 1)
    return selected_BE, prob_mean_BE


def switch_loss(fraction_E: torch.Tensor, prob_mean_E: torch.Tensor) -> torch.Tensor:
    return fraction_E.numel() * (fraction_E.to(prob_mean_E.dtype) * prob_mean_E).sum()


def balance_loss(
    selected_BE: torch.Tensor, prob_mean_BE: torch.Tensor, scope: str, global_selected_E: torch.Tensor | None = None
) -> torch.Tensor:
    """One layer's balance loss in `scope`; `global_selected_E` (copies per expert over the whole
    step) is required for global_batch."""
    if scope == "sequence":
        per_sequence_BE = selected_BE / selected_BE.sum(dim=1, keepdim=True).clamp_min(1)
        losses_B = selected_BE.shape[1] * (per_sequence_BE.to(prob_mean_BE.dtype) * prob_mean_BE).sum(dim=1)
        return losses_B.mean() if losses_B.numel() else prob_mean_BE.sum() * 0.0
    counts_E = selected_BE.sum(dim=0) if scope == "micro_batch" else global_selected_E
    if counts_E is None:
        raise ValueError(f"moe.aux_loss_scope={scope!r} needs the step's global expert counts")
    fraction_E = counts_E / counts_E.sum().clamp_min(1)
    prob_mean_E = prob_mean_BE.mean(dim=0) if prob_mean_BE.shape[0] else prob_mean_BE.sum(dim=0)
    return switch_loss(fraction_E, prob_mean_E)


def router_losses(
    stats: list, aux_loss_coef: float, z_loss_coef: float, scope: str, global_selected_LE: torch.Tensor | None = None
) -> RouterLosses:
    """Over the MoE layers of one forward (`stats`: each layer's MoEStats, in depth order)."""
    if not stats:
        zero = torch.zeros(())
        return RouterLosses(zero, zero.new_zeros(0), zero.new_zeros(0))
    aux_L = torch.stack(
        [
            balance_loss(
                s.selected_BE, s.prob_mean_BE, scope, None if global_selected_LE is None else global_selected_LE[i]
            )
            for i, s in enumerate(stats)
        ]
    )
    z_L = torch.stack([s.z_loss for s in stats])
    total = aux_loss_coef * aux_L.sum() + z_loss_coef * z_L.sum()
    return RouterLosses(total, aux_L.detach(), z_L.detach())
