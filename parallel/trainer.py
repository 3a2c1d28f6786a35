"""The trainer `parallelize` returns: the DeepSpeed engine over the dense weights, the experts with
their own optimizer, and one gradient norm over both."""

from __future__ import annotations

import torch
from torch import nn

from models.moe.experts import GroupedExperts
from parallel.collectives import average_replicated_expert_gradients
from parallel.deepspeed_state import DenseShards
from parallel.dims import ParallelDims
from parallel.grad_norm import clip_by_global_norm
from parallel.zero import local_tensor


class Trainer:
    def __init__(self, engine, dense: DenseShards, experts: dict[str, GroupedExperts],
                 expert_optimizer: torch.optim.Optimizer | None, experts_sharded: bool, dims: ParallelDims,
                 zero_stage: int, grad_clip: float):
        self.engine = engine
        self.dense = dense
        self.experts = experts  # name in the single-process model (e.g. blocks.1.ffn.experts) -> module
        # Taken now, while FSDP has the sharded parameters in place (the objects the optimizer updates;
        # between forward and backward a module may hold its gathered copy instead).
        self.named_expert_parameters = [(f"{prefix}.{name}", p) for prefix, module in experts.items()
                                        for name, p in module.named_parameters()]
        self.expert_optimizer = expert_optimizer
        self.experts_sharded = experts_sharded
        self.dims = dims
        self.zero_stage = zero_stage
        self.grad_clip = grad_clip

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, idx_BS: torch.Tensor):
        return self.engine(idx_BS)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum; expert grads get the same scaling

    def step(self, lr: float) -> float | None:
        """Call after every micro-batch's backward. At the accumulation boundary: clip dense and
        expert gradients by their one global norm, update both, and return that norm (else None)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        grad_norm = None
        if boundary:
            params = self.expert_parameters()
            if not self.experts_sharded:
                average_replicated_expert_gradients(params, self.dims)
            expert_grads = [local_tensor(p.grad) for p in params if p.grad is not None]
            grad_norm = clip_by_global_norm(self.dense, expert_grads, self.experts_sharded, self.grad_clip, self.dims)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        if boundary and self.expert_optimizer is not None:
            for group in self.expert_optimizer.param_groups:
                group["lr"] = lr
            self.expert_optimizer.step()
            self.expert_optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_expert_parameters]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)
        for module in self.experts.values():
            module.train(mode)
