"""N processes on this machine over gloo, with the variables torchrun sets: for multi-rank tests and
benchmarks that run a function in each rank rather than a whole job (`launch/` starts jobs)."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
        }
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local_ranks(world_size: int, fn, *args) -> None:
    """Calls fn(rank, world_size, *args) in `world_size` spawned processes (fn must be importable);
    an exception in any of them fails the caller. fn sets up its process group, e.g. with
    parallel.dims.init_parallel, which reads the variables set here."""
    mp.start_processes(
        _entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True, start_method="spawn"
    )
