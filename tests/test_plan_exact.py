"""The memory planner's model states equal, byte for byte, what real jobs hold on every rank.

For each layout (1 rank: ZeRO 0-3; 4 ranks: parallel.ep 1, 2, 4 x ZeRO 0-3; and train.dtype=bf16 on
1 rank at ZeRO-2 and on 4 ranks with ep=2 at ZeRO 1 and 3) a tiny model is built
on the meta device and parallelized exactly as the job does (parallel.parallelize), then trained
for two steps. parallel/memory.model_state_bytes measures each rank at the two moments the plan
describes (see its docstring):
- at the accumulation boundary of step 2 (after backward, before the optimizer step): gradients;
- at rest after step 2: weights, optimizer state and buffers (and gradients: none, except
  ZeRO-3's permanent gradient-partition buffer).
Each must equal parallel/memory_plan.plan_model_states for that rank. A walk over everything the
trainer references also checks that the measurement misses no tensor it holds.

Pipeline layouts (parallel.pp=2: 4 ranks with ep 2 or 1 at ZeRO 0-2, 2 ranks at ZeRO 1-2, and
interleaved 1F1B with 2 stages per rank) run two steps of their schedule the same way: each rank
holds only its stages' part, data parallel over its slice, and the plan says so per rank. Their
activations (the micro-batches the schedule keeps in flight, 1F1B and interleaved) are checked on
a larger model against the profiler's peak of a step on every rank, within the 25% that
tests/test_plan.py allows the single-process estimate.

The models are chosen so that DeepSpeed pads: their dense matrices (105,740 and 184,932 elements)
and norms (100 and 90) are not multiples of 2 x 4 ranks; the tied 5003 x 20 embedding exceeds
ZeRO-3's persistence threshold (1e5 elements) while the other parameters stay persistent; and
with d_model 18 the persistent parameters (embedding and output 5003 x 18 included) do not split
evenly over 4 ranks.
"""

import functools
import gc
import os

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from models.gpt import GPT
from models.moe.balance import router_losses
from parallel.dims import init_parallel
from parallel.memory import count_model_states
from parallel.parallelize import parallelize
from parallel.precision import autocast_dtype
from planner.model_states import Layout, element_bytes, plan_model_states
from tests.ranks import run_ranks
from train.config import JobConfig

# d_model 20 splits over 2 and 4 expert-data-parallel ranks (FSDP2 needs even shards); 18 only
# runs where the experts are not sharded (ep=4 on 4 ranks).
MODELS = {"even": dict(d_model=20, n_heads=2, tie=True), "uneven": dict(d_model=18, n_heads=3, tie=False)}
# (ep, ZeRO stage, model, train.dtype): bf16 gathers the FSDP-sharded experts in bf16 and keeps fp32 masters.
LAYOUTS_4 = (
    [(ep, stage, "even", "fp32") for ep in (1, 2) for stage in range(4)]
    + [(4, stage, "uneven", "fp32") for stage in range(4)]
    + [(2, stage, "even", "bf16") for stage in (1, 3)]
)
LAYOUTS_1 = [(1, stage, "even", "fp32") for stage in range(4)] + [(1, 2, "even", "bf16")]


def tiny_job(ep: int, stage: int, d_model: int, n_heads: int, tie: bool, train_dtype: str = "fp32") -> JobConfig:
    job = JobConfig()
    job.train.dtype = train_dtype
    m = job.model
    m.vocab_size, m.max_seq_len, m.n_layers, m.ffn_hidden = 5003, 8, 2, 28
    m.d_model, m.n_heads, m.tie_embeddings = d_model, n_heads, tie
    # Block 1 dense, block 2 MoE with a shared expert: every kind of parameter.
    job.moe.num_experts, job.moe.expert_ffn_hidden, job.moe.every, job.moe.num_shared_experts = 4, 12, 2, 1
    job.train.micro_batch, job.train.seq_len = 2, 8
    job.parallel.ep, job.deepspeed.zero_stage = ep, stage
    return job


