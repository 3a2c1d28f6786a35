"""The training step and the evaluation under pipeline parallelism (parallel.pp > 1).

The same contract as train/loop.py's `run_step` and `evaluate`: one optimizer step over grad_accum
micro-batches (they are the pipeline's micro-batches), a non-finite loss on any rank skips the step
on every rank, stop signals and background writes are agreed in the step's one all-reduce, and the
returned figures have the same meaning. What differs: the schedule runs every forward and backward
(parallel/pipeline.py), only the last stage's ranks hold a cross-entropy, and each rank sees the
MoE layers of its own stages (the [L, E] load is summed over the world, where each layer counts on
its stage's ranks only).

Shape legend: L MoE layers (of the whole model), E experts.
"""

from __future__ import annotations

import torch

from parallel.collectives import all_reduce_sum
from parallel.pipeline import RouterLossSettings
from train.data import BatchSampler
from train.loop import StepResult, autocast_context, look_at_host, replayed_rng
from train.metrics import MoEWindow


def load_of(records, num_layers: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """[L, E] int64 copies routed to each expert of the layers in `records` (zeros elsewhere)."""
    load_LE = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
    for r in records:
        load_LE[r.moe_index] += r.stats.tokens_per_expert
    return load_LE


@torch.no_grad()
def count_routing(run, xs: list[torch.Tensor]) -> torch.Tensor:
    """[L, E] copies routed to each expert over the whole step (train/loop.py: count_routing, through
    the pipeline): one forward of every micro-batch, no graph, the random state replayed."""
    runner = run.trainer.pipeline
    runner.set_router_losses(RouterLossSettings())  # the pass's own losses are not used
    with replayed_rng(run.device):
        runner.forward_only(xs, autocast_context(run))
    records = runner.take_records()
    return all_reduce_sum(load_of(records, run.num_moe_layers, run.job.moe.num_experts, run.device), run.dims)


def router_settings(run, xs: list[torch.Tensor]) -> RouterLossSettings:
    moe, t, dims = run.job.moe, run.job.train, run.dims
    settings = RouterLossSettings(moe.aux_loss_coef, moe.z_loss_coef, moe.aux_loss_scope, grad_scale=1 / t.grad_accum)
    if moe.aux_loss_scope == "global_batch" and run.num_moe_layers:
        if t.grad_accum > 1:
            settings.step_counts_LE = count_routing(run, xs)
        elif dims.dp > 1:
            group = dims.dp_mesh.get_group()

            def reduce_counts_E(counts_E: torch.Tensor) -> torch.Tensor:
                summed = counts_E.clone()
                torch.distributed.all_reduce(summed, group=group)
                return summed

            settings.reduce_counts_E = reduce_counts_E
    return settings


def run_pipeline_step(run, sampler: BatchSampler, step: int, window: MoEWindow, lr: float):
    """One optimizer step (train/loop.py: run_step's contract). Host syncs: the step's losses and
    flags are read once, after the schedule (plus the global gradient norm)."""
    t, runner = run.job.train, run.trainer.pipeline
    xs, ys = zip(*(sampler.get(step, micro_step) for micro_step in range(t.grad_accum)))
    runner.set_router_losses(router_settings(run, list(xs)))
    losses = runner.train_step(list(xs), list(ys), autocast_context(run))
    records = runner.take_records()
    ce_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    num_bad = torch.zeros((), dtype=torch.float64, device=run.device)
    for loss in losses:
        ce_sum += loss.detach().double()
        num_bad += (~torch.isfinite(loss.detach())).double()
    for r in records:  # a router loss that is not finite poisons the gradients of its stage
        num_bad += (~torch.isfinite(r.aux + r.z)).double()
    num_bad_world, stop, writing, ce_total = look_at_host(run, num_bad, ce_sum)
    if num_bad_world > 0:
        # Every backward already ran: the gradients are dropped and the step applied with lr 0, as
        # train/loop.py's skip_step does (AdamW's moments decay by one step of zero gradients).
        run.trainer.discard_gradients()
        run.trainer.step(0.0)
        return StepResult(applied=False, stop=stop, writing=writing)
    grad_norm = run.trainer.step(lr)
    window.add_records(records, t.grad_accum)
    load_LE = load_of(records, run.num_moe_layers, run.job.moe.num_experts, run.device)
    return StepResult(True, ce_total / t.grad_accum, grad_norm, load_LE, stop, writing)


@torch.no_grad()
def evaluate_pipeline(run, batches) -> torch.Tensor:
    """[2] float64: (sum of the validation cross-entropies, number of batches) on the last stage's
    ranks, zeros elsewhere; the caller sums them over the world."""
    runner = run.trainer.pipeline
    runner.set_router_losses(RouterLossSettings())
    total = torch.zeros(2, dtype=torch.float64, device="cpu")
    batches = list(batches)
    logits = runner.forward_only([x for x, _ in batches], autocast_context(run))
    runner.take_records()
    for logits_BSV, (_, y) in zip(logits, batches):
        ce = runner.cross_entropy(logits_BSV, y.to(run.device))
        total += torch.tensor([ce.item(), 1.0], dtype=torch.float64)
    return total
