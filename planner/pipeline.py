"""What pipeline stages (parallel.pp > 1) add to a rank's memory, beyond its stages' model states
(planner/model_states.py: rank_stages): the activations of the micro-batches in flight, and what
torch.distributed.pipelining holds between the stages (parallel/pipeline.py).

    activations      each local stage s holds c_s micro-batches' saved activations at the rank's
                     busiest moment (parallel/pipeline_layout.py: in_flight_micro_batches, from the
                     schedule); one of them is in its backward, adding that stage's working set:
                     Σ c_s · saved_s + max_s (peak_s − saved_s)
    receive buffers  torch's PipelineStage allocates one buffer per micro-batch for every input it
                     receives (not on the first stage: the hidden state B·S·D, and with tied
                     embeddings the V·D matrix) and for every output gradient it receives (not on
                     the last stage: the same shapes), in the weights' dtype, and keeps them
    transients       the V·D gradients of the embedding matrix in a backward (`_vocab_matrices`:
                     the first stage's lookup gradient; tied, the received matrix's gradient and
                     the product of the backward's Σ output · output-gradient); on the last stage
                     the stage's output, one micro-batch's fp32 logits (B·S·V), which torch's stage
                     holds beside the loss until that micro-batch's backward, and its gradient. The
                     job asks the schedule not to keep every micro-batch's logits for a merged
                     return value (parallel/pipeline.py: step_options)

Legend: B micro-batch, S sequence, D hidden, V vocabulary, n = train.grad_accum micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import GPTConfig
from parallel.pipeline_layout import in_flight_micro_batches
from planner.activations import FP32, ActivationPeak, activation_peak
from planner.model_states import DURING_COMPUTE, Layout, RankStages, Transient


@dataclass(frozen=True)
class StepShape:
    micro_batch: int
    seq_len: int
    n_micro: int  # micro-batches per step (train.grad_accum)


def in_flight(layout: Layout, stages: RankStages, n_micro: int) -> list[int]:
    """Micro-batches in flight on each of the rank's stages at its busiest moment."""
    return in_flight_micro_batches(layout.schedule, layout.pp, stages.pp_rank, layout.stages_per_rank, n_micro)


def rank_activation_peak(
    cfg: GPTConfig, layout: Layout, stages: RankStages, shape: StepShape, mode: str, a: int, r: int
) -> ActivationPeak:
    """The activations of the rank's in-flight micro-batches (see the module docstring)."""
    counts = in_flight(layout, stages, shape.n_micro)
    peaks = [
        activation_peak(
            cfg,
            shape.micro_batch,
            shape.seq_len,
            layout.ep,
            mode,
            a,
            r,
            blocks=stages.ranges[s],
            last=s == stages.num_stages - 1,
        )
        for s in stages.stages
    ]
    saved = sum(c * p.saved for c, p in zip(counts, peaks, strict=True))
    busiest = max(peaks, key=lambda p: p.peak - p.saved)
    by_experts = sum(c * p.saved_by_experts for c, p in zip(counts, peaks, strict=True))
    return ActivationPeak(saved, saved + busiest.peak - busiest.saved, busiest.phase, by_experts)


def receive_buffers(cfg: GPTConfig, layout: Layout, stages: RankStages, shape: StepShape) -> int:
    """Bytes of the receive buffers torch's pipeline stages of this rank keep (module docstring)."""
    m = cfg.model
    per_micro_batch = shape.micro_batch * shape.seq_len * m.d_model
    if m.tie_embeddings:
        per_micro_batch += m.vocab_size * m.d_model
    boundaries = sum((s > 0) + (s < stages.num_stages - 1) for s in stages.stages)  # inputs + output gradients
    return boundaries * shape.n_micro * per_micro_batch * layout.bytes_per_param


def pipeline_transients(cfg: GPTConfig, layout: Layout, stages: RankStages, shape: StepShape) -> list[Transient]:
    m, out = cfg.model, []
    matrices = max(_vocab_matrices(m.tie_embeddings, s, stages.num_stages) for s in stages.stages)
    if matrices:
        out.append(
            Transient(
                "V x D matrices of the embedding's backward (its gradients; tied: the surrogate's product)",
                DURING_COMPUTE,
                matrices * m.vocab_size * m.d_model * layout.bytes_per_param,
            )
        )
    if stages.holds_last:
        logits = shape.micro_batch * shape.seq_len * m.vocab_size * FP32
        out.append(
            Transient("the last stage's output (one micro-batch's logits) and its gradient", DURING_COMPUTE, 2 * logits)
        )
    return out


def _vocab_matrices(tied: bool, stage: int, num_stages: int) -> int:
    """V x D tensors one backward of `stage` allocates: the first stage's embedding gradient (dense);
    with tied embeddings also the gradient of the matrix a later stage received, the surrogate
    Σ output · output-gradient's product on a stage that sent it on, and on the first stage the sum
    of the embedding's two gradients (lookup and projection)."""
    first, last = stage == 0, stage == num_stages - 1
    return first + (tied and not first) + (tied and not last) + (tied and first)
