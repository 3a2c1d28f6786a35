"""DeepSpeed ZeRO (stages 0-3) for the dense weights; the routed experts stay Switchyard's.

Why the experts are kept out of the DeepSpeed engine: DeepSpeed's MoE support keys on its own
`deepspeed.moe.layer.MoE` modules (expert gradient groups, expert checkpoint files) and refuses
ZeRO-3 outright ("Native DeepSpeed MoE is not supported with ZeRO Stage 3"). Our experts are a
different module fed by our dispatcher. So the engine is given the model with its
`GroupedExperts` unregistered: it sees only dense weights, which are identical on every rank
(plain data parallelism), and every ZeRO stage applies to them, stage 3 included. The experts,
different on each EP rank, are kept whole on their rank and optimised here by an AdamW of their
own, with gradients averaged over their expert-data-parallel group.

Clipping: DeepSpeed clips the dense gradients by their global norm; the experts are clipped by the
global norm of all experts (summed over the EP group), both at `optim.grad_clip`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from parallel.data_parallel import all_reduce_expert_gradients
from parallel.dims import ParallelDims

ZERO_STAGES = (0, 1, 2, 3)


def validate_zero_stage(stage) -> None:
    if stage not in ZERO_STAGES:
        raise ValueError(f"deepspeed.zero_stage must be one of 0, 1, 2, 3; got {stage!r}")


def detach_experts(model: nn.Module) -> list[nn.Module]:
    """Unregister each MoE layer's experts from the module tree (the layer still calls them), so
    that `model.parameters()`, and with it DeepSpeed, sees only the dense weights."""
    experts = []
    for layer in model.moe_layers():
        module = layer._modules.pop("experts")
        object.__setattr__(layer, "experts", module)  # a plain attribute: forward is unchanged
        experts.append(module)
    return experts


def deepspeed_config(zero_stage: int, micro_batch: int, grad_accum: int, grad_clip: float, world_size: int) -> dict:
    return {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        # The optimizer is ours (torch AdamW): DeepSpeed's fused CPU/GPU Adam would need JIT-built ops.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class ZeroTrainer:
    """The DeepSpeed engine over the dense weights plus Switchyard's expert optimizer."""

    def __init__(self, model: nn.Module, dense_optimizer: torch.optim.Optimizer, experts: list[nn.Module],
                 expert_optimizer: torch.optim.Optimizer | None, ds_config: dict, dims: ParallelDims, grad_clip: float):
        import deepspeed  # heavy import, only where the engine is built

        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=dense_optimizer, config=ds_config, dist_init_required=False)
        self.experts = experts
        self.expert_optimizer = expert_optimizer
        self.dims = dims
        self.grad_clip = grad_clip

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, idx_BS: torch.Tensor):
        return self.engine(idx_BS)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum; expert grads get the same scaling

    def step(self, lr: float) -> None:
        """Call after every micro-batch's backward; updates weights at the accumulation boundary."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        if boundary and self.expert_optimizer is not None:
            for group in self.expert_optimizer.param_groups:
                group["lr"] = lr
            params = self.expert_parameters()
            all_reduce_expert_gradients(params, self.dims)
            if self.grad_clip > 0:
                clip_expert_gradients(params, self.grad_clip, self.dims)
            self.expert_optimizer.step()
            self.expert_optimizer.zero_grad(set_to_none=True)

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.experts for p in module.parameters()]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)


def clip_expert_gradients(params: list[nn.Parameter], max_norm: float, dims: ParallelDims) -> None:
    """Clip by the norm over all experts: each EP rank holds different experts, so squared norms
    add up over the EP group (EDP replicas hold identical, already averaged gradients)."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            sq += p.grad.detach().double().square().sum().cpu()
    if dims.ep > 1:
        dist.all_reduce(sq, group=dims.ep_group)
    scale = max_norm / (math.sqrt(float(sq)) + 1e-6)
    if scale < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
