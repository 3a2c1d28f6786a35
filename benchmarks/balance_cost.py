"""What each balance-loss scope costs: tokens/s of the training step (train/loop.py: run_step, as the
job runs it) at train.grad_accum 1 and 4 for each moe.aux_loss_scope, side by side in one run.

    python benchmarks/balance_cost.py [--rounds 6] [--micro-batch 2] [--seq-len 128]

One process, ZeRO-0, fp32, 1 torch thread, the default model (4 blocks, d_model 256, 8 experts top-2,
vocabulary 8192) on random tokens. One trainer per arm, built alike from the same seed; the arms take
their steps in turn (round robin, the first round untimed), so a load change on a shared machine hits
all of them alike. Reported: each arm's tokens per CPU-second of the process (and per wall-clock second) and its ratio
to micro_batch at the same grad_accum. One more arm runs global_batch at grad_accum 4 with the
routing-only pass computing the output head as well, as it did before it stopped after the blocks.
Writes JSON to benchmarks/local/balance_cost_cpu.json (untracked); --update-results writes the committed
benchmarks/results/balance_cost_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.gpt import GPT  # noqa: E402
from parallel.dims import init_parallel  # noqa: E402
from parallel.parallelize import parallelize  # noqa: E402
from train.config import JobConfig  # noqa: E402
from train.data import BatchSampler  # noqa: E402
from train.loop import run_step  # noqa: E402
from train.metrics import MoEWindow  # noqa: E402
from train.setup import Run  # noqa: E402

SCOPES = ("micro_batch", "sequence", "global_batch")
GRAD_ACCUMS = (1, 4)
# global_batch as it was before the routing-only pass dropped the output head (for the ratio).
WITH_HEAD = "global_batch, counting pass with head"


def build_arm(arm: str, grad_accum: int, args, tokens: np.ndarray, dims):
    job = JobConfig()
    job.moe.aux_loss_scope = "global_batch" if arm == WITH_HEAD else arm
    job.train.grad_accum, job.train.micro_batch, job.train.seq_len = grad_accum, args.micro_batch, args.seq_len
    job.model.max_seq_len = args.seq_len
    with torch.device("meta"):
        model = GPT(job.gpt_config())
    trainer = parallelize(model, dims, job)
    if arm == WITH_HEAD:
        full_forward = trainer.forward
        trainer.forward = lambda idx_BS, logits=True: full_forward(idx_BS, logits=True)
    no_checkpoints = types.SimpleNamespace(background_write_running=lambda: False)  # what run_step asks of it
    run = Run(job, dims, None, None, trainer, no_checkpoints, 0, 0.0, None)
    sampler = BatchSampler(tokens, args.seq_len, args.micro_batch, 1, 0, grad_accum, job.train.seed)
    window = MoEWindow(len(trainer.module.moe_layers()), job.moe.num_experts)
    return run, sampler, window


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=6, help="timed rounds (each arm one step per round), after one untimed"
    )
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON record (default: benchmarks/local/balance_cost_cpu.json, untracked)",
    )
    parser.add_argument(
        "--update-results",
        action="store_true",
        help="write the committed record benchmarks/results/balance_cost_cpu.json instead",
    )
    args = parser.parse_args(argv)
    if args.out is None:  # a trial run never overwrites the committed figures by accident
        args.out = REPO / "benchmarks" / ("results" if args.update_results else "local") / "balance_cost_cpu.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    dims = init_parallel(ep=1, num_experts=8, device=torch.device("cpu"))
    tokens = np.random.default_rng(0).integers(0, 8192, size=200_000).astype(np.int64)
    keys = [(scope, accum) for accum in GRAD_ACCUMS for scope in SCOPES] + [(WITH_HEAD, 4)]
    arms = {key: build_arm(*key, args, tokens, dims) for key in keys}
    # CPU seconds of this (single-threaded) process: other jobs on a shared machine stretch the wall
    # clock, not these; wall seconds are recorded beside them.
    seconds, wall = {key: 0.0 for key in arms}, {key: 0.0 for key in arms}
    load_before = os.getloadavg()
    for round_index in range(args.rounds + 1):
        for key, (run, sampler, window) in arms.items():
            start, start_wall = time.process_time(), time.perf_counter()
            result = run_step(run, sampler, round_index, window)
            elapsed, elapsed_wall = time.process_time() - start, time.perf_counter() - start_wall
            assert result.applied
            if round_index > 0:
                seconds[key] += elapsed
                wall[key] += elapsed_wall
    rows = []
    for (scope, accum), total in seconds.items():
        tokens = args.rounds * accum * args.micro_batch * args.seq_len
        rows.append(
            {
                "aux_loss_scope": scope,
                "grad_accum": accum,
                "tokens_per_s": round(tokens / total, 1),
                "tokens_per_wall_s": round(tokens / wall[(scope, accum)], 1),
            }
        )
    for row in rows:
        base = next(r for r in rows if r["grad_accum"] == row["grad_accum"] and r["aux_loss_scope"] == "micro_batch")
        row["vs_micro_batch"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
        row["vs_micro_batch_wall"] = round(row["tokens_per_wall_s"] / base["tokens_per_wall_s"], 3)
    print(
        "| `train.grad_accum` | `moe.aux_loss_scope` | tokens per CPU-second | vs micro_batch "
        "| (wall clock: vs micro_batch) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['grad_accum']} | {row['aux_loss_scope']} | {row['tokens_per_s']:.0f} "
            f"| {row['vs_micro_batch']:.3f} | {row['vs_micro_batch_wall']:.3f} |"
        )
    record = {
        "command": "python benchmarks/balance_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
