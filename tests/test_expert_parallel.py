"""Expert parallelism over gloo, in 4 real processes, against the single-process MoE layer.

For ep in {1, 2, 4}: outputs, input gradients and every expert's weight gradients equal the
one-process layer on the same global batch, for E in {4, 8, 64}, k in {1, 2, 4}, with random
routing, all tokens on one expert, and experts that get no tokens; shared experts included.
"""

import copy
import itertools

import pytest
import torch
import torch.distributed as dist

from models.config import MoEConfig
from models.moe.layer import MoELayer
from parallel.dims import init_parallel
from parallel.dispatcher import peer_major_to_expert_major
from parallel.expert_parallel import apply_expert_parallel
from tests.ranks import run_ranks

WORLD = 4
D = 16
TOKENS_PER_RANK = 24
TOL = dict(rtol=1e-5, atol=1e-5)


class OneLayerModel(torch.nn.Module):
    """The smallest thing apply_expert_parallel accepts: a module with moe_layers()."""

    def __init__(self, layer: MoELayer):
        super().__init__()
        self.layer = layer

    def moe_layers(self):
        return [self.layer]


def set_routing(layer: MoELayer, mode: str) -> None:
    E = layer.router.num_experts
    bias = torch.zeros(E)
    if mode == "one_expert":
        bias[E - 1] = 1e4  # every token's first choice is the last expert (on the last EP rank)
    elif mode == "some_empty":
        bias[: E // 2] = -1e4  # the first half of the experts get nothing unless k > E/2
    layer.router.expert_bias.copy_(bias)


def expected_bytes(expert_ids_TK: torch.Tensor, num_experts: int, ep: int, ep_rank: int) -> int:
    """Dropless minimum, computed independently: copies bound for experts on other EP ranks."""
    owner = expert_ids_TK.flatten() // (num_experts // ep)
    return 2 * int((owner != ep_rank).sum()) * D * 4


def _check_case(dims, ep, E, k, mode, shared, capacity_factor):
    rank = dims.rank
    torch.manual_seed(1000 * E + 10 * k + len(mode))  # identical weights and data on every rank
    cfg = MoEConfig(num_experts=E, top_k=k, expert_ffn_hidden=32, num_shared_experts=shared, capacity_factor=capacity_factor)
    layer = MoELayer(D, "swiglu", cfg)
    layer.reset_parameters(0.3, 2)
    set_routing(layer, mode)
    x_global = torch.randn(WORLD * TOKENS_PER_RANK, D)
    g_global = torch.randn(WORLD * TOKENS_PER_RANK, D)
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)

    # Reference: one process, whole batch (with capacity: per-rank batches, since capacity is per rank).
    ref = copy.deepcopy(layer)
    x_ref = x_global.clone().requires_grad_()
    if capacity_factor is None:
        out_ref, _ = ref(x_ref.unsqueeze(0))
        out_ref = out_ref.squeeze(0)
    else:
        out_ref = torch.cat([ref(x_ref[r * TOKENS_PER_RANK : (r + 1) * TOKENS_PER_RANK].unsqueeze(0))[0].squeeze(0) for r in range(WORLD)])
    (out_ref * g_global).sum().backward()

    # Expert parallel: this rank's tokens, its expert shard.
    model = OneLayerModel(copy.deepcopy(layer))
    apply_expert_parallel(model, dims)
    ep_layer = model.layer
    assert ep_layer.experts.num_experts == E // ep
    x_mine = x_global[mine].clone().requires_grad_()
    out, stats = ep_layer(x_mine.unsqueeze(0))
    out = out.squeeze(0)
    (out * g_global[mine]).sum().backward()

    case = f"ep={ep} E={E} k={k} {mode} shared={shared} cf={capacity_factor}"
    torch.testing.assert_close(out, out_ref[mine], **TOL, msg=lambda m: f"{case}: output\n{m}")
    torch.testing.assert_close(x_mine.grad, x_ref.grad[mine], **TOL, msg=lambda m: f"{case}: input grad\n{m}")

    first = dims.ep_rank * (E // ep)
    for name in ("w1_EDF", "w2_EFD", "w3_EDF"):
        grad = getattr(ep_layer.experts, name).grad.clone()
        dist.all_reduce(grad, group=dims.edp_group)  # the other EP groups' tokens
        want = getattr(ref.experts, name).grad[first : first + E // ep]
        torch.testing.assert_close(grad, want, **TOL, msg=lambda m: f"{case}: {name} grad\n{m}")
    dense = [ep_layer.router.gate_ED] + (list(ep_layer.shared_experts.parameters()) if shared else [])
    dense_ref = [ref.router.gate_ED] + (list(ref.shared_experts.parameters()) if shared else [])
    for p, p_ref in zip(dense, dense_ref):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, p_ref.grad, **TOL, msg=lambda m: f"{case}: dense grad\n{m}")

    routing = ref.router(x_global[mine])
    if capacity_factor is None:
        assert stats.bytes_sent == expected_bytes(routing.expert_ids_TK, E, ep, dims.ep_rank), case
        assert stats.num_dropped.item() == 0
    load = stats.tokens_per_expert.clone()
    dist.all_reduce(load)
    assert load.sum().item() == WORLD * TOKENS_PER_RANK * k, case


def _ep_worker(rank, world_size, ep, cases):
    dims = init_parallel(ep, num_experts=64, device=torch.device("cpu"))
    assert dims.world_size == WORLD and dims.ep == ep
    for case in cases:
        _check_case(dims, ep, *case)


DROPLESS_CASES = [
    (E, k, mode, shared, None)
    for (E, k, mode), shared in zip(
        itertools.product((4, 8, 64), (1, 2, 4), ("random", "one_expert", "some_empty")), itertools.cycle((0, 1))
    )
]
CAPACITY_CASES = [(8, 2, "random", 0, 1.0), (8, 1, "one_expert", 1, 1.25)]


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_expert_parallel_layer_equals_single_process(ep):
    run_ranks(WORLD, _ep_worker, ep, DROPLESS_CASES + CAPACITY_CASES)


def test_regroup_permutation_by_hand():
    # 2 peers, 2 local experts. Received rows: peer0 -> (e0: 2 rows, e1: 1 row), peer1 -> (e0: 1, e1: 3).
    # Rows 0..6 arrive as [p0e0 p0e0 p0e1 p1e0 p1e1 p1e1 p1e1]; expert-major order is
    # [p0e0 p0e0 p1e0 | p0e1 p1e1 p1e1 p1e1] = rows [0, 1, 3, 2, 4, 5, 6].
    perm = peer_major_to_expert_major(torch.tensor([[2, 1], [1, 3]]))
    assert perm.tolist() == [0, 1, 3, 2, 4, 5, 6]
    assert peer_major_to_expert_major(torch.zeros(2, 3, dtype=torch.int64)).tolist() == []
