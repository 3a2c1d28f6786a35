"""World = PP × DP × EP: validated once, process groups built in one place from DeviceMeshes.

With pipeline parallelism (`pp` > 1) the blocks are split into stages (parallel/pipeline.py) and
the world into `pp` consecutive slices of `dp = world / pp` ranks, one slice per stage; without it
the whole world is one slice. Every rank of a slice owns a data shard (the slice's dense weights
are data parallel over it; the ranks at one position of every slice, a pipeline, read the same
data). Within a slice, consecutive blocks of `ep` ranks split the experts between them (an
expert-parallel group, kept on one node when GPUs are packed per node); ranks at the same position
of different blocks hold the same experts (an expert-data-parallel group: they average, and under
ZeRO partition, those experts' gradients and optimizer state).

    world 4, ep 2:         mesh (edp=2, ep=2)    EP groups {0,1} {2,3}   EDP groups {0,2} {1,3}
    world 8, pp 2, ep 2:   stage 0 = ranks 0-3, stage 1 = ranks 4-7; pipelines {0,4} {1,5} {2,6} {3,7};
                           in each slice EP and EDP groups as above ({4,5} {6,7}, {4,6} {5,7})

On CUDA the default group is `cpu:gloo,cuda:nccl`, so a collective works whether its tensor lives
on the GPU or (small bookkeeping) on the CPU; the loop still keeps its collectives on the compute
device (`ParallelDims.device`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_AXES = ("edp", "ep")  # ep innermost: an EP group is `ep` consecutive ranks
PIPELINE_MESH_AXES = ("pp", "edp", "ep")  # pp outermost: a stage's ranks are consecutive


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    local_rank: int
    ep: int
    device: torch.device = torch.device("cpu")  # where compute runs, and where every collective's tensors live
    mesh: Optional[DeviceMesh] = None  # this slice's ranks on axes MESH_AXES; None on one process
    dp_mesh: Optional[DeviceMesh] = (
        None  # this slice's ranks on one axis (the dense weights' split); None on one process
    )
    store: Optional[dist.Store] = None  # the rendezvous store (for wait_for_every_rank); None on one process
    pp: int = 1  # pipeline stages (parallel.pp)
    pp_group: Optional[dist.ProcessGroup] = None  # this rank's pipeline: one rank of each slice; None without pp

    @property
    def dp(self) -> int:
        """Ranks of one slice: the data-parallel degree of the dense weights (the world without pp)."""
        return self.world_size // self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh.get_group("ep") if self.mesh is not None else None

    @property
    def edp_group(self) -> Optional[dist.ProcessGroup]:
        return self.mesh.get_group("edp") if self.mesh is not None else None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def validate_degrees(world_size: int, ep: int, num_experts: int, pp: int = 1) -> None:
    """Pure arithmetic, so every rank reaches the same verdict without talking to the others."""
    if pp < 1 or world_size % pp:
        raise ValueError(
            f"parallel.pp ({pp}) must divide the number of processes ({world_size}); allowed: divisors of {world_size}"
        )
    if ep < 1 or world_size % (pp * ep):
        if pp == 1:
            raise ValueError(
                f"parallel.ep ({ep}) must divide the number of processes ({world_size}); "
                f"allowed: divisors of {world_size}"
            )
        raise ValueError(
            f"parallel.pp x parallel.ep ({pp} x {ep}) must divide the number of processes ({world_size}); "
            f"allowed parallel.ep with parallel.pp={pp}: divisors of {world_size // pp}"
        )
    if num_experts % ep:
        raise ValueError(f"parallel.ep ({ep}) must divide moe.num_experts ({num_experts})")


def read_launch_env() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's variables, else SLURM's, else one process."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"]), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
    return 1, 0, 0


def process_group_backend(device: torch.device) -> str:
    """NCCL alone rejects CPU tensors; the combined backend takes both, so no collective can fail
    for living on the wrong device."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting longer than this has hung


def local_cuda_device(local_rank: int) -> torch.device:
    """This process's GPU: the LOCAL_RANK-th visible one. A node started with more processes than
    visible GPUs would otherwise fail later, deep inside CUDA, or share a GPU without saying so."""
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(
            f"LOCAL_RANK={local_rank} but this node shows {visible} CUDA device(s)"
            + (f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else "")
            + f"; start at most {visible} process(es) per node, or set train.device=cpu"
        )
    return torch.device("cuda", local_rank)


def init_parallel(
    ep: int, num_experts: int, device: torch.device, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT, pp: int = 1
) -> ParallelDims:
    """Validate degrees (before any collective, so a bad setting cannot hang), then build the groups.
    `timeout`: how long a collective may wait for the other ranks."""
    world_size, rank, local_rank = read_launch_env()
    validate_degrees(world_size, ep, num_experts, pp)
    if device.type == "cuda" and device.index is None:
        device = local_cuda_device(local_rank)
    # With a device, NCCL binds its communicators to this process's GPU at once (no guessing later).
    device_id = {"device_id": device} if device.type == "cuda" else {}
    # torchrun's variables, also when started by srun or by hand: DeepSpeed reads them.
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
        os.environ.setdefault(name, str(value))
    backend = process_group_backend(device)
    if world_size == 1:
        # DeepSpeed wants a process group even for one process; an in-memory store needs no port.
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **device_id)
        return ParallelDims(1, 0, 0, ep, device, pp=pp)

    store = None
    if not dist.is_initialized():
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        # After a torchrun restart the store can still hold the dead attempt's gloo addresses:
        # a per-attempt key prefix makes the new processes meet only each other.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"switchyard/attempt{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **device_id)
    if pp == 1:
        mesh = init_device_mesh(device.type, (world_size // ep, ep), mesh_dim_names=MESH_AXES)
        dp_mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))  # the default group, reused
        return ParallelDims(world_size, rank, local_rank, ep, device, mesh, dp_mesh, store)
    dp = world_size // pp
    mesh_3d = init_device_mesh(device.type, (pp, dp // ep, ep), mesh_dim_names=PIPELINE_MESH_AXES)
    slices = init_device_mesh(device.type, (pp, dp), mesh_dim_names=("pp", "dp"))
    return ParallelDims(
        world_size,
        rank,
        local_rank,
        ep,
        device,
        mesh_3d["edp", "ep"],
        slices["dp"],
        store,
        pp,
        slices.get_group("pp"),
    )


def wait_for_every_rank(dims: ParallelDims, what: str, timeout: datetime.timedelta) -> None:
    """A barrier on the rendezvous store with its own, long timeout, for work whose length differs
    between ranks by more than a collective may wait (COLLECTIVE_TIMEOUT): e.g. one node building
    the data cache while another finds it ready. `what` names the barrier; use each name once."""
    if not dims.distributed or dims.store is None:
        return
    arrived, done = f"wait/{what}/arrived", f"wait/{what}/done"
    if dims.store.add(arrived, 1) == dims.world_size:
        dims.store.set(done, "1")
    dims.store.wait([done], timeout)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
