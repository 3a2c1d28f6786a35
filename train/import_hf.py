"""`python -m train.import_hf HF_DIR`: read a Hugging Face model directory (local files only) as a
Switchyard model, and print the overrides that start training from it:

    python -m train $(python -m train.import_hf HF_DIR)

They set `model.init_from=hf:HF_DIR`, every model/MoE setting the weights fix, and the directory's
tokenizer (`data.tokenizer.kind=file`). Supported: the classes train/hf/mapping.py maps exactly
(Llama, Qwen2, Arcee, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Glm4-MoE: grouped-query attention, q/k
norms, qkv biases and Llama-3's RoPE scaling included) with options Switchyard computes identically;
anything else (sliding windows, latent attention, other RoPE scalings, ...) is refused with one line.
"""

from __future__ import annotations

import shlex
import sys

from train.cli import run_tool, tool_parser
from train.hf.importing import load_hf_weights, training_overrides


def main(argv: list[str]) -> int:
    parser = tool_parser("python -m train.import_hf", __doc__)
    parser.add_argument(
        "hf_dir",
        metavar="HF_DIR",
        help="a transformers model directory (config.json, safetensors, "
        "tokenizer.json); the overrides for python -m train are printed",
    )
    args = parser.parse_args(argv)

    def print_overrides() -> None:
        model, _ = load_hf_weights(args.hf_dir)  # read everything once, so a broken file is found now
        print(" ".join(shlex.quote(o) for o in training_overrides(model)))

    return run_tool(print_overrides)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
