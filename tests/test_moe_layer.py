"""The MoE layer against a per-token oracle, the dense FFN, and capacity arithmetic."""

import pytest
import torch

from models.config import MoEConfig
from models.ffn import FeedForward, activate
from models.moe import experts as experts_module
from models.moe.dispatch import expert_capacity
from models.moe.layer import MoELayer

D = 16


def make_layer(**overrides):
    torch.manual_seed(0)
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_ffn_hidden": 32, **overrides})
    layer = MoELayer(D, "swiglu", cfg)
    layer.reset_parameters(0.2, 2)
    return layer


def per_token_oracle(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Each token through each of its k experts, one at a time: obviously correct, slow. Under a
    capacity, each expert computes only its first `capacity` copies in (token, choice) order."""
    routing = layer.router(x_TD)
    ex = layer.experts
    T, K = routing.expert_ids_TK.shape
    cf = layer.dispatcher.capacity_factor
    capacity = T * K if cf is None else expert_capacity(T * K, layer.router.num_experts, cf)
    taken = [0] * layer.router.num_experts
    rows = []
    for t in range(T):
        acc = torch.zeros(D)
        for e, w in zip(routing.expert_ids_TK[t].tolist(), routing.weights_TK[t]):
            taken[e] += 1
            if taken[e] > capacity:
                continue  # dropped: the residual stream carries the token on
            h = activate(x_TD[t] @ ex.w1_EDF[e], x_TD[t] @ ex.w3_EDF[e])
            acc = acc + w * (h @ ex.w2_EFD[e])
        rows.append(acc)
    out = torch.stack(rows) if rows else x_TD.new_zeros(0, D)
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x_TD)
    return out


@pytest.mark.parametrize("top_k,num_shared", [(1, 0), (2, 0), (4, 1)])
def test_layer_equals_per_token_oracle(top_k, num_shared):
    layer = make_layer(top_k=top_k, num_shared_experts=num_shared).eval()
    x = torch.randn(2, 5, D)
    out, stats = layer(x)
    torch.testing.assert_close(out.view(-1, D), per_token_oracle(layer, x.view(-1, D)), rtol=1e-5, atol=1e-5)
    assert stats.tokens_per_expert.sum().item() == 10 * top_k
    assert stats.num_dropped.item() == 0


def test_one_expert_top1_equals_dense_ffn():
    layer = make_layer(num_experts=1, top_k=1).eval()
    dense = FeedForward(D, 32, "swiglu")
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w1_EDF[0].T)
        dense.w3.weight.copy_(layer.experts.w3_EDF[0].T)
        dense.w2.weight.copy_(layer.experts.w2_EFD[0].T)
    x = torch.randn(3, 7, D, requires_grad=True)
    out, _ = layer(x)
    torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-6)
    grad_moe = torch.autograd.grad(out.sum(), x)[0]
    grad_dense = torch.autograd.grad(dense(x).sum(), x)[0]
    torch.testing.assert_close(grad_moe, grad_dense, rtol=1e-5, atol=1e-6)


def test_dropless_skewed_routing_keeps_every_token():
    layer = make_layer(top_k=2).eval()
    layer.router.expert_bias.copy_(torch.tensor([100.0, 50.0, 0.0, 0.0]))  # every token picks experts 0 and 1
    x = torch.randn(64, D)
    out, stats = layer(x.unsqueeze(0))
    assert stats.tokens_per_expert.tolist() == [64, 64, 0, 0]
    assert stats.num_dropped.item() == 0
    torch.testing.assert_close(out.squeeze(0), per_token_oracle(layer, x), rtol=1e-5, atol=1e-5)


def test_capacity_drops_exactly_the_overflow():
    # T=8, k=1, E=4, factor 1 -> capacity ceil(8/4) = 2; all 8 tokens want expert 0 -> 6 dropped.
    layer = make_layer(top_k=1, capacity_factor=1.0).eval()
    layer.router.expert_bias.copy_(torch.tensor([100.0, 0.0, 0.0, 0.0]))
    x = torch.randn(8, D)
    out, stats = layer(x.unsqueeze(0))
    out = out.squeeze(0)
    assert stats.num_dropped.item() == 6
    assert stats.tokens_per_expert.tolist() == [8, 0, 0, 0]  # the load asked for, before drops
    # The first two tokens (priority by position) are computed exactly; the rest get zero.
    torch.testing.assert_close(out[:2], per_token_oracle(layer, x)[:2], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(out[2:]) == 0


def test_capacity_with_mixed_load_counts_per_expert():
    layer = make_layer(num_experts=2, top_k=1, capacity_factor=1.5).eval()
    # capacity = ceil(1.5 * 10 / 2) = 8; send 9 tokens to expert 1 and 1 token to expert 0.
    x = torch.randn(10, D)
    with torch.no_grad():
        layer.router.gate_ED.zero_()
        layer.router.gate_ED[0, 0] = 1.0
    x[:, 0] = -5.0
    x[3, 0] = 5.0
    _, stats = layer(x.unsqueeze(0))
    assert stats.tokens_per_expert.tolist() == [1, 9]
    assert stats.num_dropped.item() == 1


def test_layer_gradients_match_oracle():
    layer = make_layer(top_k=2, num_shared_experts=1)
    x = torch.randn(12, D, requires_grad=True)
    out, _ = layer(x.unsqueeze(0))
    params = [p for p in layer.parameters()]
    grads_fast = torch.autograd.grad(out.square().sum(), [x, *params])
    grads_oracle = torch.autograd.grad(per_token_oracle(layer, x).square().sum(), [x, *params])
    for a, b in zip(grads_fast, grads_oracle):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 40])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("kernel", ["grouped_mm", "loop"])
def test_any_number_of_tokens_equals_the_oracle(num_tokens, score, capacity_factor, kernel, monkeypatch):
    # Empty batches included (a caller with nothing to route must not crash), in both input shapes.
    if kernel == "loop":
        monkeypatch.setattr(experts_module, "grouped_mm_supported", lambda *args: False)
    layer = make_layer(top_k=2, score=score, capacity_factor=capacity_factor, num_shared_experts=1).eval()
    x_TD = torch.randn(num_tokens, D, requires_grad=True)
    for x in (x_TD.unsqueeze(0), x_TD):
        out, stats = layer(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out.reshape(-1, D), per_token_oracle(layer, x_TD), rtol=1e-5, atol=1e-5)
        assert stats.tokens_per_expert.sum().item() == 2 * num_tokens
        assert stats.selected_BE.shape == (1, 4) and stats.prob_mean_BE.shape == (1, 4)
        assert torch.isfinite(stats.z_loss) and torch.isfinite(stats.router_entropy)
        grad_x, grad_w1 = torch.autograd.grad(out.square().sum() + stats.z_loss, [x_TD, layer.experts.w1_EDF])
        assert grad_x.shape == x_TD.shape and torch.isfinite(grad_w1).all()
    batched, _ = layer(torch.randn(3, 0, D))  # sequences of no token
    assert batched.shape == (3, 0, D)
