"""Flat (1-D) tensors split over the world in contiguous ranges, and moving them from one split to
another.

A DTensor sharded `Shard(0)` over a 1-D mesh of the world splits a flat tensor of n elements as
`torch.chunk` does: each rank in turn holds ceil(n / world) elements, the last one what is left,
ranks past the end none (`chunk_piece`). DeepSpeed ZeRO-1/2 cuts each param group's flat buffer
into equal partitions, so a parameter is split wherever those cuts fall: ranges of any length
(parallel/deepspeed_state.py: `DenseShards.piece`). `repartition` moves such ranges into DTensor's
split (to save) and back (after loading) with one all-to-all, so that every flattened parameter
is one DTensor that torch.distributed.checkpoint can read into any other layout. ZeRO-3's
partitions already are DTensor's split: nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + numel) of a flattened tensor."""

    start: int
    numel: int


EMPTY = Piece(0, 0)  # a rank holding nothing of a tensor (every empty range is this one)


def chunk_piece(numel: int, world: int, rank: int) -> Piece:
    """`rank`'s range under DTensor's Shard(0) over `world` ranks (torch.chunk's sizes)."""
    chunk = -(-numel // world)
    start = min(rank * chunk, numel)
    held = min(chunk, numel - start)
    return Piece(start, held) if held else EMPTY


def chunk_split(numel: int, world: int) -> list[Piece]:
    return [chunk_piece(numel, world, rank) for rank in range(world)]


def gather_split(pieces: list[Piece | None], device: torch.device, group=None) -> list[list[Piece]]:
    """Every rank's piece of each tensor: `pieces[i]` is this rank's piece of tensor i (None: none);
    returns [i][rank], ranks of `group` (default: the world). Every rank of the group must pass the
    same number of pieces."""
    if not pieces:
        return []
    local = torch.tensor(
        [[p.start, p.numel] if p is not None and p.numel else [0, 0] for p in pieces], dtype=torch.int64, device=device
    )  # [i, 2]
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered, dim=1).tolist()  # [i][rank][start, numel]
    return [[Piece(start, numel) for start, numel in ranks] for ranks in table]


def _overlap(a: Piece, b: Piece) -> tuple[int, int]:
    return max(a.start, b.start), min(a.start + a.numel, b.start + b.numel)


def repartition(
    values: list[torch.Tensor],
    have: list[list[Piece]],
    want: list[list[Piece]],
    rank: int,
    device: torch.device,
    group=None,
) -> list[torch.Tensor]:
    """values[i]: this rank's piece have[i][rank] of flat tensor i (1-D, all of one dtype). Returns
    this rank's pieces want[i][rank], new tensors on `device`; the two splits cover the same
    elements. One all-to-all over `group` (default: the world; `rank` is this rank's index in it;
    every rank of the group calls it)."""
    world = len(have[0]) if have else 1
    send_parts, input_splits = [], []
    for peer in range(world):  # what this rank sends to each peer, peer by peer, tensor by tensor
        count = 0
        for i, v in enumerate(values):
            lo, hi = _overlap(have[i][rank], want[i][peer])
            if hi > lo:
                send_parts.append(v[lo - have[i][rank].start : hi - have[i][rank].start].to(device))
                count += hi - lo
        input_splits.append(count)
    output_splits = [
        sum(max(0, hi - lo) for lo, hi in (_overlap(h[peer], w[rank]) for h, w in zip(have, want)))
        for peer in range(world)
    ]
    dtype = values[0].dtype
    send = torch.cat(send_parts) if send_parts else torch.empty(0, dtype=dtype, device=device)
    received = torch.empty(sum(output_splits), dtype=dtype, device=device)
    dist.all_to_all_single(received, send, output_splits, input_splits, group=group)
    out = [torch.empty(want[i][rank].numel, dtype=dtype, device=device) for i in range(len(values))]
    at = 0
    for peer in range(world):  # the same order, seen from the receiving side
        for i in range(len(values)):
            lo, hi = _overlap(have[i][peer], want[i][rank])
            if hi > lo:
                start = want[i][rank].start
                out[i][lo - start : hi - start] = received[at : at + hi - lo]
                at += hi - lo
    return out
