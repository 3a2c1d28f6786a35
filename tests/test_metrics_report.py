"""Expert-utilisation figures against hand-computed values, the dead-expert warning, and the
PNG report built from metrics.jsonl."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.moe.balance import RouterLosses
from models.moe.layer import MoEStats
from parallel.dims import ParallelDims
from train.loop import DeadExpertWarnings
from train.metrics import MoEWindow
from train.plots import load_shares

ONE_PROCESS = ParallelDims(world_size=1, rank=0, local_rank=0, ep=1)


def stats(load, dropped=0, nbytes=0, seconds=0.0):
    load = torch.tensor(load)
    return MoEStats(
        load,
        load[None],
        torch.full((1, len(load)), 1 / len(load)),
        torch.tensor(0.5),
        torch.tensor(1.0),
        torch.tensor(dropped),
        nbytes,
        seconds,
    )


def add(window, layers, aux):
    """One micro-step: each layer's stats, and the balance losses the loop computed for them."""
    window.add(layers, RouterLosses(torch.tensor(0.0), torch.tensor(aux), torch.full((len(aux),), 0.5)))


def test_window_figures_by_hand():
    window = MoEWindow(num_layers=2, num_experts=4)
    add(window, [stats([3, 1, 0, 0], dropped=1, nbytes=100, seconds=0.25), stats([2, 2, 2, 2])], aux=[1.2, 1.0])
    add(window, [stats([1, 3, 0, 0], dropped=2, nbytes=60, seconds=0.25), stats([2, 2, 2, 2])], aux=[1.0, 1.0])
    out = window.summarize(ONE_PROCESS, elapsed_seconds=2.0)
    assert out["moe/layer0/tokens_per_expert"] == [4, 4, 0, 0]
    assert out["moe/layer0/imbalance_max_over_mean"] == pytest.approx(4 / 2)
    assert out["moe/layer0/load_cv"] == pytest.approx(np.std([4, 4, 0, 0]) / 2)
    assert out["moe/layer0/dead_experts"] == 2
    assert out["moe/layer0/aux_loss"] == pytest.approx(1.1)
    assert out["moe/layer0/dropped_tokens"] == 3
    assert out["moe/layer0/all_to_all_bytes"] == 160
    assert out["moe/layer1/imbalance_max_over_mean"] == pytest.approx(1.0)
    assert out["moe/layer1/dead_experts"] == 0
    assert out["perf/all_to_all_time_share"] == pytest.approx(0.5 / 2.0)


def test_imbalance_percentiles_over_layers_by_hand():
    # max/mean per layer: 1, 2, 4, 3, 2 -> sorted 1, 2, 2, 3, 4: the median is 2; p90 lies at 0.9·4 = 3.6
    # places, between 3 and 4: 3.6; the worst is layer 2.
    loads = [[1, 1, 1, 1], [2, 1, 1, 0], [4, 0, 0, 0], [3, 1, 0, 0], [2, 2, 0, 0]]
    window = MoEWindow(num_layers=5, num_experts=4)
    add(window, [stats(load) for load in loads], aux=[1.0] * 5)
    out = window.summarize(ONE_PROCESS, elapsed_seconds=1.0)
    assert [out[f"moe/layer{layer}/imbalance_max_over_mean"] for layer in range(5)] == pytest.approx([1, 2, 4, 3, 2])
    assert out["moe/imbalance_max_over_mean/p50"] == pytest.approx(2.0)
    assert out["moe/imbalance_max_over_mean/p90"] == pytest.approx(3.6)
    assert out["moe/imbalance_max_over_mean/max"] == pytest.approx(4.0)
    assert out["moe/imbalance_max_over_mean/worst_layer"] == 2


def test_key_count_grows_with_layers_never_with_experts():
    def keys(num_layers, num_experts):
        window = MoEWindow(num_layers, num_experts)
        add(window, [stats([1] * num_experts) for _ in range(num_layers)], aux=[1.0] * num_layers)
        return set(window.summarize(ONE_PROCESS, elapsed_seconds=1.0))

    per_layer = {k for k in keys(2, 4) if k.startswith("moe/layer0/")}
    assert keys(2, 4) == keys(2, 256)  # per-expert counts are one list per layer, not one key per expert
    assert len(keys(40, 4)) - len(keys(2, 4)) == 38 * len(per_layer) == 38 * 9
    over_layers = {k for k in keys(40, 4) if k.startswith("moe/imbalance_max_over_mean/")}
    assert over_layers == {f"moe/imbalance_max_over_mean/{s}" for s in ("p50", "p90", "max", "worst_layer")}
    assert not {k for k in keys(0, 4) if k.startswith("moe/")}  # a dense model logs no MoE key


def test_dead_experts_get_a_warning_line_after_the_warm_up_when_they_change():
    warnings = DeadExpertWarnings(after_step=30)
    two_dead = {"moe/layer0/tokens_per_expert": [5, 0, 7, 0], "moe/layer1/tokens_per_expert": [1, 1]}
    assert warnings.lines(30, two_dead, 10) == []  # the router is still warming up
    assert warnings.lines(40, two_dead, 10) == [
        "warning: step 40: layer0: expert(s) [1, 3] got no token in the last 10 step(s)"
    ]
    assert warnings.lines(50, two_dead, 10) == []  # the same experts again: said once
    one_dead = {"moe/layer0/tokens_per_expert": [5, 0, 7, 1], "moe/layer1/tokens_per_expert": [0, 2]}
    assert warnings.lines(60, one_dead, 10) == [
        "warning: step 60: layer0: expert(s) [1] got no token in the last 10 step(s)",
        "warning: step 60: layer1: expert(s) [0] got no token in the last 10 step(s)",
    ]
    alive = {"moe/layer0/tokens_per_expert": [5, 1, 7, 1], "moe/layer1/tokens_per_expert": [1, 2]}
    assert warnings.lines(70, alive, 10) == []
    assert warnings.lines(80, one_dead, 10) == [
        "warning: step 80: layer0: expert(s) [1] got no token in the last 10 step(s)",
        "warning: step 80: layer1: expert(s) [0] got no token in the last 10 step(s)",
    ]


def write_run(run_dir):
    records = [
        {"step": 0, "val/loss": 5.5},
        {
            "step": 10,
            "train/loss": 4.0,
            "moe/layer0/tokens_per_expert": [6, 2],
            "moe/layer0/imbalance_max_over_mean": 1.5,
        },
        {
            "step": 20,
            "train/loss": 3.0,
            "moe/layer0/tokens_per_expert": [4, 4],
            "moe/layer0/imbalance_max_over_mean": 1.0,
        },
        {"step": 20, "val/loss": 3.2},
    ]
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_load_shares_by_hand(tmp_path):
    write_run(tmp_path / "run")
    steps, share_LES = load_shares(
        [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    )
    assert steps == [10, 20]
    np.testing.assert_allclose(share_LES, [[[0.75, 0.5], [0.25, 0.5]]])


def test_report_writes_the_plots(tmp_path):
    write_run(tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-m", "train.report", str(tmp_path / "run")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for name in ("loss.png", "imbalance.png", "expert_heatmap.png"):
        png = tmp_path / "run/plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    missing = subprocess.run(
        [sys.executable, "-m", "train.report", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2
    assert "RUN_DIR must hold a metrics.jsonl" in missing.stderr
