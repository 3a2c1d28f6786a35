"""Activation checkpointing: recompute blocks (or only their MoE feed-forward) in the backward pass.

Non-reentrant `torch.utils.checkpoint`, installed by replacing the module's `forward` on the
instance: parameter names, `isinstance` checks and module hooks are unchanged. The MoE layer
returns its router losses and statistics from `forward`; the recomputation's copies of them are
discarded by checkpoint, so they are counted once (Megatron-Core #1330, MegaBlocks #113 counted them
per recomputation). The random state is replayed, so router jitter draws the same noise twice.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

ACTIVATION_CHECKPOINTING = ("none", "full", "moe")


def _checkpointed(forward, *args):
    return checkpoint(forward, *args, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """`full`: every transformer block; `moe`: only the MoE feed-forward layers; `none`: nothing."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"train.activation_checkpointing must be one of {', '.join(map(repr, ACTIVATION_CHECKPOINTING))}; "
            f"got {mode!r}"
        )
    if mode == "none":
        return
    blocks = model.blocks.values() if isinstance(model.blocks, nn.ModuleDict) else model.blocks  # a pipeline stage's
    targets = list(blocks) if mode == "full" else model.moe_layers()
    for module in targets:
        module.forward = functools.partial(_checkpointed, module.forward)
