"""Memory on CPU: ZeRO for the experts, and activation checkpointing's memory against its time.

    python benchmarks/memory.py            # see benchmarks/README.md

What one run does, on the default model (conf/model/small.yaml + conf/moe/default.yaml: 4 blocks,
d_model 256, 8 experts top-2 of width 512, vocabulary 8192), with random token batches:

A. ZeRO 0/1/2/3 with parallel.ep=2 on 4 spawned ranks (gloo, 1 torch thread each; so each expert
   lives on 2 ranks, its expert-data-parallel group): each rank builds the model on the meta
   device and parallelizes it as the job does (parallel.parallelize), runs two steps, and measures
   its model states with parallel/memory.model_state_bytes -- gradients at the accumulation
   boundary of step 2, weights / optimizer state / buffers at rest after it -- next to the
   planner's prediction (planner/model_states.py). ZeRO-0 keeps every expert whole on both of its
   ranks, as all stages did before the experts had ZeRO; the expert optimizer state of ZeRO >= 1
   is shown as a fraction of ZeRO-0's (1/EDP = 1/2 expected).
B. train.activation_checkpointing none / full / moe with train.seq_len=1024 (model.max_seq_len
   1024), one process, ZeRO-0, micro-batch 8 (8192 tokens per step), fp32, 1 torch thread: the
   peak memory of a training step (model states at rest + the torch profiler's peak
   of what the step allocates on top; forward, backward and optimizer step), the planner's
   estimate, and the median step time over interleaved timed steps (no profiler). This
   machine's fp32 matmul peak (torch.mm, 2048^3, same threads, best of 10) is measured in the
   same run, so speed is reported as model-FLOPs utilisation and as time relative to `none`.

Prints tables and writes JSON to benchmarks/local/memory_cpu.json (untracked); --update-results writes the
committed benchmarks/results/memory_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
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
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported (also in spawned ranks)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.gpt import GPT, count_parameters  # noqa: E402
from models.moe.balance import router_losses  # noqa: E402
from parallel.local_launch import run_local_ranks  # noqa: E402
from parallel.memory import model_state_bytes, profiled_allocation_peak, total_bytes  # noqa: E402
from planner.activations import activation_peak  # noqa: E402
from planner.model_states import Layout, plan_model_states  # noqa: E402
from train.cli import compose_job  # noqa: E402
from train.metrics import flops_per_token  # noqa: E402

MODES = ("none", "full", "moe")
ZERO_WORLD, ZERO_EP = 4, 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=1024, help="part B: train.seq_len (and model.max_seq_len)")
    p.add_argument("--warmup", type=int, default=1, help="part B: untimed steps per mode")
    p.add_argument("--steps", type=int, default=5, help="part B: timed steps per mode (interleaved)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="part B: torch threads (1: on a shared machine two threads can spin for seconds per op)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON record (default: benchmarks/local/memory_cpu.json, untracked; see --update-results)",
    )
    p.add_argument(
        "--update-results",
        action="store_true",
        help="write the committed record benchmarks/results/memory_cpu.json instead",
    )
    args = p.parse_args(argv)
    if args.out is None:  # a trial run never overwrites the committed figures by accident
        args.out = REPO / "benchmarks" / ("results" if args.update_results else "local") / "memory_cpu.json"
    return args


def build(job, dims):
    from parallel.parallelize import parallelize

    with torch.device("meta"):
        model = GPT(job.gpt_config())
    return parallelize(model, dims, job)


def train_step(trainer, job, seed: int, lr: float = 1e-3, step: bool = True) -> None:
    """One micro-batch as train/loop.py runs it: forward, loss, backward, (optimizer step)."""
    t = job.train
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, job.model.vocab_size, (t.micro_batch, t.seq_len + 1), generator=generator)
    logits, stats = trainer.forward(idx[:, :-1])
    # micro_batch scope: the memory of global_batch without the step's count pre-pass
    router = router_losses(stats, job.moe.aux_loss_coef, job.moe.z_loss_coef, "micro_batch").total
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()) + router
    del logits, stats
    trainer.backward(loss)
    if step:
        trainer.step(lr)


# -- A: ZeRO stages, 4 ranks, ep 2 -------------------------------------------------------------


def zero_worker(rank: int, world_size: int, out_dir: str) -> None:
    from parallel.dims import init_parallel

    results = {}
    for stage in range(4):
        job = compose_job([f"parallel.ep={ZERO_EP}", f"deepspeed.zero_stage={stage}"])
        dims = init_parallel(job.parallel.ep, job.moe.num_experts, torch.device("cpu"))
        with torch.device("meta"):
            planned = plan_model_states(GPT(job.gpt_config()), Layout(world_size, ZERO_EP, stage), rank)
        trainer = build(job, dims)
        train_step(trainer, job, seed=rank)
        train_step(trainer, job, seed=100 + rank, step=False)
        boundary = model_state_bytes(trainer)
        trainer.step(1e-3)
        rest = model_state_bytes(trainer)
        results[stage] = {"boundary": boundary, "rest": rest, "planned": planned}
        del trainer
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def held(measured: dict) -> dict:
    """The figures the planner reports: gradients at the boundary, the rest at rest."""
    out = {part: dict(kinds) for part, kinds in measured["rest"].items()}
    for part in out:
        out[part]["gradients"] = measured["boundary"][part]["gradients"]
    return out


def run_zero_stages() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_local_ranks(ZERO_WORLD, zero_worker, tmp)
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(ZERO_WORLD)]
    stages = {}
    for stage in map(str, range(4)):
        ranks = [held(per_rank[r][stage]) for r in range(ZERO_WORLD)]
        planned = [per_rank[r][stage]["planned"] for r in range(ZERO_WORLD)]
        stages[stage] = {
            "measured_per_rank": ranks,
            "planned_per_rank": planned,
            "planned_equals_measured": ranks == planned,
        }
    zero0 = stages["0"]["measured_per_rank"][0]["experts"]["optimizer"]
    for stage in stages.values():
        stage["expert_optimizer_over_zero0"] = stage["measured_per_rank"][0]["experts"]["optimizer"] / zero0
    return stages


# -- B: activation checkpointing ----------------------------------------------------------------


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_checkpointing(args) -> dict:
    from parallel.dims import init_parallel

    torch.set_num_threads(args.threads)
    jobs = {
        m: compose_job(
            [
                f"train.seq_len={args.seq_len}",
                f"model.max_seq_len={args.seq_len}",
                f"train.activation_checkpointing={m}",
            ]
        )
        for m in MODES
    }
    job = jobs["none"]
    dims = init_parallel(1, job.moe.num_experts, torch.device("cpu"))
    trainers = {m: build(jobs[m], dims) for m in MODES}
    peak_flops = matmul_peak_flops()
    for m in MODES:
        for i in range(args.warmup):
            train_step(trainers[m], jobs[m], seed=i)
    memory = {}
    for m in MODES:
        at_rest = total_bytes(model_state_bytes(trainers[m]))
        step_peak = profiled_allocation_peak(lambda: train_step(trainers[m], jobs[m], seed=999))
        with torch.device("meta"):
            model = GPT(jobs[m].gpt_config())
        planned_states = total_bytes(plan_model_states(model, Layout(1, 1, 0), 0))
        estimate = activation_peak(jobs[m].gpt_config(), job.train.micro_batch, args.seq_len, 1, m, 4)
        memory[m] = {
            "model_states_at_rest": at_rest,
            "step_peak_above_rest": step_peak,
            "peak": at_rest + step_peak,
            "planned_activation_peak": estimate.peak,
            "planned_peak": planned_states + estimate.peak,
            "planned_phase": estimate.phase,
        }
    times = {m: [] for m in MODES}
    for i in range(args.steps):
        for m in MODES:  # interleaved, so that a change in the machine's load hits every mode alike
            times[m].append(_timed(lambda: train_step(trainers[m], jobs[m], seed=10 + i)))
    total, active = count_parameters(GPT(job.gpt_config()))
    tokens = job.train.micro_batch * args.seq_len
    fpt = flops_per_token(active, 0, job.model.n_layers, job.model.d_model, args.seq_len)  # tied embedding
    results = {}
    for m in MODES:
        median = statistics.median(times[m])
        results[m] = {
            **memory[m],
            "step_times_s": times[m],
            "median_step_s": median,
            "tokens_per_s": tokens / median,
            "mfu": fpt * tokens / median / peak_flops,
        }
    for m in MODES:
        results[m]["time_over_none"] = results[m]["median_step_s"] / results["none"]["median_step_s"]
        results[m]["peak_over_none"] = results[m]["peak"] / results["none"]["peak"]
    return {
        "matmul_peak_gflops": peak_flops / 1e9,
        "tokens_per_step": tokens,
        "flops_per_token": fpt,
        "parameters": total,
        "active_parameters": active,
        "modes": results,
    }


# -- output -------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def print_tables(zero: dict, ckpt: dict, args) -> None:
    print(
        f"\nA. model states per rank (MiB), default model, {ZERO_WORLD} ranks, parallel.ep={ZERO_EP} "
        f"(expert-data-parallel groups of {ZERO_WORLD // ZERO_EP}); gradients at the accumulation boundary, "
        "the rest at rest after a step; rank 0"
    )
    head = (
        "| ZeRO | dense weights | dense grads | dense optim | dense buffers "
        "| expert weights | expert grads | expert optim "
        "| expert optim / ZeRO-0 | all states | max over ranks | = planner |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for stage, s in zero.items():
        r0 = s["measured_per_rank"][0]
        d, e = r0["dense"], r0["experts"]
        worst = max(total_bytes(r) for r in s["measured_per_rank"])
        print(
            f"| {stage:>4} | {mib(d['weights']):>13} | {mib(d['gradients']):>11} | {mib(d['optimizer']):>11} | "
            f"{mib(d['buffers']):>13} | "
            f"{mib(e['weights']):>14} | {mib(e['gradients']):>12} | {mib(e['optimizer']):>12} | "
            f"{s['expert_optimizer_over_zero0']:>21.3f} | {mib(total_bytes(r0)):>10} | {mib(worst):>14} | "
            f"{'yes' if s['planned_equals_measured'] else 'NO':>9} |"
        )
    modes = ckpt["modes"]
    print(
        f"\nB. train.activation_checkpointing, default model, train.seq_len={args.seq_len}, micro-batch 8 "
        f"({ckpt['tokens_per_step']} tokens/step), 1 process, {args.threads} threads, fp32; "
        f"fp32 matmul peak {ckpt['matmul_peak_gflops']:.1f} GFLOP/s; median of {args.steps} steps"
    )
    head = (
        "| mode | peak MiB | peak / none | planner peak MiB | activations (planner) MiB | step s | time / none | MFU |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for m in MODES:
        r = modes[m]
        print(
            f"| {m:>4} | {mib(r['peak']):>8} | {r['peak_over_none']:>11.2f} | {mib(r['planned_peak']):>16} | "
            f"{mib(r['planned_activation_peak']):>25} | {r['median_step_s']:>6.2f} | {r['time_over_none']:>11.2f} | "
            f"{100 * r['mfu']:>2.1f}% |"
        )


def machine_info() -> dict:
    import deepspeed

    cpu_model = platform.processor()
    try:
        cpu_model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    machine = machine_info()
    print(
        f"{command}\nload average at start: {machine['load_average_at_start']}\n"
        f"A: ZeRO stages on {ZERO_WORLD} ranks...",
        flush=True,
    )
    zero = run_zero_stages()
    print("B: activation checkpointing...", flush=True)
    ckpt = run_checkpointing(args)
    print_tables(zero, ckpt, args)
    machine["load_average_at_end"] = os.getloadavg()
    print(f"\nload average at end: {machine['load_average_at_end']}")
    record = {
        "benchmark": "memory_cpu",
        "command": command,
        "date_utc": started.isoformat(timespec="seconds"),
        "wall_s": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "zero_stages": zero,
        "activation_checkpointing": ckpt,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {os.path.relpath(args.out, REPO)}")


if __name__ == "__main__":
    main()
