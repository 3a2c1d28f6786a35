"""Variable-split all-to-all as an autograd function: the backward is the reverse exchange."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # What rank r received from s must send its gradient back from r to s: swap the splits.
        grad_in = _AllToAll.apply(grad_out.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Rows [sum(input_splits[:p]), +input_splits[p]) of `x` go to peer p; the result holds
    output_splits[p] rows from each peer p, in peer order. Differentiable."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def all_to_all_async(x: torch.Tensor, group) -> tuple[torch.Tensor, dist.Work]:
    """Even-split exchange started in the background (not differentiable): `wait()` the returned
    work before reading the output. Used for the per-expert counts, so the token gather can run
    while they travel."""
    out = torch.empty_like(x)
    work = dist.all_to_all_single(out, x.contiguous(), group=group, async_op=True)
    return out, work
