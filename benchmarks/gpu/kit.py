"""The GPU kit's measurements, one subcommand each; benchmarks/gpu/run_all.sh calls them in order.

    python benchmarks/gpu/kit.py peak       --out DIR            # bf16 matmul TFLOP/s (8192^3), the MFU denominator
    python benchmarks/gpu/kit.py sync-count --out DIR [-- overrides]   # host syncs per training step
    python benchmarks/gpu/kit.py moe-layer  --out DIR [--backends torch megablocks dmoe]
    python benchmarks/gpu/kit.py summary    --out DIR            # every result file -> DIR/summary.md

Each subcommand writes DIR/<name>.json. On a machine without CUDA (run_all.sh --cpu-rehearsal)
every subcommand runs its code path at toy sizes on the CPU and marks its figures `rehearsal`:
they say nothing about speed.

Shape legend: T tokens, D hidden, F expert width, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def write(out: Path, name: str, record: dict) -> None:
    record = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu (rehearsal)",
        "torch": torch.__version__,
        "rehearsal": not CUDA,
        **record,
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record)[:2000])


def time_ms(fn, warmup: int, iters: int) -> list[float]:
    """Wall time of each call in ms: CUDA events around it on a GPU, the host clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times


# ---------------------------------------------------------------------------------------------
# The bf16 matmul peak, measured in the same run as everything it divides
# ---------------------------------------------------------------------------------------------


def peak(args) -> None:
    n = 8192 if CUDA else 256
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))  # random data, never zeros
    times = time_ms(lambda: a @ b, warmup=3, iters=10 if CUDA else 3)
    tflops = 2 * n**3 / (statistics.median(times) / 1000) / 1e12
    write(
        args.out, "peak", {"matmul": f"{n}x{n}x{n} bf16", "median_ms": statistics.median(times), "bf16_tflops": tflops}
    )


def measured_peak(out: Path) -> float | None:
    path = out / "peak.json"
    return json.loads(path.read_text())["bf16_tflops"] if path.exists() else None


# ---------------------------------------------------------------------------------------------
# Host synchronisations per training step
# ---------------------------------------------------------------------------------------------


