"""Routed experts as stacked weights, and the compute backends that run them.

Shape legend: N routed token copies (sorted by expert), D hidden, F expert width,
E experts held by this module (all of them, or the local shard under expert parallelism).

The input is grouped by expert: rows [0, counts[0]) belong to expert 0, the next counts[1] rows
to expert 1, and so on. Groups may be empty; nothing is padded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import EXPERT_BACKENDS
from models.ffn import activate
from models.moe.megablocks_experts import run_experts_megablocks


def run_experts_loop(x_ND, counts_E, w1_EDF, w2_EFD, w3_EDF=None) -> torch.Tensor:
    """The oracle: one plain matmul chain per expert, in a Python loop."""
    outputs = []
    for e, x_expert in enumerate(torch.split(x_ND, counts_E.tolist())):
        gate = x_expert @ w3_EDF[e] if w3_EDF is not None else None
        outputs.append(activate(x_expert @ w1_EDF[e], gate) @ w2_EFD[e])
    if not outputs:
        return x_ND.new_zeros(0, w2_EFD.shape[-1])
    return torch.cat(outputs)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects non-contiguous incoming gradients (e.g. from index_add).
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(x_ND: torch.Tensor, *weights: torch.Tensor) -> bool:
    """grouped_mm takes fp32/bf16/fp16 only (float64 crashes), with every row stride a multiple
    of 16 bytes."""
    if not hasattr(F, "grouped_mm"):
        return False
    if any(t.dtype not in GROUPED_MM_DTYPES or t.dtype != x_ND.dtype for t in weights):
        return False
    sizes = [x_ND.shape[-1]] + [w.shape[-1] for w in weights]
    return all(s * x_ND.element_size() % 16 == 0 for s in sizes)


def compute_dtype(x_ND: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's when it is on (grouped_mm is not on autocast's
    list, so it would otherwise run in the fp32 of the master weights), else the weights'."""
    if torch.is_autocast_enabled(x_ND.device.type):
        return torch.get_autocast_dtype(x_ND.device.type)
    return weight.dtype


def run_experts_grouped(x_ND, counts_E, w1_EDF, w2_EFD, w3_EDF=None) -> torch.Tensor:
    """One grouped GEMM per weight over the variable-size expert groups (inputs share one dtype)."""
    offsets_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)  # on the device: no host sync
    h_NF = _contiguous_grad(F.grouped_mm(x_ND, w1_EDF, offs=offsets_E))
    gate_NF = _contiguous_grad(F.grouped_mm(x_ND, w3_EDF, offs=offsets_E)) if w3_EDF is not None else None
    return _contiguous_grad(F.grouped_mm(activate(h_NF, gate_NF).contiguous(), w2_EFD, offs=offsets_E))


class GroupedExperts(nn.Module):
    """`num_experts` SwiGLU/GELU feed-forward experts stored as [E, ...] stacked weights."""

    def __init__(self, num_experts: int, d_model: int, ffn_hidden: int, activation: str, backend: str):
        super().__init__()
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"moe.backend must be one of {', '.join(map(repr, EXPERT_BACKENDS))}; got {backend!r}")
        self.num_experts = num_experts
        self.first_expert = 0  # global index of expert 0 of this module (its expert-parallel shard)
        self.init_recipe: tuple[float, int, int] | None = None  # (init_std, num_layers, seed) of reset_parameters
        self.backend = backend
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, d_model, ffn_hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, ffn_hidden, d_model))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, d_model, ffn_hidden)) if activation == "swiglu" else None

    @torch.no_grad()
    def reset_parameters(self, init_std: float, num_layers: int, seed: int) -> None:
        """Expert e (global index) is drawn from its own generator seeded with `seed + e`, so any
        expert-parallel shard initialises exactly the experts that one process would, without
        materialising the others. On the meta device only the recipe is kept: a sharded set-up
        (parallel/parallelize.py) later writes each shard from `initial_weights`."""
        self.init_recipe = (init_std, num_layers, seed)
        for local in range(self.num_experts):
            if self.w1_EDF.is_meta:
                break
            for name, values in self.initial_weights(local).items():
                getattr(self, name)[local].copy_(values)

    def initial_weights(self, local: int) -> dict[str, torch.Tensor]:
        """The initial weights of local expert `local` (name -> [D, F] or [F, D], on the CPU), from the
        recipe of the last `reset_parameters`."""
        init_std, num_layers, seed = self.init_recipe
        # Residual-branch output projections shrink with depth (GPT-2).
        stds = {"w1_EDF": init_std, "w3_EDF": init_std, "w2_EFD": init_std / math.sqrt(2 * num_layers)}
        generator = torch.Generator().manual_seed(seed + self.first_expert + local)
        values = {}
        for name, std in stds.items():
            weight = getattr(self, name)
            if weight is not None:
                values[name] = torch.empty(weight.shape[1:], dtype=weight.dtype, device="cpu")
                values[name].normal_(0.0, std, generator=generator)
        return values

    def keep_experts(self, first: int, count: int) -> None:
        """Drop every expert but [first, first + count): the expert-parallel shard of this rank.
        Works on the meta device too, so a shard never needs the whole layer in memory."""
        for name in ("w1_EDF", "w2_EFD", "w3_EDF"):
            weight = getattr(self, name)
            if weight is not None:
                setattr(self, name, nn.Parameter(weight.detach()[first : first + count].clone()))
        self.first_expert += first
        self.num_experts = count

    def forward(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, host_counts_E: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`counts_E`: rows per expert (on x's device); `host_counts_E`: the same on the host, where the
        dispatcher copied them (kernels that read sizes on the host use it instead of copying again)."""
        assert counts_E.numel() == self.num_experts, (counts_E.numel(), self.num_experts)
        weights = (self.w1_EDF, self.w2_EFD, self.w3_EDF)
        dtype = compute_dtype(x_ND, self.w1_EDF)
        x_ND = x_ND.to(dtype)
        weights = tuple(w.to(dtype) if w is not None else None for w in weights)  # differentiable casts
        if self.backend == "megablocks":  # MegaBlocks' grouped kernels: CUDA, bf16 (imported lazily)
            return run_experts_megablocks(x_ND, counts_E, *weights, host_counts_E=host_counts_E)
        if grouped_mm_supported(x_ND, *(w for w in weights if w is not None)):
            return run_experts_grouped(x_ND, counts_E, *weights)
        return run_experts_loop(x_ND, counts_E, *weights)
