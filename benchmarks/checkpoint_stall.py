"""How long a checkpoint save stops training: synchronous save vs train.async_save, side by side.

    python benchmarks/checkpoint_stall.py            # see benchmarks/README.md

One process on CPU, the default model (conf/model/small.yaml + conf/moe/default.yaml), ZeRO-0,
fp32, set up as the job does (train.setup). Rounds alternate the two ways of saving; each round
trains a few steps, then saves the same kind of checkpoint:
- sync: the stall is the whole `CheckpointManager.save` call (write, CRCs, publish);
- async: the stall is the `save` call (staging the state in host memory, starting the writer
  thread) plus, once the write is done, `finish_background` (CRCs, publish); the steps trained
  while the thread writes are timed too, to show what the writing costs them.
Prints a table and writes JSON to benchmarks/local/checkpoint_stall_cpu.json (untracked);
--update-results writes benchmarks/results/checkpoint_stall_cpu.json, the committed record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="saves of each kind")
    parser.add_argument(
        "--out", default=None, help="the JSON record (default: benchmarks/local/checkpoint_stall_cpu.json, untracked)"
    )
    parser.add_argument(
        "--update-results",
        action="store_true",
        help="write benchmarks/results/checkpoint_stall_cpu.json, the committed record",
    )
    args = parser.parse_args()
    if args.out is None:
        folder = REPO / "benchmarks" / ("results" if args.update_results else "local")
        args.out = str(folder / "checkpoint_stall_cpu.json")
        Path(args.out).parent.mkdir(exist_ok=True)

    import torch

    from train.check import compose_job
    from train.data import BatchSampler
    from train.logging import quiet_third_party_logs
    from train.loop import run_step
    from train.metrics import MoEWindow
    from train.setup import setup

    torch.set_num_threads(1)
    quiet_third_party_logs()
    workdir = Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    job = compose_job(
        [
            "logging.wandb.mode=disabled",
            "logging.progress_bar=false",
            "data.tokenizer.kind=bytes",
            f"hydra.run.dir={workdir}/run",
            "train.keep_checkpoints=2",
        ]
    )
    job.run_dir = str(workdir / "run")
    run = setup(job)
    t = job.train
    sampler = BatchSampler(run.data.train, t.seq_len, t.micro_batch, 1, 0, t.grad_accum, t.seed)
    window = MoEWindow(len(run.model.moe_layers()), job.moe.num_experts)
    step = 0

    def train_one() -> float:
        nonlocal step
        start = time.perf_counter()
        run_step(run, sampler, step, window)
        step += 1
        return time.perf_counter() - start

    for _ in range(2):
        train_one()  # warm-up
    rows = {"sync": [], "async": []}
    steps_alone, steps_while_writing = [], []
    for _ in range(args.rounds):
        for mode in ("sync", "async"):
            steps_alone += [train_one() for _ in range(2)]
            start = time.perf_counter()
            run.checkpoints.save(run.trainer, step, background=mode == "async")
            stall = time.perf_counter() - start
            if mode == "async":
                while run.checkpoints.background_write_running():
                    steps_while_writing.append(train_one())
                start = time.perf_counter()
                run.checkpoints.finish_background()
                stall += time.perf_counter() - start
            rows[mode].append(stall)
    size = sum(p.stat().st_size for p in (run.checkpoints.latest()).iterdir())
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, torch {torch.__version__}, 1 process, 1 thread, CPU",
        "checkpoint_bytes": size,
        "stall_s": {mode: {"median": statistics.median(v), "all": v} for mode, v in rows.items()},
        "async_over_sync": statistics.median(rows["async"]) / statistics.median(rows["sync"]),
        "step_s_median": statistics.median(steps_alone),
        "step_s_while_writing_median": statistics.median(steps_while_writing) if steps_while_writing else None,
        "steps_while_writing": len(steps_while_writing),
    }
    print(f"checkpoint: {size / 1e6:.1f} MB; a training step alone: {result['step_s_median'] * 1e3:.0f} ms")
    print("| save | stall per save (median) | all |")
    print("|---|---|---|")
    for mode, v in rows.items():
        print(f"| {mode} | {statistics.median(v) * 1e3:.0f} ms | {', '.join(f'{x * 1e3:.0f}' for x in v)} |")
    print(
        f"async / sync stall: {result['async_over_sync']:.2f}; "
        f"{len(steps_while_writing)} step(s) trained while writing, "
        f"median {result['step_s_while_writing_median'] and result['step_s_while_writing_median'] * 1e3:.0f} ms"
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    run.lock.release()


if __name__ == "__main__":
    main()
