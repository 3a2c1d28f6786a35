"""Expert parallelism over gloo, in 4 real processes, against the single-process MoE layer.

For ep in {1, 2, 4}: outputs, input gradients and every expert's weight gradients equal the
one-process layer on the same global batch, for E in {4, 8, 64}, k in {1, 2, 4}, with random
routing, all tokens on one expert, and experts that get no tokens; shared experts included.
"""

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from models.config import MoEConfig
from models.moe.layer import MoELayer
from parallel.dims import init_parallel
from parallel.dispatcher import peer_major_to_expert_major
from parallel.expert_parallel import shard_moe_layer
from tests.ranks import run_ranks

WORLD = 4
D = 16
TOKENS_PER_RANK = 24
TOL = dict(rtol=1e-5, atol=1e-5)


def set_routing(layer: MoELayer, mode: str) -> None:
    E = layer.router.num_experts
    bias = torch.zeros(E)
    if mode == "one_expert":
        bias[E - 1] = 1e4  # every token's first choice is the last expert (on the last EP rank)
    elif mode == "some_empty":
        bias[: E // 2] = -1e4  # the first half of the experts get nothing unless k > E/2
    layer.router.expert_bias.copy_(bias)


def expected_bytes_sent(router, x_global: torch.Tensor, dims, num_experts: int) -> int:
    """Computed independently from the routing of every rank's tokens: this rank sends its copies
    bound for experts on other EP ranks (dispatch), and returns the results of other ranks' copies
    that its own experts computed (combine). Dropless: nothing more, nothing less."""

    def owner_of(peer):
        return router(x_global[peer * TOKENS_PER_RANK : (peer + 1) * TOKENS_PER_RANK]).expert_ids_TK.flatten() // (
            num_experts // dims.ep
        )

    group_start = dims.rank - dims.ep_rank
    sent = int((owner_of(dims.rank) != dims.ep_rank).sum())
    returned = sum(int((owner_of(group_start + p) == dims.ep_rank).sum()) for p in range(dims.ep) if p != dims.ep_rank)
    return (sent + returned) * D * 4


class Checks:
    """Collects failures instead of raising at the first one: a rank that stopped early would
    leave the others waiting in the case's remaining collectives."""

    def __init__(self, case: str):
        self.case, self.failures = case, []

    def close(self, got, want, what: str) -> None:
        try:
            torch.testing.assert_close(got, want, **TOL)
        except AssertionError as err:
            self.failures.append(f"{what}: {err}")

    def true(self, condition: bool, what: str) -> None:
        if not condition:
            self.failures.append(what)

    def raise_if_failed(self) -> None:
        if self.failures:
            raise AssertionError(f"{self.case}: " + "; ".join(self.failures))


