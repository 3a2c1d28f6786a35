"""Grouped-GEMM expert backend against the per-expert loop oracle."""

import pytest
import torch

from models.moe.experts import GroupedExperts, grouped_mm_supported, run_experts_grouped, run_experts_loop


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts", [[5, 0, 3, 9], [0, 0, 17, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
def test_grouped_equals_loop_values_and_grads(activation, counts):
    torch.manual_seed(0)
    experts = GroupedExperts(4, d_model=16, ffn_hidden=32, activation=activation, backend="torch")
    experts.reset_parameters(0.1, 2, seed=0)
    counts_E = torch.tensor(counts)
    x = torch.randn(int(counts_E.sum()), 16)
    weights = [w for w in (experts.w1_EDF, experts.w2_EFD, experts.w3_EDF)]
    assert grouped_mm_supported(x, *(w for w in weights if w is not None))
    grad_out = torch.randn(x.shape[0], 16)

    def run(fn):
        xx = x.clone().requires_grad_()
        for w in weights:
            if w is not None:
                w.grad = None
        y = fn(xx, counts_E, *weights)
        (y * grad_out).sum().backward()
        return y.detach(), xx.grad, [w.grad.clone() if w is not None else None for w in weights]

    y_loop, gx_loop, gw_loop = run(run_experts_loop)
    y_grp, gx_grp, gw_grp = run(run_experts_grouped)
    torch.testing.assert_close(y_grp, y_loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_grp, gx_loop, rtol=1e-5, atol=1e-6)
    for a, b in zip(gw_grp, gw_loop):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unaligned_shapes_fall_back_to_loop():
    experts = GroupedExperts(2, d_model=6, ffn_hidden=10, activation="swiglu", backend="torch")
    experts.reset_parameters(0.1, 1, seed=0)
    x = torch.randn(5, 6)
    assert not grouped_mm_supported(x, experts.w1_EDF)
    out = experts(x, torch.tensor([2, 3]))
    torch.testing.assert_close(
        out, run_experts_loop(x, torch.tensor([2, 3]), experts.w1_EDF, experts.w2_EFD, experts.w3_EDF)
    )


def test_keep_experts_slices_the_shard():
    experts = GroupedExperts(8, d_model=16, ffn_hidden=16, activation="gelu", backend="torch")
    experts.reset_parameters(0.1, 1, seed=0)
    full = experts.w1_EDF.detach().clone()
    experts.keep_experts(4, 2)
    assert experts.num_experts == 2
    torch.testing.assert_close(experts.w1_EDF.detach(), full[4:6])


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="moe.backend must be one of"):
        GroupedExperts(2, 16, 16, "gelu", backend="cutlass")


def test_float64_never_takes_grouped_mm_and_still_matches_the_loop():
    # grouped_mm crashes on float64 even when every width is 16-byte aligned: the loop must run.
    experts = GroupedExperts(2, d_model=16, ffn_hidden=16, activation="swiglu", backend="torch").double()
    experts.reset_parameters(0.1, 1, seed=0)
    x = torch.randn(5, 16, dtype=torch.float64)
    assert not grouped_mm_supported(x, experts.w1_EDF, experts.w2_EFD, experts.w3_EDF)
    out = experts(x, torch.tensor([2, 3]))
    assert out.dtype == torch.float64
    torch.testing.assert_close(
        out, run_experts_loop(x, torch.tensor([2, 3]), experts.w1_EDF, experts.w2_EFD, experts.w3_EDF)
    )


def test_expert_gemms_run_in_the_autocast_dtype():
    experts = GroupedExperts(2, d_model=16, ffn_hidden=16, activation="swiglu", backend="torch")
    experts.reset_parameters(0.1, 1, seed=0)
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, torch.tensor([2, 3]))
    assert out.dtype == torch.bfloat16  # fp32 master weights, bf16 GEMMs
    want = run_experts_loop(
        x.bfloat16(), torch.tensor([2, 3]), *(w.bfloat16() for w in (experts.w1_EDF, experts.w2_EFD, experts.w3_EDF))
    )
    torch.testing.assert_close(out, want)
    out.float().sum().backward()
    assert experts.w1_EDF.grad.dtype == torch.float32 and x.grad is not None


def test_a_shard_built_on_meta_initialises_the_same_experts_as_the_whole_layer():
    whole = GroupedExperts(8, d_model=16, ffn_hidden=16, activation="swiglu", backend="torch")
    whole.reset_parameters(0.1, 2, seed=123)
    with torch.device("meta"):
        shard = GroupedExperts(8, d_model=16, ffn_hidden=16, activation="swiglu", backend="torch")
    shard.keep_experts(4, 2)  # expert-parallel rank 2 of 4, never allocating the others
    shard.to_empty(device="cpu")
    shard.reset_parameters(0.1, 2, seed=123)
    for name in ("w1_EDF", "w2_EFD", "w3_EDF"):
        torch.testing.assert_close(getattr(shard, name), getattr(whole, name)[4:6], rtol=0, atol=0)


def test_megablocks_backend_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    """moe.backend=megablocks: one line naming the setting and why. The settings (train.device=cpu,
    train.dtype=fp32: its kernels are CUDA bf16) in the pure validation; the machine (CUDA, the
    packages) in the pre-flight, here on this CUDA-less machine and with the packages faked present."""
    import models.moe.megablocks_experts as megablocks_experts
    from tests.jobs import TINY
    from train.cli import compose_job
    from train.preflight import check_megablocks_available

    def job(*overrides):
        return compose_job([*TINY, "moe.backend=megablocks", f"hydra.run.dir={tmp_path}", *overrides])

    with pytest.raises(ValueError, match=r"^moe.backend=megablocks runs on CUDA only; got train.device='cpu'"):
        job("train.device=cpu").validate()
    with pytest.raises(ValueError, match=r"^moe.backend=megablocks runs bf16 only .* got train.dtype='fp32'"):
        job("train.device=cuda", "train.dtype=fp32").validate()
    job("train.device=cuda", "train.dtype=bf16").validate()  # the settings alone are fine
    if not torch.cuda.is_available():
        with pytest.raises(
            ValueError,
            match=r"^moe.backend=megablocks needs CUDA and the megablocks package .*"
            r"this machine has no CUDA device: use moe.backend=torch$",
        ):
            check_megablocks_available()
    monkeypatch.setattr(megablocks_experts, "megablocks_unavailable_reason", lambda: None)
    check_megablocks_available()


def test_megablocks_kernels_take_cuda_bf16_only():
    from models.moe.megablocks_experts import run_experts_megablocks

    with pytest.raises(ValueError, match=r"moe.backend=megablocks runs CUDA bf16 tensors only .*'cpu torch.float32'"):
        run_experts_megablocks(torch.randn(3, 16), torch.tensor([1, 2]), torch.randn(2, 16, 8), torch.randn(2, 8, 16))
