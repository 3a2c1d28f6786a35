"""apply_expert_parallel: turn a built single-process model into this rank's expert-parallel shard.

The model code does not change: each MoE layer keeps only its local experts' weights and gets an
all-to-all dispatcher in place of the local one. Call it on a model initialised identically on
every rank (same seed), so that the shards together are exactly the single-process weights.
"""

from __future__ import annotations

from torch import nn

from models.moe.layer import MoELayer
from parallel.dims import ParallelDims
from parallel.dispatcher import AllToAllDispatcher


def apply_expert_parallel(model: nn.Module, dims: ParallelDims) -> None:
    """Every MoE layer of `model` (anything with `moe_layers()`)."""
    for layer in model.moe_layers():
        shard_moe_layer(layer, dims)


def shard_moe_layer(layer: MoELayer, dims: ParallelDims) -> None:
    if dims.ep == 1:
        return  # every rank holds every expert; the LocalDispatcher stays
    num_experts = layer.dispatcher.num_experts
    num_local = num_experts // dims.ep
    layer.experts.keep_experts(dims.ep_rank * num_local, num_local)
    layer.dispatcher = AllToAllDispatcher(
        num_experts, layer.top_k, layer.dispatcher.capacity_factor, dims.ep_group, dims.ep, dims.ep_rank
    )
