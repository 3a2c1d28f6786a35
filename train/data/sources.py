"""Corpus text as (train, val) datasets with one "text" column, one row per document.

The corpus is the classics (see `classics`), local files (.txt / .json / .jsonl / .parquet) or a
Hugging Face Hub dataset. Each classics document gives its tail to validation; for files and hub
datasets the last rows are validation.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from types import MappingProxyType

import datasets

from train.data.classics import classics_documents, read_classics
from train.data.filecheck import check_text_file, diagnose

CORPORA = ("classics", "files", "hub")
FILE_BUILDERS = MappingProxyType(  # extension -> datasets builder
    {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"})


# ---------------------------------------------------------------------------------------------
# Train / validation split
# ---------------------------------------------------------------------------------------------


def tail_cut(text: str, val_fraction: float) -> int:
    """Where the validation tail of one document starts: the line start nearest to the
    `val_fraction` point. May be len(text) (no tail) for a document whose last line is long."""
    target = len(text) - round(len(text) * val_fraction)
    before = text.rfind("\n", 0, target) + 1  # 0 if no newline before the target
    after = text.find("\n", target) + 1 or len(text)
    candidates = [c for c in (before, after) if c > 0]
    return min(candidates, key=lambda c: abs(c - target))


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Each document's last `val_fraction` goes to validation, so both splits mix all documents."""
    train, val = [], []
    for doc in docs:
        cut = tail_cut(doc, val_fraction)
        if len(docs) == 1 and cut == len(doc):  # a single document must still give a val split
            cut = len(doc) - max(1, round(len(doc) * val_fraction))
        train.append(doc[:cut])
        val.append(doc[cut:])
    return _nonblank(train), _nonblank(val)


def _nonblank(texts: Sequence[str | None]) -> list[str]:
    return [t for t in texts if t and not t.isspace()]


def _split_rows(ds: datasets.Dataset, val_fraction: float, describe: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The last `val_fraction` of the rows (at least one) is validation; one row is split by text."""
    ds = ds.filter(lambda texts: [bool(t) and not t.isspace() for t in texts],
                   batched=True, input_columns="text", desc="dropping empty rows")
    if len(ds) == 0:
        raise ValueError(f"data: corpus {describe} is empty: no non-whitespace text")
    if len(ds) == 1:
        train, val = split_documents([ds[0]["text"]], val_fraction)
        return _text_dataset(train), _text_dataset(val)
    num_val = min(max(1, int(len(ds) * val_fraction)), len(ds) - 1)
    return ds.select(range(len(ds) - num_val)), ds.select(range(len(ds) - num_val, len(ds)))


def _text_dataset(texts: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts}, features=datasets.Features({"text": datasets.Value("string")}))


# ---------------------------------------------------------------------------------------------
# User corpora: local files or the Hugging Face Hub
# ---------------------------------------------------------------------------------------------


def abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def checked_paths(cfg) -> list[str]:
    paths = [abspath(p) for p in (cfg.paths or [])]
    if not paths:
        raise ValueError("data.paths must list at least one file when data.corpus='files'")
    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"data.paths: {path} is a directory; list the files in it")
        if not os.path.isfile(path):
            raise ValueError(f"data.paths: file not found: {path}")
        if not os.access(path, os.R_OK):
            raise ValueError(f"data.paths: {path}: not readable (permission denied)")
        if os.path.splitext(path)[1].lower() not in FILE_BUILDERS:  # checked here so _builder cannot fail
            raise ValueError(f"data.paths: {path}: extension must be one of "
                             f"{', '.join(repr(e) for e in FILE_BUILDERS)}")
    return paths


def _builder(path: str) -> str:
    """The datasets builder ("text", "json", "parquet") for a file, by extension."""
    return FILE_BUILDERS[os.path.splitext(path)[1].lower()]


def _text_column(ds: datasets.Dataset, field: str, source: str) -> datasets.Dataset:
    """Just the text, as a string column named "text"."""
    if field not in ds.column_names:
        raise ValueError(f"data.text_field={field!r}: no such column in {source}; columns: {ds.column_names}")
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"data.text_field={field!r}: column in {source} holds {feature}, not text")
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds


def _load_files(cfg) -> datasets.Dataset:
    """Rows of all files, in the order of data.paths. A .txt file is one document (one row)."""
    paths = checked_paths(cfg)
    for path in paths:  # before any reading: a binary or mis-encoded file fails fast, naming its line
        if _builder(path) in ("text", "json"):  # (pyarrow would take bytes that are not UTF-8 into a string)
            check_text_file(path)
    parts = []
    for builder, group in itertools.groupby(paths, key=_builder):  # one load per run of same-kind files
        group = list(group)
        field = "text" if builder == "text" else cfg.text_field
        extra = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=group, split="train",
                                       cache_dir=os.path.join(abspath(cfg.cache_dir), "hf"), **extra)
        except Exception as err:  # datasets' errors name neither the file nor the line: find them
            raise ValueError(_first_problem(group, field) or f"data.paths: could not read {', '.join(group)}: "
                             f"{type(err).__name__}: {_first_line(err)}") from err
        try:
            parts.append(_text_column(ds, field, ", ".join(group)))
        except ValueError as err:  # e.g. a column of mixed types: name the first row that is not text
            problem = _first_problem(group, field)
            if problem is None:
                raise
            raise ValueError(problem) from err
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _first_problem(paths: list[str], text_field: str) -> str | None:
    return next(filter(None, (diagnose(path, text_field) for path in paths)), None)


def _first_line(err: BaseException) -> str:
    """The first line of an error, or of its cause when the error itself is a generic wrapper."""
    cause = err.__cause__ or err
    return (str(cause).strip().splitlines() or [""])[0]


def _load_hub(cfg) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(cfg.hub_name, split="train", cache_dir=os.path.join(abspath(cfg.cache_dir), "hf"))
    except Exception as e:
        raise ValueError(
            f"data.hub_name={cfg.hub_name!r}: could not load its 'train' split from the Hugging Face Hub "
            f"(needs network access; or use data.corpus='files'): {type(e).__name__}: {e}"
        ) from e
    return _text_column(ds, cfg.text_field, f"hub dataset {cfg.hub_name!r}")


def load_splits(cfg) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val) datasets with one column "text", one row per document."""
    frac = float(cfg.val_fraction)
    if cfg.corpus == "classics":
        train, val = split_documents(classics_documents(read_classics(abspath(cfg.cache_dir))), frac)
        return _text_dataset(train), _text_dataset(val)
    if cfg.corpus == "files":
        return _split_rows(_load_files(cfg), frac, f"'files' (data.paths={list(cfg.paths)})")
    return _split_rows(_load_hub(cfg), frac, f"'hub' (data.hub_name={cfg.hub_name!r})")
