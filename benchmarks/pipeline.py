"""Pipeline parallelism on CPU: the bubble against the schedule's theoretical fraction, and tokens/s
of pp=2 x ep=2 against dp=2 x ep=2, each part's peers side by side in one run.

    python benchmarks/pipeline.py [--rounds 6] [--grad-accums 2 4 8]     # see benchmarks/README.md

A. The bubble. 2 ranks over gloo (parallel/local_launch.py: torchrun's variables, 1 torch thread
   each, so the 2 ranks fit the 2 cores), parallel.pp=2, ep=1. Every rank builds one trainer per
   arm as the job does (parallel.parallelize -> parallelize_pipeline): gpipe and 1f1b at each
   train.grad_accum n, and interleaved_1f1b (parallel.stages_per_rank=2: 4 stages, rank 0 holds
   stages 0 and 2). The arms take one training step each in turn (train/loop.py: run_step, as
   the job runs it; one untimed round first), so a change of load on the shared machine hits
   them alike. Each rank records the wall-clock interval of every stage forward (the engine call
   torch's PipelineStage makes), of the last stage's loss and of every stage backward
   (PipelineRunner.backward); the schedule's time is the wall clock of PipelineRunner.train_step
   (torch's schedule.step: every forward, backward and send/receive of the step; not the
   optimizer step). Measured bubble of a rank = 1 - busy / schedule time, summed over the timed
   steps; the table gives the mean of the 2 ranks. Beside it:
     * theory: (pp-1)/(n+pp-1) for GPipe and 1F1B, (pp-1)/(v*n+pp-1) for interleaved 1F1B with v
       stages per rank (Narayanan et al. 2021, arXiv 2104.04473, sec. 2.2: bubble time
       (p-1)/v of a micro-batch's forward+backward, against n of them; torch's looped placement
       and its rounds of pp micro-batches per stage are that paper's schedule when pp divides n),
       idle time as a fraction of the schedule's whole time, equal stages, no communication;
     * simulated: each rank's recorded order of operations replayed with each (stage, kind)'s
       median measured duration and no communication cost (`simulate`): what the schedule
       would give with these stages' real (unequal) costs. measured - simulated is what the
       machine adds: sends and receives over gloo, the schedule's own Python, scheduling noise.
B. Throughput. 4 ranks on the 2 cores (oversubscribed: 2 processes a core), parallel.ep=2 in both
   arms, the same model and global batch (train.seq_len x micro_batch x grad_accum x data-parallel
   ranks): pp=2 x ep=2 (1F1B, each stage's 2 ranks an expert-parallel group) against dp=2 x ep=2
   (pp=1: 4 data-parallel ranks, experts on 2). Both trainers live in the same 4 processes and
   take steps in turn, each between two barriers. Reported: tokens per second of wall clock
   (rank 0 between the barriers) and tokens per CPU-second (the 4 processes' CPU time summed,
   gloo's threads included): with 4 processes on 2 cores the wall clock also counts the time a
   rank waits for a core, so the CPU figure is the fairer measure of the work done.
B2. The same pair on 2 ranks (a core each, ep=1): pp=2 against dp=2, where the bubble is idle time
   of a core, as it would be of a GPU.

Model (both parts): model=tiny widened to 4 blocks of d_model 128 (4 heads), 4 experts top-2 of
width 128, the byte vocabulary (256, tied embeddings), train.seq_len 256 (the default), micro-batch 4, fp32,
ZeRO-0, moe.aux_loss_scope=micro_batch (the global_batch scope's extra routing pass is measured by
balance_cost.py and would blur the schedule here), random tokens.

Prints the tables and writes JSON to benchmarks/local/pipeline_cpu.json (untracked); --update-results
writes the committed benchmarks/results/pipeline_cpu.json. Do not start it under torchrun: it starts
its own ranks.
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

from parallel.local_launch import run_local_ranks  # noqa: E402

MODEL = [
    "model=tiny",
    "model.n_layers=4",
    "model.d_model=128",
    "model.n_heads=4",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.expert_ffn_hidden=128",
    "moe.aux_loss_scope=micro_batch",
    "deepspeed.zero_stage=0",
    "train.dtype=fp32",
    "train.device=cpu",
    "logging.wandb.mode=disabled",
]
VOCAB = 256
PP = 2


# -- pure helpers (tests/test_pipeline_benchmark.py) ---------------------------------------------


def theoretical_bubble(schedule: str, pp: int, n_micro: int, stages_per_rank: int = 1) -> float:
    """Idle fraction of a rank's schedule time with equal stages and free communication:
    (pp-1)/(n+pp-1) for gpipe and 1f1b, (pp-1)/(v*n+pp-1) for interleaved_1f1b (v stages per rank)."""
    v = stages_per_rank if schedule == "interleaved_1f1b" else 1
    return (pp - 1) / (v * n_micro + pp - 1)


Op = tuple[str, int, int]  # (kind "F" | "L" | "B", stage, micro-batch); "L": the last stage's loss


def label_ops(events: list[tuple[str, int]]) -> list[Op]:
    """A rank's (kind, stage) events in the order it ran them -> (kind, stage, micro-batch). Every
    schedule here runs each stage's forwards, and its backwards, in micro-batch order."""
    seen: dict[tuple[str, int], int] = {}
    out = []
    for kind, stage in events:
        index = seen.get((kind, stage), 0)
        seen[(kind, stage)] = index + 1
        out.append((kind, stage, index))
    return out


