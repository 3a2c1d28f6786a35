"""The memory planner's figures (`build_report`) and its printed table (`render`); see train/plan.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from models.config import GPTConfig, ModelConfig, MoEConfig
from models.gpt import GPT, count_parameters
from parallel.activation_checkpointing import ACTIVATION_CHECKPOINTING
from planner.activations import ActivationPeak, activation_peak
from planner.model_states import (
    AT_STEP,
    DURING_COMPUTE,
    DeepSpeedSettings,
    Layout,
    RankStages,
    Transient,
    all_to_all_bytes_per_step,
    element_bytes,
    plan_all_ranks,
    plan_transients,
    rank_stages,
)
from planner.pipeline import StepShape as PipelineStep
from planner.pipeline import in_flight, pipeline_transients, rank_activation_peak, receive_buffers

GIB = 2**30


class StepShape(Protocol):
    """What the planner reads of a job's train settings (train.config.TrainConfig is one)."""

    micro_batch: int
    seq_len: int
    grad_accum: int
    dtype: str


class PlannedJob(Protocol):
    """What the planner reads of a job (train.config.JobConfig is one): the planner never imports
    the job's modules, so it names the fields it needs here."""

    model: ModelConfig
    moe: MoEConfig
    train: StepShape

    def gpt_config(self) -> GPTConfig: ...


class PlanSettings(Protocol):
    """The planner's own settings (train.plan.PlanConfig is one)."""

    device_memory_gb: float


KINDS = (
    ("weights", "weights"),
    ("gradients", "gradients (at the accumulation boundary)"),
    ("optimizer", "optimizer state (AdamW moments; fp32 masters under ZeRO >= 1)"),
    ("buffers", "buffers (rotary tables, router biases; ZeRO-3 reduce bucket)"),
)


@dataclass
class Report:
    job: PlannedJob
    plan: PlanSettings
    layout: Layout
    total_params: int
    active_params: int
    expert_params: int
    rank: int  # the rank whose model states are shown (the worst one)
    spread: int  # bytes between the lightest and the heaviest rank's model states
    states: dict[str, dict[str, int]]
    transients: list[Transient]
    activations: dict[str, ActivationPeak]  # per activation-checkpointing mode
    all_to_all: dict[str, dict[str, int]]  # per mode
    peaks: dict[str, int]  # per mode: bytes per rank at the busiest moment
    bytes_per_activation: int  # activations and all-to-all elements, from train.dtype (element_bytes)
    # With pipeline stages (layout.pp > 1; else None, [], 0): the shown rank's stages, the micro-batches
    # in flight on each, its receive buffers, and every pipeline rank's peak (the job's mode).
    stages: RankStages | None = None
    in_flight: list[int] = field(default_factory=list)
    receive_buffers: int = 0
    pipeline_peaks: list[int] = field(default_factory=list)

    @property
    def ranks_differ(self) -> bool:
        return self.spread > 0

    @property
    def model_states(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.states.values())

    @property
    def device_bytes(self) -> int:
        return int(self.plan.device_memory_gb * GIB)

    def fits(self, mode: str) -> bool:
        return self.peaks[mode] <= self.device_bytes


def build_report(job: PlannedJob, plan: PlanSettings, model: GPT, layout: Layout) -> Report:
    """The figures of the heaviest rank: without pipeline stages the rank with the most model
    states; with them, the pipeline rank (its stages) with the highest peak in the job's
    train.activation_checkpointing mode, and within it the rank with the most model states."""
    settings = DeepSpeedSettings.for_model(model, layout.zero_stage)
    total, active = count_parameters(model)
    experts = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    per_rank = plan_all_ranks(model, layout, settings)
    totals = [sum(sum(k.values()) for k in states.values()) for states in per_rank]
    candidates = []
    for pp_rank in range(layout.pp):
        ranks = range(pp_rank * layout.dp, (pp_rank + 1) * layout.dp)
        rank = max(ranks, key=lambda r: (totals[r], -r))  # the heaviest, the first of equals
        spread = max(totals[r] for r in ranks) - min(totals[r] for r in ranks)
        candidates.append(
            _rank_report(job, plan, model, layout, settings, rank, per_rank[rank], spread, total, active, experts)
        )
    chosen = job.train.activation_checkpointing
    report = max(candidates, key=lambda r: (r.peaks[chosen], -r.rank))
    if layout.pp > 1:
        report.pipeline_peaks = [r.peaks[chosen] for r in candidates]
    return report


def rank_report(job: PlannedJob, plan: PlanSettings, model: GPT, layout: Layout, rank: int) -> Report:
    """The figures of `rank` (build_report shows the heaviest)."""
    settings = DeepSpeedSettings.for_model(model, layout.zero_stage)
    total, active = count_parameters(model)
    experts = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    states = plan_all_ranks(model, layout, settings)[rank]
    return _rank_report(job, plan, model, layout, settings, rank, states, 0, total, active, experts)


