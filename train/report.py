"""`python -m train.report RUN_DIR`: PNG plots of a run from its metrics.jsonl, for people without
W&B — loss curves, load imbalance per MoE layer, and each layer's expert-load heatmap over time
(drawn by train/plots.py), written to RUN_DIR/plots/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from train.cli import run_tool
from train.plots import write_report


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m train.report RUN_DIR", file=sys.stderr)
        return 2
    def report() -> None:
        for path in write_report(Path(argv[0])):
            print(path)

    return run_tool(report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