def dependencies(op: Op, num_stages: int, has_loss: bool) -> list[Op]:
    kind, stage, mb = op
    if kind == "F":
        return [("F", stage - 1, mb)] if stage > 0 else []
    if kind == "L":
        return [("F", stage, mb)]
    if stage == num_stages - 1:
        return [("L", stage, mb)] if has_loss else [("F", stage, mb)]
    return [("F", stage, mb), ("B", stage + 1, mb)]


def simulate(orders: dict[int, list[Op]], duration: dict[tuple[str, int], float], num_stages: int):
    """Replay each rank's operations in its order, each starting when the rank is free and its
    inputs are ready (no communication cost). Returns (makespan, {rank: busy time})."""
    has_loss = any(kind == "L" for ops in orders.values() for kind, _, _ in ops)
    end: dict[Op, float] = {}
    free = {rank: 0.0 for rank in orders}
    position = {rank: 0 for rank in orders}
    busy = {rank: 0.0 for rank in orders}
    remaining = sum(len(ops) for ops in orders.values())
    while remaining:
        progressed = False
        for rank, ops in orders.items():
            while position[rank] < len(ops):
                op = ops[position[rank]]
                deps = dependencies(op, num_stages, has_loss)
                if any(d not in end for d in deps):
                    break
                start = max([free[rank], *(end[d] for d in deps)])
                took = duration[(op[0], op[1])]
                end[op] = free[rank] = start + took
                busy[rank] += took
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"the recorded orders deadlock: {[ops[position[r]] for r, ops in orders.items()]}")
    return max(free.values()), busy


def equal_costs(num_stages: int) -> dict[tuple[str, int], float]:
    """Equal stages, a backward twice a forward, a free loss: the theory's assumptions."""
    costs = {(kind, s): cost for s in range(num_stages) for kind, cost in (("F", 1.0), ("B", 2.0))}
    return {**costs, ("L", num_stages - 1): 0.0}


def idle_fraction(makespan: float, busy: dict[int, float]) -> float:
    """Mean over ranks of 1 - busy / makespan."""
    return statistics.fmean(1 - b / makespan for b in busy.values())


# -- building a trainer as the job does -----------------------------------------------------------


def compose(overrides: list[str]):
    from train.cli import compose_job

    job = compose_job([*MODEL, *overrides])
    job.model.vocab_size = VOCAB  # what the job sets from the byte tokenizer
    return job


