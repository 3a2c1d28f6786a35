"""The training loop: step (skipping non-finite ones), log, evaluate, save."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.generate import generate
from models.moe.balance import router_losses
from models.moe.layer import tokens_per_expert_LE
from parallel.collectives import all_reduce_sum
from train import preemption
from train.checkpoint.manager import SaveFailed
from train.config import JobConfig
from train.data import BatchSampler, val_batches
from train.logging import RunLogger
from train.metrics import MoEWindow
from train.setup import Run


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


def lr_at(step: int, job: JobConfig) -> float:
    """Linear warmup, then cosine decay to lr · min_lr_ratio at the last step."""
    o, total = job.optim, job.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast_context(run: Run):
    """The job's autocast (train.dtype), or nothing."""
    if run.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=run.autocast_dtype)


@contextlib.contextmanager
def replayed_rng(device: torch.device):
    """Restore the random state on exit: a pass inside draws the same numbers (router jitter) as the
    pass that follows it."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)


def forward(run: Run, x_BS: torch.Tensor, logits: bool = True):
    """(logits [B, S, V], MoE stats) of one micro-batch, under the job's autocast (logits=False: no
    logits, the pass stops after the last block)."""
    with autocast_context(run):
        return run.trainer.forward(x_BS.to(run.device), logits=logits)


def forward_loss(run: Run, x_BS: torch.Tensor, y_BS: torch.Tensor, step_selected_LE: torch.Tensor | None = None):
    """(total loss, cross-entropy, MoE stats, RouterLosses) of one micro-batch. For the global_batch
    balance loss, `step_selected_LE` holds the whole step's expert counts (see count_routing);
    None means this micro-batch is the step's only one on each rank, so its counts are reduced here."""
    moe = run.job.moe
    logits_BSV, stats = forward(run, x_BS)
    ce = F.cross_entropy(logits_BSV.flatten(0, 1), y_BS.to(run.device).flatten())
    if moe.aux_loss_scope == "global_batch" and step_selected_LE is None and stats:
        step_selected_LE = all_reduce_sum(tokens_per_expert_LE(stats), run.dims)
    losses = router_losses(stats, moe.aux_loss_coef, moe.z_loss_coef, moe.aux_loss_scope, step_selected_LE)
    return ce + losses.total.to(ce), ce, stats, losses


