"""One global gradient norm over dense and expert gradients, and clipping by it.

The norm is the one a single process would compute over the whole model's gradients. Each rank
holds a piece of them: its share of the dense gradients (all of them under ZeRO-0, a disjoint
range under ZeRO >= 1) and of the experts' (its EP shard; under FSDP a disjoint dim-1 slice, else a
replica of what its EDP group holds). Each rank scales its squared sums so that one sum over the
world counts every element exactly once (torchtitan sums expert and non-expert norms the same way).
"""

from __future__ import annotations

import math

import torch

from parallel.collectives import all_reduce_sum
from parallel.deepspeed_state import DenseShards
from parallel.dims import ParallelDims


def squared_sum(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total += t.detach().double().square().sum().to(device)
    return total


def global_grad_norm(
    dense: DenseShards, expert_grads: list[torch.Tensor], experts_sharded: bool, dims: ParallelDims
) -> float:
    dense_grads = [g for _, p in dense.named_parameters() if (g := dense.grad(p)) is not None]
    dense_copies = 1 if dense.partitioned else dims.dp  # ranks holding each dense element (its stage's)
    expert_copies = 1 if experts_sharded else dims.edp  # ranks holding each expert element
    shares = torch.stack(
        [squared_sum(dense_grads, dims.device) / dense_copies, squared_sum(expert_grads, dims.device) / expert_copies]
    )
    return math.sqrt(float(all_reduce_sum(shares, dims).sum()))


def clip_by_global_norm(
    dense: DenseShards, expert_grads: list[torch.Tensor], experts_sharded: bool, max_norm: float, dims: ParallelDims
) -> float:
    """Scales every gradient by max_norm / norm when the norm exceeds max_norm (as
    torch.nn.utils.clip_grad_norm_ does); max_norm 0 disables clipping. Returns the norm before."""
    norm = global_grad_norm(dense, expert_grads, experts_sharded, dims)
    coef = max_norm / (norm + 1e-6)
    if max_norm > 0 and coef < 1:
        dense.scale_grads(coef)
        for g in expert_grads:
            g.mul_(coef)
    return norm
