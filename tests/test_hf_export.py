"""Export to Hugging Face, proven against transformers itself: the exported directory loads with
AutoModelForCausalLM / AutoTokenizer and gives Switchyard's logits (fp32, max |diff| <= 1e-4), for
every architecture with an exact counterpart, from real checkpoints (1 rank, and 4 ranks with
ep=2 + ZeRO-3); the rest is refused with one line and leaves nothing behind."""

import json

import pytest
import torch
import transformers  # noqa: E402  (the hf extra; `make test` installs it)

from models.config import RopeScalingConfig
from models.gpt import GPT
from tests import hf_runs
from tests.hf_runs import one_thread  # noqa: F401  (autouse)
from train.checkpoint.run_weights import load_run_weights
from train.data.tokenizer import Tokenizer
from train.export_hf import main as export_main
from train.hf import mapping as hf_mapping
from train.hf.exporting import write_hf_model
from train.hf.importing import load_hf_weights, shape_settings

TOLERANCE = 1e-4


def hf_logits(out_dir, ids_BS: torch.Tensor) -> tuple[torch.Tensor, object]:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched weight
    with torch.no_grad():
        return model.eval()(ids_BS).logits, model


def max_diff(model, out_dir, ids_BS: torch.Tensor) -> tuple[float, object]:
    with torch.no_grad():
        ours = model.eval()(ids_BS)[0]
    theirs, hf_model = hf_logits(out_dir, ids_BS)
    return (ours - theirs).abs().max().item(), hf_model


VARIANTS = [  # (settings, transformers class)
    ({}, "MixtralForCausalLM"),  # the default architecture: MoE in every block, top-2 softmax
    ({"moe_top_k": 1}, "MixtralForCausalLM"),
    ({"moe_every": 2}, "Qwen2MoeForCausalLM"),  # dense, MoE, dense, MoE
    ({"moe_num_shared_experts": 1, "moe_normalize_topk": False}, "Qwen2MoeForCausalLM"),
    ({"moe_score": "sigmoid", "moe_num_shared_experts": 1, "moe_bias_update_rate": 0.01}, "Glm4MoeForCausalLM"),
    ({"moe_every": 5, "model_tie_embeddings": False}, "LlamaForCausalLM"),  # dense
    ({"moe_every": 5, "model_activation": "gelu"}, "ArceeForCausalLM"),  # dense GELU
    # Grouped-query attention 4:1 with head_dim != d_model / n_heads, q/k norms, qkv biases, gated shared experts:
    ({"model_n_heads": 8, "model_n_kv_heads": 2, "model_head_dim": 6}, "MixtralForCausalLM"),
    ({"model_n_heads": 8, "model_n_kv_heads": 1, "model_qk_norm": "head", "moe_every": 2}, "Qwen3MoeForCausalLM"),
    ({"model_n_kv_heads": 2, "model_qk_norm": "projection", "moe_normalize_topk": False}, "OlmoeForCausalLM"),
    (
        {"model_qkv_bias": True, "model_n_kv_heads": 2, "moe_num_shared_experts": 2, "moe_shared_expert_gate": True},
        "Qwen2MoeForCausalLM",
    ),
    (
        {
            "model_qkv_bias": True,
            "model_qk_norm": "head",
            "model_n_kv_heads": 1,
            "moe_score": "sigmoid",
            "moe_num_shared_experts": 1,
            "moe_bias_update_rate": 0.01,
        },
        "Glm4MoeForCausalLM",
    ),
    (
        {
            "moe_every": 5,
            "model_n_heads": 8,
            "model_n_kv_heads": 1,
            "model_head_dim": 8,
            "model_rope_scaling": RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 16),
        },
        "LlamaForCausalLM",
    ),  # Llama-3
    ({"moe_every": 5, "model_qkv_bias": True, "model_n_kv_heads": 2}, "Qwen2ForCausalLM"),  # Qwen2.5
]


@pytest.mark.parametrize("settings,hf_class", VARIANTS, ids=[c + str(s) for s, c in VARIANTS])
def test_export_gives_switchyards_logits_in_transformers(tmp_path, settings, hf_class):
    model = hf_runs.random_model(**settings)
    write_hf_model(model.cfg, model.state_dict(), Tokenizer(), tmp_path / "hf")
    ids_BS = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(1))
    diff, hf_model = max_diff(model, tmp_path / "hf", ids_BS)
    assert type(hf_model).__name__ == hf_class
    assert diff <= TOLERANCE, diff
    # And back: import(export(x)) is x, bit for bit ...
    imported, state_dict = load_hf_weights(tmp_path / "hf")
    if not (
        settings.get("moe_num_shared_experts")
        and hf_class == "Qwen2MoeForCausalLM"
        and not settings.get("moe_shared_expert_gate")
    ):
        assert shape_settings(imported.cfg) == shape_settings(model.cfg)
        assert state_dict.keys() == model.state_dict().keys()
        assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())
        return
    # ... except an ungated shared expert, written as Qwen2-MoE's gated one with a zero gate: it reads
    # back gated (moe.shared_expert_gate=true), computing the same function.
    assert imported.cfg.moe.shared_expert_gate and not model.cfg.moe.shared_expert_gate
    back = GPT(imported.cfg)
    back.load_state_dict(state_dict)
    with torch.no_grad():
        assert (back.eval()(ids_BS)[0] - model(ids_BS)[0]).abs().max().item() <= TOLERANCE


