"""ZeRO for the whole model: DeepSpeed for the dense weights, FSDP2 for the routed experts.

Dense weights are identical on every rank (plain data parallelism over the world) and go to a
DeepSpeed engine: all four ZeRO stages apply to them. The routed experts differ between the ranks
of an expert-parallel group and are replicated across their expert-data-parallel (EDP) group,
so they are kept out of the engine (DeepSpeed's MoE support keys on its own `deepspeed.moe` module
and refuses ZeRO-3) and sharded over the EDP group with torch's FSDP2 (`fully_shard`), as
torchtitan does:

    deepspeed.zero_stage   dense (DeepSpeed)                  experts (FSDP2 over EDP)
    0                      replicated                         replicated; grads all-reduced
    1                      optimizer state partitioned        weights, grads and optimizer state
    2                      + gradients partitioned              sharded at rest; gathered for
                                                                forward and backward
    3                      + weights partitioned              + freed between forward and backward

FSDP2 has no ZeRO-1 mode, so stage 1 also shards the experts' gradients (memory only goes down).
Experts are sharded along dim 1 (d_model for w1/w3, the expert width for w2), so a rank holding a
single expert still splits it across its EDP group. With one rank per EDP group nothing is sharded.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from models.config import require_choice
from models.moe.experts import GroupedExperts
from parallel.dims import ParallelDims
from parallel.precision import expert_mixed_precision

ZERO_STAGES = (0, 1, 2, 3)
EXPERT_SHARD_DIM = 1  # see the module docstring


def validate_zero_stage(stage) -> None:
    require_choice("deepspeed.zero_stage", stage, ZERO_STAGES)


DEEPSPEED_DEFAULT_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size


def reduce_bucket_elements(d_model: int) -> int:
    """DeepSpeed's gradient reduce bucket, in elements: d_model² (Hugging Face's "auto" size),
    capped at DeepSpeed's default. DeepSpeed's fixed 5e8 would be allocated up front under ZeRO-3
    (2 GB of fp32 on every rank, whatever the model), and during each backward under ZeRO 1-2."""
    return min(d_model * d_model, DEEPSPEED_DEFAULT_BUCKET)


def deepspeed_config(zero_stage: int, micro_batch: int, grad_accum: int, world_size: int, d_model: int) -> dict:
    config = {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        # Off: dense and expert gradients are clipped together by one global norm (parallel/grad_norm.py).
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": reduce_bucket_elements(d_model)},
        # The optimizer is ours (torch AdamW): DeepSpeed's fused CPU/GPU Adam would need JIT-built ops.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        # No DeepSpeed timing: its throughput timer is on by default and synchronises the device at the
        # start of every forward and the end of every step (the loop times itself, without a sync).
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if zero_stage in (1, 2):
        # DeepSpeed's own gradient norm (a reduction over all partitions and a host copy in every step)
        # is thrown away: ours covers dense and expert gradients together (parallel/grad_norm.py).
        config["zero_optimization"]["compute_grad_norm"] = False
    return config


def detach_experts(model: nn.Module) -> dict[str, GroupedExperts]:
    """Unregister each MoE layer's experts from the module tree (the layer still calls them), so
    that `model.parameters()`, and with it DeepSpeed, sees only the dense weights. Returns them by
    their name in the undetached model (e.g. `blocks.1.ffn.experts`), in depth order."""
    experts = {}
    for name, layer in list(model.named_modules()):
        if isinstance(getattr(layer, "experts", None), GroupedExperts) and "experts" in layer._modules:
            module = layer._modules.pop("experts")
            object.__setattr__(layer, "experts", module)  # a plain attribute: forward is unchanged
            experts[f"{name}.experts"] = module
    return experts


def experts_are_sharded(dims: ParallelDims, zero_stage: int) -> bool:
    """FSDP2 shards the experts over their expert-data-parallel group from ZeRO-1 on, when it has
    more than one rank (`dims`: anything with `.edp`, also the planner's Layout)."""
    return zero_stage >= 1 and dims.edp > 1


def shard_experts(
    experts: dict[str, GroupedExperts], dims: ParallelDims, zero_stage: int, compute_dtype: torch.dtype | None = None
) -> bool:
    """FSDP2 over each EDP group (see the table above); returns whether anything was sharded.
    Under mixed precision the experts are gathered in `compute_dtype` and reduced in fp32."""
    if not experts_are_sharded(dims, zero_stage):
        return False
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = expert_mixed_precision(compute_dtype) or MixedPrecisionPolicy()
    for module in experts.values():
        fully_shard(
            module,
            mesh=dims.mesh["edp"],
            reshard_after_forward=zero_stage == 3,
            shard_placement_fn=lambda _: Shard(EXPERT_SHARD_DIM),
            mp_policy=mp_policy,
        )
        # Sum over the EDP group divided by the data-parallel degree: see parallel/collectives.py for why.
        # As a plain SUM with a separate division: gloo has no PREMUL_SUM.
        module.set_gradient_divide_factor(float(dims.dp))
        module.set_force_sum_reduction_for_comms(True)
    return True


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def expert_global_view(t: torch.Tensor, dims: ParallelDims, sharded: bool) -> torch.Tensor:
    """This rank's piece of an expert tensor (weights or AdamW state) described as a piece of the
    global [E, ...] tensor of the single-process model, on the world mesh: dim 0 split over the EP
    axis, dim 1 over the EDP axis when sharded (else replicated there). Checkpoints are written and
    resharded through this view (torch.distributed.checkpoint reads any layout into any other)."""
    if dims.mesh is None:
        return t
    local = local_tensor(t)
    placements = (Shard(EXPERT_SHARD_DIM) if sharded else Replicate(), Shard(0))  # (edp, ep) axes
    global_shape = list(local.shape)
    global_shape[0] *= dims.ep
    if sharded:
        global_shape[EXPERT_SHARD_DIM] = t.shape[EXPERT_SHARD_DIM]  # the DTensor's global size
    shape = torch.Size(global_shape)
    stride = torch.empty(0).new_empty(shape, device="meta").stride()
    return DTensor.from_local(local, dims.mesh, placements, run_check=False, shape=shape, stride=stride)
