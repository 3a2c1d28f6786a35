"""Tokenizers: text <-> token ids.

`Tokenizer` wraps a `tokenizers` backend, or is the dependency-free byte-level tokenizer. This
module also finds (or adds) a backend's end-of-text token, trains byte-level BPE, and builds the
tokenizer that `data.tokenizer` configures (bpe / file / hub / bytes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from train.data.sources import abspath, require_hub_reachable

if TYPE_CHECKING:  # datasets (with pandas, pyarrow) is imported where data is built, not by every rank
    import datasets

log = logging.getLogger(__name__)

TOKENIZER_KINDS = ("bpe", "file", "hub", "bytes")
EOT_TOKEN = "<|endoftext|>"
# End-of-text tokens of common pretrained tokenizers, in order of preference.
EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
BYTES_VOCAB = 257  # ids 0..255 are bytes, 256 is end-of-text


class Tokenizer:
    """Text <-> token ids.

    Wraps a `tokenizers.Tokenizer`, or with `backend=None` is the dependency-free byte-level
    tokenizer (ids 0..255 are UTF-8 bytes, 256 is end-of-text). Special tokens written in the
    text itself are encoded as plain text, so data can never forge an end-of-text.
    `decode` drops end-of-text (and, for bytes, any id >= 256, e.g. from a padded model vocab).
    """

    def __init__(self, backend: tokenizers.Tokenizer | None = None, eot_id: int | None = None):
        self.backend = backend
        if backend is None:
            self.vocab_size = BYTES_VOCAB
            self.eot_id = BYTES_VOCAB - 1
            return
        backend.encode_special_tokens = True  # runtime flag, not saved in tokenizer.json
        self.eot_id = _find_eot_id(backend) if eot_id is None else eot_id
        assert self.eot_id is not None, "backend has no end-of-text token (use with_eot first)"
        self.vocab_size = max(backend.get_vocab_size(with_added_tokens=True), self.eot_id + 1)

    @classmethod
    def from_file(cls, path: str, eot_id: int | None = None) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_file(path), eot_id)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.backend is None:
            return [list(t.encode("utf-8")) for t in texts]
        # add_special_tokens=False: no BOS/EOS from a pretrained post-processor, we add EOT ourselves.
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.backend is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.backend.decode(ids, skip_special_tokens=True)

    def save(self, path: str) -> None:
        assert self.backend is not None, "the bytes tokenizer has nothing to save"
        self.backend.save(path)

    # Pickling (datasets.map workers) goes through JSON because the backend forgets runtime flags.
    def __getstate__(self) -> dict:
        return {"json": None if self.backend is None else self.backend.to_str(), "eot_id": self.eot_id}

    def __setstate__(self, state: dict) -> None:
        backend = None if state["json"] is None else tokenizers.Tokenizer.from_str(state["json"])
        self.__init__(backend, state["eot_id"])


def _find_eot_id(backend: tokenizers.Tokenizer) -> int | None:
    for token in EOT_CANDIDATES:
        token_id = backend.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def with_eot(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A pretrained tokenizer without any end-of-text token gets `<|endoftext|>` appended."""
    if _find_eot_id(backend) is None:
        backend.add_special_tokens([EOT_TOKEN])
    return backend


def train_bpe(texts: Iterator[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization): lossless for any text, no unknown tokens."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if backend.get_vocab_size() < vocab_size:
        log.warning(
            "BPE stopped at %d tokens (< data.tokenizer.vocab_size=%d): corpus too small",
            backend.get_vocab_size(),
            vocab_size,
        )
    return backend


def _line_pieces(text: str, size: int) -> Iterator[str]:
    """Pieces of about `size` characters cut after a newline, so BPE training parallelises."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def make_tokenizer(cfg, train: datasets.Dataset) -> Tokenizer:
    tok_cfg = cfg.tokenizer
    if tok_cfg.kind == "bytes":
        return Tokenizer()
    if tok_cfg.kind == "bpe":
        texts = (
            piece
            for batch in train.iter(batch_size=64)
            for text in batch["text"]
            for piece in _line_pieces(text, 1 << 16)
        )
        return Tokenizer(train_bpe(texts, int(tok_cfg.vocab_size)))
    if tok_cfg.kind == "file":
        try:
            backend = tokenizers.Tokenizer.from_file(abspath(tok_cfg.path))
        except Exception as e:
            raise ValueError(f"data.tokenizer.path={tok_cfg.path!r}: not a tokenizers JSON file ({e})") from e
        return Tokenizer(with_eot(backend))
    assert tok_cfg.kind == "hub", tok_cfg.kind
    require_hub_reachable(f"data.tokenizer.name={tok_cfg.name!r}", "or use data.tokenizer.kind=file")
    try:
        backend = tokenizers.Tokenizer.from_pretrained(tok_cfg.name)
    except Exception as e:
        raise ValueError(
            f"data.tokenizer.name={tok_cfg.name!r}: could not load it from the Hugging Face Hub "
            f"(needs network access; or use data.tokenizer.kind='file'): {type(e).__name__}: {e}"
        ) from e
    return Tokenizer(with_eot(backend))
