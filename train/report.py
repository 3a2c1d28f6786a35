"""`python -m train.report RUN_DIR`: PNG plots of a run from its metrics.jsonl, for people without
W&B — loss curves, load imbalance per MoE layer, and each layer's expert-load heatmap over time
(drawn by train/plots.py), written to RUN_DIR/plots/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from train.cli import run_tool, tool_parser
from train.plots import write_report


def main(argv: list[str]) -> int:
    parser = tool_parser("python -m train.report", __doc__)
    parser.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run directory with a metrics.jsonl (outputs/<run_name>); the plots go to RUN_DIR/plots/",
    )
    args = parser.parse_args(argv)

    def report() -> None:
        for path in write_report(Path(args.run_dir)):
            print(path)

    return run_tool(report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
