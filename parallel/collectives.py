"""The few collectives the training loop issues outside DeepSpeed and FSDP.

Every tensor crosses ranks on `dims.device`, the compute device: an NCCL group rejects CPU
tensors, so these helpers move their argument there and back rather than trusting each caller.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.dims import ParallelDims


def all_reduce_sum(t: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Sum `t` over the world and return it on its own device (a no-op on one process)."""
    if not dims.distributed:
        return t
    on_device = t.to(dims.device)
    dist.all_reduce(on_device)
    return on_device.to(t.device)


def any_rank(flag: bool, dims: ParallelDims) -> bool:
    """True when `flag` is true on at least one rank: every rank takes the same branch."""
    return any_rank_of((flag,), dims)[0]


def any_rank_of(flags: tuple[bool, ...], dims: ParallelDims) -> tuple[bool, ...]:
    """`any_rank` of several flags in one all-reduce (one collective per step carries them all)."""
    if not dims.distributed:
        return tuple(bool(f) for f in flags)
    summed = all_reduce_sum(torch.tensor([float(f) for f in flags], device=dims.device), dims)
    return tuple(bool(v > 0) for v in summed.tolist())


def average_replicated_expert_gradients(params: list[torch.nn.Parameter], dims: ParallelDims) -> None:
    """Experts kept whole on each rank of their expert-data-parallel (EDP) group: sum their
    gradients over that group, divided by the data-parallel degree W (the world, or under pipeline
    parallelism the ranks of one stage).

    Why W, not the group size: the single-process gradient of a global-batch mean is
    (1/W)·Σ_ranks ∂L_r/∂θ. A rank holding expert e already receives, through the all-to-all
    backward, the contributions of every rank in its EP group; summing over the EDP group adds the
    other EP groups, giving Σ over all W ranks. (Sharded experts get the same divisor from FSDP.)
    """
    if not dims.distributed or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # experts that saw no token still join the collective
    if dims.edp == 1:  # no replica to sum with: only the 1/W of the global-batch mean, in place
        for p in params:
            p.grad.div_(dims.dp)
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective instead of one per tensor
    dist.all_reduce(flat, group=dims.edp_group)
    flat /= dims.dp
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


PEER_LOST_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "NCCL error",
    "Watchdog caught collective operation timeout",
)


def peer_failure(err: BaseException) -> str | None:
    """The cause, when `err` is a collective failing because another rank died (gloo's "Connection
    closed by peer", NCCL's aborted communicator), else None."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(err)
    if not isinstance(err, getattr(dist, "DistError", ())) and not any(sign in text for sign in PEER_LOST_SIGNS):
        return None
    line = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    line = line.split("] ", 1)[-1] if line.startswith("[") else line  # without gloo's source location
    return line.split(". This is typically", 1)[0]  # and without its advice to read the other logs
