"""One MoE layer, forward + backward, on CPU: Switchyard (dropless, expert parallel) vs DeepSpeed's MoE.

    python benchmarks/moe_layer.py            # spawns its own 2 ranks over gloo; see benchmarks/README.md

What one run does:

1. Spawns 2 processes (gloo, 1 torch thread each). In each, for every (E, k):
   * builds a Switchyard `MoELayer` (GELU experts, dropless) and shards it with
     `shard_moe_layer` (ep=2), and a `deepspeed.moe.layer.MoE` (ep_size=2, capacity mode,
     drop_tokens=True, use_rts=False) whose expert is Linear(D,F,no bias) -> GELU -> Linear(F,D,no bias),
     with the router and expert weights copied from the Switchyard layer: both route the same
     tokens to the same experts and do the same math per expert;
   * checks before timing, on a small batch: Switchyard's EP output, input gradient and expert
     weight gradients equal the unsharded layer's on the same global batch; a DeepSpeed layer with
     a capacity too large to drop anything gives the same output and input gradient (so the two
     really compute the same function); the timed DeepSpeed layer gives finite output of the right shape;
   * times forward + backward of each, interleaved iteration by iteration (barrier before and
     after each), and reports global tokens/s from the median, plus how many token copies
     DeepSpeed's capacity dropped.
2. In the parent process (one process, one thread), "the floor": Switchyard's whole unsharded
   layer (router + dispatch + experts + combine) vs `run_experts_grouped` alone on pre-sorted
   inputs with the same per-expert counts, both forward + backward.

Prints tables and writes JSON to benchmarks/local/moe_layer_cpu.json (untracked); --update-results writes the
committed benchmarks/results/moe_layer_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Before torch / DeepSpeed are imported (children re-import this module under spawn).
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU: skip DeepSpeed's accelerator probing
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from models.config import MoEConfig  # noqa: E402
from models.moe.balance import balance_loss  # noqa: E402
from models.moe.dispatch import plan_routing  # noqa: E402
from models.moe.experts import grouped_mm_supported, run_experts_grouped  # noqa: E402
from models.moe.layer import MoELayer  # noqa: E402
from parallel.expert_parallel import shard_moe_layer  # noqa: E402
from parallel.local_launch import run_local_ranks  # noqa: E402

WORLD = 2
AUX_COEF, Z_COEF = 0.01, 0.001  # Switchyard's defaults (MoEConfig); DeepSpeed gets AUX_COEF on its l_aux
INIT_STD = 0.02


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens-per-rank", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--ffn-hidden", type=int, default=512, help="expert width F")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2], help="DeepSpeed supports 1 and 2 only")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="DeepSpeed's train capacity factor")
    p.add_argument("--min-capacity", type=int, default=4, help="DeepSpeed's min_capacity (its default)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--floor-iters", type=int, default=20)
    p.add_argument("--check-tokens", type=int, default=64, help="tokens per rank of the correctness check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON record (default: benchmarks/local/moe_layer_cpu.json, untracked; see --update-results)",
    )
    p.add_argument(
        "--update-results",
        action="store_true",
        help="write the committed record benchmarks/results/moe_layer_cpu.json instead",
    )
    args = p.parse_args(argv)
    if args.out is None:  # a trial run never overwrites the committed figures by accident
        args.out = REPO / "benchmarks" / ("results" if args.update_results else "local") / "moe_layer_cpu.json"
    args.out = args.out.resolve()
    for k in args.top_k:
        if k not in (1, 2):
            p.error(f"--top-k must be 1 or 2 (DeepSpeed's MoE supports only these); got {k}")
    for e in args.experts:
        if e % WORLD:
            p.error(f"--experts must be divisible by {WORLD}; got {e}")
    return args


# ---------------------------------------------------------------------------------------------
# Building the two layers
# ---------------------------------------------------------------------------------------------


def build_switchyard(args, E: int, k: int) -> MoELayer:
    """The full (unsharded) layer. normalize_topk only for k=2, as DeepSpeed's gates do (top-1:
    weight = softmax probability; top-2: the two probabilities renormalised to sum to 1)."""
    cfg = MoEConfig(
        num_experts=E, top_k=k, expert_ffn_hidden=args.ffn_hidden, capacity_factor=None, normalize_topk=k > 1
    )
    cfg.validate()
    layer = MoELayer(args.d_model, "gelu", cfg)
    layer.reset_parameters(INIT_STD, num_layers=1)
    return layer


def shard(full: MoELayer, dims) -> MoELayer:
    """A copy of the full layer, sharded by Switchyard's own shard_moe_layer (ep=2)."""
    layer = copy.deepcopy(full)
    shard_moe_layer(layer, dims)
    assert layer.experts.num_experts == full.experts.num_experts // WORLD
    return layer


