"""Pipeline parallelism: a built GPT cut into stages, run by torch.distributed.pipelining.

    stage modules      `StageModule`: the blocks of one stage (and the embedding on the first, the
                       final norm and output head on the last), under the single-process model's
                       parameter names (`blocks.5.attn.qkv.weight`), so checkpoints, the optimizer
                       state and the gradient norm need no renaming;
    one engine a rank  the rank's stages live in one `LocalStages` container that DeepSpeed wraps
                       (ZeRO over the stage's data-parallel ranks: parallel/dims.py); each
                       torch `PipelineStage` calls the engine with its stage index;
    backward           every micro-batch's backward goes through `engine.backward` (a scalar:
                       the loss on the last stage, Σ output · output-gradient elsewhere), so
                       DeepSpeed's accumulation and reduction work as without pipelining; the
                       last backward of the step on this rank is the accumulation boundary;
    router losses      each MoE layer's balance and z losses are attached to the hidden state right
                       after the layer (`AttachLoss`, as Megatron-Core's aux-loss scaler): forward
                       unchanged, backward adds d(coef · loss) = 1/grad_accum (the loss's share of
                       the step, like the cross-entropy's), so they reach every weight below the
                       router exactly once, whichever stage holds the layer;
    tied embeddings    the first stage sends its embedding matrix along with the hidden state; the
                       last stage projects with it and its gradient flows back through the stages
                       into the embedding's own backward (exact at every ZeRO stage; it costs
                       V·D elements per micro-batch and stage boundary: untie large models).

Shape legend: B micro-batch, S sequence, D hidden, V vocabulary, L MoE layers, E experts.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.gpt import GPT
from models.moe.balance import balance_loss
from models.moe.layer import MoELayer, MoEStats
from parallel.deepspeed_state import set_accumulation_boundary
from parallel.dims import ParallelDims
from parallel.pipeline_layout import local_stages, stage_block_counts, stage_ranges

SCHEDULE_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


class AttachLoss(torch.autograd.Function):
    """y = x in the forward; in the backward, `loss` receives the gradient `grad_scale` (as if
    `grad_scale · loss` had been added to the objective) and x its own gradient unchanged."""

    @staticmethod
    def forward(ctx, x, loss, grad_scale: float):
        ctx.grad_scale = grad_scale
        ctx.save_for_backward(loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        (loss,) = ctx.saved_tensors
        return grad_x, torch.full_like(loss, ctx.grad_scale), None


@dataclass
class RouterLossSettings:
    """What the stages need to form each MoE layer's router loss in this step."""

    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    scope: str = "micro_batch"
    step_counts_LE: torch.Tensor | None = None  # global_batch: copies per expert over the whole step, every layer
    grad_scale: float = 1.0  # 1 / grad_accum: each micro-batch's share of the step's loss
    # global_batch with one micro-batch a step: sums a layer's [E] counts over the stage's ranks.
    reduce_counts_E: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class LayerRecord:
    """One MoE layer's figures of one micro-batch, for the metrics (detached)."""

    moe_index: int  # the layer's index among the model's MoE layers
    stats: MoEStats
    aux: torch.Tensor
    z: torch.Tensor


