"""Balance-loss scope experiment (issue 12): the default model trained twice on 2 ranks with
parallel.ep=2 -- once with moe.aux_loss_scope=micro_batch, once with global_batch; same steps, seed,
data and layout -- then each run's validation loss, load imbalance (from metrics.jsonl) and
specialisation report (python -m train.specialization).

    python benchmarks/balance_scope.py [--reuse] [--skip-report] [-- extra overrides for both arms]

Runs land in outputs/<prefix>_<scope>/; the figures are printed as Markdown tables and written,
with the commands, machine load and timings, to benchmarks/local/balance_scope.json (untracked;
--update-results: the committed benchmarks/results/balance_scope.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCOPES = ("micro_batch", "global_batch")
LAST_STEPS = 100  # imbalance is averaged over the log windows of the run's last LAST_STEPS steps


def arm_overrides(scope: str, prefix: str, extra: list[str]) -> list[str]:
    # W&B and the progress bar off: they change no figure, and the machine is shared.
    return [
        "parallel.ep=2",
        f"moe.aux_loss_scope={scope}",
        f"run_name={prefix}_{scope}",
        "logging.wandb.mode=disabled",
        "logging.progress_bar=false",
        *extra,
    ]


def final_step(run_dir: Path) -> int | None:
    """The step of the run's latest complete checkpoint (None: none yet)."""
    metas = sorted((run_dir / "checkpoints").glob("step_*/meta.json"))
    return json.loads(metas[-1].read_text())["step"] if metas else None


def train_arm(scope: str, args) -> dict:
    run_dir = REPO / "outputs" / f"{args.prefix}_{scope}"
    command = ["launch/torchrun.sh", "2", *arm_overrides(scope, args.prefix, args.overrides)]
    record = {"scope": scope, "run_dir": str(run_dir.relative_to(REPO)), "command": " ".join(command)}
    if args.reuse and final_step(run_dir) is not None and (run_dir / "metrics.jsonl").is_file():
        record["trained"] = "reused"
        return record
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    record["load_average_before"] = os.getloadavg()
    start = time.perf_counter()
    with open(REPO / "outputs" / f"{args.prefix}_{scope}.log", "w") as log:
        done = subprocess.run(["bash", *command], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    record.update(trained="now", wall_seconds=round(time.perf_counter() - start, 1), load_average_after=os.getloadavg())
    if done.returncode != 0:
        sys.exit(f"{scope}: training failed with exit code {done.returncode}; see outputs/{args.prefix}_{scope}.log")
    return record


def report_arm(run_dir: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "train.specialization", str(run_dir)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"specialization report on {run_dir} failed: {done.stderr.strip()}")
    return json.loads((run_dir / "specialization" / "specialization.json").read_text())


def metrics_figures(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    windows = [r for r in records if "moe/layer0/imbalance_max_over_mean" in r]
    last_step = windows[-1]["step"]
    layers = sorted(
        int(k.split("/")[1].removeprefix("layer"))
        for k in windows[-1]
        if k.endswith("/imbalance_max_over_mean") and "/layer" in k
    )
    late = [r for r in windows if r["step"] > last_step - LAST_STEPS]

    def mean(values):
        return sum(values) / len(values)

    return {
        "val_loss": val,
        "final_val_loss": val[max(val)],
        "imbalance_last_steps_per_layer": [
            mean([r[f"moe/layer{layer}/imbalance_max_over_mean"] for r in late]) for layer in layers
        ],
        "imbalance_whole_run_per_layer": [
            mean([r[f"moe/layer{layer}/imbalance_max_over_mean"] for r in windows]) for layer in layers
        ],
        "aux_loss_last_steps_per_layer": [mean([r[f"moe/layer{layer}/aux_loss"] for r in late]) for layer in layers],
        "tokens_per_s": mean([r["perf/tokens_per_s"] for r in windows]),
    }


def markdown(results: dict) -> str:
    scopes = list(results)
    first = results[scopes[0]]
    layers = range(len(first["imbalance_last_steps_per_layer"]))
    steps = sorted(first["val_loss"], key=int)

    def mean(values):
        return sum(values) / len(values)

    lines = [
        "| moe.aux_loss_scope | "
        + " | ".join(f"val loss @{s}" for s in steps)
        + f" | max/mean load, last {LAST_STEPS} steps | max/mean load, whole run | JS between domains (bits) "
        "| JS within a domain (bits) |",
        "|---|" + "---|" * (len(steps) + 4),
    ]
    for scope, r in results.items():
        spec = r["specialization"]["layers"]
        lines.append(
            f"| {scope} | "
            + " | ".join(f"{r['val_loss'][s]:.4f}" for s in steps)
            + f" | {mean(r['imbalance_last_steps_per_layer']):.3f} | {mean(r['imbalance_whole_run_per_layer']):.3f}"
            + f" | {mean([layer['js_divergence'] for layer in spec]):.4f}"
            f" | {mean([layer['js_divergence_within_mean'] for layer in spec]):.4f} |"
        )
    lines += [
        "",
        "(load and JS: means over the MoE layers)",
        "",
        "| MoE layer | "
        + " | ".join(f"max/mean load ({s}) | JS between ({s}) | JS within ({s})" for s in scopes)
        + " |",
        "|---|" + "---|---|---|" * len(scopes),
    ]
    for layer in layers:
        cells = []
        for s in scopes:
            spec = results[s]["specialization"]["layers"][layer]
            cells.append(
                f"{results[s]['imbalance_last_steps_per_layer'][layer]:.3f} | {spec['js_divergence']:.4f} | "
                f"{spec['js_divergence_within_mean']:.4f}"
            )
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default="balance", help="run names are <prefix>_<scope>")
    parser.add_argument(
        "--reuse", action="store_true", help="skip training an arm whose run directory holds a checkpoint"
    )
    parser.add_argument("--skip-report", action="store_true", help="train only")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON record (default: benchmarks/local/balance_scope.json, untracked; see --update-results)",
    )
    parser.add_argument(
        "--update-results",
        action="store_true",
        help="write the committed record benchmarks/results/balance_scope.json instead",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both arms (after --)")
    args = parser.parse_args()
    if args.out is None:  # a trial run never overwrites the committed figures by accident
        args.out = REPO / "benchmarks" / ("results" if args.update_results else "local") / "balance_scope.json"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    arms = {scope: train_arm(scope, args) for scope in SCOPES}
    if args.skip_report:
        print(json.dumps(arms, indent=2))
        return 0
    results = {}
    for scope, arm in arms.items():
        run_dir = REPO / arm["run_dir"]
        results[scope] = {**arm, **metrics_figures(run_dir), "specialization": report_arm(run_dir)}
    table = markdown(results)
    print(table)
    record = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": results,
        "tables": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
