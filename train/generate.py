"""`python -m train.generate RUN_DIR --prompt "..."`: print a continuation of the prompt by a run's
model (latest checkpoint, or --step N), sampled with --temperature and --top-k (temperature 0 is
greedy), at most --max-new-tokens tokens, stopping at end-of-text.

The sampling itself is models/generate.py's, which the training loop also calls at each evaluation.
"""

from __future__ import annotations

import sys

from models.generate import generate
from train.cli import run_tool, tool_parser


def main(argv: list[str]) -> int:
    parser = tool_parser("python -m train.generate", __doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with a checkpoint (outputs/<run_name>)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="at most this many new tokens")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling: the same seed gives the same text")
    args = parser.parse_args(argv)
    from train.checkpoint.run_weights import load_run_weights

    def sample() -> None:
        weights = load_run_weights(args.run_dir, args.step)
        model = weights.build_model()
        text = generate(
            model, weights.tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed
        )
        print(args.prompt + text)

    return run_tool(sample)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