def _check_case(dims, ep, E, k, mode, shared, capacity_factor):
    rank = dims.rank
    checks = Checks(f"ep={ep} E={E} k={k} {mode} shared={shared} cf={capacity_factor}")
    torch.manual_seed(1000 * E + 10 * k + len(mode))  # identical weights and data on every rank
    cfg = MoEConfig(
        num_experts=E, top_k=k, expert_ffn_hidden=32, num_shared_experts=shared, capacity_factor=capacity_factor
    )
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
        out_ref = torch.cat(
            [
                ref(x_ref[r * TOKENS_PER_RANK : (r + 1) * TOKENS_PER_RANK].unsqueeze(0))[0].squeeze(0)
                for r in range(WORLD)
            ]
        )
    (out_ref * g_global).sum().backward()

    # Expert parallel: this rank's tokens, its expert shard.
    ep_layer = copy.deepcopy(layer)
    shard_moe_layer(ep_layer, dims)
    checks.true(ep_layer.experts.num_experts == E // ep, "local expert count")
    x_mine = x_global[mine].clone().requires_grad_()
    out, stats = ep_layer(x_mine.unsqueeze(0))
    out = out.squeeze(0)
    (out * g_global[mine]).sum().backward()

    checks.close(out, out_ref[mine], "output")
    checks.close(x_mine.grad, x_ref.grad[mine], "input grad")

    first = dims.ep_rank * (E // ep)
    for name in ("w1_EDF", "w2_EFD", "w3_EDF"):
        grad = getattr(ep_layer.experts, name).grad.clone()
        dist.all_reduce(grad, group=dims.edp_group)  # the other EP groups' tokens
        want = getattr(ref.experts, name).grad[first : first + E // ep]
        checks.close(grad, want, f"{name} grad")
    dense = [ep_layer.router.gate_ED] + (list(ep_layer.shared_experts.parameters()) if shared else [])
    dense_ref = [ref.router.gate_ED] + (list(ref.shared_experts.parameters()) if shared else [])
    for p, p_ref in zip(dense, dense_ref):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        checks.close(grad, p_ref.grad, "dense grad")

    if capacity_factor is None:
        checks.true(
            stats.bytes_sent == expected_bytes_sent(ref.router, x_global, dims, E), f"bytes sent {stats.bytes_sent}"
        )
        checks.true(stats.num_dropped.item() == 0, "dropped a copy")
        traffic = torch.tensor([stats.bytes_sent])
        dist.all_reduce(traffic)  # the world's total is every remote copy, there and back
        owners = ref.router(x_global).expert_ids_TK.view(WORLD, -1) // (E // ep)
        remote = sum(int((owners[r] != r % ep).sum()) for r in range(WORLD))
        checks.true(traffic.item() == 2 * remote * D * 4, f"world traffic {traffic.item()}")
    load = stats.tokens_per_expert.clone()
    dist.all_reduce(load)
    checks.true(load.sum().item() == WORLD * TOKENS_PER_RANK * k, "routed copies")
    checks.raise_if_failed()


DROPLESS_CASES = [
    (E, k, mode, shared, None)
    for (E, k, mode), shared in zip(
        itertools.product((4, 8, 64), (1, 2, 4), ("random", "one_expert", "some_empty")), itertools.cycle((0, 1))
    )
]
CAPACITY_CASES = [(8, 2, "random", 0, 1.0), (8, 1, "one_expert", 1, 1.25)]
CASES = {
    f"E{E}-k{k}-{mode}-shared{shared}-cf{cf}": (E, k, mode, shared, cf)
    for E, k, mode, shared, cf in DROPLESS_CASES + CAPACITY_CASES
}


def _ep_worker(rank, world_size, ep, out_dir):
    dims = init_parallel(ep, num_experts=64, device=torch.device("cpu"))
    assert dims.world_size == WORLD and dims.ep == ep
    failures = {}
    for name, case in CASES.items():
        try:
            _check_case(dims, ep, *case)
        except AssertionError as err:  # recorded per case; every rank still runs every case's collectives in step
            failures[name] = f"rank {rank}: {err}"
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(failures))


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda ep: f"ep{ep}")
def failures_by_case(request, tmp_path_factory):
    """All cases of one `ep` in one set of 4 processes (spawning per case would take minutes);
    each case is then reported by its own test below."""
    out_dir = tmp_path_factory.mktemp(f"ep{request.param}")
    run_ranks(WORLD, _ep_worker, request.param, str(out_dir))
    failures = {}
    for path in out_dir.glob("rank*.json"):
        for name, message in json.loads(path.read_text()).items():
            failures.setdefault(name, message)
    return failures


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_layer_equals_single_process(failures_by_case, case):
    assert case not in failures_by_case, failures_by_case.get(case)


def test_regroup_permutation_by_hand():
    # 2 peers, 2 local experts. Received rows: peer0 -> (e0: 2 rows, e1: 1 row), peer1 -> (e0: 1, e1: 3).
    # Rows 0..6 arrive as [p0e0 p0e0 p0e1 p1e0 p1e1 p1e1 p1e1]; expert-major order is
    # [p0e0 p0e0 p1e0 | p0e1 p1e1 p1e1 p1e1] = rows [0, 1, 3, 2, 4, 5, 6].
    perm = peer_major_to_expert_major(torch.tensor([[2, 1], [1, 3]]))
    assert perm.tolist() == [0, 1, 3, 2, 4, 5, 6]
    assert peer_major_to_expert_major(torch.zeros(2, 3, dtype=torch.int64)).tolist() == []


def _empty_rank_worker(rank, world_size, out_dir):
    """ep=2 on 2 ranks; rank 0 routes no token (forward and backward), rank 1 routes them all."""
    dims = init_parallel(2, num_experts=4, device=torch.device("cpu"))
    failures = []
    for score, capacity_factor in (("softmax", None), ("sigmoid", None), ("softmax", 1.0)):
        checks = Checks(f"score={score} cf={capacity_factor}")
        torch.manual_seed(7)
        cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden=32, score=score, capacity_factor=capacity_factor)
        layer = MoELayer(D, "swiglu", cfg)
        layer.reset_parameters(0.3, 2)
        x_all = torch.randn(6, D)
        ref = copy.deepcopy(layer)
        out_ref, _ = ref(x_all.unsqueeze(0))
        out_ref.square().sum().backward()

        shard_moe_layer(layer, dims)
        x_mine = (x_all if rank == 1 else x_all[:0]).clone().requires_grad_()
        out, stats = layer(x_mine.unsqueeze(0))
        out.square().sum().backward()
        checks.true(out.shape == (1, x_mine.shape[0], D), f"output shape {tuple(out.shape)}")
        if rank == 1:
            checks.close(out.squeeze(0), out_ref.squeeze(0), "output")
        checks.true(stats.tokens_per_expert.sum().item() == 2 * x_mine.shape[0], "routed copies")
        first = dims.ep_rank * 2
        for name in ("w1_EDF", "w2_EFD", "w3_EDF"):
            want = getattr(ref.experts, name).grad[first : first + 2]
            checks.close(getattr(layer.experts, name).grad, want, f"{name} grad")
        try:
            checks.raise_if_failed()
        except AssertionError as err:
            failures.append(f"rank {rank}: {err}")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(failures))


def test_a_rank_with_no_tokens_neither_hangs_nor_crashes(tmp_path):
    run_ranks(2, _empty_rank_worker, str(tmp_path))
    failures = [f for path in tmp_path.glob("rank*.json") for f in json.loads(path.read_text())]
    assert len(list(tmp_path.glob("rank*.json"))) == 2 and not failures, failures
