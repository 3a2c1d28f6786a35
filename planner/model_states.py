"""Model-state bytes each rank will hold, from a model built on the meta device: the arithmetic of
parallel/zero.py's table (DeepSpeed for the dense weights, FSDP2 over the expert-data-parallel
group for the experts), mirrored exactly, padding included.

It predicts what parallel/memory.py measures (same categories, same moments: gradients at the
accumulation boundary, weights and optimizer state at rest); tests/test_plan_exact.py checks them
equal, byte for byte, on real multi-rank jobs. What it mirrors, from DeepSpeed's
runtime/zero/stage_1_and_2.py, stage3.py, parameter_offload.py and torch's FSDP2:

- ZeRO 1-2: each optimizer param group is flattened into one buffer padded to a multiple of
  2 x world (`nccl_start_alignment_factor`), split into `world` equal partitions. The module's
  parameters become views of it (weights: the whole buffer). This rank keeps an fp32 master copy
  of its partition and AdamW's moments for it (one `step` per group). At the boundary it keeps
  the gradients of every parameter that overlaps its partition, whole, in one buffer, plus zeros
  for the part of its partition past the group's last parameter.
- ZeRO-3: each parameter is padded to a multiple of `world` and split; this rank keeps one
  partition of each (weights), an fp32 master copy and AdamW's moments per sub-group of at most
  `sub_group_size` elements, and a flat gradient-partition buffer, all permanently; parameters of
  at most `param_persistence_threshold` elements stay gathered on every rank as well ("persistent",
  in a buffer of `world` padded partitions).
  The reduce bucket (`reduce_bucket_size` elements) is allocated once and kept.
- ZeRO-0: everything whole; AdamW's moments per parameter.
- Experts: this rank's `num_experts / ep` experts, whole (ZeRO-0 or one rank per EDP group), or
  split evenly along dim 1 over the EDP group by FSDP2 (weights, gradients, AdamW state).

The DeepSpeed settings (bucket size, persistence threshold, sub-group size) are read from the
installed DeepSpeed's own defaults for the config parallel/zero.py builds, so a DeepSpeed upgrade
that changes them changes the plan; a change to its partitioning would fail the exactness test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from models.moe.experts import GroupedExperts
from parallel.zero import EXPERT_SHARD_DIM, experts_are_sharded

NCCL_START_ALIGNMENT_FACTOR = 2  # DeepSpeed stage_1_and_2.py: flat buffers are padded to 2 x world elements
FP32_BYTES = 4  # DeepSpeed's master copies and their AdamW moments are fp32
STEP_BYTES = 4  # AdamW's `step`: one fp32 scalar per tensor it steps


def element_bytes(train_dtype: str) -> tuple[int, int]:
    """(bytes per weight and gradient element, bytes per activation and all-to-all element) of a
    job's `train.dtype`. Weights, gradients and AdamW state stay fp32 masters (parallel/precision.py);
    under bf16 the matmul outputs and the tokens that cross the all-to-all take 2 bytes. `auto` is
    bf16 on the GPUs a plan is for (fp32 only on CPUs)."""
    return FP32_BYTES, (FP32_BYTES if train_dtype == "fp32" else 2)


@dataclass(frozen=True)
class Layout:
    world_size: int
    ep: int
    zero_stage: int
    bytes_per_param: int = 4  # weights and gradients: fp32 masters whatever train.dtype (see element_bytes)
    bytes_per_compute: int = 4  # what FSDP2 gathers the experts in (their compute dtype): 2 under bf16
    pp: int = 1  # pipeline stages' slices of the world (parallel.pp)
    stages_per_rank: int = 1  # parallel.stages_per_rank
    schedule: str = "1f1b"  # parallel.schedule
    split: str | tuple[int, ...] = "layers"  # parallel.split (a list as a tuple)

    @property
    def dp(self) -> int:
        """Ranks of one pipeline slice: what the dense weights are data parallel (and ZeRO-split) over."""
        return self.world_size // self.pp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def dims(self, rank: int):
        """The ParallelDims of `rank` (no process groups): what parallel/pipeline.py's stage_plan reads."""
        from parallel.dims import ParallelDims

        return ParallelDims(self.world_size, rank, 0, self.ep, pp=self.pp)

    @property
    def experts_sharded(self) -> bool:
        return experts_are_sharded(self, self.zero_stage)  # reads .edp, as ParallelDims has it


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The ZeRO settings the engine runs with (DeepSpeed's defaults for parallel/zero.py's config)."""

    reduce_bucket_size: int
    contiguous_gradients: bool
    sub_group_size: int
    param_persistence_threshold: int
    model_persistence_threshold: int

    @classmethod
    def for_model(cls, model: nn.Module, zero_stage: int) -> "DeepSpeedSettings":
        """The settings parallel/zero.py gives DeepSpeed for this GPT (the bucket depends on d_model)."""
        from parallel.deepspeed_state import zero_settings
        from parallel.zero import deepspeed_config

        return cls(**zero_settings(deepspeed_config(zero_stage, 1, 1, 1, model.cfg.model.d_model)["zero_optimization"]))


def empty_states() -> dict[str, dict[str, int]]:
    return {part: {"weights": 0, "gradients": 0, "optimizer": 0, "buffers": 0} for part in ("dense", "experts")}


def dense_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters DeepSpeed gets (parallel/zero.py: detach_experts), in module order."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in expert_ids]


def optimizer_groups(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """The AdamW param groups parallel/parallelize.py builds (matrices, then 1-D; empty ones dropped)."""
    from parallel.parallelize import parameter_groups

    return [group for group in parameter_groups(params) if group]


@dataclass(frozen=True)
class RankStages:
    """What pipeline rank `pp_rank` holds: its stages (parallel/pipeline.py: stage_plan), every
    stage's blocks, and `module`, the rank's `LocalStages` (what its DeepSpeed engine wraps: the
    parameters and buffers in the job's order), built from the meta model without changing it."""

    pp_rank: int
    stages: list[int]
    ranges: list[range]
    num_stages: int
    module: nn.Module

    @property
    def holds_first(self) -> bool:
        return 0 in self.stages

    @property
    def holds_last(self) -> bool:
        return self.num_stages - 1 in self.stages


def rank_stages(model: nn.Module, layout: Layout, pp_rank: int) -> RankStages:
    """The stages of pipeline rank `pp_rank` exactly as the job cuts them (parallel/pipeline.py)."""
    from types import SimpleNamespace

    from parallel.pipeline import LocalStages, StageModule, stage_plan

    parallel = SimpleNamespace(split=layout.split, stages_per_rank=layout.stages_per_rank)
    mine, ranges, num_stages = stage_plan(model, layout.dims(pp_rank * layout.dp), parallel)
    local = LocalStages(model, [StageModule(model, s, num_stages, ranges[s]) for s in mine])
    return RankStages(pp_rank, mine, ranges, num_stages, local)


def held_module(model: nn.Module, layout: Layout, rank: int) -> nn.Module:
    """The module whose parameters and buffers `rank` holds: the model, or its pipeline stages."""
    return model if layout.pp == 1 else rank_stages(model, layout, rank // layout.dp).module


def plan_model_states(
    model: nn.Module, layout: Layout, rank: int, settings: DeepSpeedSettings | None = None
) -> dict[str, dict[str, int]]:
    """Bytes of weights, gradients, optimizer state and buffers that `rank` will hold, as
    parallel/memory.model_state_bytes measures them. `model` is the whole single-process model
    (typically on the meta device); it is not changed. With pipeline stages (layout.pp > 1) the
    rank holds its stages' part (`rank_stages`), data parallel over the layout.dp ranks of its slice."""
    settings = settings or DeepSpeedSettings.for_model(model, layout.zero_stage)
    model, rank = held_module(model, layout, rank), rank % layout.dp
    states = empty_states()
    named = dense_parameters(model)
    groups = [[p.numel() for p in g] for g in optimizer_groups([p for _, p in named])]
    dense = states["dense"]
    if layout.zero_stage == 0:
        _plan_zero0(dense, groups, layout)
    elif layout.zero_stage in (1, 2):
        _plan_zero12(dense, groups, layout, rank)
    else:
        _plan_zero3(dense, groups, [p.numel() for _, p in named], layout, settings)
    dense["buffers"] += sum(b.numel() * b.element_size() for b in model.buffers())
    _plan_experts(states["experts"], model, layout)
    return states


def _plan_zero0(dense: dict, groups: list[list[int]], layout: Layout) -> None:
    numel = sum(map(sum, groups))
    num_tensors = sum(map(len, groups))
    dense["weights"] += numel * layout.bytes_per_param
    dense["gradients"] += numel * layout.bytes_per_param
    dense["optimizer"] += 2 * numel * layout.bytes_per_param + num_tensors * STEP_BYTES


def _plan_zero12(dense: dict, groups: list[list[int]], layout: Layout, rank: int) -> None:
    world, bpp = layout.dp, layout.bytes_per_param
    gradient_numel = 0
    for sizes in groups:
        total = sum(sizes)
        alignment = NCCL_START_ALIGNMENT_FACTOR * world
        flat = math.ceil(total / alignment) * alignment
        part = flat // world
        start, end = part * rank, part * (rank + 1)
        dense["weights"] += flat * bpp
        dense["optimizer"] += 3 * part * FP32_BYTES + STEP_BYTES  # master copy, exp_avg, exp_avg_sq
        # Gradients kept for the step: every parameter overlapping [start, end), whole...
        offset = 0
        for n in sizes:
            if start <= offset < end or offset < start < offset + n:
                gradient_numel += n
            offset += n
        # ...and zeros for the part of the partition that lies past the last parameter.
        covered = max(0, min(end, total) - start)
        gradient_numel += part - covered
    dense["gradients"] += gradient_numel * bpp


def _plan_zero3(
    dense: dict, groups: list[list[int]], named_numels: list[int], layout: Layout, settings: DeepSpeedSettings
) -> None:
    world, bpp = layout.dp, layout.bytes_per_param

    def partition(n: int) -> int:
        return math.ceil(n / world)

    all_partitions = sum(partition(n) for sizes in groups for n in sizes)
    dense["weights"] += all_partitions * bpp  # one defragmented buffer of every parameter's partition
    persisted = 0
    for n in named_numels:  # parameter_offload.py: mark_persistent_parameters
        if n + persisted > settings.model_persistence_threshold:
            continue
        if n <= settings.param_persistence_threshold:
            persisted += n
            if world > 1:  # gathered whole (padded to `world` partitions) and kept; on one rank, a view
                dense["weights"] += partition(n) * world * bpp
    for sizes in groups:
        for sub_group in _sub_groups([partition(n) for n in sizes], settings.sub_group_size):
            dense["optimizer"] += 3 * sum(sub_group) * FP32_BYTES + STEP_BYTES
    dense["gradients"] += all_partitions * bpp
    if settings.contiguous_gradients:
        dense["buffers"] += settings.reduce_bucket_size * bpp


def _sub_groups(partition_numels: list[int], sub_group_size: int) -> list[list[int]]:
    """stage3.py: _create_fp16_sub_groups."""
    if sub_group_size >= sum(partition_numels):
        return [partition_numels]
    groups, current = [], []
    for i, n in enumerate(partition_numels):
        current.append(n)
        if sum(current) >= sub_group_size or i == len(partition_numels) - 1:
            groups.append(current)
            current = []
    return groups


def _plan_experts(experts: dict, model: nn.Module, layout: Layout) -> None:
    bpp = layout.bytes_per_param
    for module in model.modules():
        if not isinstance(module, GroupedExperts):
            continue
        for p in module.parameters():
            local = p.numel() // layout.ep  # this rank's num_experts / ep experts
            if layout.experts_sharded:
                assert p.shape[EXPERT_SHARD_DIM] % layout.edp == 0, "check_even_expert_sharding first"
                local //= layout.edp
            experts["weights"] += local * bpp
            experts["gradients"] += local * bpp
            experts["optimizer"] += 2 * local * bpp + STEP_BYTES


def check_even_expert_sharding(model: nn.Module, layout: Layout) -> None:
    """FSDP2 refuses uneven shards on a dim other than 0, and the experts are split along dim 1."""
    if not layout.experts_sharded:
        return
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            d_model, width = module.w1_EDF.shape[1], module.w2_EFD.shape[1]
            if d_model % layout.edp or width % layout.edp:
                raise ValueError(
                    f"with deepspeed.zero_stage>=1 each expert is split over its {layout.edp} expert-data-parallel "
                    f"ranks along model.d_model ({d_model}) and moe.expert_ffn_hidden ({width}): both must be "
                    f"divisible by {layout.edp}"
                )


def plan_all_ranks(
    model: nn.Module, layout: Layout, settings: DeepSpeedSettings | None = None
) -> list[dict[str, dict[str, int]]]:
    """plan_model_states for every rank (ranks differ only in DeepSpeed's partitions of the
    dense part under ZeRO 1-2; ZeRO-3 pads every parameter to equal partitions)."""
    settings = settings or DeepSpeedSettings.for_model(model, layout.zero_stage)
    out = []
    for pp_rank in range(layout.pp):
        first = pp_rank * layout.dp
        if layout.zero_stage in (0, 3) or layout.dp == 1:
            out += [plan_model_states(model, layout, first, settings)] * layout.dp
        else:
            out += [plan_model_states(model, layout, first + r, settings) for r in range(layout.dp)]
    return out


# -- transients: not held at rest, estimates (not part of the exactness test) -----------------

DURING_COMPUTE = "forward/backward"  # adds to the activations' peak
AT_STEP = "after backward"  # gradient reduction and the optimizer step, when activations are freed
DEEPSPEED_ALLREDUCE_BUCKET = 500_000_000  # engine.py: MEMORY_OPT_ALLREDUCE_SIZE, ZeRO-0's flattened reduce


@dataclass(frozen=True)
class Transient:
    what: str
    when: str  # DURING_COMPUTE or AT_STEP
    bytes: int


def _expert_layer_numels(model: nn.Module, layout: Layout) -> list[int]:
    """Elements of this rank's local experts, per MoE layer (unsharded)."""
    return [
        sum(p.numel() for p in m.parameters()) // layout.ep for m in model.modules() if isinstance(m, GroupedExperts)
    ]


def plan_transients(
    model: nn.Module, layout: Layout, settings: DeepSpeedSettings | None = None, rank: int = 0
) -> list[Transient]:
    """Memory a step allocates and frees again, beyond activations: the gathered copies FSDP2 and
    ZeRO-3 compute with, gradients before their reduction, DeepSpeed's buckets (from the same
    sources as the module docstring), on `rank` (its pipeline stages' part). Upper-bound estimates."""
    settings = settings or DeepSpeedSettings.for_model(model, layout.zero_stage)
    model = held_module(model, layout, rank)
    bpp, out = layout.bytes_per_param, []
    layers = _expert_layer_numels(model, layout)
    if layers and layout.experts_sharded:
        # ZeRO 1-2 keep every layer's gathered experts from its forward to its backward
        # (reshard_after_forward=False); ZeRO-3 frees them after each use (this layer + one prefetched).
        gathered = sum(layers) if layout.zero_stage < 3 else sum(sorted(layers)[-2:])
        out.append(Transient("experts all-gathered by FSDP2", DURING_COMPUTE, gathered * layout.bytes_per_compute))
        # Unsharded gradients (compute dtype) + FSDP2's reduce-scatter input (fp32: reduce_dtype).
        out.append(
            Transient(
                "one MoE layer's expert gradients, before reduce-scatter",
                DURING_COMPUTE,
                max(layers) * (layout.bytes_per_compute + FP32_BYTES),
            )
        )
    elif layers and layout.edp > 1:  # parallel/collectives.py: average_replicated_expert_gradients
        out.append(Transient("expert gradients flattened for their all-reduce", AT_STEP, sum(layers) * bpp))
    named = dense_parameters(model)
    if layout.zero_stage in (1, 2) and settings.contiguous_gradients:
        out.append(Transient("DeepSpeed gradient reduce bucket", DURING_COMPUTE, settings.reduce_bucket_size * bpp))
    if layout.zero_stage in (1, 2):
        partitions = sum(
            math.ceil(sum(p.numel() for p in g) / (NCCL_START_ALIGNMENT_FACTOR * layout.dp))
            * NCCL_START_ALIGNMENT_FACTOR
            for g in optimizer_groups([p for _, p in named])
        )
        out.append(Transient("DeepSpeed fp32 gradient partition for the step", AT_STEP, partitions * FP32_BYTES))
    if layout.zero_stage == 0 and layout.dp > 1:
        numel = min(sum(p.numel() for _, p in named), DEEPSPEED_ALLREDUCE_BUCKET)
        out.append(Transient("DeepSpeed flattened gradient all-reduce", AT_STEP, numel * bpp))
    if layout.zero_stage == 3 and layout.dp > 1:
        gathered = sorted(p.numel() for _, p in named if p.numel() > settings.param_persistence_threshold)[-2:]
        if gathered:
            out.append(
                Transient("dense parameters all-gathered by ZeRO-3 (two largest)", DURING_COMPUTE, sum(gathered) * bpp)
            )
    return out


def all_to_all_bytes_per_step(
    num_moe_layers: int,
    tokens_per_micro_batch: int,
    top_k: int,
    d_model: int,
    layout: Layout,
    grad_accum: int,
    recompute: bool,
    bytes_per_element: int,
) -> dict[str, int]:
    """Bytes this rank sends per optimizer step, dropless, under uniform routing: of its k·T token
    copies per MoE layer, (ep−1)/ep go to other ranks, and as many results come back from it
    (parallel/dispatcher.py). The tokens travel in the compute dtype (`bytes_per_element`: 2 under
    bf16, models/moe/layer.py). Backward sends the same again; activation checkpointing of the MoE
    layers (full or moe) repeats the forward exchanges."""
    copies_leaving = round(tokens_per_micro_batch * top_k * (layout.ep - 1) / layout.ep)
    per_exchange = copies_leaving * d_model * bytes_per_element
    forward = 2 * per_exchange * num_moe_layers * grad_accum  # dispatch + combine
    return {
        "forward": forward,
        "backward": forward,
        "recompute": forward if recompute else 0,
        "total": forward * (3 if recompute else 2),
    }
