"""Collectives the training loop needs outside DeepSpeed: expert-gradient averaging and sums.

Why the expert divisor is the world size, not the group size: the single-process gradient of a
global-batch mean is (1/W)·Σ_ranks ∂L_r/∂θ. A rank holding expert e already receives, through the
all-to-all backward, the contributions of every rank in its EP group; summing over the EDP group
adds the other EP groups, giving Σ over all W ranks. (DeepSpeed divides its own expert gradients
by the data-parallel world size for the same reason.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.dims import ParallelDims


def all_reduce_expert_gradients(params: list[nn.Parameter], dims: ParallelDims) -> None:
    if not dims.distributed or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # experts that saw no token still join the collective
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective instead of one per tensor
    dist.all_reduce(flat, group=dims.edp_group)
    flat /= dims.world_size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def all_reduce_sum(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Sum a tensor over the world (a no-op on one process)."""
    if dims.distributed:
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, dims: ParallelDims) -> bool:
    """True when `flag` is true on at least one rank: every rank takes the same branch."""
    t = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce_sum(t, dims).item() > 0)