@torch.no_grad()
def count_routing(run: Run, sampler: BatchSampler, step: int) -> torch.Tensor:
    """[L, E] copies routed to each expert over the whole step: every micro-batch of every rank.

    With gradient accumulation the first micro-batch's backward runs before the later ones are
    routed, so a routing-only pass over the step's micro-batches comes first (one extra forward
    each, without the output head, no graph kept). The random state is replayed, so router jitter
    draws the same noise as the training pass that follows, which then routes exactly as counted here."""
    total_LE = None
    with replayed_rng(run.device):
        for micro_step in range(run.job.train.grad_accum):
            x, _ = sampler.get(step, micro_step)
            _, stats = forward(run, x, logits=False)
            counts_LE = tokens_per_expert_LE(stats)
            total_LE = counts_LE if total_LE is None else total_LE + counts_LE
    return all_reduce_sum(total_LE, run.dims)


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean validation cross-entropy over fixed blocks, averaged over all ranks. With
    train.global_batch set, the blocks are eval_batches x global_batch, whatever the layout."""
    t = run.job.train
    run.trainer.train(False)
    total = torch.zeros(2, dtype=torch.float64, device="cpu")
    num_batches = t.eval_batches * (t.grad_accum if t.global_batch is not None else 1)
    batches = val_batches(run.data.val, t.seq_len, t.micro_batch, num_batches, run.dims.dp, run.dims.dp_rank)
    if run.trainer.pipeline is not None:
        from train.pipeline_step import evaluate_pipeline

        total = evaluate_pipeline(run, batches)
        batches = []
    for x, y in batches:
        logits_BSV, _ = forward(run, x)
        ce = F.cross_entropy(logits_BSV.flatten(0, 1), y.to(run.device).flatten())
        total += torch.tensor([ce.item(), 1.0], dtype=torch.float64, device="cpu")
    run.trainer.train(True)
    total = all_reduce_sum(total, run.dims)
    return float(total[0] / total[1])


def sample(run: Run, seed: int) -> str:
    """The prompt and a sampled continuation, so a person can read what the model learned. Every
    rank generates (the forward is collective under expert parallelism and ZeRO-3) the same text."""
    prompt = run.job.logging.sample_prompt
    return prompt + generate(
        run.trainer.engine,
        run.data.tokenizer,
        prompt,
        run.job.logging.sample_tokens,
        temperature=0.8,
        top_k=50,
        seed=seed,
    )


@dataclasses.dataclass
class StepResult:
    applied: bool  # False: a non-finite loss on some rank, the step was skipped everywhere
    loss: float = float("nan")  # mean cross-entropy of this rank's micro-batches
    grad_norm: float = float("nan")  # global norm of all gradients, before clipping
    load_LE: torch.Tensor | None = None  # [L, E] int64 copies routed to each expert on this rank (compute device)
    stop: bool = False  # some rank got a stop signal (train/preemption.py): save and stop after this step
    writing: bool = False  # some rank's background checkpoint write was still running


def run_step(run: Run, sampler: BatchSampler, step: int, window: MoEWindow) -> StepResult:
    """One optimizer step over grad_accum micro-batches (`step` counts from 0). A non-finite loss
    on any rank skips the step on every rank. The same all-reduce tells every rank whether any of
    them got a stop signal, so they all stop after the same step.

    Host syncs: the figures of the micro-batches (finite, cross-entropy, load) are summed on the
    device, and read once, before the last backward (see README: the sync budget)."""
    t = run.job.train
    lr = lr_at(step, run.job)
    if run.trainer.pipeline is not None:
        from train.pipeline_step import run_pipeline_step  # (it imports this module)

        return run_pipeline_step(run, sampler, step, window, lr)
    grad_norm = float("nan")
    load_LE = torch.zeros(run.num_moe_layers, run.job.moe.num_experts, dtype=torch.int64, device=run.device)
    ce_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    num_bad = torch.zeros((), dtype=torch.float64, device=run.device)  # micro-batches with a non-finite loss
    step_selected_LE, stop, writing = None, False, False
    if run.job.moe.aux_loss_scope == "global_batch" and t.grad_accum > 1 and load_LE.numel():
        step_selected_LE = count_routing(run, sampler, step)
    for micro_step in range(t.grad_accum):
        x, y = sampler.get(step, micro_step)
        loss, ce, stats, losses = forward_loss(run, x, y, step_selected_LE)
        num_bad += (~torch.isfinite(loss)).double()
        ce_sum += ce.detach().double()
        if micro_step == t.grad_accum - 1:
            num_bad_world, stop, writing, ce_total = look_at_host(run, num_bad, ce_sum)
            if num_bad_world > 0:
                skip_step(run, loss)
                return StepResult(applied=False, stop=stop, writing=writing)
        run.trainer.backward(loss)
        norm = run.trainer.step(lr)
        grad_norm = norm if norm is not None else grad_norm
        window.add(stats, losses)
        if stats:
            load_LE += tokens_per_expert_LE(stats)
    return StepResult(True, ce_total / t.grad_accum, grad_norm, load_LE, stop, writing)


def look_at_host(run: Run, num_bad: torch.Tensor, ce_sum: torch.Tensor) -> tuple[float, bool, bool, float]:
    """The step's one look at the host: non-finite losses, stop signals and background writes on
    any rank (one all-reduce), and this rank's cross-entropy sum (one copy). Returns (micro-batches
    with a non-finite loss in the world, stop, a background write still running, ce_sum)."""
    host_flags = torch.tensor(
        [float(preemption.requested()), float(run.checkpoints.background_write_running())],
        dtype=torch.float64,
        device=run.device,
    )
    world_3 = all_reduce_sum(torch.cat([num_bad[None], host_flags]), run.dims)
    num_bad_world, stops, writes, ce_total = torch.cat([world_3, ce_sum[None]]).tolist()
    return num_bad_world, stops > 0, writes > 0, ce_total


def skip_step(run: Run, last_loss: torch.Tensor) -> None:
    """Leave DeepSpeed's accumulation window as if no gradient had come. With grad_accum=1 nothing
    was accumulated and nothing is done. Otherwise the earlier micro-batches' gradients (maybe
    non-finite) are discarded after the boundary's backward, and the step is applied with lr 0: no
    weight changes (Adam's moments decay by one step of zero gradients)."""
    if run.job.train.grad_accum == 1:
        return
    run.trainer.backward(last_loss.nan_to_num() * 0.0)  # collective under EP and ZeRO: every rank runs it
    run.trainer.discard_gradients()
    run.trainer.step(0.0)


class DeadExpertWarnings:
    """One console line when a layer's set of experts that got no token changes, after `after_step`:
    during the learning-rate warm-up a freshly initialised router leaves some experts idle for a
    window on nearly every run, which says nothing yet. The counts are in the metrics either way
    (`moe/layerN/dead_experts`)."""

    def __init__(self, after_step: int):
        self.after_step = after_step
        self.last_warned: dict[str, list[int]] = {}

    def lines(self, step: int, metrics: dict, window_steps: int) -> list[str]:
        out = []
        for key, load in metrics.items():
            if not key.endswith("/tokens_per_expert"):
                continue
            layer = key.split("/")[1]
            dead = [e for e, n in enumerate(load) if n == 0]
            if step <= self.after_step or dead == self.last_warned.get(layer, []):
                continue
            self.last_warned[layer] = dead
            if dead:
                out.append(
                    f"warning: step {step}: {layer}: expert(s) {dead} got no token in the last {window_steps} step(s)"
                )
        return out


def train_steps(run: Run, logger: RunLogger) -> dict:
    job, dims, t = run.job, run.dims, run.job.train
    sampler = BatchSampler(run.data.train, t.seq_len, t.micro_batch, dims.dp, dims.dp_rank, t.grad_accum, t.seed)
    window = MoEWindow(run.num_moe_layers, job.moe.num_experts, run.device)
    dead_experts = DeadExpertWarnings(after_step=job.optim.warmup_steps)
    tokens_per_step = t.micro_batch * t.seq_len * t.grad_accum * dims.dp
    loss_sum, window_steps, window_start = 0.0, 0, time.perf_counter()
    bad_in_a_row, bad_total, applied_total = 0, 0, 0
    summary: dict = {}
    # Where the validation curve starts: the untrained model, or the model a resume just loaded.
    start_loss = evaluate(run)
    logger.log(run.start_step, {"val/loss": start_loss})
    if run.start_step > 0:
        logger.info(f"step {run.start_step}: val loss {start_loss:.4f} (at the resumed checkpoint)")
    last_step = min(t.steps, t.stop_at or t.steps)
    for step in range(run.start_step, last_step):
        done = step + 1
        result = run_step(run, sampler, step, window)
        if not result.applied and result.stop:
            stop_with_checkpoint(run, logger, done, saved=False)
        if not result.applied:
            bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
            logger.info(f"step {done}: non-finite loss, step skipped ({bad_in_a_row} in a row, {bad_total} in all)")
            logger.log(done, {"train/skipped_steps": bad_total})
            if bad_in_a_row >= t.max_bad_steps:
                raise TrainingDiverged(
                    f"{bad_in_a_row} consecutive steps had a non-finite loss (train.max_bad_steps={t.max_bad_steps}); "
                    f"stopping at step {done}, the last good checkpoint is kept in {run.checkpoints.dir}"
                )
            continue
        bad_in_a_row, applied_total = 0, applied_total + 1
        if job.moe.bias_update_rate > 0:
            run.model.update_router_biases(list(all_reduce_sum(result.load_LE, dims)))
        loss_sum += result.loss
        window_steps += 1
        step_metrics = {"train/grad_norm": result.grad_norm}

        if done % t.log_interval == 0 or done == t.steps:
            elapsed = time.perf_counter() - window_start
            mean_loss = (
                float(all_reduce_sum(torch.tensor([loss_sum / max(window_steps, 1)], dtype=torch.float64), dims)[0])
                / dims.dp  # (under pipeline parallelism only the last stage's ranks hold a loss)
            )
            tokens_per_s = tokens_per_step * window_steps / elapsed
            metrics = {
                "train/loss": mean_loss,
                "train/lr": lr_at(step, job),
                "perf/tokens_per_s": tokens_per_s,
                **step_metrics,
                **window.summarize(dims, elapsed),
            }
            if t.peak_tflops:
                metrics["perf/mfu"] = tokens_per_s * run.flops_per_token / (t.peak_tflops * 1e12 * dims.world_size)
            logger.log(done, metrics)
            for line in dead_experts.lines(done, metrics, window_steps):
                logger.info(line)
            logger.progress(done, {"loss": f"{mean_loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"})
            summary.update(metrics)
            loss_sum, window_steps, window_start = 0.0, 0, time.perf_counter()
            window.reset()
        else:
            logger.log(done, step_metrics)
        if done % t.eval_interval == 0 or done == t.steps:
            val_loss = evaluate(run)
            record = {"val/loss": val_loss}
            if job.logging.sample_tokens and run.trainer.pipeline is None:  # (no generation through a pipeline)
                record["samples/text"] = sample(run, seed=t.seed + done)
                logger.info(f"step {done}: sample: {record['samples/text']!r}")
            logger.log(done, record)
            logger.info(f"step {done}: val loss {val_loss:.4f}")
            summary["val/loss"] = val_loss
        if run.checkpoints.in_flight and not result.writing:
            checkpoint(run, logger, run.checkpoints.finish_background)  # every rank's write is done: publish
        saved = (done % t.ckpt_interval == 0 or done == last_step) and checkpoint(
            run, logger, lambda: run.checkpoints.save(run.trainer, done, background=t.async_save and done != last_step)
        )
        if result.stop:
            stop_with_checkpoint(run, logger, done, saved)
    if bad_total and not applied_total:
        raise TrainingDiverged(
            f"every step of this run ({bad_total}) had a non-finite loss; nothing was trained or saved"
        )
    return summary


def checkpoint(run: Run, logger: RunLogger, save) -> bool:
    """Run `save` (a save, or the publication of a background one); a failed save stops the job
    or, with train.on_save_failure=continue, is a warning line (returns False)."""
    try:
        save()
    except SaveFailed as err:
        if run.job.train.on_save_failure == "stop":
            raise
        logger.info(f"warning: {err}; training continues (train.on_save_failure=continue)")
        return False
    return True


def stop_with_checkpoint(run: Run, logger: RunLogger, done: int, saved: bool) -> None:
    """Every rank reached this after the same step (train/preemption.py): save and stop."""
    if not saved:
        run.checkpoints.save(run.trainer, done)  # a failed save here stops the job whatever the setting
    run.checkpoints.finish_background()
    logger.info(f"preempted at step {done}, checkpoint saved")
    raise preemption.Preempted(done, preemption.signal_name())


def train(run: Run) -> dict:
    """Run the set-up job; returns the last logged figures (for sweeps and tests)."""
    job = run.job
    job_dict = dataclasses.asdict(job)
    logger = RunLogger(
        Path(job.run_dir),
        job_dict,
        job.train.steps,
        run.start_step,
        job.logging.wandb,
        job.logging.progress_bar,
        run.dims.is_main,
    )
    try:
        return train_steps(run, logger)
    finally:
        logger.close()
