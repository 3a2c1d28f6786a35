"""What a live trainer holds in memory on this rank: its model states, measured tensor by tensor.

`model_state_bytes(trainer)` counts the bytes of the tensors that hold the model's weights,
gradients and optimizer state, for the dense part (DeepSpeed engine) and the routed experts
(FSDP2 over their expert-data-parallel group, or whole under ZeRO-0) separately. A tensor counts
with its whole storage (`untyped_storage().nbytes()`: padding and the unused tail of a flat
buffer included), and every storage once, in the first category that claims it, in this order:

    weights     dense: the module's parameters (ZeRO 0-2: whole, as views of DeepSpeed's flat
                buffers under 1-2; ZeRO-3: the `ds_tensor` partitions, plus the parameters kept
                whole because they are small, DeepSpeed's "persistent" parameters);
                experts: each parameter's local tensor (an FSDP2 shard, or the whole local experts)
    gradients   dense: `param.grad`; under ZeRO 1-2 the gradient partition DeepSpeed keeps for the
                step (`averaged_gradients`, `all_grad_tensors`) and the fp32 partition's `.grad`;
                under ZeRO-3 its flat gradient-partition buffer;
                experts: each parameter's `.grad` local tensor
    optimizer   AdamW's state tensors (`exp_avg`, `exp_avg_sq`, `step`) and the tensors it steps
                when they are not the weights: DeepSpeed's fp32 master partitions (ZeRO >= 1)
    buffers     dense only: the module's buffers (rotary tables, router biases) and DeepSpeed's
                gradient-reduction buckets (`ipg_buckets`: during backward under ZeRO 1-2, always
                under ZeRO-3)

What is held depends on when you look. Two moments matter (see train/plan.py, which predicts
both, and tests/test_plan_exact.py, which measures them):
- at the accumulation boundary, after the last backward and before the optimizer step: the most
  gradient memory a step holds (gradients are freed by the step);
- at rest, after an optimizer step: weights, optimizer state and the permanent buffers.
Not counted: activations, the all-gathered copies FSDP2 and ZeRO-3 make while computing, and
DeepSpeed's scalar flags (an overflow flag, the last norm) -- all transient or a few bytes.
"""

from __future__ import annotations

import torch

from parallel.zero import local_tensor

PARTS = ("dense", "experts")
KINDS = ("weights", "gradients", "optimizer", "buffers")


class ModelStateCount:
    """Bytes per (part, kind), each storage counted once, by the first category that adds it;
    `storages`: the data pointers of every storage counted."""

    def __init__(self):
        self.storages: set[int] = set()
        self.bytes = {part: dict.fromkeys(KINDS, 0) for part in PARTS}

    def add(self, part: str, kind: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        storage = local_tensor(tensor).untyped_storage()
        if storage.nbytes() == 0:  # a freed ZeRO-3 parameter, an empty placeholder
            return
        key = storage.data_ptr()
        if key in self.storages:
            return
        self.storages.add(key)
        self.bytes[part][kind] += storage.nbytes()

    def add_all(self, part: str, kind: str, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.add(part, kind, t)
            elif isinstance(t, (list, tuple)):
                self.add_all(part, kind, t)


def _adamw_state(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def model_state_bytes(trainer) -> dict[str, dict[str, int]]:
    """{"dense" | "experts": {"weights" | "gradients" | "optimizer" | "buffers": bytes}} held by
    this rank now (see the module docstring for what each counts and when to call it)."""
    return count_model_states(trainer).bytes


def count_model_states(trainer) -> ModelStateCount:
    count = ModelStateCount()
    dense = trainer.dense  # DeepSpeed's tensors, through parallel/deepspeed_state.py
    module_params = [p for _, p in dense.named_parameters()]

    # Weights first, so that ZeRO-0's AdamW (which steps the parameters themselves) does not claim them.
    count.add_all("dense", "weights", [p.data for p in module_params])
    count.add_all("dense", "weights", dense.partitioned_weights())
    count.add_all("experts", "weights", [p.data for _, p in trainer.named_expert_parameters])

    count.add_all("dense", "gradients", [p.grad for p in module_params])
    count.add_all("dense", "gradients", dense.held_gradients())
    count.add_all("experts", "gradients", [p.grad for _, p in trainer.named_expert_parameters])

    client = dense.client_optimizer
    count.add_all("dense", "optimizer", list(client.state.keys()))  # fp32 master partitions (ZeRO >= 1)
    count.add_all("dense", "optimizer", _adamw_state(client))
    count.add_all("experts", "optimizer", _adamw_state(trainer.expert_optimizer))

    count.add_all("dense", "buffers", list(trainer.module.buffers()))
    count.add_all("dense", "buffers", dense.reduce_buckets())
    return count


def total_bytes(states: dict[str, dict[str, int]]) -> int:
    return sum(sum(kinds.values()) for kinds in states.values())


def profiled_allocation_peak(fn) -> int:
    """Peak of the bytes allocated while `fn` runs, above what was allocated before (CPU allocator
    events of the torch profiler, in time order): the activations and working set of a step."""
    from torch._C._profiler import _EventType

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = [n for n in walk(prof.profiler.kineto_results.experimental_event_tree()) if n.tag == _EventType.Allocation]
    live = peak = 0
    for event in sorted(events, key=lambda n: n.start_time_ns):
        live += event.extra_fields.alloc_size
        peak = max(peak, live)
    return peak
