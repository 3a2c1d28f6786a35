"""Which blocks each pipeline stage holds, and which rank holds each stage: pure arithmetic, so the
job's validation (train/config.py) and the memory planner reach the same verdict as the ranks.

Stages are numbered 0 … S-1 from the embedding to the output head, S = pp × stages_per_rank. Stage
s lives on pipeline rank s mod pp (the looped placement of interleaved 1F1B: with 2 stages per rank
and pp=2, rank 0 holds stages 0 and 2, rank 1 stages 1 and 3).
"""

from __future__ import annotations

PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
PIPELINE_ZERO_STAGES = (0, 1, 2)  # ZeRO-3 gathers weights in module hooks that a stage's engine does not run
SPLITS = ("layers", "params")


def validate_split(split, n_layers: int, num_stages: int) -> None:
    """parallel.split against the model: one ValueError naming the settings and what is allowed."""
    if n_layers < num_stages:
        raise ValueError(
            f"parallel.pp x parallel.stages_per_rank ({num_stages} stages) exceeds model.n_layers ({n_layers}): "
            "each stage needs at least one block"
        )
    if isinstance(split, str):
        if split not in SPLITS:
            raise ValueError(f"parallel.split must be 'layers', 'params' or a list of block counts; got {split!r}")
        if split == "layers" and n_layers % num_stages:
            raise ValueError(
                f"parallel.pp x parallel.stages_per_rank ({num_stages} stages) must divide model.n_layers "
                f"({n_layers}) with parallel.split=layers; use parallel.split=params or a list of block counts"
            )
        return
    counts = list(split) if isinstance(split, (list, tuple)) or hasattr(split, "__iter__") else None
    if (
        counts is None
        or len(counts) != num_stages
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts)
        or sum(counts) != n_layers
    ):
        raise ValueError(
            f"parallel.split as a list needs {num_stages} positive block counts (one per stage) summing to "
            f"model.n_layers ({n_layers}); got {split!r}"
        )


def stage_block_counts(split, block_params: list[int], num_stages: int, first_extra: int, last_extra: int) -> list[int]:
    """Blocks per stage. `block_params`: each block's parameter count (for split="params");
    `first_extra` / `last_extra`: the parameters the first stage (embedding) and the last (norm,
    untied output head) hold besides their blocks."""
    n = len(block_params)
    validate_split(split, n, num_stages)
    if split == "layers":
        return [n // num_stages] * num_stages
    if split == "params":
        return balanced_counts(block_params, num_stages, first_extra, last_extra)
    return list(split)


def balanced_counts(block_params: list[int], num_stages: int, first_extra: int, last_extra: int) -> list[int]:
    """Contiguous blocks per stage minimising the largest stage's parameter count (dynamic
    programming over split points; ties go to the earliest split)."""
    n = len(block_params)
    prefix = [0]
    for p in block_params:
        prefix.append(prefix[-1] + p)

    def weight(stage: int, lo: int, hi: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == num_stages - 1 else 0)
        return prefix[hi] - prefix[lo] + extra

    inf = float("inf")
    # best[s][i]: the smallest max weight placing the first i blocks into stages 0 … s-1.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], weight(s - 1, j, i))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, i = [], n
    for s in range(num_stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def stage_ranges(counts: list[int]) -> list[range]:
    """Block indices of each stage."""
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def local_stages(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The stages pipeline rank `pp_rank` holds, in order."""
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def validate_micro_batches(schedule: str, grad_accum: int, pp: int) -> None:
    """What each schedule needs of train.grad_accum, the step's micro-batches (torch's own checks,
    said in the job's settings; interleaved 1F1B as torch 2.11 wants it, a multiple of pp)."""
    if schedule == "1f1b" and grad_accum < pp:
        raise ValueError(
            f"parallel.schedule=1f1b needs train.grad_accum (micro-batches per step) >= parallel.pp ({pp}); "
            f"got {grad_accum}"
        )
    if schedule == "interleaved_1f1b" and grad_accum % pp:
        raise ValueError(
            f"parallel.schedule=interleaved_1f1b needs train.grad_accum (micro-batches per step) to be a multiple "
            f"of parallel.pp ({pp}); got {grad_accum}"
        )


def in_flight_micro_batches(schedule: str, pp: int, pp_rank: int, stages_per_rank: int, n_micro: int) -> list[int]:
    """Micro-batches whose forward activations pipeline rank `pp_rank` holds at its busiest moment
    (the most forwards not yet backwarded), one count per local stage (`local_stages` order).

    gpipe: every forward runs before any backward: all `n_micro`. 1f1b (torch's Schedule1F1B): stage
    s runs min(n_micro, pp − s) warm-up forwards, then backward-then-forward, so never more.
    interleaved_1f1b (torch's ScheduleInterleaved1F1B, replayed here): micro-batches go in rounds of
    n_micro / max(1, n_micro // pp); the rank runs (v − 1) · round + 2 · (pp − 1 − rank) warm-up
    forwards (at most n_micro · v), each `round` of them on its next local stage in turn, then
    forward-then-backward pairs, so one forward more is alive before the first backward."""
    if schedule == "gpipe":
        return [n_micro] * stages_per_rank
    if schedule == "1f1b":
        return [min(n_micro, pp - pp_rank)] * stages_per_rank
    if schedule != "interleaved_1f1b":
        raise ValueError(f"parallel.schedule must be one of {', '.join(PIPELINE_SCHEDULES)}; got {schedule!r}")
    v = stages_per_rank
    per_round = n_micro // max(1, n_micro // pp)
    total = n_micro * v
    warmup = min((v - 1) * per_round + 2 * (pp - 1 - pp_rank), total)
    alive, best = [0] * v, [0] * v

    def forward(op: int) -> None:
        alive[(op // per_round) % v] += 1
        if sum(alive) > sum(best):
            best[:] = alive

    def backward(op: int) -> None:
        alive[v - 1 - ((op - warmup) // per_round) % v] -= 1

    for op in range(total + warmup):  # warm-up: forwards; then forward + backward pairs; cool-down: backwards
        if op < total:
            forward(op)
        if op >= warmup:
            backward(op)
    return best
