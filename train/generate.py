"""`python -m train.generate RUN_DIR --prompt "..."`: print a continuation of the prompt by a run's
model (latest checkpoint, or --step N), sampled with --temperature and --top-k (temperature 0 is
greedy), at most --max-new-tokens tokens, stopping at end-of-text.

`generate(model, tokenizer, prompt, ...)` is the same thing on a live model; the training loop can
call it at each evaluation to log a short sample. Under expert parallelism or ZeRO-3 the forward
pass is collective: call it on every rank with the same arguments (the same seed gives the same
tokens everywhere) and print on one.

No KV cache: every new token reruns the whole context (at most model.max_seq_len tokens, the
oldest dropped), which is the obviously-correct path and fast enough for samples.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the module stays light: ranks that only sample need not import the data stack
    from train.data.tokenizer import Tokenizer


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 seed: int = 0, stop_id: int | None = None) -> list[int]:
    """New token ids after `prompt_ids` (without them); stops after `stop_id`'s first appearance,
    which is not returned. `model(idx_BS)` returns (logits [B, S, V], stats), as `models.gpt.GPT` does."""
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0; got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = all tokens); got {top_k}")
    if not prompt_ids:
        raise ValueError("--prompt must encode to at least one token")
    gpt = getattr(model, "module", model)  # a DeepSpeed engine wraps the GPT
    max_len = gpt.cfg.model.max_seq_len
    device = gpt.embed.weight.device
    rng = torch.Generator().manual_seed(seed)  # on CPU: the same draws on every device and rank
    was_training = gpt.training
    gpt.eval()  # no router jitter
    ids = list(prompt_ids)
    try:
        for _ in range(max_new_tokens):
            context_BS = torch.tensor([ids[-max_len:]], device=device)
            logits_V = model(context_BS)[0][0, -1].float().cpu()
            next_id = _pick(logits_V, temperature, top_k, rng)
            if next_id == stop_id:
                break
            ids.append(next_id)
    finally:
        gpt.train(was_training)
    return ids[len(prompt_ids):]


def _pick(logits_V: torch.Tensor, temperature: float, top_k: int, rng: torch.Generator) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    if 0 < top_k < logits_V.numel():
        threshold = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < threshold, float("-inf"))
    probs_V = torch.softmax(logits_V / temperature, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=rng))


def generate(model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
             top_k: int = 50, seed: int = 0) -> str:
    """The continuation of `prompt` (text only, without the prompt)."""
    new_ids = generate_ids(model, tokenizer.encode(prompt), max_new_tokens, temperature, top_k, seed, tokenizer.eot_id)
    return tokenizer.decode(new_ids)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from train.run_weights import load_run_weights

    try:
        weights = load_run_weights(args.run_dir, args.step)
        model = weights.build_model()
        text = generate(model, weights.tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    except ValueError as err:
        print(f"switchyard: error: {err}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