class NoCheckpoints:
    """What run_step asks of the checkpoint manager (no saves in a benchmark)."""

    def background_write_running(self) -> bool:
        return False


def build_run(job, tokens):
    """(Run, BatchSampler, MoEWindow) of one arm, on the process group already set up."""
    from models.gpt import GPT
    from parallel.dims import init_parallel
    from parallel.parallelize import parallelize
    from train.data.sampler import BatchSampler
    from train.metrics import MoEWindow
    from train.setup import Run

    p, t = job.parallel, job.train
    dims = init_parallel(p.ep, job.moe.num_experts, torch.device("cpu"), pp=p.pp)
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    trainer = parallelize(model, dims, job)
    run = Run(job, dims, None, None, trainer, NoCheckpoints(), 0, 0.0, None)
    sampler = BatchSampler(tokens, t.seq_len, t.micro_batch, dims.dp, dims.dp_rank, t.grad_accum, t.seed)
    window = MoEWindow(run.num_moe_layers, job.moe.num_experts, dims.device)
    return run, sampler, window


def random_tokens():
    import numpy as np

    return np.random.default_rng(0).integers(0, VOCAB, size=400_000).astype(np.int64)


# -- A: the bubble --------------------------------------------------------------------------------


class StageClock:
    """Records the wall-clock interval of every stage forward, loss and backward of one runner, and
    of its schedule (train_step, entered by both ranks together: a barrier before the clock starts,
    so the step's window is the same on every rank, as in the theory)."""

    def __init__(self, runner):
        import torch.distributed as dist

        # (kind, stage, start, end, this thread's CPU seconds): wall intervals for the bubble; the CPU
        # time is the operation's own cost, which other jobs on a shared machine do not stretch.
        self.events: list[tuple[str, int, float, float, float]] = []
        self.schedule: tuple[float, float] = (0.0, 0.0)  # train_step's (start, end), time.perf_counter
        self.schedule_cpu_s = 0.0  # this process's CPU time in train_step (its threads included)
        for stage in runner.stages:
            stage.submod.forward = self.timed(stage.submod.forward, "F", stage.stage_index)
        last = runner.num_stages - 1
        runner.schedule._loss_fn = self.timed(runner.schedule._loss_fn, "L", last)
        backward = runner.backward
        runner.backward = lambda stage, *args: self.timed(backward, "B", stage)(stage, *args)
        train_step = runner.train_step

        def timed_train_step(*args):
            dist.barrier(group=runner.dims.pp_group)
            start, cpu = time.perf_counter(), time.process_time()
            out = train_step(*args)
            self.schedule = (start, time.perf_counter())
            self.schedule_cpu_s = time.process_time() - cpu
            return out

        runner.train_step = timed_train_step

    def timed(self, fn, kind: str, stage: int):
        def call(*args):
            start, cpu = time.perf_counter(), time.thread_time()
            out = fn(*args)
            self.events.append((kind, stage, start, time.perf_counter(), time.thread_time() - cpu))
            return out

        return call

    def reset(self) -> None:
        self.events = []


def bubble_arms(grad_accums: list[int]) -> list[dict]:
    arms = []
    for schedule in ("gpipe", "1f1b"):
        arms += [{"schedule": schedule, "stages_per_rank": 1, "grad_accum": n} for n in grad_accums]
    arms += [{"schedule": "interleaved_1f1b", "stages_per_rank": 2, "grad_accum": n} for n in grad_accums]
    return arms