class StageModule(nn.Module):
    """Blocks [first, last) of a GPT, with the embedding (first stage) or the final norm and output
    head (last stage); the submodules are the model's own, registered under the model's names."""

    def __init__(self, model: GPT, index: int, num_stages: int, blocks: range):
        super().__init__()
        self.index, self.is_first, self.is_last = index, index == 0, index == num_stages - 1
        self.tied = model.cfg.model.tie_embeddings
        if self.is_first:
            self.embed = model.embed
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        if self.is_last:
            self.norm = model.norm
            if not self.tied:
                self.lm_head = model.lm_head
        moe_blocks = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)]
        self.moe_index = {i: moe_blocks.index(i) for i in blocks if i in moe_blocks}
        self.__dict__["tables"] = model  # what holds the rotary tables (not a submodule; see LocalStages)
        self.settings = RouterLossSettings()
        self.records: list[LayerRecord] = []

    def forward(self, *inputs):
        """First stage: (idx_BS,); others: (x_BSD,) or, with tied embeddings, (x_BSD, w_VD).
        Returns x_BSD (or (x_BSD, w_VD)); the last stage returns logits_BSV (fp32)."""
        if self.is_first:
            x_BSD = self.embed(inputs[0])
            w_VD = self.embed.weight if self.tied else None
        else:
            x_BSD = inputs[0]
            w_VD = inputs[1] if self.tied else None
        S = x_BSD.shape[1]
        cos, sin = self.tables.rope_cos[:S], self.tables.rope_sin[:S]
        for key, block in self.blocks.items():
            x_BSD, stats = block(x_BSD, cos, sin)
            if stats is not None:
                x_BSD = self.account_router_loss(x_BSD, self.moe_index[int(key)], stats)
        if self.is_last:
            h_BSD = self.norm(x_BSD)
            logits = F.linear(h_BSD, w_VD) if self.tied else self.lm_head(h_BSD)
            return logits.float()
        return (x_BSD, w_VD) if self.tied else x_BSD

    def account_router_loss(self, x_BSD: torch.Tensor, moe_index: int, stats: MoEStats) -> torch.Tensor:
        s = self.settings
        counts_E = None
        if s.scope == "global_batch":
            if s.step_counts_LE is not None:
                counts_E = s.step_counts_LE[moe_index]
            else:
                counts_E = s.reduce_counts_E(stats.tokens_per_expert) if s.reduce_counts_E else stats.tokens_per_expert
        aux = balance_loss(stats.selected_BE, stats.prob_mean_BE, s.scope, counts_E)
        self.records.append(LayerRecord(moe_index, stats, aux.detach(), stats.z_loss.detach()))
        loss = s.aux_loss_coef * aux + s.z_loss_coef * stats.z_loss
        if torch.is_grad_enabled() and loss.requires_grad:
            x_BSD = AttachLoss.apply(x_BSD, loss, s.grad_scale)
        return x_BSD

    def moe_layers(self) -> list[MoELayer]:
        return [self.blocks[str(i)].ffn for i in sorted(self.moe_index)]


class LocalStages(nn.Module):
    """This rank's stages in one module (what its DeepSpeed engine wraps): the union of their
    submodules under the model's names; `forward(stage, *inputs)` runs one of them."""

    def __init__(self, model: GPT, stages: list[StageModule]):
        super().__init__()
        self.cfg = model.cfg
        for name in ("embed", "norm", "lm_head"):
            if any(name in stage._modules for stage in stages):
                setattr(self, name, getattr(model, name))
        self.blocks = nn.ModuleDict({key: block for stage in stages for key, block in stage.blocks.items()})
        self.stages = stages  # a plain list: their modules are registered above, once
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        for stage in stages:  # the tables the stages read, wherever this module moves them
            stage.__dict__["tables"] = self

    def forward(self, stage: int, *inputs):
        return self.stage(stage)(*inputs)

    def stage(self, index: int) -> StageModule:
        return next(s for s in self.stages if s.index == index)

    def moe_layers(self) -> list[MoELayer]:
        return [layer for stage in self.stages for layer in stage.moe_layers()]

    def moe_indices(self) -> list[int]:
        return [i for stage in self.stages for i in sorted(stage.moe_index.values())]

    @torch.no_grad()
    def update_router_biases(self, tokens_per_expert: list[torch.Tensor]) -> None:
        """The selection-bias step of the layers held here, from every layer's global load."""
        for layer, index in zip(self.moe_layers(), self.moe_indices(), strict=True):
            layer.router.update_bias(tokens_per_expert[index])


class EngineCall(nn.Module):
    """What a torch PipelineStage calls: the rank's engine, running stage `index`."""

    def __init__(self, engine, index: int):
        super().__init__()
        self.index = index
        self.__dict__["engine"] = engine  # not a submodule: the engine's parameters are its own

    def forward(self, *inputs):
        return self.engine(self.index, *inputs)


