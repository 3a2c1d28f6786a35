"""Run a function in N real processes over gloo (torch.multiprocessing), for multi-rank tests."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    # The same variables torchrun sets, so the code under test reads its usual environment.
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    )
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size: int, fn, *args) -> None:
    """Calls fn(rank, world_size, *args) in `world_size` processes; an exception in any fails the caller."""
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True, start_method="spawn")