def bubble_worker(rank: int, world_size: int, out_dir: str, arms: list[dict], rounds: int, micro_batch: int) -> None:
    from train.loop import run_step

    tokens = random_tokens()
    built = []
    for arm in arms:
        job = compose(
            [
                f"parallel.pp={PP}",
                f"parallel.schedule={arm['schedule']}",
                f"parallel.stages_per_rank={arm['stages_per_rank']}",
                f"train.grad_accum={arm['grad_accum']}",
                f"train.micro_batch={micro_batch}",
            ]
        )
        run, sampler, window = build_run(job, tokens)
        built.append((run, sampler, window, StageClock(run.trainer.pipeline)))
    steps = [[] for _ in arms]
    for round_index in range(rounds + 1):
        for i, (run, sampler, window, clock) in enumerate(built):
            clock.reset()
            result = run_step(run, sampler, round_index, window)
            assert result.applied
            if round_index == 0:
                continue
            busy = sum(end - start for _, _, start, end, _ in clock.events)
            steps[i].append(
                {
                    "schedule": clock.schedule,
                    "busy_s": busy,
                    "schedule_cpu_s": clock.schedule_cpu_s,
                    "events": [(k, s, end - start, cpu) for k, s, start, end, cpu in clock.events],
                }
            )
    Path(out_dir, f"bubble{rank}.json").write_text(json.dumps(steps))


def summarize_bubble(arms: list[dict], per_rank: list[list[list[dict]]]) -> list[dict]:
    rows = []
    for i, arm in enumerate(arms):
        num_stages = PP * arm["stages_per_rank"]
        # Each step's window: from the first rank's start to the last rank's end (one machine: one
        # monotonic clock for all processes), so a rank's idle tail after its last backward counts.
        windows = [
            max(steps[i][k]["schedule"][1] for steps in per_rank)
            - min(steps[i][k]["schedule"][0] for steps in per_rank)
            for k in range(len(per_rank[0][i]))
        ]
        measured, orders, durations, cpu_durations, cpu_over_busy, cpu_over_window = [], {}, {}, {}, [], []
        per_step = [  # the measured bubble of each step, mean of the ranks (its spread: the noise)
            statistics.fmean(1 - steps[i][k]["busy_s"] / windows[k] for steps in per_rank) for k in range(len(windows))
        ]
        for rank, steps in enumerate(per_rank):
            runs = steps[i]
            measured.append(1 - sum(s["busy_s"] for s in runs) / sum(windows))
            cpu_s = sum(s["schedule_cpu_s"] for s in runs)
            cpu_over_busy.append(cpu_s / sum(s["busy_s"] for s in runs))
            cpu_over_window.append(cpu_s / sum(windows))
            orders[rank] = label_ops([(k, s) for k, s, _, _ in runs[-1]["events"]])
            for step in runs:
                for kind, stage, took, cpu in step["events"]:
                    durations.setdefault((kind, stage), []).append(took)
                    cpu_durations.setdefault((kind, stage), []).append(cpu)
        median = {key: statistics.median(values) for key, values in durations.items()}
        median_cpu = {key: statistics.median(values) for key, values in cpu_durations.items()}
        rows.append(
            {
                **arm,
                "theory": theoretical_bubble(arm["schedule"], PP, arm["grad_accum"], arm["stages_per_rank"]),
                # torch's recorded order with equal stages (F 1, B 2, loss 0): the schedule's own fraction
                "replayed_equal": idle_fraction(*simulate(orders, equal_costs(num_stages), num_stages)),
                "simulated_cpu": idle_fraction(*simulate(orders, median_cpu, num_stages)),
                "simulated_wall": idle_fraction(*simulate(orders, median, num_stages)),
                "measured": statistics.fmean(measured),
                "measured_per_rank": measured,
                "measured_per_step": per_step,
                "schedule_ms_median": statistics.median(windows) * 1e3,
                # the last timed step's operations on each rank, in order: [kind, stage, micro-batch, wall ms, CPU ms]
                "last_step_ops": {
                    rank: [
                        [*op, round(1e3 * took, 2), round(1e3 * cpu, 2)]
                        for op, (_, _, took, cpu) in zip(orders[rank], steps[i][-1]["events"])
                    ]
                    for rank, steps in enumerate(per_rank)
                },
                "op_wall_ms_median": {
                    f"{kind}{stage}": round(1e3 * v, 3) for (kind, stage), v in sorted(median.items())
                },
                "op_cpu_ms_median": {f"{k}{s}": round(1e3 * v, 3) for (k, s), v in sorted(median_cpu.items())},
                # CPU time of the schedule over its busy and its whole wall time, per rank: ~1 and
                # ~(1 - bubble) when waiting costs no CPU and no other job takes the core.
                "schedule_cpu_over_busy": cpu_over_busy,
                "schedule_cpu_over_window": cpu_over_window,
            }
        )
    return rows


