"""`python -m train.export_hf RUN_DIR OUT_DIR [--step N] [--max-shard-mb M]`: a run's model as a
Hugging Face directory that `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` and
`AutoTokenizer.from_pretrained(OUT_DIR)` load with no extra code, computing the same logits.

It holds config.json, generation_config.json, the weights as safetensors (sharded above
--max-shard-mb, with model.safetensors.index.json) and the run's tokenizer. Which transformers
class is chosen, and why it is exact, is in train/hf/mapping.py; a model without an exact
counterpart is refused with one line naming the setting. Everything is written into a temporary
sibling directory that is renamed to OUT_DIR at the end: after a failure OUT_DIR does not exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

from train.cli import run_tool, tool_parser
from train.hf.exporting import DEFAULT_MAX_SHARD_BYTES, export_hf


def main(argv: list[str]) -> int:
    parser = tool_parser("python -m train.export_hf", __doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with a checkpoint (outputs/<run_name>)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the directory to create (must not exist, or be empty)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--max-shard-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e6, help="largest safetensors file (MB)"
    )
    args = parser.parse_args(argv)

    def export() -> None:
        model_type = export_hf(args.run_dir, args.out_dir, args.step, int(args.max_shard_mb * 1e6))
        print(f"switchyard: exported {args.run_dir} as {model_type} to {Path(args.out_dir).resolve()}")

    return run_tool(export)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
