"""parallelize(model, dims, job) -> Trainer: the one place where a built model meets the machine.

The order is the documentation (torchtitan's `parallelize_*` functions are the model):

1. Expert parallelism: each MoE layer keeps this rank's experts and an all-to-all dispatcher.
   Done first, on the meta device when the model was built there, so no rank ever allocates
   experts it does not hold.
2. Materialise and initialise: only what this rank holds, from `train.seed` (dense weights
   identical on every rank; each expert from its own seed, whatever the layout). Under ZeRO-3 the
   dense weights are partitioned one initialisation unit at a time; experts that FSDP will shard
   stay on the meta device until step 4.
3. Activation checkpointing (`train.activation_checkpointing`): before any wrapper that must
   re-run in the recomputation (FSDP's all-gather of the experts).
4. ZeRO for the experts: out of the dense module tree, sharded over their EDP group (FSDP2), then
   only this rank's shards are allocated and initialised.
5. Optimizers and the DeepSpeed engine (ZeRO `deepspeed.zero_stage`) for the dense weights.

`job` is the job config (train/config.py: JobConfig); read here: train.seed,
train.activation_checkpointing, train.micro_batch, train.grad_accum, train.dtype, deepspeed.zero_stage, optim.*.
"""

from __future__ import annotations

import torch
from torch import nn

from models.moe.experts import GroupedExperts
from models.moe.layer import MoELayer
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.deepspeed_state import (
    DenseShards,
    StageGroups,
    ensure_adamw_state,
    full_shape,
    partition_zero3,
    skip_deepspeed_shm_op,
    skip_zero3_grad_norm,
)
from parallel.dims import ParallelDims
from parallel.expert_parallel import apply_expert_parallel, shard_moe_layer
from parallel.pipeline import LocalStages, PipelineRunner, StageModule, kept_modules, stage_plan
from parallel.precision import autocast_dtype
from parallel.trainer import Trainer
from parallel.zero import (
    EXPERT_SHARD_DIM,
    deepspeed_config,
    detach_experts,
    experts_are_sharded,
    local_tensor,
    shard_experts,
)


def parallelize(model: nn.Module, dims: ParallelDims, job) -> Trainer:
    if dims.pp > 1:
        return parallelize_pipeline(model, dims, job)
    config = deepspeed_config(
        job.deepspeed.zero_stage, job.train.micro_batch, job.train.grad_accum, dims.dp, job.model.d_model
    )
    experts_sharded = experts_are_sharded(dims, job.deepspeed.zero_stage)
    apply_expert_parallel(model, dims)  # 1
    materialize(
        model,
        dims.device,
        job.train.seed,
        zero3_config=config if job.deepspeed.zero_stage == 3 else None,
        experts_stay_meta=experts_sharded,
    )  # 2
    apply_activation_checkpointing(model, job.train.activation_checkpointing)  # 3
    return Trainer(*shard_and_optimize(model, dims, job, config, experts_sharded), job.optim.grad_clip)  # 4, 5


def shard_and_optimize(model: nn.Module, dims: ParallelDims, job, config: dict, experts_sharded: bool, mpu=None):
    """Steps 4 and 5 on a materialised `model` (or a pipeline rank's stages): the experts out of the
    module tree and under FSDP2, the optimizers, and the DeepSpeed engine over the rest. `mpu`:
    DeepSpeed's groups (parallel/deepspeed_state.py: StageGroups), None for the whole world.
    Returns Trainer's first seven arguments."""
    experts = detach_experts(model)
    shard_experts(experts, dims, job.deepspeed.zero_stage, autocast_dtype(job.train.dtype, dims.device))
    if experts_sharded:
        materialize_expert_shards(experts, dims)

    dense_optimizer = adamw(model.parameters(), job.optim)
    expert_params = [p for module in experts.values() for p in module.parameters()]
    expert_optimizer = adamw(expert_params, job.optim) if expert_params else None
    if expert_optimizer is not None:
        ensure_adamw_state(expert_optimizer)  # so that a checkpoint can load into it before step 1
    import deepspeed  # heavy import, only where the engine is built

    skip_deepspeed_shm_op()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=dense_optimizer, config=config, mpu=mpu, dist_init_required=False
    )
    skip_zero3_grad_norm(engine)  # ours is parallel/grad_norm.py (ZeRO-1/2: deepspeed_config says so)
    dense = DenseShards(engine, dense_optimizer, job.deepspeed.zero_stage)
    return engine, dense, experts, expert_optimizer, experts_sharded, dims, job.deepspeed.zero_stage


