"""parallelize(model, dims, job) -> Trainer: the one place where a built model meets the machine.

The order is the documentation (torchtitan's `parallelize_*` functions are the model):

1. Expert parallelism: each MoE layer keeps this rank's experts and an all-to-all dispatcher.
   Done first, on the meta device when the model was built there, so no rank ever allocates
   experts it does not hold.
2. Materialise and initialise: only what this rank holds, from `train.seed` (dense weights
   identical on every rank; each expert from its own seed, whatever the layout).
3. Activation checkpointing (`train.activation_checkpointing`): before any wrapper that must
   re-run in the recomputation (FSDP's all-gather of the experts).
4. ZeRO for the experts: out of the dense module tree, sharded over their EDP group (FSDP2).
5. Optimizers and the DeepSpeed engine (ZeRO `deepspeed.zero_stage`) for the dense weights.

`job` is the job config (train/config.py: JobConfig); read here: train.seed,
train.activation_checkpointing, train.micro_batch, train.grad_accum, deepspeed.zero_stage, optim.*.
"""

from __future__ import annotations

import torch
from torch import nn

from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.deepspeed_state import DenseShards, ensure_adamw_state, skip_deepspeed_shm_op
from parallel.dims import ParallelDims
from parallel.expert_parallel import apply_expert_parallel
from parallel.trainer import Trainer
from parallel.zero import deepspeed_config, detach_experts, shard_experts


def parallelize(model: nn.Module, dims: ParallelDims, job) -> Trainer:
    apply_expert_parallel(model, dims)  # 1
    materialize(model, dims.device, job.train.seed)  # 2
    apply_activation_checkpointing(model, job.train.activation_checkpointing)  # 3
    experts = detach_experts(model)  # 4
    experts_sharded = shard_experts(experts, dims, job.deepspeed.zero_stage)

    dense_optimizer = adamw(model.parameters(), job.optim)  # 5
    expert_params = [p for module in experts.values() for p in module.parameters()]
    expert_optimizer = adamw(expert_params, job.optim) if expert_params else None
    if expert_optimizer is not None:
        ensure_adamw_state(expert_optimizer)  # so that a checkpoint can load into it before step 1
    config = deepspeed_config(job.deepspeed.zero_stage, job.train.micro_batch, job.train.grad_accum, dims.world_size,
                              job.model.d_model)
    import deepspeed  # heavy import, only where the engine is built

    skip_deepspeed_shm_op()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=dense_optimizer, config=config, dist_init_required=False)
    dense = DenseShards(engine, dense_optimizer, job.deepspeed.zero_stage)
    return Trainer(engine, dense, experts, expert_optimizer, experts_sharded, dims, job.deepspeed.zero_stage, job.optim.grad_clip)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a model built on the meta device and initialise it from `seed`; a model built on a
    real device is only moved."""
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
        torch.manual_seed(seed)
        model.init_weights()
    else:
        model.to(device)


def parameter_groups(params) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """AdamW's two groups, in this order: matrices (weight decay) and 1-D tensors (norms: none)."""
    params = list(params)
    return [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]


def adamw(params, optim) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms (1-D) are left alone."""
    matrices, vectors = parameter_groups(params)
    groups = [{"params": matrices, "weight_decay": optim.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