def sync_count(args) -> None:
    """Steps of the job as `python -m train` builds it; on CUDA each step runs under
    torch.cuda.set_sync_debug_mode('warn'), which warns once per synchronising call, and the
    warnings are counted with where they came from."""
    from train.cli import compose_job
    from train.data import BatchSampler
    from train.loop import run_step
    from train.metrics import MoEWindow
    from train.setup import setup

    job = compose_job([f"run_name={args.name}", *args.overrides])
    job.run_dir = str(args.out / "runs" / args.name)
    run = setup(job)
    t = job.train
    sampler = BatchSampler(
        run.data.train, t.seq_len, t.micro_batch, run.dims.world_size, run.dims.rank, t.grad_accum, t.seed
    )
    window = MoEWindow(len(run.model.moe_layers()), job.moe.num_experts, run.device)  # sums stay on the device
    run_step(run, sampler, 0, window)  # warm-up: allocator, cuBLAS handles, DeepSpeed's first step
    per_step, where = [], Counter()
    for step in range(1, 1 + args.steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if CUDA:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                run_step(run, sampler, step, window)
            finally:
                if CUDA:
                    torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        per_step.append(len(syncs))
        where.update(f"{os.path.relpath(w.filename, REPO)}:{w.lineno}" for w in syncs)
    write(
        args.out,
        args.name,
        {
            "overrides": args.overrides,
            "moe_layers": len(run.model.moe_layers()),
            "grad_accum": t.grad_accum,
            "syncs_per_step": per_step if CUDA else None,
            "by_place": dict(where.most_common()) if CUDA else None,
            "note": "torch.cuda.set_sync_debug_mode('warn'); first step excluded (warm-up)"
            if CUDA
            else "no CUDA: the steps ran, nothing was counted (the CPU count is the sync-budget test's)",
        },
    )


# ---------------------------------------------------------------------------------------------
# One MoE layer, forward + backward
# ---------------------------------------------------------------------------------------------


def build_switchyard(D: int, F: int, E: int, K: int, backend: str):
    from models.config import MoEConfig
    from models.moe.layer import MoELayer

    cfg = MoEConfig(num_experts=E, top_k=K, expert_ffn_hidden=F, backend=backend)
    cfg.validate()
    layer = MoELayer(D, "swiglu", cfg).to(DEVICE)
    layer.reset_parameters(0.02, num_layers=2)
    return layer


def step_switchyard(layer, x_BSD, g_BSD) -> None:
    from models.moe.balance import balance_loss

    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out, stats = layer(x_BSD)
        aux = balance_loss(stats.selected_BE, stats.prob_mean_BE, "micro_batch")
    ((out.float() * g_BSD).sum() + 0.01 * aux + 0.001 * stats.z_loss).backward()


def build_dmoe(D: int, F: int, E: int, K: int):
    """MegaBlocks' own dMoE (grouped GEMM, GLU with SiLU like our swiglu experts, no biases), bf16."""
    import torch.nn.functional as Fn
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    args = Arguments(
        hidden_size=D,
        ffn_hidden_size=F,
        moe_num_experts=E,
        moe_top_k=K,
        mlp_type="glu",
        mlp_impl="grouped",
        activation_fn=Fn.silu,
        bias=False,
        return_bias=False,
        bf16=True,
        fp16=False,
        moe_loss_weight=0.01,
        device=torch.cuda.current_device(),
    )
    return dMoE(args), args


def step_dmoe(layer_and_args, x_SBD, g_SBD) -> None:
    from megablocks.layers.moe import batched_load_balancing_loss, clear_load_balancing_loss

    layer, args = layer_and_args
    out = layer(x_SBD)
    ((out.float() * g_SBD).sum() + batched_load_balancing_loss(args)).backward()
    clear_load_balancing_loss()  # MegaBlocks keeps the layer's balance loss in a module-level list


def case_step(backend: str, D: int, F: int, E: int, K: int, x_BSD, g_BSD):
    """One forward + backward of a freshly built layer, as a callable (the layer lives in its closure)."""
    if backend == "dmoe":
        layer = build_dmoe(D, F, E, K)
        x_SBD = x_BSD.transpose(0, 1).bfloat16().requires_grad_()  # MegaBlocks takes [S, B, D]
        return lambda: step_dmoe(layer, x_SBD, g_BSD.transpose(0, 1))
    layer = build_switchyard(D, F, E, K, backend)
    x_BSD = x_BSD.clone().requires_grad_()
    return lambda: step_switchyard(layer, x_BSD, g_BSD)


def moe_layer(args) -> None:
    D, T, F = (2048, 16384, args.ffn_hidden) if CUDA else (64, 256, 64)
    iters, warmup = (args.iters, 3) if CUDA else (2, 1)
    peak_tflops = measured_peak(args.out)
    rows = []
    for E in args.experts:
        for K in args.top_k:
            gen = torch.Generator(device="cpu").manual_seed(E * 100 + K)
            x = torch.randn(1, T, D, generator=gen).to(DEVICE)
            g = torch.randn(1, T, D, generator=gen).to(DEVICE)
            # Expert GEMMs only: 3 weights (SwiGLU), 2·T·K·D·F each, forward + backward = 3x.
            expert_flop = 3 * 2 * T * K * D * F * 3
            for backend in args.backends:
                torch.manual_seed(0)
                try:
                    times = time_ms(case_step(backend, D, F, E, K, x, g), warmup, iters)
                except Exception as err:  # noqa: BLE001 - one failing case is a finding, not the end of the table
                    rows.append({"E": E, "K": K, "backend": backend, "error": f"{type(err).__name__}: {err}"[:300]})
                    continue
                ms = statistics.median(times)
                tflops = expert_flop / (ms / 1000) / 1e12
                rows.append(
                    {
                        "E": E,
                        "K": K,
                        "backend": backend,
                        "median_ms": ms,
                        "times_ms": times,
                        "expert_gemm_tflops": tflops,
                        "fraction_of_bf16_peak": tflops / peak_tflops if peak_tflops else None,
                    }
                )
                print(f"E={E:3d} K={K} {backend:10s} {ms:8.2f} ms  {tflops:7.1f} TFLOP/s", flush=True)
    write(
        args.out,
        args.name,
        {
            "tokens": T,
            "d_model": D,
            "ffn_hidden": F,
            "activation": "swiglu",
            "dtype": "bf16 autocast (Switchyard: fp32 master weights); dMoE: bf16 weights",
            "bf16_peak_tflops": peak_tflops,
            "warmup": warmup,
            "iters": iters,
            "rows": rows,
        },
    )


# ---------------------------------------------------------------------------------------------
# Everything in one table
# ---------------------------------------------------------------------------------------------


def summary(args) -> None:
    out = args.out
    machine = torch.cuda.get_device_name() if CUDA else "CPU rehearsal: no speed figures"
    lines = [f"# GPU kit results ({machine})", ""]
    status = out / "status.tsv"
    if status.exists():
        lines += ["| step | status | seconds |", "|---|---|---|"]
        lines += [f"| {' | '.join(line.split(chr(9)))} |" for line in status.read_text().splitlines() if line.strip()]
        lines.append("")
    if (out / "peak.json").exists():
        lines.append(f"bf16 matmul peak: {json.loads((out / 'peak.json').read_text())['bf16_tflops']:.0f} TFLOP/s\n")
    for name in ("sync_count", "sync_count_accum2"):
        if (out / f"{name}.json").exists():
            r = json.loads((out / f"{name}.json").read_text())
            lines.append(
                f"{name}: {r['moe_layers']} MoE layers, grad_accum {r['grad_accum']}: "
                f"syncs per step {r['syncs_per_step']}\n"
            )
    for path in sorted(out.glob("moe_layer*.json")):
        r = json.loads(path.read_text())
        lines += [
            f"## {path.stem}: T={r['tokens']} D={r['d_model']} F={r['ffn_hidden']}",
            "",
            "| E | K | backend | fwd+bwd ms | expert GEMM TFLOP/s | of bf16 peak |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"| {row['E']} | {row['K']} | {row['backend']} | error: {row['error'][:80]} | | |")
            else:
                frac = f"{row['fraction_of_bf16_peak']:.2f}" if row["fraction_of_bf16_peak"] else "-"
                lines.append(
                    f"| {row['E']} | {row['K']} | {row['backend']} | {row['median_ms']:.2f} | "
                    f"{row['expert_gemm_tflops']:.1f} | {frac} |"
                )
        lines.append("")
    peak_tflops = measured_peak(out)
    for metrics in sorted((out / "runs").glob("*/metrics.jsonl")):
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        perf = [r for r in records if "perf/tokens_per_s" in r]
        losses = [r["train/loss"] for r in records if "train/loss" in r]
        if perf:
            tps = perf[-1]["perf/tokens_per_s"]
            mfu = perf[-1].get("perf/mfu")
            mfu_text = f"{mfu:.3f}" if mfu is not None else "-"
            peak_text = round(peak_tflops) if peak_tflops else "-"
            lines.append(
                f"run {metrics.parent.name}: last window {tps:,.0f} tokens/s, MFU {mfu_text} "
                f"(over {peak_text} TFLOP/s measured), loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            )
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("peak", "sync-count", "moe-layer", "summary"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        if name == "sync-count":
            p.add_argument("--steps", type=int, default=3)
            p.add_argument("--name", default="sync_count")
            p.add_argument("overrides", nargs="*")
        if name == "moe-layer":
            p.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "megablocks", "dmoe"])
            p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
            p.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 8])
            p.add_argument("--ffn-hidden", type=int, default=1024)
            p.add_argument("--iters", type=int, default=10)
            p.add_argument("--name", default="moe_layer")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    {"peak": peak, "sync-count": sync_count, "moe-layer": moe_layer, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