def stage_plan(model: GPT, dims: ParallelDims, parallel) -> tuple[list[int], list[range], int]:
    """(this rank's stages, every stage's blocks, the number of stages). `parallel`: the job's
    ParallelConfig (split, stages_per_rank)."""
    num_stages = dims.pp * parallel.stages_per_rank
    m = model.cfg.model
    block_params = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    first_extra = model.embed.weight.numel()
    last_extra = model.norm.weight.numel() + (0 if m.tie_embeddings else model.lm_head.weight.numel())
    split = parallel.split if isinstance(parallel.split, str) else [int(c) for c in parallel.split]
    ranges = stage_ranges(stage_block_counts(split, block_params, num_stages, first_extra, last_extra))
    return local_stages(dims.pp_rank, dims.pp, parallel.stages_per_rank), ranges, num_stages


def kept_modules(model: GPT, stages: list[int], ranges: list[range], num_stages: int) -> list[nn.Module]:
    """The model's top-level pieces that `stages` hold (blocks, embedding, norm, untied head)."""
    out: list[nn.Module] = [model.blocks[i] for s in stages for i in ranges[s]]
    if 0 in stages:
        out.append(model.embed)
    if num_stages - 1 in stages:
        out.append(model.norm)
        if not model.cfg.model.tie_embeddings:
            out.append(model.lm_head)
    return out


def stage_io_meta(stage: StageModule, micro_batch: int, seq_len: int, cfg, dtype: torch.dtype):
    """(inputs, outputs) of one micro-batch as meta tensors: what torch's PipelineStage needs to
    allocate its buffers without running the stage (MoE layers would talk to other ranks)."""
    m = cfg.model

    def hidden():
        return torch.empty(micro_batch, seq_len, m.d_model, dtype=dtype, device="meta", requires_grad=True)

    def tied(x):
        if not m.tie_embeddings:
            return (x,)
        return (x, torch.empty(m.vocab_size, m.d_model, dtype=dtype, device="meta", requires_grad=True))

    inputs = (
        (torch.empty(micro_batch, seq_len, dtype=torch.int64, device="meta"),) if stage.is_first else tied(hidden())
    )
    if stage.is_last:
        outputs = (torch.empty(micro_batch, seq_len, m.vocab_size, dtype=torch.float32, device="meta"),)
    else:
        outputs = tied(hidden())
    return inputs, outputs


