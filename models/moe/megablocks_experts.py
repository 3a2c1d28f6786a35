"""`moe.backend=megablocks`: MegaBlocks' grouped-GEMM expert MLP, fed by Switchyard's router and dispatchers.

Shape legend: N routed token copies (sorted by expert), D hidden, F expert width, E experts held here.

MegaBlocks' dMoE (0.10, `mlp_impl='grouped'`) permutes the tokens by expert, counts them, and runs
its `GroupedMLP` / `GroupedGLU`: one `grouped_gemm.ops.gmm(x, w, batch_sizes)` per weight over
variable-size groups (dropless, nothing padded), batch sizes as an int64 host tensor. Our
dispatchers already hand the experts that input (copies sorted by expert, with counts per local
expert), so this backend calls the same kernels through MegaBlocks' `grouped_gemm_util`, with
Switchyard's router, dispatch/combine and weight layout: [E, D, F] and [E, F, D] are exactly the
`b` operands gmm multiplies without a transpose. gmm reads the group sizes on the host: the
dispatchers hand over the host copy they made anyway (the all-to-all's split sizes; with capacity,
the kept counts), so this backend adds no device->host copy to the layer; only on one rank without
capacity, where nothing else needs the counts on the host, does it make the layer's one copy. The
kernels are CUDA and bf16 only; megablocks is imported here lazily, so nothing else needs it
installed. The per-expert loop in experts.py is the oracle (tests/test_gpu_experts.py, marked `gpu`);
tests/test_sync_budget.py counts the copies on CPU with a stand-in for gmm.
"""

from __future__ import annotations

import importlib.util

import torch

from models.ffn import activate

MEGABLOCKS_DTYPE = torch.bfloat16  # grouped_gemm's kernels take bf16 operands only


def megablocks_unavailable_reason() -> str | None:
    """Why `moe.backend=megablocks` cannot run on this machine, or None when it can."""
    if not torch.cuda.is_available():
        return "this machine has no CUDA device"
    missing = [name for name in ("megablocks", "grouped_gemm") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} is not installed (make setup-gpu)"
    return None


def require_cuda_bf16(tensors: list[torch.Tensor]) -> None:
    if any(t.dtype != MEGABLOCKS_DTYPE or not t.is_cuda for t in tensors):
        raise ValueError(
            f"moe.backend=megablocks runs CUDA bf16 tensors only (train.dtype=bf16); got "
            f"{sorted({f'{t.device.type} {t.dtype}' for t in tensors})}"
        )


def run_experts_megablocks(x_ND, counts_E, w1_EDF, w2_EFD, w3_EDF=None, host_counts_E=None) -> torch.Tensor:
    """The expert MLP as MegaBlocks computes it: gmm(x, w1) -> activation (x gmm(x, w3)) -> gmm(., w2).
    Inputs: CUDA bf16, rows grouped by expert with `counts_E` rows each (any device); `host_counts_E`:
    the same counts already on the host (a dispatcher's copy), else they are copied here."""
    require_cuda_bf16([t for t in (x_ND, w1_EDF, w2_EFD, w3_EDF) if t is not None])
    from megablocks import grouped_gemm_util as gg  # lazy: a CUDA-only package

    gg.assert_grouped_gemm_is_available()
    if host_counts_E is None:
        host_counts_E = counts_E.to(device="cpu")  # a device->host copy: gmm reads the group sizes on the host
    batch_sizes_E = host_counts_E.to(torch.int64)
    x_ND = x_ND.contiguous()  # gmm takes contiguous operands only
    h_NF = gg.ops.gmm(x_ND, w1_EDF.contiguous(), batch_sizes_E)
    gate_NF = gg.ops.gmm(x_ND, w3_EDF.contiguous(), batch_sizes_E) if w3_EDF is not None else None
    return gg.ops.gmm(activate(h_NF, gate_NF).contiguous(), w2_EFD.contiguous(), batch_sizes_E)
