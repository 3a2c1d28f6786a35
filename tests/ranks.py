"""Multi-rank tests run a function in N real processes over gloo: see parallel/local_launch.py."""

from parallel.local_launch import free_port
from parallel.local_launch import run_local_ranks as run_ranks

__all__ = ["free_port", "run_ranks"]
