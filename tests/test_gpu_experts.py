"""The expert kernels on CUDA in bf16 against the per-expert loop oracle run in fp64: torch's
grouped_mm (moe.backend=torch) and MegaBlocks' grouped GEMM (moe.backend=megablocks).

Marked `gpu` (deselected by default): `pytest -m gpu tests/test_gpu_experts.py` on a CUDA machine;
benchmarks/gpu/run_all.sh runs the grouped_mm half in its first stage and the MegaBlocks half once
it has built MegaBlocks. Counts include empty experts and a rank that received no token at all.
"""

import copy

import pytest
import torch

from models.config import MoEConfig
from models.moe.experts import GroupedExperts, grouped_mm_supported, run_experts_grouped, run_experts_loop
from models.moe.layer import MoELayer
from models.moe.megablocks_experts import megablocks_unavailable_reason, run_experts_megablocks

pytestmark = pytest.mark.gpu

COUNTS = [[37, 0, 5, 64, 0, 1, 21, 0], [0, 0, 0, 130, 0, 0, 0, 0], [0] * 8, [16] * 8]  # [0]*8: a rank given no token
BF16_REL = 1e-2  # bf16 operands with fp32 accumulation land between 1e-3 and 1e-2 of an fp64 reference


def need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def need_megablocks():
    need_cuda()
    reason = megablocks_unavailable_reason()
    if reason is not None:  # on a CUDA machine this suite is meant to check MegaBlocks: say what is missing
        pytest.fail(f"moe.backend=megablocks cannot run: {reason}")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def fwd_bwd(fn, x_ND, counts_E, weights, grad_ND):
    x = x_ND.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() if w is not None else None for w in weights]
    y = fn(x, counts_E, *ws)
    (y * grad_ND.to(y.dtype)).sum().backward()
    zeros = [torch.zeros_like(w) if w is not None else None for w in ws]  # an oracle with no rows has no grads
    grads = [w.grad if w is not None and w.grad is not None else z for w, z in zip(ws, zeros)]
    return y.detach(), x.grad if x.grad is not None else torch.zeros_like(x), grads


def compare_with_oracle(fn, activation: str, counts: list[int], D: int = 256, F: int = 512):
    torch.manual_seed(sum(counts) + len(activation))
    experts = GroupedExperts(len(counts), d_model=D, ffn_hidden=F, activation=activation, backend="torch")
    experts.reset_parameters(0.05, 2, seed=1)
    weights = [w.detach().cuda() if w is not None else None for w in (experts.w1_EDF, experts.w2_EFD, experts.w3_EDF)]
    counts_E = torch.tensor(counts, device="cuda")
    x_ND = torch.randn(sum(counts), D, device="cuda")
    grad_ND = torch.randn(sum(counts), D, device="cuda")

    bf16 = [w.bfloat16() if w is not None else None for w in weights]
    y, gx, gw = fwd_bwd(fn, x_ND.bfloat16(), counts_E, bf16, grad_ND)
    f64 = [w.bfloat16().double() if w is not None else None for w in weights]  # the same bf16 values, in fp64
    y_ref, gx_ref, gw_ref = fwd_bwd(run_experts_loop, x_ND.bfloat16().double(), counts_E, f64, grad_ND.double())
    assert y.dtype == torch.bfloat16 and y.shape == y_ref.shape
    if sum(counts) == 0:
        assert y.numel() == 0 and gx.numel() == 0
    else:
        assert rel_err(y, y_ref) < BF16_REL
        assert rel_err(gx, gx_ref) < BF16_REL
    for g, g_ref in zip(gw, gw_ref):
        if g is None:
            continue
        assert g.shape == g_ref.shape and torch.isfinite(g).all()
        for e, n in enumerate(counts):
            if n == 0:  # an expert that received nothing has an exactly zero gradient
                assert not g[e].any(), f"expert {e} got no rows but a nonzero gradient"
            else:
                assert rel_err(g[e], g_ref[e]) < BF16_REL


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_mm_bf16_matches_loop_on_cuda(activation, counts):
    need_cuda()
    bf16 = torch.bfloat16
    assert grouped_mm_supported(torch.empty(1, 256, dtype=bf16), torch.empty(1, 256, 512, dtype=bf16))
    compare_with_oracle(run_experts_grouped, activation, counts)


def test_grouped_mm_path_in_fp32_on_cuda_matches_loop():
    """train.dtype=fp32 on a GPU: GroupedExperts lets fp32 through to grouped_mm (torch 2.11 documents
    bf16 only), so the fp32 path must run and agree with the loop (tf32 may be on: 1e-3)."""
    need_cuda()
    torch.manual_seed(0)
    experts = GroupedExperts(8, d_model=256, ffn_hidden=512, activation="swiglu", backend="torch").cuda()
    experts.reset_parameters(0.05, 2, seed=1)
    counts_E = torch.tensor(COUNTS[0], device="cuda")
    x = torch.randn(int(counts_E.sum()), 256, device="cuda")
    y = experts(x, counts_E)
    weights = [w.detach().double() for w in (experts.w1_EDF, experts.w2_EFD, experts.w3_EDF)]
    assert rel_err(y.detach(), run_experts_loop(x.double(), counts_E, *weights)) < 1e-3


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", COUNTS)
def test_megablocks_matches_loop(activation, counts):
    need_megablocks()
    compare_with_oracle(run_experts_megablocks, activation, counts)


def test_megablocks_refuses_fp32():
    need_megablocks()
    x = torch.randn(4, 256, device="cuda")
    w1, w2 = torch.randn(2, 256, 512, device="cuda"), torch.randn(2, 512, 256, device="cuda")
    with pytest.raises(ValueError, match="moe.backend=megablocks runs CUDA bf16 tensors only"):
        run_experts_megablocks(x, torch.tensor([1, 3]), w1, w2)


@pytest.mark.parametrize("top_k", [1, 2])
def test_megablocks_layer_matches_torch_backend_under_autocast(top_k):
    """The whole MoE layer (our router, LocalDispatcher, combine) with either backend, fp32 master
    weights under bf16 autocast as the job runs it: same outputs and gradients within bf16 rounding."""
    need_megablocks()
    torch.manual_seed(top_k)
    cfg = MoEConfig(num_experts=8, top_k=top_k, expert_ffn_hidden=512, backend="torch")
    torch_layer = MoELayer(256, "swiglu", cfg).cuda()
    torch_layer.reset_parameters(0.05, num_layers=2)
    mb_layer = copy.deepcopy(torch_layer)
    mb_layer.experts.backend = "megablocks"
    x = torch.randn(2, 128, 256, device="cuda")
    grad = torch.randn(2, 128, 256, device="cuda")
    results = []
    for layer in (torch_layer, mb_layer):
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = layer(xx)
        (out.float() * grad).sum().backward()
        results.append((out.float(), xx.grad, layer.experts.w1_EDF.grad, layer.experts.w2_EFD.grad))
    for a, b in zip(*results):
        assert rel_err(a, b.double()) < BF16_REL