def forward_backward(trainer, job: JobConfig, seed: int) -> None:
    torch.manual_seed(seed)
    idx = torch.randint(0, job.model.vocab_size, (job.train.micro_batch, job.train.seq_len + 1))
    compute_dtype = autocast_dtype(job.train.dtype, torch.device("cpu"))
    with torch.autocast("cpu", dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None):
        logits, stats = trainer.forward(idx[:, :-1])
    # micro_batch scope: the same memory as global_batch, without the step's count pre-pass
    router = router_losses(stats, job.moe.aux_loss_coef, job.moe.z_loss_coef, "micro_batch").total
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()) + router
    trainer.backward(loss)


def reachable_storages(trainer, max_depth: int = 8) -> dict[int, tuple[int, str]]:
    """Every tensor storage reachable from the trainer's engine, experts and optimizers through
    attributes, containers, parameters, gradients and DTensor local tensors: data pointer ->
    (bytes, a path to it). (Not its process groups and mesh: bookkeeping, not model state.)"""
    found, seen = {}, set()

    def visit(obj, path, depth):
        if depth > max_depth or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (torch.distributed.ProcessGroup, torch.distributed.device_mesh.DeviceMesh)):
            return
        if isinstance(obj, torch.Tensor):
            if obj.grad is not None:
                visit(obj.grad, path + ".grad", depth)
            if isinstance(obj, DTensor):
                visit(obj.to_local(), path + ".local", depth)
                return
            if obj.device.type != "meta" and obj.untyped_storage().nbytes():
                found.setdefault(obj.untyped_storage().data_ptr(), (obj.untyped_storage().nbytes(), path))
            return
        if isinstance(obj, dict):
            for key, value in list(obj.items()):
                visit(key, f"{path}<key>", depth + 1)
                visit(value, f"{path}[{str(key)[:20]}]", depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for i, value in enumerate(obj):
                visit(value, f"{path}[{i}]", depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in (
            "deepspeed",
            "torch",
            "parallel",
            "models",
        ):
            if isinstance(obj, torch.nn.Module):
                for name, p in obj.named_parameters():
                    visit(p, f"{path}.{name}", depth + 1)
            for key, value in list(vars(obj).items()):
                visit(value, f"{path}.{key}", depth + 1)

    for name in ("engine", "dense", "experts", "expert_optimizer", "named_expert_parameters"):
        visit(getattr(trainer, name), f"trainer.{name}", 0)
    return found


def check_layout(rank: int, world_size: int, ep: int, stage: int, model_name: str, train_dtype: str) -> None:
    job = tiny_job(ep, stage, **MODELS[model_name], train_dtype=train_dtype)
    layout = Layout(world_size, ep, stage, *element_bytes(train_dtype))
    with torch.device("meta"):
        planned = plan_model_states(GPT(job.gpt_config()), layout, rank)
        model = GPT(job.gpt_config())
    dims = init_parallel(ep, job.moe.num_experts, torch.device("cpu"))
    trainer = parallelize(model, dims, job)
    forward_backward(trainer, job, seed=rank)
    trainer.step(1e-3)
    forward_backward(trainer, job, seed=100 + rank)
    boundary, boundary_reachable = count_model_states(trainer), reachable_storages(trainer)
    trainer.step(1e-3)
    rest, rest_reachable = count_model_states(trainer), reachable_storages(trainer)

    where = f"rank {rank}/{world_size}, ep={ep}, ZeRO-{stage}, {model_name} model, {train_dtype}"
    for part in ("dense", "experts"):
        assert boundary.bytes[part]["gradients"] == planned[part]["gradients"], (where, part, boundary.bytes, planned)
        for kind in ("weights", "optimizer", "buffers"):
            assert rest.bytes[part][kind] == planned[part][kind], (where, part, kind, rest.bytes, planned)
    permanent_gradients = planned["dense"]["gradients"] if stage == 3 else 0  # ZeRO-3 keeps its buffer
    assert rest.bytes["dense"]["gradients"] == permanent_gradients, (where, rest.bytes)
    assert rest.bytes["experts"]["gradients"] == 0, (where, rest.bytes)
    # Nothing the trainer holds escapes the measurement (DeepSpeed's scalar flags aside).
    for moment, counted, reachable in (("boundary", boundary, boundary_reachable), ("rest", rest, rest_reachable)):
        missed = {path: size for ptr, (size, path) in reachable.items() if ptr not in counted.storages and size > 8}
        assert not missed, (where, moment, missed)
    del trainer, model
    gc.collect()


# -- pipeline stages: each rank holds its stages' part -------------------------------------------

# (world, pp, ep, ZeRO stage, model, stages per rank): 4 ranks pp=2 x ep=2 with the tied model (the last
# stage holds no head weight); pp=2 x dp=2 with the untied one, its experts FSDP-sharded over 2 ranks;
# 2 ranks pp=2; interleaved 1F1B with 2 stages per rank (4 blocks: rank 0 holds blocks 0 and 2).
PIPELINE_LAYOUTS_4 = [(4, 2, 2, 1, "even", 1), (4, 2, 1, 2, "uneven", 1), (4, 2, 2, 0, "uneven", 1)]
PIPELINE_LAYOUTS_2 = [(2, 2, 1, 1, "uneven", 1), (2, 2, 1, 2, "even", 1), (2, 2, 1, 1, "even", 2)]


def pipeline_step(trainer, job: JobConfig, seed: int) -> None:
    """One step's forward and backward of every micro-batch through the pipeline schedule."""
    import contextlib

    from parallel.pipeline import RouterLossSettings

    t, runner = job.train, trainer.pipeline
    torch.manual_seed(seed)
    idx = [torch.randint(0, job.model.vocab_size, (t.micro_batch, t.seq_len + 1)) for _ in range(t.grad_accum)]
    runner.set_router_losses(
        RouterLossSettings(job.moe.aux_loss_coef, job.moe.z_loss_coef, "micro_batch", grad_scale=1 / t.grad_accum)
    )
    runner.train_step([x[:, :-1] for x in idx], [x[:, 1:] for x in idx], contextlib.nullcontext())
    runner.take_records()


def check_pipeline_layout(
    rank: int, world_size: int, pp: int, ep: int, stage: int, model_name: str, stages_per_rank: int
) -> None:
    job = tiny_job(ep, stage, **MODELS[model_name])
    job.parallel.pp, job.train.grad_accum = pp, 2
    if stages_per_rank > 1:
        job.parallel.stages_per_rank, job.parallel.schedule = stages_per_rank, "interleaved_1f1b"
        job.model.n_layers = pp * stages_per_rank  # one block per stage
    layout = Layout(
        world_size,
        ep,
        stage,
        *element_bytes("fp32"),
        pp=pp,
        stages_per_rank=stages_per_rank,
        schedule=job.parallel.schedule,
    )
    with torch.device("meta"):
        planned = plan_model_states(GPT(job.gpt_config()), layout, rank)
        model = GPT(job.gpt_config())
    dims = init_parallel(ep, job.moe.num_experts, torch.device("cpu"), pp=pp)
    trainer = parallelize(model, dims, job)
    for step in range(2):
        pipeline_step(trainer, job, seed=100 * step + dims.dp_rank)  # a pipeline's ranks read the same data
        if step == 1:
            boundary, boundary_reachable = count_model_states(trainer), reachable_storages(trainer)
        trainer.step(1e-3)
    rest, rest_reachable = count_model_states(trainer), reachable_storages(trainer)

    where = f"rank {rank}/{world_size}, pp={pp} x {stages_per_rank} stages, ep={ep}, ZeRO-{stage}, {model_name} model"
    for part in ("dense", "experts"):
        assert boundary.bytes[part]["gradients"] == planned[part]["gradients"], (where, part, boundary.bytes, planned)
        for kind in ("weights", "optimizer", "buffers"):
            assert rest.bytes[part][kind] == planned[part][kind], (where, part, kind, rest.bytes, planned)
    assert rest.bytes["experts"]["gradients"] == 0, (where, rest.bytes)
    for moment, counted, reachable in (("boundary", boundary, boundary_reachable), ("rest", rest, rest_reachable)):
        missed = {path: size for ptr, (size, path) in reachable.items() if ptr not in counted.storages and size > 8}
        assert not missed, (where, moment, missed)
    # The stages differ: the plan is not one rank's figures repeated.
    with torch.device("meta"):
        other = plan_model_states(GPT(job.gpt_config()), layout, (rank + layout.dp) % world_size)
    assert other != planned, where
    del trainer, model
    gc.collect()


# (world, pp, ep, stages per rank, train.activation_checkpointing): a model whose activations outweigh
# its V x D matrices (d_model 64, vocabulary 512), 4 micro-batches of 4 x 64 tokens.
PIPELINE_ACTIVATIONS = {4: (4, 2, 2, 1, "none"), 2: (2, 2, 1, 2, "moe")}


def check_pipeline_activations(rank: int, world_size: int, pp: int, ep: int, stages_per_rank: int, mode: str) -> None:
    """The step's allocations on each rank (the profiler's peak over the schedule of step 2: the
    activations of the micro-batches in flight, the forward/backward transients, the gradients
    the step allocates anew, the logits the schedule keeps) against the plan's figure for them:
    gradients + max(activation peak + forward/backward transients, after-backward transients)."""
    from parallel.memory import profiled_allocation_peak
    from planner.report import rank_report

    job = tiny_job(ep, 1, **MODELS["even"])
    m = job.model
    m.d_model, m.n_heads, m.vocab_size, m.ffn_hidden, job.moe.expert_ffn_hidden = 64, 4, 512, 128, 64
    m.n_layers, m.max_seq_len = pp * stages_per_rank, 64
    job.train.micro_batch, job.train.seq_len, job.train.grad_accum = 4, 64, 4
    job.train.activation_checkpointing = mode
    job.parallel.pp, job.parallel.stages_per_rank = pp, stages_per_rank
    job.parallel.schedule = "interleaved_1f1b" if stages_per_rank > 1 else "1f1b"
    layout = Layout(
        world_size,
        ep,
        1,
        *element_bytes("fp32"),
        pp=pp,
        stages_per_rank=stages_per_rank,
        schedule=job.parallel.schedule,
    )
    with torch.device("meta"):
        report = rank_report(job, None, GPT(job.gpt_config()), layout, rank)
        model = GPT(job.gpt_config())
    dims = init_parallel(ep, job.moe.num_experts, torch.device("cpu"), pp=pp)
    trainer = parallelize(model, dims, job)
    pipeline_step(trainer, job, seed=dims.dp_rank)  # step 1 allocates the receive buffers and AdamW's state
    trainer.step(1e-3)
    measured = profiled_allocation_peak(functools.partial(pipeline_step, trainer, job, seed=10 + dims.dp_rank))
    during = sum(t.bytes for t in report.transients if t.when == "forward/backward")
    after = sum(t.bytes for t in report.transients if t.when == "after backward")
    gradients = report.states["dense"]["gradients"] + report.states["experts"]["gradients"]
    planned = gradients + max(report.activations[mode].peak + during, after)
    where = (
        f"rank {rank}/{world_size}, pp={pp} x {stages_per_rank} stages, ep={ep}, {mode}, in flight {report.in_flight}"
    )
    assert planned == pytest.approx(measured, rel=0.25), (where, planned, measured, report.activations[mode])
    del trainer, model
    gc.collect()


def _pipeline_worker(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)  # kernels' scratch memory the same everywhere (tests/test_plan.py: one_thread)
    for layout in PIPELINE_LAYOUTS_4 if world_size == 4 else PIPELINE_LAYOUTS_2:
        check_pipeline_layout(rank, *layout)
    check_pipeline_activations(rank, *PIPELINE_ACTIVATIONS[world_size])


def test_planned_model_states_of_pipeline_stages_equal_what_each_rank_holds():
    run_ranks(4, _pipeline_worker)
    run_ranks(2, _pipeline_worker)


def _worker(process: int, num_processes: int) -> None:
    """Processes 0-3 form a 4-rank world; process 4 is a world of its own (one start-up for both,
    running side by side)."""
    world_size, rank, layouts = (1, 0, LAYOUTS_1) if process == 4 else (4, process, LAYOUTS_4)
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    for ep, stage, model_name, train_dtype in layouts:
        check_layout(rank, world_size, ep, stage, model_name, train_dtype)


def test_planned_model_states_equal_what_each_rank_holds():
    run_ranks(5, _worker)
