"""Expert-utilisation and throughput figures, accumulated over a log window and reduced over ranks.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import torch

from models.moe.balance import RouterLosses
from models.moe.layer import MoEStats, tokens_per_expert_LE
from parallel.collectives import all_reduce_sum
from parallel.dims import ParallelDims


class MoEWindow:
    """Sums each MoE layer's stats over the micro-steps of one log window.

    The sums of device figures stay on `device` (no host copy per micro-step: each would
    synchronise a GPU); `summarize` reduces them over ranks and copies them to the host once."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str = "cpu"):
        self.tokens_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        # Per layer, summed over micro-steps: aux, z, entropy, dropped copies (device figures).
        self.sums_L4 = torch.zeros(num_layers, 4, dtype=torch.float64, device=device)
        # Per layer: bytes sent, all-to-all seconds (host figures, known without the device).
        self.host_sums_L2 = torch.zeros(num_layers, 2, dtype=torch.float64, device="cpu")
        self.num_micro_steps = 0

    def add(self, stats: list[MoEStats], losses: RouterLosses) -> None:
        self.num_micro_steps += 1
        if not stats:
            return
        self.tokens_LE += tokens_per_expert_LE(stats).to(self.tokens_LE)
        self.sums_L4 += torch.stack(
            [
                losses.aux_L.double(),
                losses.z_L.double(),
                torch.stack([s.router_entropy for s in stats]).double(),
                torch.stack([s.num_dropped for s in stats]).double(),
            ],
            dim=1,
        ).to(self.sums_L4)
        host_L2 = [[s.bytes_sent, s.all_to_all_seconds] for s in stats]
        self.host_sums_L2 += torch.tensor(host_L2, dtype=torch.float64, device="cpu")

    def add_records(self, records: list, num_micro_steps: int) -> None:
        """`add` for a pipeline stage (parallel/pipeline.py): the layers this rank holds, each record
        one layer's figures of one micro-batch, tagged with its MoE-layer index."""
        self.num_micro_steps += num_micro_steps
        for r in records:
            s = r.stats
            self.tokens_LE[r.moe_index] += s.tokens_per_expert.to(self.tokens_LE)
            self.sums_L4[r.moe_index] += torch.stack([r.aux, r.z, s.router_entropy, s.num_dropped]).to(self.sums_L4)
            self.host_sums_L2[r.moe_index] += torch.tensor([s.bytes_sent, s.all_to_all_seconds], dtype=torch.float64)

    def summarize(self, dims: ParallelDims, elapsed_seconds: float) -> dict:
        """Global figures (identical on every rank): counts summed over ranks, losses averaged."""
        on_device = torch.cat([self.tokens_LE, self.sums_L4, self.host_sums_L2.to(self.sums_L4.device)], dim=1)
        on_host = all_reduce_sum(on_device, dims).cpu()  # the window's one device->host copy
        tokens_LE, sums_L6 = on_host[:, :-6], on_host[:, -6:]
        means_L3 = sums_L6[:, :3] / max(self.num_micro_steps * dims.dp, 1)  # each layer runs on dp ranks
        # Forward all-to-all wall time per rank, as a share of the window (CPU/gloo only).
        out = {"perf/all_to_all_time_share": float(sums_L6[:, 5].sum() / dims.world_size / max(elapsed_seconds, 1e-9))}
        # Max/mean load per layer, and its spread over layers: a deep model's dashboard reads these
        # few keys whatever its depth; the per-layer keys below say which layer to look at.
        imbalance_L = tokens_LE.max(dim=1).values / tokens_LE.mean(dim=1).clamp_min(1e-12)
        if imbalance_L.numel():  # a model with MoE layers
            out["moe/imbalance_max_over_mean/p50"] = float(torch.quantile(imbalance_L, 0.5))  # linear interpolation
            out["moe/imbalance_max_over_mean/p90"] = float(torch.quantile(imbalance_L, 0.9))
            out["moe/imbalance_max_over_mean/max"] = float(imbalance_L.max())
            out["moe/imbalance_max_over_mean/worst_layer"] = int(imbalance_L.argmax())  # first of the ties
        for layer in range(tokens_LE.shape[0]):
            load_E = tokens_LE[layer]
            mean = load_E.mean().clamp_min(1e-12)
            prefix = f"moe/layer{layer}"
            out[f"{prefix}/tokens_per_expert"] = [int(v) for v in load_E.tolist()]
            out[f"{prefix}/imbalance_max_over_mean"] = float(imbalance_L[layer])
            out[f"{prefix}/load_cv"] = float(load_E.std(unbiased=False) / mean)
            out[f"{prefix}/dead_experts"] = int((load_E == 0).sum())
            out[f"{prefix}/aux_loss"] = float(means_L3[layer, 0])
            out[f"{prefix}/z_loss"] = float(means_L3[layer, 1])
            out[f"{prefix}/router_entropy"] = float(means_L3[layer, 2])
            out[f"{prefix}/dropped_tokens"] = int(sums_L6[layer, 3])
            out[f"{prefix}/all_to_all_bytes"] = int(sums_L6[layer, 4])
        return out

    def reset(self) -> None:
        self.tokens_LE.zero_()
        self.sums_L4.zero_()
        self.host_sums_L2.zero_()
        self.num_micro_steps = 0


def flops_per_token(active_params: int, embedding_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6·N_active (matmul weights, embedding lookup
    excluded) plus 12·L·D·S for attention scores and values."""
    return 6.0 * (active_params - embedding_params) + 12.0 * n_layers * d_model * seq_len