def build_deepspeed(args, full: MoELayer, E: int, k: int, capacity_factor: float, rank: int):
    """deepspeed.moe.layer.MoE with ep_size=2, weights copied from the full Switchyard layer.
    Experts are laid out like Switchyard's: rank r holds global experts [r·E/2, (r+1)·E/2)."""
    from deepspeed.moe.layer import MoE

    D, F = args.d_model, args.ffn_hidden
    expert = nn.Sequential(nn.Linear(D, F, bias=False), nn.GELU(), nn.Linear(F, D, bias=False))
    moe = MoE(
        hidden_size=D,
        expert=expert,
        num_experts=E,
        ep_size=WORLD,
        k=k,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
        min_capacity=args.min_capacity,
        drop_tokens=True,
        use_rts=False,
        top2_2nd_expert_sampling=False,  # deterministic second choice, like Switchyard's top-k
    )
    moe.set_deepspeed_parallelism()  # creates (once) and attaches the expert-parallel group
    local = E // WORLD
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(full.router.gate_ED)
        for local_index, mlp in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            e = rank * local + local_index
            mlp[0].weight.copy_(full.experts.w1_EDF[e].t())  # Linear(D, F).weight is [F, D]
            mlp[2].weight.copy_(full.experts.w2_EFD[e].t())
    return moe.train()


def ds_capacity(args, tokens: int, E: int, k: int, capacity_factor: float) -> int:
    """DeepSpeed's per-expert capacity in its drop_tokens mode (sharded_moe._capacity, with
    capacity_factor·k for top-2): max(ceil(T/E · cf · k), min_capacity)."""
    return max(math.ceil(tokens / E * capacity_factor * k), args.min_capacity)


# ---------------------------------------------------------------------------------------------
# One forward + backward of each
# ---------------------------------------------------------------------------------------------


def step_switchyard(layer: MoELayer, x_BSD: torch.Tensor, g_BSD: torch.Tensor):
    out, stats = layer(x_BSD)
    aux = balance_loss(stats.selected_BE, stats.prob_mean_BE, "micro_batch")
    loss = (out * g_BSD).sum() + AUX_COEF * aux + Z_COEF * stats.z_loss
    loss.backward()
    return out, stats


def step_deepspeed(moe, x_BSD: torch.Tensor, g_BSD: torch.Tensor):
    out, l_aux, exp_counts = moe(x_BSD)
    loss = (out * g_BSD).sum() + AUX_COEF * l_aux
    loss.backward()
    return out, exp_counts


def clear_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


# ---------------------------------------------------------------------------------------------
# Correctness, before any timing
# ---------------------------------------------------------------------------------------------


