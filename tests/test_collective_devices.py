"""Every collective the loop issues outside DeepSpeed/FSDP carries tensors on the compute device.

On CUDA an NCCL group rejects CPU tensors; the old loop all-reduced host tensors (`any_rank`, the
metrics window, expert clipping). This test would have caught it on a CPU machine: tensors created
without naming a device land on the `meta` device here (torch.set_default_device), and every
collective is recorded and must hold tensors on `dims.device`. The process group itself is
`cpu:gloo,cuda:nccl` on CUDA, so even a host tensor could not fail there.
"""

import torch
import torch.distributed as dist

from models.moe.balance import RouterLosses
from models.moe.layer import MoEStats
from parallel.collectives import all_reduce_sum, any_rank, average_replicated_expert_gradients
from parallel.dims import init_parallel, process_group_backend
from parallel.grad_norm import global_grad_norm
from tests.ranks import run_ranks
from train.metrics import MoEWindow

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_to_all_single")


class _NoDense:
    partitioned = False

    def named_parameters(self):
        return []


def _worker(rank, world_size):
    dims = init_parallel(ep=1, num_experts=2, device=torch.device("cpu"))
    seen = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def recorder(name):
        def call(tensor, *args, **kwargs):
            seen.append((name, tensor.device))
            return originals[name](tensor, *args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, recorder(name))
    torch.set_default_device("meta")  # a tensor that does not name its device is caught below
    try:
        assert any_rank(rank == 1, dims) is True
        assert all_reduce_sum(torch.ones(3, device="cpu"), dims).tolist() == [2.0, 2.0, 2.0]
        window = MoEWindow(num_layers=1, num_experts=2)
        stats = MoEStats(
            torch.tensor([3, 1], device="cpu"),
            torch.tensor([[3, 1]], device="cpu"),
            torch.full((1, 2), 0.5, device="cpu"),
            torch.tensor(0.5, device="cpu"),
            torch.tensor(0.7, device="cpu"),
            torch.tensor(0, device="cpu"),
            10,
            0.0,
        )
        window.add(
            [stats],
            RouterLosses(torch.tensor(1.0, device="cpu"), torch.ones(1, device="cpu"), torch.ones(1, device="cpu")),
        )
        assert window.summarize(dims, elapsed_seconds=1.0)["moe/layer0/tokens_per_expert"] == [6, 2]
        experts = [torch.nn.Parameter(torch.ones(2, 3, device="cpu"))]
        experts[0].grad = torch.full((2, 3), float(rank + 1), device="cpu")
        average_replicated_expert_gradients(experts, dims)
        assert experts[0].grad.tolist() == [[1.5] * 3] * 2  # (1 + 2) / world size 2
        assert abs(global_grad_norm(_NoDense(), [experts[0].grad], False, dims) - 1.5 * 6**0.5) < 1e-9
    finally:
        torch.set_default_device(None)
        for name, fn in originals.items():
            setattr(dist, name, fn)
    assert len(seen) >= 5
    assert all(device == dims.device for _, device in seen), seen


def test_collectives_use_the_compute_device():
    run_ranks(2, _worker)


def test_cuda_groups_accept_host_and_device_tensors():
    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"
