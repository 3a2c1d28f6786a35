"""Moving flat tensors between DeepSpeed-style ranges of any length and DTensor's Shard(0) chunks
(parallel/flat_split.py), checked against DTensor's own split of the whole tensor on real ranks."""

import torch

from parallel.flat_split import EMPTY, Piece, chunk_split, repartition
from tests.ranks import run_ranks

NUMELS = [10, 1, 3, 17, 0, 8]  # the 1 and 3 leave ranks with nothing under Shard(0); 0 is a tensor nobody holds


def test_chunk_split_is_torch_chunk():
    for numel in range(30):
        for world in range(1, 7):
            sizes = [c.numel() for c in torch.arange(numel).chunk(world)]
            split = chunk_split(numel, world)
            assert [p.numel for p in split if p.numel] == [s for s in sizes if s], (numel, world)
            assert [p.start for p in split if p.numel] == [sum(sizes[:i]) for i, s in enumerate(sizes) if s]
            assert all(p == EMPTY for p in split if not p.numel)


def uneven_split(numel: int, world: int, seed: int) -> list[Piece]:
    """Contiguous ranges of random lengths in rank order (ZeRO-1/2 style), some ranks empty."""
    cuts = sorted(torch.randint(0, numel + 1, (world - 1,), generator=torch.Generator().manual_seed(seed)).tolist())
    bounds = [0, *cuts, numel]
    return [Piece(lo, hi - lo) if hi > lo else EMPTY for lo, hi in zip(bounds, bounds[1:])]


def _worker(rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world,))
    fulls = [torch.arange(n, dtype=torch.float32) * (i + 1) for i, n in enumerate(NUMELS)]
    have = [uneven_split(n, world, seed=i) for i, n in enumerate(NUMELS)]
    want = [chunk_split(n, world) for n in NUMELS]
    mine = [full[h[rank].start : h[rank].start + h[rank].numel] for full, h in zip(fulls, have)]

    chunks = repartition(mine, have, want, rank, torch.device("cpu"))
    for full, chunk in zip(fulls, chunks):  # the oracle: DTensor's own split of the whole tensor
        expected = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None).to_local()
        assert torch.equal(chunk, expected), (rank, chunk, expected)

    back = repartition(chunks, want, have, rank, torch.device("cpu"))
    for piece, original in zip(back, mine):
        assert torch.equal(piece, original)


def test_repartition_into_dtensor_chunks_and_back():
    run_ranks(3, _worker)