class PipelineRunner:
    """The torch pipelining stages and schedule of this rank, and the two other passes the loop
    needs (forward only: evaluation and the global-batch routing pass)."""

    def __init__(self, engine, local: LocalStages, num_stages: int, dims: ParallelDims, job, experts_by_stage):
        from torch.distributed.pipelining import PipelineStage, schedules

        self.engine, self.local, self.num_stages, self.dims = engine, local, num_stages, dims
        self.n_micro = job.train.grad_accum
        self.micro_batch, self.seq_len = job.train.micro_batch, job.train.seq_len
        self.dtype = next(local.parameters()).dtype
        self.experts_by_stage = experts_by_stage  # stage index -> its FSDP-sharded expert modules
        runtime = self

        class Stage(PipelineStage):
            def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
                if backward_type != "full":
                    raise NotImplementedError(f"pipeline backward of type {backward_type!r}")
                grads = runtime.backward(
                    self.stage_index, bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"]
                )
                return grads, None

        self.stages = []
        for module in local.stages:
            inputs, outputs = stage_io_meta(module, self.micro_batch, self.seq_len, job, self.dtype)
            self.stages.append(
                Stage(
                    EngineCall(engine, module.index),
                    module.index,
                    num_stages,
                    dims.device,
                    input_args=inputs,
                    output_args=outputs,
                    group=dims.pp_group,
                )
            )
        schedule_class = getattr(schedules, SCHEDULE_CLASSES[job.parallel.schedule])
        stages = self.stages if job.parallel.schedule == "interleaved_1f1b" else self.stages[0]
        self.schedule = schedule_class(stages, self.n_micro, loss_fn=self.cross_entropy, scale_grads=False)
        # The last stage's outputs (every micro-batch's logits) are not wanted: without this, torch
        # keeps them all until the next step to return them merged.
        wants = inspect.signature(self.schedule.step).parameters
        self.step_options = {"return_outputs": False} if "return_outputs" in wants else {}
        self.backward_calls: dict[int, int] = {}

    @staticmethod
    def cross_entropy(logits_BSV: torch.Tensor, y_BS: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_BSV.flatten(0, 1), y_BS.flatten())

    @property
    def holds_first(self) -> bool:
        return self.local.stages[0].is_first

    @property
    def holds_last(self) -> bool:
        return self.local.stages[-1].is_last

    def backward(self, stage: int, outputs, output_grads, inputs) -> tuple:
        """One micro-batch's backward of `stage` through the engine; returns the inputs' gradients."""
        self.backward_calls[stage] = self.backward_calls.get(stage, 0) + 1
        last_of_stage = self.backward_calls[stage] == self.n_micro
        set_accumulation_boundary(self.engine, sum(self.backward_calls.values()) == self.n_micro * len(self.stages))
        for module in self.experts_by_stage.get(stage, []):
            module.set_requires_gradient_sync(last_of_stage)  # FSDP reduce-scatters once per step
        if output_grads is None:  # the last stage: `outputs` is this micro-batch's loss
            self.engine.backward(outputs)  # scaled by 1/grad_accum, as without pipelining
        else:
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            grads = output_grads if isinstance(output_grads, tuple) else (output_grads,)
            surrogate = sum((o * g).sum() for o, g in zip(outputs, grads) if g is not None and o.requires_grad)
            self.engine.backward(surrogate, scale_wrt_gas=False)  # the gradients already carry 1/grad_accum
        grads_in = []
        for value in inputs:
            grads_in.append(value.grad if isinstance(value, torch.Tensor) else None)
            if isinstance(value, torch.Tensor):
                value.grad = None
        return tuple(grads_in)

    def train_step(self, xs: list[torch.Tensor], ys: list[torch.Tensor], autocast) -> list[torch.Tensor]:
        """Forward and backward of the step's micro-batches; the last stage's losses (else [])."""
        self.backward_calls = {}
        set_accumulation_boundary(self.engine, False)
        args = (torch.cat(xs).to(self.dims.device),) if self.holds_first else ()
        target = torch.cat(ys).to(self.dims.device) if self.holds_last else None
        losses: list[torch.Tensor] = []
        with autocast:
            self.schedule.step(*args, target=target, losses=losses, **self.step_options)
        assert sum(self.backward_calls.values()) == self.n_micro * len(self.stages), self.backward_calls
        return losses if self.holds_last else []

    def _peer(self, stage: int) -> int:
        """The global rank holding `stage` in this rank's pipeline."""
        return dist.get_global_rank(self.dims.pp_group, stage % self.dims.pp)

    @torch.no_grad()
    def forward_only(self, xs: list[torch.Tensor], autocast) -> list[torch.Tensor]:
        """Every micro-batch through every stage, no graph: the last stage's logits (else [])."""
        outputs = []
        with autocast if autocast is not None else contextlib.nullcontext():
            for x in xs:
                for module in self.local.stages:
                    if module.is_first:
                        inputs = (x.to(self.dims.device),)
                    else:
                        meta, _ = stage_io_meta(module, x.shape[0], x.shape[1], self.local.cfg, self.dtype)
                        inputs = tuple(torch.empty(t.shape, dtype=t.dtype, device=self.dims.device) for t in meta)
                        for t in inputs:
                            dist.recv(t, src=self._peer(module.index - 1))
                    out = module(*inputs)
                    if module.is_last:
                        outputs.append(out)
                    else:
                        for t in out if isinstance(out, tuple) else (out,):
                            dist.send(t.contiguous(), dst=self._peer(module.index + 1))
        return outputs

    def take_records(self) -> list[LayerRecord]:
        """The MoE figures the stages recorded since the last call (and forget them)."""
        out = [r for stage in self.local.stages for r in stage.records]
        for stage in self.local.stages:
            stage.records = []
        return out

    def set_router_losses(self, settings: RouterLossSettings) -> None:
        for stage in self.local.stages:
            stage.settings = settings
