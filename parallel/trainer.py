"""The trainer `parallelize` returns: the DeepSpeed engine over the dense weights, the experts with
their own optimizer, one gradient norm over both, and the one owner of the sharded training state
(`state_dict()` / `load_state_dict()`, as DTensors)."""

from __future__ import annotations

import torch
from torch import nn

from models.moe.experts import GroupedExperts
from parallel import training_state
from parallel.collectives import average_replicated_expert_gradients
from parallel.deepspeed_state import DenseShards
from parallel.dims import ParallelDims
from parallel.grad_norm import clip_by_global_norm
from parallel.zero import EXPERT_SHARD_DIM, local_tensor


class Trainer:
    def __init__(
        self,
        engine,
        dense: DenseShards,
        experts: dict[str, GroupedExperts],
        expert_optimizer: torch.optim.Optimizer | None,
        experts_sharded: bool,
        dims: ParallelDims,
        zero_stage: int,
        grad_clip: float,
        pipeline=None,
    ):
        self.engine = engine
        self.dense = dense
        self.experts = experts  # name in the single-process model (e.g. blocks.1.ffn.experts) -> module
        # Taken now, while FSDP has the sharded parameters in place (the objects the optimizer updates;
        # between forward and backward a module may hold its gathered copy instead).
        self.named_expert_parameters = [
            (f"{prefix}.{name}", p) for prefix, module in experts.items() for name, p in module.named_parameters()
        ]
        self.expert_optimizer = expert_optimizer
        self.experts_sharded = experts_sharded
        self.dims = dims
        self.zero_stage = zero_stage
        self.grad_clip = grad_clip
        # parallel/pipeline.py: PipelineRunner with pipeline parallelism (the loop's pipeline step), else None.
        self.pipeline = pipeline

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

    @torch.no_grad()
    def discard_gradients(self) -> None:
        """Zero every gradient accumulated in this window (after the boundary's backward, before
        `step`): a skipped step's, which may not be finite."""
        self.dense.zero_grads()
        for p in self.expert_parameters():
            if p.grad is not None:
                p.grad.zero_()

    def persistent_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """Buffers that belong with the weights (the routers' selection bias), not the recomputable
        ones (rotary tables)."""
        out = []
        for prefix, sub in self.module.named_modules():
            for name, buffer in sub.named_buffers(recurse=False):
                if buffer is not None and name not in sub._non_persistent_buffers_set:
                    out.append((f"{prefix}.{name}" if prefix else name, buffer))
        return out

    # -- the whole training state (parallel/training_state.py says what it holds) ----------------

    def state_dict(self, with_rng: bool = True) -> dict[str, torch.Tensor]:
        """This rank's part of the whole training state, as DTensors that torch.distributed.checkpoint
        can save and read into any other layout: weights, AdamW state, buffers, step counts, and
        (`with_rng`) this rank's random state. Weights and buffers are views of the live tensors."""
        return training_state.state_dict(self, with_rng)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Entries of `state_dict()`'s names and layout (typically filled in by DCP) into this
        trainer; names not given keep their values. Every rank calls it with the same names."""
        training_state.load_state_dict(self, state_dict)

    def load_model_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Weights named as in the single-process model (`GPT.state_dict()`, experts as the global
        [E, ...] tensors, or anything whose [first:first + n] gives those experts' rows, as
        train.hf.mapping.ExpertRows reads them from a file) into this rank's shards. Names not in
        `state_dict` keep their values."""
        whole = {name: t for name, t in state_dict.items() if isinstance(t, torch.Tensor)}
        training_state.load_model_weights(self, whole)
        for name, p in self.named_expert_parameters:  # lazy rows: read only this rank's experts
            rows = state_dict.get(name)
            if rows is None or isinstance(rows, torch.Tensor):
                continue
            module = self.experts[name.rsplit(".", 1)[0]]
            local = rows[module.first_expert : module.first_expert + module.num_experts]
            if self.experts_sharded:  # FSDP's dim-1 slice (torch.chunk sizes, as FSDP cuts it)
                local = local.chunk(self.dims.edp, dim=EXPERT_SHARD_DIM)[self.dims.edp_rank]
            with torch.no_grad():
                local_tensor(p).copy_(local)

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_expert_parameters]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)
        for module in self.experts.values():
            module.train(mode)
