"""Sampling a continuation from a model: `generate_ids` on token ids, `generate` on text.

Under expert parallelism or ZeRO-3 the forward pass is collective: call it on every rank with the
same arguments (the same seed gives the same tokens everywhere) and print on one.

With `use_cache` (the default) the prompt runs once and each new token attends to the cached keys
and values of the tokens before it (`models.gpt.KVCache`), while the whole sequence fits in
model.max_seq_len. Without it (and beyond max_seq_len, where the oldest tokens are dropped and every
position shifts) every new token reruns the whole context: the obviously-correct path, kept as the
oracle the cache is tested against.
"""

from __future__ import annotations

from typing import Protocol

import torch

from models.gpt import KVCache


class TextCodec(Protocol):
    """What sampling needs of a tokenizer (train/data/tokenizer.py's Tokenizer is one)."""

    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """New token ids after `prompt_ids` (without them); stops after `stop_id`'s first appearance,
    which is not returned. `model(idx_BS[, cache])` returns (logits [B, S, V], stats), as
    `models.gpt.GPT` does."""
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
    cache = KVCache(gpt.cfg.model) if use_cache else None
    try:
        for _ in range(max_new_tokens):
            if cache is not None and len(ids) <= max_len:  # every position still fits: only the new ones run
                new_BS = torch.tensor([ids[cache.length :]], device=device)
                logits_V = model(new_BS, cache)[0][0, -1].float().cpu()
            else:
                context_BS = torch.tensor([ids[-max_len:]], device=device)
                logits_V = model(context_BS)[0][0, -1].float().cpu()
            next_id = _pick(logits_V, temperature, top_k, rng)
            if next_id == stop_id:
                break
            ids.append(next_id)
    finally:
        gpt.train(was_training)
    return ids[len(prompt_ids) :]


def _pick(logits_V: torch.Tensor, temperature: float, top_k: int, rng: torch.Generator) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    if 0 < top_k < logits_V.numel():
        threshold = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < threshold, float("-inf"))
    probs_V = torch.softmax(logits_V / temperature, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=rng))


def generate(
    model,
    tokenizer: TextCodec,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """The continuation of `prompt` (text only, without the prompt)."""
    new_ids = generate_ids(model, tokenizer.encode(prompt), max_new_tokens, temperature, top_k, seed, tokenizer.eot_id)
    return tokenizer.decode(new_ids)
