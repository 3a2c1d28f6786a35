"""A run's figures from its metrics.jsonl records: loss curves, load imbalance per MoE layer, and
each layer's expert-load heatmap over time (`write_report`, for `python -m train.report`), and the
expert-load figure the W&B logger sends at each log step.

Shape legend: L MoE layers, E experts, S logged steps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LOAD_KEY = re.compile(r"moe/layer(\d+)/tokens_per_expert")


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"RUN_DIR must hold a metrics.jsonl; none in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = {r["step"]: r[key] for r in records if key in r}  # a resumed run's later record wins
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def load_shares(records: list[dict]) -> tuple[list[int], np.ndarray]:
    """Steps and the [L, E, S] share of each layer's routed copies that went to each expert."""
    rows = {r["step"]: r for r in records if any(LOAD_KEY.fullmatch(k) for k in r)}
    steps = sorted(rows)
    if not steps:
        return [], np.zeros((0, 0, 0))
    layers = sorted(int(m.group(1)) for k in rows[steps[0]] if (m := LOAD_KEY.fullmatch(k)))
    load_LES = np.array(
        [[rows[s][f"moe/layer{layer}/tokens_per_expert"] for s in steps] for layer in layers], dtype=float
    ).transpose(0, 2, 1)
    return steps, load_LES / np.maximum(load_LES.sum(axis=1, keepdims=True), 1)


def expert_load_figure(share_LE: np.ndarray, title: str = "share of routed tokens"):
    """One step's layers × experts load as a heatmap (also what W&B shows, step by step)."""
    fig, ax = plt.subplots(figsize=(max(4, share_LE.shape[1] * 0.4), max(2, share_LE.shape[0] * 0.5)))
    image = ax.imshow(share_LE, aspect="auto", cmap="viridis", vmin=0)
    ax.set(xlabel="expert", ylabel="MoE layer", title=title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def plot_losses(records: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("train/loss", "val/loss"):
        steps, values = series(records, key)
        ax.plot(steps, values, label=key, marker="o" if key == "val/loss" else None)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    ax.legend()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_imbalance(records: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({k for r in records for k in r if k.endswith("/imbalance_max_over_mean")})
    for key in keys:
        ax.plot(*series(records, key), label=key.split("/")[1])
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set(xlabel="step", ylabel="max / mean tokens per expert", title="load imbalance")
    ax.legend()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_expert_heatmaps(records: list[dict], out: Path) -> None:
    steps, share_LES = load_shares(records)
    num_layers = max(share_LES.shape[0], 1)
    fig, axes = plt.subplots(num_layers, 1, figsize=(8, 2.2 * num_layers), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        if share_LES.size:
            image = ax.imshow(
                share_LES[layer],
                aspect="auto",
                cmap="viridis",
                vmin=0,
                extent=(steps[0], steps[-1], share_LES.shape[1] - 0.5, -0.5),
            )
            fig.colorbar(image, ax=ax)
        ax.set(ylabel=f"layer {layer}\nexpert")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("share of routed tokens per expert over time")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path) -> list[Path]:
    records = read_records(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    outputs = [plots / "loss.png", plots / "imbalance.png", plots / "expert_heatmap.png"]
    for plot, out in zip((plot_losses, plot_imbalance, plot_expert_heatmaps), outputs):
        plot(records, out)
    return outputs