def parallelize_pipeline(model: nn.Module, dims: ParallelDims, job) -> Trainer:
    """The same order with pipeline stages (parallel/pipeline.py): the model is cut first, on the
    meta device, and each rank materialises only its stages' weights."""
    config = deepspeed_config(
        job.deepspeed.zero_stage, job.train.micro_batch, job.train.grad_accum, dims.dp, job.model.d_model
    )
    experts_sharded = experts_are_sharded(dims, job.deepspeed.zero_stage)
    mine, ranges, num_stages = stage_plan(model, dims, job.parallel)
    kept = kept_modules(model, mine, ranges, num_stages)
    for module in kept:
        for layer in module.modules():
            if isinstance(layer, MoELayer):
                shard_moe_layer(layer, dims)  # 1
    materialize(model, dims.device, job.train.seed, experts_stay_meta=experts_sharded, kept=kept)  # 2
    local = LocalStages(model, [StageModule(model, s, num_stages, ranges[s]) for s in mine])
    apply_activation_checkpointing(local, job.train.activation_checkpointing)  # 3
    _, singleton = torch.distributed.new_subgroups(group_size=1)  # DeepSpeed's "model parallel" group
    mpu = StageGroups(dims.dp_mesh.get_group(), singleton)
    parts = shard_and_optimize(local, dims, job, config, experts_sharded, mpu)  # 4, 5
    engine, experts = parts[0], parts[2]
    block_stage = {i: s for s in mine for i in ranges[s]}
    experts_by_stage: dict[int, list[GroupedExperts]] = {}
    if experts_sharded:
        for name, module in experts.items():
            experts_by_stage.setdefault(block_stage[int(name.split(".")[1])], []).append(module)
    runner = PipelineRunner(engine, local, num_stages, dims, job, experts_by_stage)
    return Trainer(*parts, job.optim.grad_clip, pipeline=runner)


@torch.no_grad()
def materialize(
    model: nn.Module,
    device: torch.device,
    seed: int,
    zero3_config: dict | None = None,
    experts_stay_meta: bool = False,
    kept: list[nn.Module] | None = None,
) -> None:
    """Allocate a model built on the meta device and initialise it from `seed`; a model built on a
    real device is only moved.

    With `zero3_config` (DeepSpeed ZeRO-3) or `experts_stay_meta`, the model is materialised one
    initialisation unit at a time (GPT.init_units: the embedding, a norm, an attention, a
    feed-forward), with the same draws from the same RNG in the same order as `init_weights` on one
    process. Under ZeRO-3 each unit's dense weights go to DeepSpeed at once, which keeps this rank's
    partition and frees the rest: no rank ever holds the whole dense model. With `experts_stay_meta`
    the routed experts keep only their initialisation recipe; `materialize_expert_shards` writes
    the FSDP shards from it.

    With `kept` (a pipeline stage's modules, parallel/pipeline.py: kept_modules) only those are kept:
    a unit outside them is allocated (one at a time, on the same device, so the same generator
    draws) and freed again, so the kept weights get exactly the single-process values; routed
    experts outside them draw from their own generators and are never allocated."""
    if not any(p.is_meta for p in model.parameters()):
        model.to(device)
        return
    torch.manual_seed(seed)
    if zero3_config is None and not experts_stay_meta and kept is None:
        model.to_empty(device=device)
        model.init_weights()
        return
    if zero3_config is not None:
        skip_deepspeed_shm_op()  # before DeepSpeed sets up its communication
    kept = [model] if kept is None else kept
    kept_ids = {id(m) for top in kept for m in top.modules()}
    model.to_empty(device=device, recurse=False)  # the model's own buffers (every stage uses them)
    model.init_buffers()
    for unit, init in model.init_units():
        keep = id(unit) in kept_ids
        for module in unit.modules():
            if isinstance(module, GroupedExperts) and (experts_stay_meta or not keep):
                continue
            if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
                module.to_empty(device=device, recurse=False)  # (a unit may hold an earlier one: q/k norms)
        model.tie_weights()  # to_empty gives the embedding a new parameter
        init()
        if not keep:
            unit.to_empty(device="meta")
        elif zero3_config is not None:
            partition_zero3(dense_parameters(unit), zero3_config)
    left = [
        name
        for top in kept
        for name, p in top.named_parameters()
        if p.is_meta and not (experts_stay_meta and ".experts." in f".{name}")
    ]
    assert not left, f"no initialisation unit covers {left}"


@torch.no_grad()
def materialize_expert_shards(experts: dict[str, GroupedExperts], dims: ParallelDims) -> None:
    """Allocate only this rank's FSDP shards of experts that were sharded on the meta device, and
    write into them their piece of each expert's initial weights (one expert at a time)."""
    for module in experts.values():
        if not module.w1_EDF.is_meta:
            continue  # built on a real device: FSDP sharded the initialised weights
        module.to_empty(device=dims.device)
        for local in range(module.num_experts):
            for name, values in module.initial_weights(local).items():
                # FSDP cuts dim 1 of the [E, ...] weight as torch.chunk does (dim 0 of one expert's).
                piece = values.chunk(dims.edp, dim=EXPERT_SHARD_DIM - 1)[dims.edp_rank]
                local_tensor(getattr(module, name))[local].copy_(piece)


def dense_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters under `module` that DeepSpeed owns: all but the routed experts' (FSDP2's)."""
    experts = {id(p) for sub in module.modules() if isinstance(sub, GroupedExperts) for p in sub.parameters()}
    return [p for p in module.parameters() if id(p) not in experts]


def parameter_groups(params) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """AdamW's two groups, in this order: matrices (weight decay) and 1-D tensors (norms: none). A
    ZeRO-3 partitioned parameter is empty here and keeps its shape in `ds_shape`."""
    params = list(params)
    return [p for p in params if len(full_shape(p)) >= 2], [p for p in params if len(full_shape(p)) < 2]


def adamw(params, optim) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms (1-D) are left alone."""
    matrices, vectors = parameter_groups(params)
    groups = [{"params": matrices, "weight_decay": optim.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps
    )
