"""`prepare_data(cfg)`: the configured corpus as token files in an on-disk cache, opened as `PreparedData`.

It checks the data config, then turns the corpus into two flat token files (train.bin / val.bin)
under `<cfg.cache_dir>/<key>/`, where the key hashes everything that affects the tokens.
Preparation runs once per key: concurrent callers (torchrun ranks before any process group
exists) serialise on a file lock, one of them builds into a temporary directory and renames it
into place. The files themselves are written by `tokens`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.config import MAX_VOCAB, require_choice, require_int_in, require_number_in, require_positive_int
from train.checkpoint.files import follow_umask
from train.data.classics import CLASSICS_PINS
from train.data.sources import CORPORA, FILE_BUILDERS, abspath, checked_paths
from train.data.tokenizer import BYTES_VOCAB, TOKENIZER_KINDS, Tokenizer
from train.data.tokens import write_prepared

log = logging.getLogger(__name__)

# Bump when the cleaning, splitting or file layout changes: old caches then miss instead of being reused.
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Config checks and cache key
# ---------------------------------------------------------------------------------------------


def check_data_config(cfg) -> None:
    """Every data-setting mistake that can be seen from the settings alone -> one ValueError (pure:
    no file is read; `check_data_files` looks at the files). Run by JobConfig.validate."""
    require_choice("data.corpus", cfg.corpus, CORPORA)
    require_choice("data.tokenizer.kind", cfg.tokenizer.kind, TOKENIZER_KINDS)
    require_number_in("data.val_fraction", cfg.val_fraction, 0, 1, low_open=True, high_open=True)
    if not cfg.cache_dir:
        raise ValueError("data.cache_dir must be set")
    require_positive_int("data.num_proc", cfg.num_proc)  # no upper bound: datasets uses at most one per row
    if cfg.corpus == "hub" and not cfg.hub_name:
        raise ValueError("data.hub_name must be set when data.corpus='hub'")
    if cfg.corpus in ("files", "hub") and not cfg.text_field:
        raise ValueError("data.text_field must name the text column")
    tok = cfg.tokenizer
    if tok.kind == "bpe":
        # At least the 256 bytes + end-of-text; at most what a model takes (the tokenizers library
        # itself would abort on a huge value, after the corpus was read).
        require_int_in("data.tokenizer.vocab_size", tok.vocab_size, BYTES_VOCAB, MAX_VOCAB)
    if tok.kind == "file" and not tok.path:
        raise ValueError("data.tokenizer.path must be set when data.tokenizer.kind='file'")
    if tok.kind == "hub" and not tok.name:
        raise ValueError("data.tokenizer.name must be set when data.tokenizer.kind='hub'")
    check_domain_field(cfg)


def check_data_files(cfg) -> None:
    """The files the data settings name exist, are readable and fit them (the pre-flight's part)."""
    tok = cfg.tokenizer
    if tok.kind == "file" and not os.path.isfile(abspath(tok.path)):
        raise ValueError(f"data.tokenizer.path: file not found: {abspath(tok.path)}")
    if cfg.corpus != "files":
        return
    paths = checked_paths(cfg)  # each file exists and is readable, with a known extension
    field = getattr(cfg, "domain_field", None)
    for path in paths if field is not None else ():
        if FILE_BUILDERS[os.path.splitext(path)[1].lower()] == "text":
            raise ValueError(
                f"data.domain_field={field!r}: {path} is a text file, whose document has no fields; "
                f"give the documents as .jsonl/.json/.parquet rows with a {field!r} column"
            )


def check_domain_field(cfg) -> None:
    """data.domain_field names a column of the data rows; the column itself is checked when read."""
    field = getattr(cfg, "domain_field", None)
    if field is None:
        return
    if cfg.corpus == "classics":
        raise ValueError(
            f"data.domain_field applies to data.corpus=files or hub; the classics corpus labels its "
            f"documents itself (shakespeare, bible): leave it null (got {field!r})"
        )
    if not isinstance(field, str) or not field.strip():
        raise ValueError(
            f"data.domain_field must name the column that holds each row's domain, or be null; got {field!r}"
        )
    if field == cfg.text_field:
        raise ValueError(f"data.domain_field must name a column other than data.text_field ({field!r})")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_inputs(cfg) -> dict:
    """Everything the prepared tokens depend on (cheap to compute: no corpus reading)."""
    if cfg.corpus == "classics":
        corpus = {"kind": "classics", "packages": CLASSICS_PINS}
    elif cfg.corpus == "files":
        files = [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in checked_paths(cfg)]
        corpus = {"kind": "files", "files": files, "text_field": cfg.text_field}
    else:
        corpus = {"kind": "hub", "name": cfg.hub_name, "text_field": cfg.text_field}
    tok = cfg.tokenizer
    tokenizer = {"kind": tok.kind}
    if tok.kind == "bpe":
        tokenizer["vocab_size"] = int(tok.vocab_size)
    elif tok.kind == "file":
        tokenizer["sha256"] = _file_sha256(abspath(tok.path))
    elif tok.kind == "hub":
        tokenizer["name"] = tok.name
    return {"format": FORMAT_VERSION, "corpus": corpus, "tokenizer": tokenizer, "val_fraction": float(cfg.val_fraction)}


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Building and loading the cache
# ---------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    train: np.ndarray  # [N_train] token ids (read-only memmap)
    val: np.ndarray  # [N_val]
    vocab_size: int
    tokenizer: Tokenizer
    cache_path: str


def prepare_data(cfg) -> PreparedData:
    """Tokenize the configured corpus once into `<cfg.cache_dir>/<key>/` and open it.

    Safe to call from many processes at once (e.g. every torchrun rank): one builds, the others
    wait on `<key>.lock` and then load. A directory named `<key>` is only ever complete; one that
    was damaged afterwards (a truncated copy, a full disk) is found when opened, and rebuilt.
    """
    check_data_config(cfg)
    check_data_files(cfg)
    inputs = cache_inputs(cfg)
    cache_dir = abspath(cfg.cache_dir)
    final = os.path.join(cache_dir, cache_key(inputs))
    prepared = _load_if_sound(final)
    if prepared is None:
        os.makedirs(cache_dir, exist_ok=True)
        with _exclusive_lock(final + ".lock"):
            prepared = _load_if_sound(final)  # another process may have built it while we waited
            if prepared is None:
                _build(cfg, inputs, final)
                prepared = _load(final)
    return prepared


def _load_if_sound(path: str) -> PreparedData | None:
    """The prepared data in `path`, or None if there is none or it is damaged (then it is rebuilt)."""
    if not _is_complete(path):
        return None
    try:
        return _load(path)
    except DamagedCache as err:
        log.warning("the prepared data in %s is damaged (%s): rebuilding it", path, err)
        return None


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta.json"))


@contextlib.contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    # "a" creates the file without truncating; the lock is released when the file is closed,
    # so a crashed holder never blocks the others.
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def _build(cfg, inputs: dict, final: str) -> None:
    """Prepare into a temporary directory, then rename it to `final` (atomic). Caller holds the lock."""
    cache_dir, key = os.path.split(final)
    _remove_leftovers(cache_dir, key)
    tmp = tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=cache_dir)
    try:
        log.info("preparing data into %s", final)
        write_prepared(cfg, inputs, tmp)
        follow_umask(Path(tmp))  # mkdtemp made it private: a shared cache must be readable by the team
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_leftovers(cache_dir: str, key: str) -> None:
    """Temp dirs of crashed builders, and a `<key>` dir without meta.json (never written by us)."""
    for name in os.listdir(cache_dir):
        if name.startswith(f"{key}.tmp-"):
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
    if os.path.isdir(os.path.join(cache_dir, key)):
        shutil.rmtree(os.path.join(cache_dir, key))


