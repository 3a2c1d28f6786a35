"""Corpus text as (train, val) datasets with one "text" column, one row per document.

The corpus is the classics (see `classics`), local files (.txt / .json / .jsonl / .parquet) or a
Hugging Face Hub dataset. Each classics document gives its tail to validation; for files and hub
datasets the last rows are validation. `labelled_val_documents` gives the same validation
documents with each one's domain (for the specialisation report).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import urllib.parse
from collections.abc import Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

from train.cli import first_line
from train.data.classics import classics_documents, labelled_classics_documents, read_classics
from train.data.filecheck import check_text_file, diagnose

if TYPE_CHECKING:  # datasets (with pandas, pyarrow) is imported where data is built, not by every rank
    import datasets

CORPORA = ("classics", "files", "hub")
FILE_BUILDERS = MappingProxyType(  # extension -> datasets builder
    {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
)


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
    parts = document_parts(docs, val_fraction)
    return _nonblank([head for head, _ in parts]), _nonblank([tail for _, tail in parts])


def document_parts(docs: Sequence[str], val_fraction: float) -> list[tuple[str, str]]:
    """(training part, validation tail) of each document, in order; either may be blank."""
    parts = []
    for doc in docs:
        cut = tail_cut(doc, val_fraction)
        if len(docs) == 1 and cut == len(doc):  # a single document must still give a val split
            cut = len(doc) - max(1, round(len(doc) * val_fraction))
        parts.append((doc[:cut], doc[cut:]))
    return parts


def _nonblank(texts: Sequence[str | None]) -> list[str]:
    return [t for t in texts if t and not t.isspace()]


def _split_rows(ds: datasets.Dataset, val_fraction: float, describe: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The last `val_fraction` of the rows (at least one) is validation; one row is split by text."""
    ds = ds.filter(
        lambda texts: [bool(t) and not t.isspace() for t in texts],
        batched=True,
        input_columns="text",
        desc="dropping empty rows",
    )
    if len(ds) == 0:
        raise ValueError(f"data: corpus {describe} is empty: no non-whitespace text")
    if len(ds) == 1:
        train, val = split_documents([ds[0]["text"]], val_fraction)
        domain = ds[0]["domain"] if "domain" in ds.column_names else None  # its label, for labelled_val_documents
        return _text_dataset(train, domain), _text_dataset(val, domain)
    num_val = min(max(1, int(len(ds) * val_fraction)), len(ds) - 1)
    return ds.select(range(len(ds) - num_val)), ds.select(range(len(ds) - num_val, len(ds)))


def _text_dataset(texts: list[str], domain: str | None = None) -> datasets.Dataset:
    import datasets

    if domain is not None:
        return datasets.Dataset.from_dict({"text": texts, "domain": [domain] * len(texts)})
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
            raise ValueError(
                f"data.paths: {path}: extension must be one of {', '.join(repr(e) for e in FILE_BUILDERS)}"
            )
    return paths


def _builder(path: str) -> str:
    """The datasets builder ("text", "json", "parquet") for a file, by extension."""
    return FILE_BUILDERS[os.path.splitext(path)[1].lower()]


def _text_column(ds: datasets.Dataset, field: str, source: str, domain_field: str | None = None) -> datasets.Dataset:
    """Just the text, as a string column named "text"; with `domain_field` (data.domain_field),
    also each row's domain label, as a column named "domain"."""
    import datasets

    if field not in ds.column_names:
        raise ValueError(f"data.text_field={field!r}: no such column in {source}; columns: {ds.column_names}")
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"data.text_field={field!r}: column in {source} holds {feature}, not text")
    if domain_field is None:
        ds = ds.select_columns([field])
        return ds.rename_column(field, "text") if field != "text" else ds
    if domain_field not in ds.column_names:
        raise ValueError(f"data.domain_field={domain_field!r}: no such column in {source}; columns: {ds.column_names}")
    feature = ds.features[domain_field]
    if not (
        isinstance(feature, datasets.Value)
        and (feature.dtype in ("string", "large_string") or feature.dtype.startswith("int"))
    ):
        raise ValueError(
            f"data.domain_field={domain_field!r}: column in {source} holds {feature}, not a label (text or an integer)"
        )
    ds = ds.select_columns([field, domain_field])
    return ds.rename_columns({old: new for old, new in ((field, "text"), (domain_field, "domain")) if old != new})


def _load_files(cfg) -> datasets.Dataset:
    """Rows of all files, in the order of data.paths. A .txt file is one document (one row). With
    data.domain_field (never set with .txt files: check_data_config), also a "domain" column."""
    import datasets

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
            with _datasets_quiet():  # a bad file is Switchyard's one line below, not datasets' ERROR and bar
                ds = datasets.load_dataset(
                    builder,
                    data_files=group,
                    split="train",
                    cache_dir=os.path.join(abspath(cfg.cache_dir), "hf"),
                    **extra,
                )
        except Exception as err:  # datasets' errors name neither the file nor the line: find them
            raise ValueError(
                _first_problem(group, field)
                or f"data.paths: could not read {', '.join(group)}: {type(err).__name__}: {_first_line(err)}"
            ) from err
        try:
            parts.append(_text_column(ds, field, ", ".join(group), getattr(cfg, "domain_field", None)))
        except ValueError as err:  # e.g. a column of mixed types: name the first row that is not text
            problem = _first_problem(group, field)
            if problem is None:
                raise
            raise ValueError(problem) from err
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