def _rank_report(
    job: PlannedJob,
    plan: PlanSettings,
    model: GPT,
    layout: Layout,
    settings: DeepSpeedSettings,
    rank: int,
    states: dict[str, dict[str, int]],
    spread: int,
    total: int,
    active: int,
    experts: int,
) -> Report:
    """The figures of one rank (`states`: its planned model states; the counts: the whole model's)."""
    t = job.train
    _, bytes_per_activation = element_bytes(t.dtype)
    transients = plan_transients(model, layout, settings, rank)
    stages, counts, buffers = None, [], 0
    if layout.pp > 1:
        stages = rank_stages(model, layout, rank // layout.dp)
        shape = PipelineStep(t.micro_batch, t.seq_len, t.grad_accum)
        transients += pipeline_transients(job.gpt_config(), layout, stages, shape)
        counts, buffers = (
            in_flight(layout, stages, t.grad_accum),
            receive_buffers(job.gpt_config(), layout, stages, shape),
        )
        num_moe = len(stages.module.moe_layers())
    else:
        num_moe = len(model.moe_layers())
    activations, all_to_all, peaks = {}, {}, {}
    model_states = sum(sum(k.values()) for k in states.values())
    during = sum(x.bytes for x in transients if x.when == DURING_COMPUTE)
    at_step = sum(x.bytes for x in transients if x.when == AT_STEP)
    for mode in ACTIVATION_CHECKPOINTING:
        if stages is None:
            activations[mode] = activation_peak(
                job.gpt_config(),
                t.micro_batch,
                t.seq_len,
                layout.ep,
                mode,
                bytes_per_activation,
                layout.bytes_per_param,
            )
        else:
            activations[mode] = rank_activation_peak(
                job.gpt_config(), layout, stages, shape, mode, bytes_per_activation, layout.bytes_per_param
            )
        all_to_all[mode] = all_to_all_bytes_per_step(
            num_moe,
            t.micro_batch * t.seq_len,
            job.moe.top_k,
            job.model.d_model,
            layout,
            t.grad_accum,
            recompute=mode != "none",
            bytes_per_element=bytes_per_activation,
        )
        peaks[mode] = model_states + buffers + max(activations[mode].peak + during, at_step)
    return Report(
        job,
        plan,
        layout,
        total,
        active,
        experts,
        rank,
        spread,
        states,
        transients,
        activations,
        all_to_all,
        peaks,
        bytes_per_activation,
        stages,
        counts,
        buffers,
    )


def human(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _row(label: str, *cells: str, width: int = 62) -> str:
    return f"  {label:<{width}}" + "".join(f"{c:>19}" for c in cells)


def dominant(report: Report, mode: str) -> tuple[str, int]:
    """The largest single item in this mode's peak."""
    items = {f"{part} {kind}": v for part, kinds in report.states.items() for kind, v in kinds.items()}
    items["activations"] = report.activations[mode].peak
    if report.receive_buffers:
        items["pipeline receive buffers"] = report.receive_buffers
    for x in report.transients:
        items[x.what] = x.bytes
    name = max(items, key=items.get)
    return name, items[name]


def verdict(report: Report, mode: str) -> str:
    need, have = report.peaks[mode], report.device_bytes
    if need <= have:
        return (
            f"fits: {human(need)} of {human(have)} per rank ({need / have:.0%}), train.activation_checkpointing={mode}"
        )
    name, size = dominant(report, mode)
    line = (
        f"does not fit: {human(need)} needed of {human(have)} per rank with train.activation_checkpointing={mode}; "
        f"{name} dominate{'s' if not name.endswith('s') else ''} ({human(size)})"
    )
    better = [m for m in ACTIVATION_CHECKPOINTING if report.fits(m)]
    if better:
        line += f"; it fits with train.activation_checkpointing={better[0]} ({human(report.peaks[better[0]])})"
    return line


def _split(split) -> str:
    return split if isinstance(split, str) else "[" + ",".join(map(str, split)) + "]"


def _blocks(blocks: range) -> str:
    return f"block {blocks.start}" if len(blocks) == 1 else f"blocks {blocks.start}-{blocks.stop - 1}"


def _stages_line(r: Report) -> str:
    """Which stages the shown rank holds: the pipeline rank with the highest peak."""
    st = r.stages
    held = []
    for s in st.stages:
        head = "norm, the embedding received as output head" if r.job.model.tie_embeddings else "norm, output head"
        extra = (["embedding"] if s == 0 else []) + ([head] if s == st.num_stages - 1 else [])
        held.append(f"stage {s} ({', '.join([_blocks(st.ranges[s]), *extra])})")
    return f"pipeline rank {st.pp_rank} of {r.layout.pp}, the highest peak, holds {'; '.join(held)}"


def render(r: Report) -> str:
    job, layout, t = r.job, r.layout, r.job.train
    modes = ACTIVATION_CHECKPOINTING
    chosen = t.activation_checkpointing
    lines = [
        "switchyard memory plan (model built on the meta device; nothing allocated)",
        f"model: {count(r.total_params)} parameters ({count(r.active_params)} active per token), "
        f"{count(r.expert_params)} of them in routed experts; vocabulary {job.model.vocab_size} (model.vocab_size)",
        f"layout: {layout.world_size} rank(s), "
        + (
            f"parallel.pp={layout.pp} ({layout.num_stages} stages, parallel.schedule={layout.schedule}, "
            f"parallel.split={_split(layout.split)}) x {layout.dp} data-parallel rank(s) per stage, "
            if layout.pp > 1
            else ""
        )
        + f"parallel.ep={layout.ep}, "
        f"{layout.edp} expert-data-parallel rank(s) per expert, "
        f"ZeRO-{layout.zero_stage} (dense: DeepSpeed; "
        f"experts: {'FSDP2 shards' if layout.experts_sharded else 'whole'}); "
        f"micro-batch {t.micro_batch} x {t.seq_len} tokens, grad_accum {t.grad_accum}",
        f"bytes (train.dtype={t.dtype}): {layout.bytes_per_param} per weight/gradient element (fp32 masters), "
        f"{r.bytes_per_activation} per activation value and all-to-all element (logits and router scores fp32)",
        "",
        (
            "model states per rank, exact"
            + (f" -- {_stages_line(r)}" if r.stages is not None else "")
            + (
                f" -- rank {r.rank}, the heaviest (ranks{' of its stages' if r.stages else ''} differ by up to "
                f"{human(r.spread)}: DeepSpeed's partition boundaries)"
                if r.ranks_differ
                else f" ({'every rank of its stages' if r.stages else 'every rank'} alike)"
            )
        ),
        _row("", "dense", "experts", "total"),
    ]
    for kind, label in KINDS:
        d, e = r.states["dense"][kind], r.states["experts"][kind]
        lines.append(_row(label, human(d), human(e), human(d + e)))
    dense_total = sum(r.states["dense"].values())
    expert_total = sum(r.states["experts"].values())
    lines.append(_row("model states", human(dense_total), human(expert_total), human(r.model_states)))
    if r.transients:
        lines += [
            "",
            "transient, per rank (estimates; allocated and freed within a step)",
            _row("", "", "when", "bytes"),
        ]
        for x in r.transients:
            lines.append(_row(x.what, "", x.when, human(x.bytes)))
    if r.stages is not None:
        counts = ", ".join(f"stage {s}: {c}" for s, c in zip(r.stages.stages, r.in_flight, strict=True))
        what = (
            f"activations of the micro-batches in flight on this rank ({counts}; parallel.schedule={layout.schedule})"
        )
    else:
        what = "activations of one micro-batch per rank"
    lines += [
        "",
        f"{what} (estimate; train.activation_checkpointing, * = the job's)",
        _row("", *[m + ("*" if m == chosen else "") for m in modes]),
    ]
    lines.append(_row("saved by the forward pass", *[human(r.activations[m].saved) for m in modes]))
    lines.append(
        _row(
            "  dense part (attention, norms, router, dense FFNs, logits)",
            *[human(r.activations[m].saved - r.activations[m].saved_by_experts) for m in modes],
        )
    )
    lines.append(
        _row(
            "  experts (token copies, expert intermediates, combine)",
            *[human(r.activations[m].saved_by_experts) for m in modes],
        )
    )
    lines.append(_row("peak of forward + backward", *[human(r.activations[m].peak) for m in modes]))
    lines.append(_row("  reached in the backward of", *[r.activations[m].phase for m in modes]))
    if layout.ep > 1 and r.all_to_all["none"]["total"]:
        lines += [
            "",
            f"all-to-all bytes sent per rank per optimizer step (dropless, assuming uniform routing: "
            f"{layout.ep - 1}/{layout.ep} of the {job.moe.top_k}-way token copies leave the rank)",
            _row("", *modes),
        ]
        for key, label in (
            ("forward", "forward: dispatch + combine (the job logs these)"),
            ("backward", "backward"),
            ("recompute", "recomputed forward (activation checkpointing)"),
            ("total", "total"),
        ):
            lines.append(_row(label, *[human(r.all_to_all[m][key]) for m in modes]))
    elif layout.ep == 1:
        lines += ["", "all-to-all: none (parallel.ep=1: every rank holds every expert)"]
    buffers = " + pipeline receive buffers" if r.stages is not None else ""
    if r.stages is not None:
        lines += [
            "",
            f"pipeline receive buffers (torch's, one per micro-batch, input and output gradient): "
            f"{human(r.receive_buffers)} on this rank",
            f"peak of each pipeline rank (train.activation_checkpointing={chosen}): "
            + ", ".join(f"{i}: {human(p)}" for i, p in enumerate(r.pipeline_peaks)),
        ]
    lines += [
        "",
        f"peak per rank = model states{buffers} + max(activation peak + {DURING_COMPUTE} transients, "
        f"{AT_STEP} transients)",
        _row("", *modes),
        _row("peak", *[human(r.peaks[m]) for m in modes]),
        _row(
            f"device memory {human(r.device_bytes)} (plan.device_memory_gb)",
            *["fits" if r.fits(m) else "does not fit" for m in modes],
        ),
        "",
        f"verdict: {verdict(r, chosen)}",
    ]
    return "\n".join(lines)