def _fsync(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_tokens(path: str, dtype: np.dtype) -> np.ndarray:
    if os.path.getsize(path) == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class DamagedCache(Exception):
    """A prepared directory whose files do not match its meta.json (internal: it is rebuilt)."""


def _load(path: str) -> PreparedData:
    meta = _read_meta(path)
    dtype = np.dtype(meta["dtype"])
    try:
        if meta["inputs"]["tokenizer"]["kind"] == "bytes":
            tokenizer = Tokenizer()
        else:
            tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"), meta["eot_id"])
    except Exception as err:  # tokenizers raises its own exception types for a bad file
        raise DamagedCache(
            f"tokenizer.json: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    splits = {}
    for split in ("train", "val"):
        file = os.path.join(path, f"{split}.bin")
        expected = meta["num_tokens"][split] * dtype.itemsize
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes"
            raise DamagedCache(f"{split}.bin is {found}, meta.json says {expected} bytes")
        splits[split] = _open_tokens(file, dtype)
    return PreparedData(
        train=splits["train"], val=splits["val"], vocab_size=meta["vocab_size"], tokenizer=tokenizer, cache_path=path
    )


def _read_meta(path: str) -> dict:
    """meta.json, with every field `_load` reads, of the right type."""
    try:
        with open(os.path.join(path, "meta.json"), "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
        ok = (
            isinstance(meta["vocab_size"], int)
            and isinstance(meta["eot_id"], int)
            and np.dtype(meta["dtype"]) in (np.uint16, np.uint32)
            and all(isinstance(meta["num_tokens"][s], int) and meta["num_tokens"][s] >= 0 for s in ("train", "val"))
            and isinstance(meta["inputs"]["tokenizer"]["kind"], str)
        )
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DamagedCache(f"meta.json is unreadable: {type(err).__name__}: {err}") from err
    if not ok:
        raise DamagedCache("meta.json has fields of the wrong type")
    return meta
