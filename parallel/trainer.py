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
from parallel.zero import EXPERT_SHARD_DIM, local_tensor


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

    def forward(self, idx_BS: torch.Tensor, logits: bool = True):
        return self.engine(idx_BS, logits=logits)

    def backward(self, loss: torch.Tensor) -> None:
        if self.experts_sharded:
            # FSDP2 reduce-scatters expert gradients once per optimizer step, in the last micro-batch's
            # backward; earlier ones accumulate the unsharded gradients locally.
            sync = self.engine.is_gradient_accumulation_boundary()
            for module in self.experts.values():
                module.set_requires_gradient_sync(sync)
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

    def persistent_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """Buffers that belong with the weights (the routers' selection bias), not the recomputable
        ones (rotary tables)."""
        out = []
        for prefix, sub in self.module.named_modules():
            for name, buffer in sub.named_buffers(recurse=False):
                if buffer is not None and name not in sub._non_persistent_buffers_set:
                    out.append((f"{prefix}.{name}" if prefix else name, buffer))
        return out

    @torch.no_grad()
    def load_model_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Weights named as in the single-process model (`GPT.state_dict()`, experts as the global
        [E, ...] tensors) into this rank's shards. Names not in `state_dict` keep their values."""
        for name, p in self.dense.named_parameters():
            if name in state_dict:
                flat = state_dict[name].reshape(-1)
                piece = self.dense.piece(p)
                if self.zero_stage == 3:  # only this rank's range of the flattened parameter
                    if piece is None:
                        continue
                    flat = flat[piece.start : piece.start + piece.numel]
                self.dense.load_weights(p, flat.to(self.dims.device))
        for name, buffer in self.persistent_buffers():
            if name in state_dict:
                buffer.copy_(state_dict[name])
        for name, p in self.named_expert_parameters:
            if name in state_dict:
                module = self.experts[name.rsplit(".", 1)[0]]
                local = state_dict[name][module.first_expert : module.first_expert + module.num_experts]
                if self.experts_sharded:  # FSDP's dim-1 slice (torch.chunk sizes, as FSDP cuts it)
                    local = local.chunk(self.dims.edp, dim=EXPERT_SHARD_DIM)[self.dims.edp_rank]
                local_tensor(p).copy_(local)

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_expert_parameters]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)
        for module in self.experts.values():
            module.train(mode)