# -- B: throughput, pp=2 x ep=2 against dp=2 x ep=2 ------------------------------------------------


def throughput_arms(micro_batch: int, pp_grad_accum: int, ep: int) -> dict[str, list[str]]:
    """pp=2 (1F1B) against pp=1 on the same ranks, the same global batch (micro_batch x grad_accum x
    world / pp sequences: the pp=1 arm takes half the micro-batches on twice the data-parallel ranks)."""
    suffix = f" x ep={ep}" if ep > 1 else ""
    common = [f"parallel.ep={ep}", f"train.micro_batch={micro_batch}"]
    return {
        f"pp=2{suffix} (1f1b)": [
            *common,
            "parallel.pp=2",
            "parallel.schedule=1f1b",
            f"train.grad_accum={pp_grad_accum}",
        ],
        f"dp=2{suffix}": [*common, f"train.grad_accum={pp_grad_accum // 2}"],
    }


def throughput_worker(rank: int, world_size: int, out_dir: str, arms: dict, rounds: int) -> None:
    import torch.distributed as dist

    from train.loop import run_step

    tokens = random_tokens()
    built = {name: build_run(compose(overrides), tokens) for name, overrides in arms.items()}
    record = {name: [] for name in arms}
    for round_index in range(rounds + 1):
        for name, (run, sampler, window) in built.items():
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            result = run_step(run, sampler, round_index, window)
            dist.barrier()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            assert result.applied
            t = run.job.train
            global_tokens = t.seq_len * t.micro_batch * t.grad_accum * run.dims.dp
            if round_index > 0:
                record[name].append({"wall_s": wall, "cpu_s": cpu, "global_tokens": global_tokens})
    Path(out_dir, f"throughput{rank}.json").write_text(json.dumps(record))


