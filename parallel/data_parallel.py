"""Gradient averaging for the plain-PyTorch path: dense weights over the whole world, routed
experts over their expert-data-parallel group.

Why the expert divisor is the world size, not the group size: the single-process gradient of a
global-batch mean is (1/W)·Σ_ranks ∂L_r/∂θ. A rank holding expert e already receives, through the
all-to-all backward, the contributions of every rank in its EP group; summing over the EDP group
adds the other EP groups, giving Σ over all W ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.dims import ParallelDims


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for layer in model.moe_layers() for p in layer.experts.parameters()]


def _all_reduce_mean(grads: list[torch.Tensor], group, world_size: int) -> None:
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective instead of one per tensor
    dist.all_reduce(flat, group=group)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_gradients(model: nn.Module, dims: ParallelDims) -> None:
    if not dims.distributed:
        return
    expert_ids = {id(p) for p in expert_parameters(model)}
    dense, expert = [], []
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a layer unused on this rank must still join the collective
        (expert if id(p) in expert_ids else dense).append(p.grad)
    _all_reduce_mean(dense, None, dims.world_size)
    _all_reduce_mean(expert, dims.edp_group, dims.world_size)


def all_reduce_sum(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Sum a tensor over the world (a no-op on one process)."""
    if dims.distributed:
        dist.all_reduce(t)
    return t
