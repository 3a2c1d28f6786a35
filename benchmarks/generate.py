"""Greedy generation tokens/s on CPU: Switchyard's `generate_ids` with the KV cache and without it (the
oracle), and transformers' `generate()` (its own KV cache) on the same model, exported.

    python benchmarks/generate.py            # see benchmarks/README.md

One process, one torch thread. A random Qwen3-MoE-shaped model (grouped-query attention 8:2,
head_dim 64 != d_model / n_heads, per-head q/k norms, 16 experts top-4) is written with
train.export_hf.write_hf_model and loaded by transformers' AutoModelForCausalLM. Before timing, the
three must give the same greedy tokens (else the run stops). Then each generates `--new` tokens after a
`--prompt`-token prompt, the three interleaved round by round; tokens/s from the median round.
Prints a table and writes JSON to benchmarks/local/generate_cpu.json (untracked); --update-results writes the
committed benchmarks/results/generate_cpu.json.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import GPTConfig, ModelConfig, MoEConfig
from models.generate import generate_ids
from models.gpt import GPT
from train.data.tokenizer import Tokenizer
from train.hf.exporting import write_hf_model


def build(max_len: int) -> GPT:
    cfg = GPTConfig(
        ModelConfig(
            vocab_size=257,
            max_seq_len=max_len,
            n_layers=4,
            d_model=256,
            n_heads=8,
            n_kv_heads=2,
            head_dim=64,
            qk_norm="head",
            ffn_hidden=512,
        ),
        MoEConfig(num_experts=16, top_k=4, expert_ffn_hidden=128),
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate_ED"):
                p.normal_(0, 1.0)  # decisive routing, tokens spread over the experts
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out",
        default=None,
        help="the JSON record (default: benchmarks/local/generate_cpu.json, untracked; see --update-results)",
    )
    parser.add_argument(
        "--update-results", action="store_true", help="write benchmarks/results/generate_cpu.json, the committed record"
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = str(Path(__file__).parent / ("results" if args.update_results else "local") / "generate_cpu.json")
    import transformers

    torch.set_num_threads(1)
    model = build(args.prompt + args.new)
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_model(model.cfg, model.state_dict(), Tokenizer(), Path(tmp) / "hf")
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").eval()
    prompt = torch.randint(0, 256, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    def hf_generate(n: int) -> list[int]:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(prompt) :].tolist()

    peers = {
        "switchyard, KV cache": lambda n: generate_ids(model, prompt, n),
        "switchyard, no cache (oracle)": lambda n: generate_ids(model, prompt, n, use_cache=False),
        f"transformers {transformers.__version__} generate() ({type(hf_model).__name__})": hf_generate,
    }
    tokens = {name: run(args.new) for name, run in peers.items()}
    if len({tuple(t) for t in tokens.values()}) != 1:
        print("the peers disagree on the greedy tokens:", tokens, file=sys.stderr)
        return 1
    seconds = {name: [] for name in peers}
    for _ in range(args.rounds):
        for name, run in peers.items():
            start = time.perf_counter()
            run(args.new)
            seconds[name].append(time.perf_counter() - start)
    rates = {name: args.new / statistics.median(s) for name, s in seconds.items()}
    reference = rates["switchyard, KV cache"]
    print(f"greedy, prompt {args.prompt} tokens, {args.new} new, median of {args.rounds} rounds, 1 thread")
    print(f"{'peer':<60} {'tokens/s':>9} {'vs cache':>9}")
    for name, rate in rates.items():
        print(f"{name:<60} {rate:>9.1f} {rate / reference:>9.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "prompt": args.prompt,
                "new": args.new,
                "rounds": args.rounds,
                "seconds": seconds,
                "tokens_per_s": rates,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