def test_the_rope_permutation_is_what_makes_it_exact(tmp_path, monkeypatch):
    """The comparison above can fail: exporting q/k rows unpermuted gives other logits."""
    monkeypatch.setattr(hf_mapping, "rope_rows_to_hf", lambda w, n_heads: w)
    model = hf_runs.random_model()
    write_hf_model(model.cfg, model.state_dict(), Tokenizer(), tmp_path / "hf")
    diff, _ = max_diff(
        model, tmp_path / "hf", torch.randint(0, 257, (1, 48), generator=torch.Generator().manual_seed(1))
    )
    assert diff > 100 * TOLERANCE


def test_large_models_are_sharded_with_an_index(tmp_path):
    model = hf_runs.random_model()
    write_hf_model(model.cfg, model.state_dict(), Tokenizer(), tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((tmp_path / "hf" / s).stat().st_size <= 40_000 + 10_000 for s in shards)
    assert not (tmp_path / "hf/model.safetensors").exists()
    diff, _ = max_diff(
        model, tmp_path / "hf", torch.randint(0, 257, (1, 16), generator=torch.Generator().manual_seed(2))
    )
    assert diff <= TOLERANCE


REFUSED = [
    ({"model_activation": "gelu"}, "model.activation"),  # GELU experts: no transformers MoE class has them
    ({"moe_capacity_factor": 1.25}, "moe.capacity_factor"),
    ({"moe_bias_update_rate": 0.01}, "moe.bias_update_rate"),  # a selection bias on softmax scores
    ({"moe_score": "sigmoid", "moe_every": 2}, "moe.every"),
]


@pytest.mark.parametrize("settings,setting", REFUSED, ids=[s for _, s in REFUSED])
def test_models_without_an_exact_counterpart_are_refused(tmp_path, settings, setting):
    model = hf_runs.random_model(**settings)
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")) as err:
        write_hf_model(model.cfg, model.state_dict(), Tokenizer(), tmp_path / "hf")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


# --- real runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, data_cache):
    return hf_runs.moe_run(tmp_path_factory, data_cache)


def test_exported_run_loads_in_transformers_with_the_same_logits_and_tokens(tmp_path, moe_run, capsys):
    assert export_main([str(moe_run), str(tmp_path / "hf")]) == 0
    assert "mixtral" in capsys.readouterr().out
    weights = load_run_weights(moe_run)
    assert weights.step == 2
    text = "The king shall speak upon the sea, and the old bird will rise."
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer(text)["input_ids"] == weights.tokenizer.encode(text)  # no BOS, same BPE
    assert hf_tokenizer.eos_token_id == weights.tokenizer.eot_id
    ids_BS = torch.tensor([weights.tokenizer.encode(text)])
    diff, _ = max_diff(weights.build_model(), tmp_path / "hf", ids_BS)
    assert diff <= TOLERANCE

    # An earlier step exports its own weights.
    assert export_main([str(moe_run), str(tmp_path / "hf1"), "--step", "1"]) == 0
    step1 = load_run_weights(moe_run, step=1)
    assert not torch.equal(step1.state_dict["embed.weight"], weights.state_dict["embed.weight"])
    diff, _ = max_diff(step1.build_model(), tmp_path / "hf1", ids_BS)
    assert diff <= TOLERANCE


def test_model_saved_by_4_ranks_with_ep2_and_zero3_exports(tmp_path, tmp_path_factory, data_cache):
    run = hf_runs.trained_run(
        tmp_path_factory,
        data_cache,
        "ep2z3",
        "train.steps=1",
        "train.micro_batch=1",
        "parallel.ep=2",
        "deepspeed.zero_stage=3",
        nproc=4,
    )
    weights = load_run_weights(run)
    assert weights.state_dict["blocks.0.ffn.experts.w1_EDF"].shape == (4, 64, 64)  # both shards, whole
    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    ids_BS = torch.tensor([weights.tokenizer.encode("Give the young queen a song of peace.")])
    diff, _ = max_diff(weights.build_model(), tmp_path / "hf", ids_BS)
    assert diff <= TOLERANCE


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("switchyard: error: "), err
    return err[0]


def test_bad_exports_fail_with_one_line_and_leave_nothing(tmp_path, moe_run, capsys):
    # A run directory without checkpoints (the run's config, nothing trained).
    bare = tmp_path / "bare"
    (bare / ".hydra").mkdir(parents=True)
    (bare / ".hydra/config.yaml").write_text((moe_run / ".hydra/config.yaml").read_text())
    cases = [
        ([str(bare), str(tmp_path / "out")], "no complete checkpoint"),
        ([str(moe_run), str(tmp_path / "out"), "--step", "7"], "--step 7"),
        ([str(tmp_path / "nowhere"), str(tmp_path / "out")], "does not exist"),
    ]
    for argv, words in cases:
        assert export_main(argv) == 2
        assert words in error_line(capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep.txt").write_text("mine")
    assert export_main([str(moe_run), str(tmp_path / "full")]) == 2
    assert "not an empty directory" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "full"]  # no OUT_DIR, no partial files


def test_mismatched_vocab_sizes_are_refused(tmp_path):
    model = hf_runs.random_model(vocab_size=300)
    with pytest.raises(ValueError, match="mismatched vocab sizes"):
        write_hf_model(model.cfg, model.state_dict(), Tokenizer(), tmp_path / "hf")  # bytes: 257 tokens
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_writing_leaves_no_out_dir(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("train.hf.exporting.write_weights", disk_full)
    model = hf_runs.random_model()
    with pytest.raises(OSError):
        write_hf_model(model.cfg, model.state_dict(), Tokenizer(), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