def check_case(args, full: MoELayer, E: int, k: int, rank: int, dims) -> dict:
    Tc, D = args.check_tokens, args.d_model
    gen = torch.Generator().manual_seed(args.seed + 7)
    x_global = torch.randn(WORLD * Tc, D, generator=gen)
    g_global = torch.randn(WORLD * Tc, D, generator=gen)
    mine = slice(rank * Tc, (rank + 1) * Tc)
    tol = dict(rtol=1e-4, atol=1e-5)
    case = f"E={E} k={k} rank={rank}"

    # Reference: the unsharded layer on the whole global batch (dropless: per-rank = global).
    ref = copy.deepcopy(full)
    x_ref = x_global.clone().requires_grad_()
    out_ref, _ = ref(x_ref.unsqueeze(0))
    out_ref = out_ref.squeeze(0)
    (out_ref * g_global).sum().backward()

    # Switchyard, expert parallel, this rank's tokens.
    ep = shard(full, dims)  # a fresh shard: the timed one must not carry the check's gradients
    x = x_global[mine].clone().requires_grad_()
    out, stats = ep(x.unsqueeze(0))
    out = out.squeeze(0)
    (out * g_global[mine]).sum().backward()
    torch.testing.assert_close(out, out_ref[mine], **tol, msg=lambda m: f"Switchyard EP output, {case}\n{m}")
    torch.testing.assert_close(x.grad, x_ref.grad[mine], **tol, msg=lambda m: f"Switchyard EP input grad, {case}\n{m}")
    first = rank * (E // WORLD)
    for name in ("w1_EDF", "w2_EFD"):
        got, want = getattr(ep.experts, name).grad, getattr(ref.experts, name).grad[first : first + E // WORLD]
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"Switchyard EP {name} grad, {case}\n{m}")
    assert int(stats.num_dropped) == 0

    # DeepSpeed with a capacity that cannot drop (cf = E: capacity = T·k): the same function.
    ds_nodrop = build_deepspeed(args, full, E, k, capacity_factor=float(E), rank=rank)
    x = x_global[mine].clone().requires_grad_()
    out_ds, _, _ = ds_nodrop(x.unsqueeze(0))
    out_ds = out_ds.squeeze(0)
    (out_ds * g_global[mine]).sum().backward()
    torch.testing.assert_close(
        out_ds, out_ref[mine], **tol, msg=lambda m: f"DeepSpeed (no drops) vs Switchyard output, {case}\n{m}"
    )
    torch.testing.assert_close(
        x.grad, x_ref.grad[mine], **tol, msg=lambda m: f"DeepSpeed (no drops) vs Switchyard input grad, {case}\n{m}"
    )
    for local_index, mlp in enumerate(ds_nodrop.deepspeed_moe.experts.deepspeed_experts):
        e = first + local_index
        torch.testing.assert_close(
            mlp[0].weight.grad,
            ref.experts.w1_EDF.grad[e].t(),
            **tol,
            msg=lambda m: f"DeepSpeed (no drops) expert {e} w1 grad, {case}\n{m}",
        )
        torch.testing.assert_close(
            mlp[2].weight.grad,
            ref.experts.w2_EFD.grad[e].t(),
            **tol,
            msg=lambda m: f"DeepSpeed (no drops) expert {e} w2 grad, {case}\n{m}",
        )
    max_diff = float((out_ds - out_ref[mine]).detach().abs().max())

    # The DeepSpeed configuration that is timed: finite, right shape.
    ds = build_deepspeed(args, full, E, k, args.capacity_factor, rank)
    x = x_global[mine].clone().requires_grad_()
    out_cap, _, _ = ds(x.unsqueeze(0))
    out_cap.sum().backward()
    assert out_cap.shape == (1, Tc, D) and torch.isfinite(out_cap).all() and torch.isfinite(x.grad).all(), case
    return {"passed": True, "check_tokens_per_rank": Tc, "max_abs_diff_deepspeed_nodrop_vs_switchyard": max_diff}


# ---------------------------------------------------------------------------------------------
# The two ranks
# ---------------------------------------------------------------------------------------------


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def run_case(args, E: int, k: int, rank: int, dims) -> dict:
    torch.manual_seed(args.seed + 100 * E + k)  # identical weights on both ranks
    full = build_switchyard(args, E, k)
    check = check_case(args, full, E, k, rank, dims)
    sy = shard(full, dims)
    ds = build_deepspeed(args, full, E, k, args.capacity_factor, rank)

    T, D = args.tokens_per_rank, args.d_model
    gen = torch.Generator().manual_seed(args.seed + 1000 + rank)  # each rank its own tokens
    x_BSD = torch.randn(1, T, D, generator=gen)
    g_BSD = torch.randn(1, T, D, generator=gen)
    state = {}

    def run_sy():
        x = x_BSD.clone().requires_grad_()
        _, stats = step_switchyard(sy, x, g_BSD)
        state["sy_load"] = stats.tokens_per_expert

    def run_ds():
        x = x_BSD.clone().requires_grad_()
        _, exp_counts = step_deepspeed(ds, x, g_BSD)
        state["ds_counts"] = exp_counts

    times = {"switchyard": [], "deepspeed": []}
    for it in range(args.warmup + args.iters):
        for name, fn, module in (("switchyard", run_sy, sy), ("deepspeed", run_ds, ds)):
            clear_grads(module)
            t = timed(fn)
            if it >= args.warmup:
                times[name].append(t)

    # Slowest rank per iteration (the barriers make them nearly equal anyway).
    result = {"E": E, "k": k, "check": check}
    for name, ts in times.items():
        t = torch.tensor(ts, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        med = statistics.median(t.tolist())
        result[name] = {
            "median_s": med,
            "min_s": min(t.tolist()),
            "max_s": max(t.tolist()),
            "tokens_per_s": WORLD * T / med,
            "times_s": [round(v, 6) for v in t.tolist()],
        }
    result["ratio_switchyard_over_deepspeed"] = (
        result["switchyard"]["tokens_per_s"] / result["deepspeed"]["tokens_per_s"]
    )

    # Load and drops (routing is identical for both layers: same weights, same tokens).
    load = state["sy_load"].clone()
    dist.all_reduce(load)
    assert int(load.sum()) == WORLD * T * k
    capacity = ds_capacity(args, T, E, k, args.capacity_factor)
    counts = state["ds_counts"].to(torch.int64)
    dropped = (counts - capacity).clamp(min=0).sum().reshape(1)
    with torch.no_grad():  # DeepSpeed's own verdict, from its gate (dropped routes carry expert id -1)
        gate_out = ds.deepspeed_moe.gate(x_BSD.reshape(T, D), None, True)
    assert int(gate_out[1]) == capacity, (int(gate_out[1]), capacity)
    assert int((gate_out[3] < 0).sum()) == int(dropped), (int((gate_out[3] < 0).sum()), int(dropped))
    ds_assign = counts.sum().reshape(1)
    dist.all_reduce(dropped)
    dist.all_reduce(ds_assign)
    result["switchyard"]["dropped_copies"] = 0
    result["switchyard"]["expert_rows_per_rank"] = [
        int(load[r * (E // WORLD) : (r + 1) * (E // WORLD)].sum()) for r in range(WORLD)
    ]
    result["global_expert_load_max_over_mean"] = float(load.max()) / (WORLD * T * k / E)
    result["deepspeed"].update(
        {
            "capacity_factor": args.capacity_factor,
            "capacity_per_expert_per_rank": capacity,
            "expert_rows_per_rank": E * capacity,  # the padded [E, C, D] buffer each rank computes on
            "routed_copies": int(ds_assign),
            "dropped_copies": int(dropped),
            "dropped_fraction": int(dropped) / int(ds_assign),
        }
    )
    return result


def worker(rank: int, world_size: int, args, out_file: str) -> None:
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from parallel.dims import init_parallel

    ds_logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")  # torch.distributed's default group, gloo
    dims = init_parallel(WORLD, num_experts=max(args.experts), device=torch.device("cpu"))  # reuses it; EP groups
    assert dims.world_size == WORLD and dims.ep == WORLD
    results = []
    for E in args.experts:
        for k in args.top_k:
            r = run_case(args, E, k, rank, dims)
            results.append(r)
            if rank == 0:
                print(
                    f"  E={E:3d} k={k}: switchyard {r['switchyard']['tokens_per_s']:9.0f} tok/s, "
                    f"deepspeed {r['deepspeed']['tokens_per_s']:9.0f} tok/s, "
                    f"ratio {r['ratio_switchyard_over_deepspeed']:.2f}, "
                    f"DS dropped {100 * r['deepspeed']['dropped_fraction']:.1f}% (checks passed)",
                    flush=True,
                )
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------
# The floor: whole layer vs its expert GEMMs alone, one process
# ---------------------------------------------------------------------------------------------


def floor_case(args, E: int, k: int) -> dict:
    torch.manual_seed(args.seed + 100 * E + k)
    layer = build_switchyard(args, E, k)  # unsharded, LocalDispatcher
    T, D = args.tokens_per_rank, args.d_model
    gen = torch.Generator().manual_seed(args.seed + 1000)
    x_BSD = torch.randn(1, T, D, generator=gen)
    g_BSD = torch.randn(1, T, D, generator=gen)

    with torch.no_grad():  # the same tokens, pre-sorted by expert, with the layer's own counts
        routing = layer.router(x_BSD.reshape(T, D))
        plan = plan_routing(routing.expert_ids_TK, E, None)
        x_sorted_ND = x_BSD.reshape(T, D)[plan.order_N // k].contiguous()
        counts_E = plan.kept_per_expert_E
    g_ND = torch.randn(x_sorted_ND.shape, generator=gen)
    w1, w2 = layer.experts.w1_EDF, layer.experts.w2_EFD
    assert grouped_mm_supported(x_sorted_ND, w1, w2), (
        "grouped_mm not usable at these sizes: the layer would use the loop"
    )

    def run_layer():
        x = x_BSD.clone().requires_grad_()
        step_switchyard(layer, x, g_BSD)

    def run_experts():
        x = x_sorted_ND.clone().requires_grad_()
        y = run_experts_grouped(x, counts_E, w1, w2)
        (y * g_ND).sum().backward()

    times = {"layer": [], "experts_only": []}
    for it in range(args.warmup + args.floor_iters):
        for name, fn in (("layer", run_layer), ("experts_only", run_experts)):
            clear_grads(layer)
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            if it >= args.warmup:
                times[name].append(t)
    layer_s, experts_s = statistics.median(times["layer"]), statistics.median(times["experts_only"])
    return {
        "E": E,
        "k": k,
        "tokens": T,
        "layer_median_s": layer_s,
        "experts_only_median_s": experts_s,
        "ratio_layer_over_experts": layer_s / experts_s,
        "overhead_fraction_of_layer": 1 - experts_s / layer_s,
    }


# ---------------------------------------------------------------------------------------------


def machine_info() -> dict:
    import deepspeed

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "torch_threads_per_process": 1,
        "processes": WORLD,
        "backend": "gloo",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"),
        "python_executable": sys.executable,
    }


def print_tables(ep_results: list[dict], floor: list[dict], args) -> None:
    T = args.tokens_per_rank
    print()
    print(
        f"MoE layer fwd+bwd, CPU, {WORLD} ranks x 1 thread, gloo; {T} tokens/rank, "
        f"D={args.d_model}, F={args.ffn_hidden}, "
        f"GELU experts; median of {args.iters} iterations after {args.warmup} warm-up"
    )
    print(
        f"Switchyard: dropless, ep=2.  DeepSpeed: ep_size=2, capacity factor {args.capacity_factor}, drop_tokens=True"
    )
    head = (
        f"| {'E':>3} | k | {'Switchyard tok/s':>16} | {'DeepSpeed tok/s':>15} | {'SY / DS':>7} "
        f"| {'DS capacity/expert':>18} | {'DS dropped copies':>20} | {'max/mean expert load':>20} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in ep_results:
        ds = r["deepspeed"]
        dropped = f"{ds['dropped_copies']} / {ds['routed_copies']} ({100 * ds['dropped_fraction']:.1f}%)"
        print(
            f"| {r['E']:>3} | {r['k']} | {r['switchyard']['tokens_per_s']:>16.0f} | {ds['tokens_per_s']:>15.0f} | "
            f"{r['ratio_switchyard_over_deepspeed']:>7.2f} | {ds['capacity_per_expert_per_rank']:>18} | "
            f"{dropped:>20} | "
            f"{r['global_expert_load_max_over_mean']:>20.2f} |"
        )
    print()
    print(
        f"The floor: one process, 1 thread, {T} tokens, unsharded Switchyard layer vs run_experts_grouped alone "
        f"(fwd+bwd), median of {args.floor_iters}"
    )
    head = (
        f"| {'E':>3} | k | {'whole layer ms':>14} | {'expert GEMMs ms':>15} "
        f"| {'layer / GEMMs':>13} | {'non-GEMM share':>14} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for f in floor:
        print(
            f"| {f['E']:>3} | {f['k']} | {1000 * f['layer_median_s']:>14.1f} | "
            f"{1000 * f['experts_only_median_s']:>15.1f} | "
            f"{f['ratio_layer_over_experts']:>13.2f} | {100 * f['overhead_fraction_of_layer']:>13.1f}% |"
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"{command}\nexpert-parallel runs ({WORLD} ranks):", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "ep.json")
        run_local_ranks(WORLD, worker, args, out_file)
        ep_results = json.loads(Path(out_file).read_text())
    print("floor (1 process):", flush=True)
    floor = [floor_case(args, E, k) for E in args.experts for k in args.top_k]
    print_tables(ep_results, floor, args)

    record = {
        "benchmark": "moe_layer_fwd_bwd_cpu",
        "command": command,
        "date_utc": started.isoformat(timespec="seconds"),
        "wall_s": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "machine": machine_info(),
        "settings": {
            **{name: value for name, value in vars(args).items() if name != "out"},  # every option, as parsed
            "global_tokens": WORLD * args.tokens_per_rank,
            "activation": "gelu (exact, erf) in both; experts Linear(D,F) -> GELU -> Linear(F,D), no biases in either",
            "dtype": "float32",
            "switchyard": (
                "MoELayer, dropless (capacity_factor=None), ep=2 via shard_moe_layer, softmax router, "
                "normalize_topk = (k == 2)"
            ),
            "deepspeed": {
                "class": "deepspeed.moe.layer.MoE",
                "ep_size": WORLD,
                "drop_tokens": True,
                "use_rts": False,
                "top2_2nd_expert_sampling": False,
            },
            "loss": "sum(out * g) + 0.01 * aux (+ 0.001 * z for Switchyard, its default)",
        },
        "expert_parallel": ep_results,
        "floor": floor,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {os.path.relpath(args.out, REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