def summarize_throughput(arms: dict, per_rank: list[dict]) -> list[dict]:
    rows = []
    for name in arms:
        steps = per_rank[0][name]
        tokens = steps[0]["global_tokens"]
        walls = [s["wall_s"] for s in steps]
        cpu_per_step = [sum(r[name][k]["cpu_s"] for r in per_rank) for k in range(len(steps))]
        rows.append(
            {
                "arm": name,
                "global_tokens_per_step": tokens,
                "median_step_wall_s": statistics.median(walls),
                "min_step_wall_s": min(walls),
                "tokens_per_wall_s": tokens / statistics.median(walls),
                "cpu_s_per_step_all_ranks": statistics.median(cpu_per_step),
                "tokens_per_cpu_s": tokens / statistics.median(cpu_per_step),
                "walls_s": walls,
                "cpu_s_per_step": cpu_per_step,
            }
        )
    base = rows[-1]
    for row in rows:
        row["wall_ratio_vs_dp"] = row["tokens_per_wall_s"] / base["tokens_per_wall_s"]
        row["cpu_ratio_vs_dp"] = row["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
    return rows


# -- the run ------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (each arm one step a round), after one untimed")
    p.add_argument("--grad-accums", type=int, nargs="+", default=[2, 4, 8], help="A: train.grad_accum values")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--pp-grad-accum", type=int, default=4, help="B: train.grad_accum of the pp arm (dp arm: half)")
    p.add_argument(
        "--out", type=Path, default=None, help="the JSON record (default: benchmarks/local/pipeline_cpu.json)"
    )
    p.add_argument(
        "--update-results", action="store_true", help="write the committed benchmarks/results/pipeline_cpu.json"
    )
    args = p.parse_args(argv)
    if args.out is None:  # a trial run never overwrites the committed figures by accident
        args.out = REPO / "benchmarks" / ("results" if args.update_results else "local") / "pipeline_cpu.json"
    return args


def print_tables(bubble: list[dict], throughput: list[dict], throughput_2: list[dict]) -> None:
    print("\nA. Pipeline bubble, pp=2, 2 ranks x 1 thread, gloo (idle fraction of the schedule's time, mean of ranks)")
    print(
        "| schedule | stages/rank | micro-batches n | theory | torch's order, equal stages | simulated, op CPU times "
        "| simulated, op wall times | measured | measured, range over steps | schedule ms (median) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in bubble:
        print(
            f"| {r['schedule']} | {r['stages_per_rank']} | {r['grad_accum']} | {r['theory']:.3f} "
            f"| {r['replayed_equal']:.3f} | {r['simulated_cpu']:.3f} | {r['simulated_wall']:.3f} "
            f"| **{r['measured']:.3f}** "
            f"| {min(r['measured_per_step']):.3f} to {max(r['measured_per_step']):.3f} "
            f"| {r['schedule_ms_median']:.0f} |"
        )
    for title, rows in (
        ("B. Throughput, 4 ranks on 2 cores (2 processes a core), same model and global batch", throughput),
        ("B2. Throughput, 2 ranks on 2 cores (a core each), same model and global batch", throughput_2),
    ):
        print(f"\n{title}")
        print("| layout | tokens/step | tokens per wall-s | vs dp | tokens per CPU-s (all ranks) | vs dp |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['arm']} | {r['global_tokens_per_step']} | {r['tokens_per_wall_s']:.0f} "
                f"| {r['wall_ratio_vs_dp']:.2f} | {r['tokens_per_cpu_s']:.0f} | {r['cpu_ratio_vs_dp']:.2f} |"
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    print(f"{command}\nload average at start: {load_start}", flush=True)
    arms_a = bubble_arms(args.grad_accums)
    arms_b = throughput_arms(args.micro_batch, args.pp_grad_accum, ep=2)
    arms_c = throughput_arms(args.micro_batch, args.pp_grad_accum, ep=1)
    with tempfile.TemporaryDirectory() as tmp:
        loads = {"start": load_start}
        print("A: the bubble, 2 ranks...", flush=True)
        run_local_ranks(2, bubble_worker, tmp, arms_a, args.rounds, args.micro_batch)
        per_rank_a = [json.loads(Path(tmp, f"bubble{r}.json").read_text()) for r in range(2)]
        loads["after A"] = os.getloadavg()
        print("B: throughput, 4 ranks...", flush=True)
        run_local_ranks(4, throughput_worker, tmp, arms_b, args.rounds)
        per_rank_b = [json.loads(Path(tmp, f"throughput{r}.json").read_text()) for r in range(4)]
        loads["after B"] = os.getloadavg()
        print("B2: throughput, 2 ranks...", flush=True)
        run_local_ranks(2, throughput_worker, tmp, arms_c, args.rounds)
        per_rank_c = [json.loads(Path(tmp, f"throughput{r}.json").read_text()) for r in range(2)]
    bubble = summarize_bubble(arms_a, per_rank_a)
    throughput = summarize_throughput(arms_b, per_rank_b)
    throughput_2 = summarize_throughput(arms_c, per_rank_c)
    print_tables(bubble, throughput, throughput_2)
    load_end = os.getloadavg()
    wall = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    print(f"\nload average at end: {load_end}; {wall:.0f} s")
    record = {
        "benchmark": "pipeline_cpu",
        "command": command,
        "date_utc": started.isoformat(timespec="seconds"),
        "wall_s": round(wall, 1),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_at_start": load_start,
            "load_average_at_end": load_end,
            "load_average_after_each_part": loads,
        },
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "model": MODEL},
        "bubble": bubble,
        "throughput": throughput,
        "throughput_2_ranks": throughput_2,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {os.path.relpath(args.out, REPO)}")


if __name__ == "__main__":
    main()
