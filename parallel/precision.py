"""Which dtype a job computes in, and what follows from it for the parallel wrappers.

Mixed precision as on GPUs: weights, gradients and AdamW state stay fp32 (the master copies);
matmuls run in the autocast dtype; router logits and losses are fp32 (models/); tokens cross the
all-to-all in the compute dtype (models/moe/layer.py); FSDP2 gathers the experts in the compute
dtype and reduces their gradients in fp32.
"""

from __future__ import annotations

import torch


def autocast_dtype(train_dtype: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype of `train.dtype` on `device`; None = plain fp32. CPUs run bf16 matmuls
    slower than fp32, so `auto` keeps them in fp32."""
    if train_dtype == "bf16":
        return torch.bfloat16
    if train_dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def expert_mixed_precision(compute_dtype: torch.dtype | None):
    """FSDP2's policy for the experts: gathered in the compute dtype (half the all-gather's bytes),
    gradients reduce-scattered and kept in fp32. None (FSDP's default: everything fp32) for fp32 jobs."""
    if compute_dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
