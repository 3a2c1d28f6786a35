"""A machine with GPUs is no surprise: tests stay on the CPU unless marked `gpu`; a process whose
LOCAL_RANK has no visible GPU is refused in one line; the first collective waits for a rank that
is still preparing the data (e.g. building the cache) instead of timing out."""

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

from parallel.dims import init_parallel, wait_for_every_rank
from tests.jobs import job_env
from tests.ranks import run_ranks


def test_tests_not_marked_gpu_and_their_jobs_see_no_gpu(tmp_path):
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert job_env(tmp_path)["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()


def test_a_local_rank_without_a_visible_gpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError) as refused:
        init_parallel(ep=1, num_experts=4, device=torch.device("cuda"))
    assert str(refused.value) == (
        "LOCAL_RANK=3 but this node shows 2 CUDA device(s) (CUDA_VISIBLE_DEVICES='0,1'); "
        "start at most 2 process(es) per node, or set train.device=cpu"
    )


COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=3)
PREPARATION_SECONDS = 8  # longer than a collective may wait


def _slow_preparation_worker(rank, world_size, wait: bool):
    dims = init_parallel(ep=1, num_experts=4, device=torch.device("cpu"), timeout=COLLECTIVE_TIMEOUT)
    if rank == 0:
        time.sleep(PREPARATION_SECONDS)  # e.g. this node builds the data cache
    if wait:
        wait_for_every_rank(dims, "data", datetime.timedelta(seconds=120))
        total = torch.ones(1)
        dist.all_reduce(total)
        assert total.item() == world_size
    elif rank == 1:  # the control: without the wait, the first collective times out
        with pytest.raises(RuntimeError):
            dist.all_reduce(torch.ones(1))


def test_the_first_collective_waits_for_a_rank_that_prepares_the_data():
    run_ranks(2, _slow_preparation_worker, True)


def test_without_the_wait_the_first_collective_would_time_out():
    run_ranks(2, _slow_preparation_worker, False)
