"""Writing one prepared directory: train.bin / val.bin, tokenizer.json and meta.json.

Loads the splits, makes the tokenizer, tokenizes every document (followed by end-of-text) with
`datasets.map` and appends the ids to one flat binary file per split. meta.json is written last,
so its presence marks the directory complete.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc

from train.data.sources import load_splits
from train.data.tokenizer import Tokenizer, make_tokenizer

if TYPE_CHECKING:  # datasets (with pandas, pyarrow) is imported where data is built, not by every rank
    import datasets

log = logging.getLogger(__name__)

# Map workers only pay off when each gets a few MB of text.
PARALLEL_MIN_BYTES = 4 << 20


def write_prepared(cfg, inputs: dict, out_dir: str) -> None:
    train, val = load_splits(cfg)
    tokenizer = make_tokenizer(cfg, train)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    num_tokens = {}
    for split, ds in (("train", train), ("val", val)):
        path = os.path.join(out_dir, f"{split}.bin")
        num_tokens[split] = _write_tokens(ds, tokenizer, path, dtype, int(cfg.num_proc))
    if tokenizer.backend is not None:
        tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    meta = {
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "eot_id": tokenizer.eot_id,
        "num_tokens": num_tokens,
        "num_docs": {"train": len(train), "val": len(val)},
        "inputs": inputs,
    }
    _write_file(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=2).encode())  # last: marks completion
    log.info("%d train / %d val tokens, vocab %d", num_tokens["train"], num_tokens["val"], tokenizer.vocab_size)


def _encode_rows(texts: list[str], tokenizer: Tokenizer) -> dict:
    """datasets.map function: token ids of each document followed by end-of-text."""
    eot = np.array([tokenizer.eot_id], dtype=np.int32)
    if tokenizer.backend is None:  # bytes: skip the Python int lists
        ids = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    else:
        ids = tokenizer.encode_batch(texts)
    return {"ids": [np.concatenate([np.asarray(x, dtype=np.int32), eot]) for x in ids]}


def _write_tokens(ds: datasets.Dataset, tokenizer: Tokenizer, path: str, dtype: np.dtype, num_proc: int) -> int:
    """Tokenize every document and append all ids to one flat binary file; returns the count."""
    import datasets

    big = num_proc > 1 and len(ds) >= num_proc and ds.data.nbytes >= PARALLEL_MIN_BYTES
    encoded = ds.map(
        _encode_rows,
        batched=True,
        batch_size=64,
        input_columns="text",
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer},
        features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),  # no type guessing
        num_proc=num_proc if big else None,
        desc=f"tokenizing {os.path.basename(path)}",
    )
    count = 0
    with open(path, "wb") as f:
        for batch in encoded.with_format("arrow").iter(batch_size=256):
            ids = pc.list_flatten(batch["ids"]).to_numpy()  # [tokens in these documents]
            assert ids.size == 0 or int(ids.max()) < tokenizer.vocab_size
            f.write(ids.astype(dtype).tobytes())
            count += ids.size
        f.flush()
        os.fsync(f.fileno())
    return count


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
