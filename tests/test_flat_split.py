"""Moving flat tensors between DeepSpeed-style ranges of any length and DTensor's Shard(0) chunks
(parallel/flat_split.py), checked against DTensor's own split of the whole tensor on real ranks;
the chunks, saved with torch.distributed.checkpoint, read back whole and into another layout."""

from itertools import pairwise

import pytest
import torch
import torch.distributed.checkpoint as dcp

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
    return [Piece(lo, hi - lo) if hi > lo else EMPTY for lo, hi in pairwise(bounds)]


def fulls() -> list[torch.Tensor]:
    return [torch.arange(n, dtype=torch.float32) * (i + 1) for i, n in enumerate(NUMELS)]


def _worker(rank: int, world: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (world,))
    have = [uneven_split(n, world, seed=i) for i, n in enumerate(NUMELS)]
    want = [chunk_split(n, world) for n in NUMELS]
    mine = [full[h[rank].start : h[rank].start + h[rank].numel] for full, h in zip(fulls(), have)]

    chunks = repartition(mine, have, want, rank, torch.device("cpu"))
    for full, chunk in zip(fulls(), chunks):  # the oracle: DTensor's own split of the whole tensor
        expected = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None).to_local()
        assert torch.equal(chunk, expected), (rank, chunk, expected)

    back = repartition(chunks, want, have, rank, torch.device("cpu"))
    for piece, original in zip(back, mine):
        assert torch.equal(piece, original)

    def as_dtensors(local: list[torch.Tensor]) -> dict[str, DTensor]:
        return {
            f"t{i}": DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=torch.Size([n]), stride=(1,))
            for i, (t, n) in enumerate(zip(local, NUMELS))
        }

    dcp.save(as_dtensors(chunks), checkpoint_id=folder)
    # Read back on a mesh of the ranks in reverse order: every rank but the middle one asks for
    # another rank's chunk, the empty ones included.
    reversed_mesh = DeviceMesh("cpu", list(reversed(range(world))))
    position = world - 1 - rank
    loaded = {
        f"t{i}": DTensor.from_local(
            torch.full((chunk_split(n, world)[position].numel,), -1.0),
            reversed_mesh,
            [Shard(0)],
            run_check=False,
            shape=torch.Size([n]),
            stride=(1,),
        )
        for i, n in enumerate(NUMELS)
    }
    dcp.load(loaded, checkpoint_id=folder)
    for full, (key, t), n in zip(fulls(), loaded.items(), NUMELS):
        piece = chunk_split(n, world)[position]
        assert torch.equal(t.to_local(), full[piece.start : piece.start + piece.numel]), (rank, key)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # reading in one process is the point
def test_repartition_into_dtensor_chunks_and_back(tmp_path):
    run_ranks(3, _worker, str(tmp_path))
    whole = {f"t{i}": torch.full_like(t, -1.0) for i, t in enumerate(fulls())}
    dcp.load(whole, checkpoint_id=str(tmp_path), no_dist=True)
    for i, full in enumerate(fulls()):
        assert torch.equal(whole[f"t{i}"], full), i