@contextlib.contextmanager
def _datasets_quiet():
    """datasets' own log lines (it logs a JSON error at ERROR level, naming a 0-based row, before
    raising) and its progress bar, silenced while local files are read."""
    from datasets.utils import logging as datasets_logging

    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets_logging.is_progress_bar_enabled()
    logger.setLevel(logging.CRITICAL)
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets_logging.enable_progress_bar()


def _first_problem(paths: list[str], text_field: str) -> str | None:
    return next(filter(None, (diagnose(path, text_field) for path in paths)), None)


def _first_line(err: BaseException) -> str:
    """The first line of an error, or of its cause when the error itself is a generic wrapper."""
    return first_line(str(err.__cause__ or err))


HUB_PROBE_TIMEOUT_S = 5.0


def require_hub_reachable(setting: str, remedy: str) -> None:
    """Fail at once, in one line, when the Hugging Face Hub cannot be reached: datasets and
    huggingface_hub would otherwise retry for about half a minute, printing every retry. Skipped
    offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: the libraries then read their cache) and behind
    a proxy (which a direct probe cannot judge)."""
    truthy = ("1", "true", "yes", "on")
    if any(os.environ.get(v, "").lower() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise ValueError(
            f"{setting}: cannot reach the Hugging Face Hub at {host}:{port} ({why}); it needs network "
            f"access ({remedy}, or set HF_HUB_OFFLINE=1 to use a copy already downloaded)"
        ) from None


def _load_hub(cfg) -> datasets.Dataset:
    import datasets

    require_hub_reachable(f"data.hub_name={cfg.hub_name!r}", "or use data.corpus=files")
    try:
        ds = datasets.load_dataset(cfg.hub_name, split="train", cache_dir=os.path.join(abspath(cfg.cache_dir), "hf"))
    except Exception as e:
        raise ValueError(
            f"data.hub_name={cfg.hub_name!r}: could not load its 'train' split from the Hugging Face Hub "
            f"(needs network access; or use data.corpus='files'): {type(e).__name__}: {e}"
        ) from e
    return _text_column(ds, cfg.text_field, f"hub dataset {cfg.hub_name!r}", getattr(cfg, "domain_field", None))


def _user_rows(cfg) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val) rows of data.corpus=files or hub: "text", and "domain" with data.domain_field."""
    frac = float(cfg.val_fraction)
    if cfg.corpus == "files":
        return _split_rows(_load_files(cfg), frac, f"'files' (data.paths={list(cfg.paths)})")
    return _split_rows(_load_hub(cfg), frac, f"'hub' (data.hub_name={cfg.hub_name!r})")


def load_splits(cfg) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val) datasets with one column "text", one row per document."""
    if cfg.corpus == "classics":
        train, val = split_documents(classics_documents(read_classics(abspath(cfg.cache_dir))), float(cfg.val_fraction))
        return _text_dataset(train), _text_dataset(val)
    train, val = _user_rows(cfg)
    if "domain" in train.column_names:  # data.domain_field: checked while reading, not tokenized
        train, val = train.remove_columns("domain"), val.remove_columns("domain")
    return train, val


def labelled_val_documents(cfg) -> list[tuple[str, str]]:
    """(domain, text) of every document of the validation split, in its order (the documents
    whose tokens make val.bin): classics documents are `shakespeare` or `bible`; rows of files or
    of a hub dataset carry their domain in the column data.domain_field names."""
    if cfg.corpus == "classics":
        labelled = labelled_classics_documents(read_classics(abspath(cfg.cache_dir)))
        parts = document_parts([text for _, text in labelled], float(cfg.val_fraction))
        return [(domain, tail) for (domain, _), (_, tail) in zip(labelled, parts, strict=True) if _nonblank([tail])]
    field = getattr(cfg, "domain_field", None)
    if not field:
        raise ValueError(
            f"data.domain_field is not set: the rows of data.corpus={cfg.corpus!r} carry no domain label "
            "until it names the field that holds each row's domain"
        )
    _, val = _user_rows(cfg)
    labelled = []
    for row, (domain, text) in enumerate(zip(val["domain"], val["text"], strict=True)):
        if domain is None or (isinstance(domain, str) and not domain.strip()):
            raise ValueError(
                f"data.domain_field={field!r}: validation document {row + 1} of {len(val)} "
                f"(the last rows of the corpus) has no domain"
            )
        labelled.append((str(domain), text))
    return labelled
