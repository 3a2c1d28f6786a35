"""Router against hand-computed values."""

import math

import pytest
import torch

from models.config import MoEConfig
from models.moe.balance import balance_loss, routing_summary
from models.moe.router import TopKRouter


def make_router(weight, **overrides):
    cfg = MoEConfig(num_experts=len(weight), **overrides)
    router = TopKRouter(d_model=len(weight[0]), cfg=cfg)
    with torch.no_grad():
        router.gate_ED.copy_(torch.tensor(weight, dtype=torch.float32))
    return router


def micro_batch_aux(out, num_experts):
    """The Switch balance loss of one micro-batch (all tokens one sequence)."""
    selected_BE, prob_mean_BE = routing_summary(out.probs_TE[None], out.expert_ids_TK[None], num_experts)
    return balance_loss(selected_BE, prob_mean_BE, "micro_batch")


# Two tokens, three experts: token 0 has logits [2, 1, 0], token 1 has logits [0, 1, 3].
WEIGHT = [[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]]
X = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
LOGITS = [[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]]


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_softmax_top1_by_hand():
    out = make_router(WEIGHT, top_k=1).eval()(X)
    probs = [softmax(r) for r in LOGITS]
    assert out.expert_ids_TK.tolist() == [[0], [2]]
    # top-1 renormalised weight is exactly 1.
    torch.testing.assert_close(out.weights_TK, torch.ones(2, 1))
    # Switch loss: E * sum_e f_e P_e with f = [1/2, 0, 1/2].
    mean_p = [(probs[0][e] + probs[1][e]) / 2 for e in range(3)]
    expected_aux = 3 * (0.5 * mean_p[0] + 0.5 * mean_p[2])
    assert micro_batch_aux(out, 3).item() == pytest.approx(expected_aux, rel=1e-6)
    expected_z = sum(math.log(sum(math.exp(v) for v in r)) ** 2 for r in LOGITS) / 2
    assert out.z_loss.item() == pytest.approx(expected_z, rel=1e-6)
    expected_entropy = sum(-sum(p * math.log(p) for p in row) for row in probs) / 2
    assert out.entropy.item() == pytest.approx(expected_entropy, rel=1e-6)


def test_softmax_top2_weights_normalised_or_raw():
    probs = [softmax(r) for r in LOGITS]
    raw = make_router(WEIGHT, top_k=2, normalize_topk=False).eval()(X)
    assert raw.expert_ids_TK.tolist() == [[0, 1], [2, 1]]
    torch.testing.assert_close(raw.weights_TK, torch.tensor([[probs[0][0], probs[0][1]], [probs[1][2], probs[1][1]]]))
    normed = make_router(WEIGHT, top_k=2, normalize_topk=True).eval()(X)
    s0, s1 = probs[0][0] + probs[0][1], probs[1][2] + probs[1][1]
    torch.testing.assert_close(
        normed.weights_TK, torch.tensor([[probs[0][0] / s0, probs[0][1] / s0], [probs[1][2] / s1, probs[1][1] / s1]])
    )


def test_sigmoid_scores_by_hand():
    out = make_router(WEIGHT, top_k=2, score="sigmoid", normalize_topk=False).eval()(X)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    torch.testing.assert_close(out.weights_TK, torch.tensor([[sig(2.0), sig(1.0)], [sig(3.0), sig(1.0)]]))


def test_bias_changes_selection_not_weights():
    router = make_router(WEIGHT, top_k=1, normalize_topk=False).eval()
    router.expert_bias.copy_(torch.tensor([0.0, 10.0, 0.0]))
    out = router(X)
    assert out.expert_ids_TK.tolist() == [[1], [1]]
    probs = [softmax(r) for r in LOGITS]
    torch.testing.assert_close(out.weights_TK, torch.tensor([[probs[0][1]], [probs[1][1]]]))


def test_bias_update_moves_towards_balance():
    router = make_router(WEIGHT, top_k=1, bias_update_rate=0.1)
    router.update_bias(torch.tensor([10, 0, 2]))  # mean load 4: expert 0 over-, 1 and 2 under-loaded
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))
    off = make_router(WEIGHT, top_k=1, bias_update_rate=0.0)
    off.update_bias(torch.tensor([10, 0, 2]))
    assert off.expert_bias.abs().sum() == 0


def test_balanced_routing_gives_aux_loss_one():
    # Token i prefers expert i: each expert gets 1/4 of the assignments and, by symmetry, a mean
    # probability of 1/4, so E * sum(f * P) = 4 * 4 * (1/4 * 1/4) = 1.
    router = make_router((2 * torch.eye(4)).tolist(), top_k=1)
    out = router.eval()(torch.eye(4))
    assert out.expert_ids_TK.flatten().tolist() == [0, 1, 2, 3]
    assert micro_batch_aux(out, 4).item() == pytest.approx(1.0)


def test_router_logits_stay_fp32_under_autocast():
    router = make_router(WEIGHT, top_k=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(X.bfloat16())
    assert out.weights_TK.dtype == torch.float32


def test_jitter_only_in_training():
    router = make_router(WEIGHT, top_k=2, jitter=0.5, normalize_topk=False)
    torch.manual_seed(0)
    a = router.train()(X).weights_TK
    b = router.eval()(X).weights_TK
    c = router.eval()(X).weights_TK
    assert not torch.equal(a, b)
    assert torch.equal(b, c)


def test_a_rank_with_no_token_has_finite_router_losses():
    router = make_router(WEIGHT, top_k=2)
    out = router(torch.randn(0, 2, requires_grad=True))
    aux = {
        scope: balance_loss(
            *routing_summary(out.probs_TE.view(0, 1, 3), out.expert_ids_TK.view(0, 1, 2), 3),
            scope,
            torch.tensor([5, 3, 0]),
        )
        for scope in ("micro_batch", "sequence", "global_batch")
    }
    for value in (*aux.values(), out.z_loss, out.entropy):
        assert torch.isfinite(value) and value.item() == 0.0
    (sum(aux.values()) + out.z_loss).backward()  # and it can be backpropagated (an EP rank may get no token)
