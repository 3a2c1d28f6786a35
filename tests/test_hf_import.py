"""Import from Hugging Face: directories written by transformers itself read as Switchyard models
with the same logits; an exported run reads back bit for bit and training started from it
(model.init_from=hf:, at parallel.ep=2) starts at the original run's validation loss; directories
Switchyard cannot compute exactly are refused with one line."""

import json
import math

import pytest
import torch
import transformers

from models.gpt import GPT
from tests import hf_runs
from tests.hf_runs import one_thread  # noqa: F401  (autouse)
from tests.jobs import run_job
from train.checkpoint.run_weights import load_run_weights
from train.data.tokenizer import Tokenizer
from train.export_hf import main as export_main
from train.hf.exporting import write_hf_model
from train.hf.files import SafetensorsWeights, byte_tokenizer_backend
from train.hf.importing import load_hf_weights
from train.import_hf import main as import_main

TOLERANCE = 1e-4


def save_hf(model, out_dir, tokenizer_backend=None) -> None:
    """A directory as transformers writes it, plus the bytes tokenizer."""
    model.save_pretrained(out_dir)
    (tokenizer_backend or byte_tokenizer_backend()).save(str(out_dir / "tokenizer.json"))


def tiny(config_class, **fields):
    common = dict(
        vocab_size=257,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=24,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return config_class(**{**common, **fields})


def randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}  # 16 < the 40 positions tested: the scaled band is exercised
# Real ratios: grouped-query attention 4:1 (Mixtral, Qwen3-30B-A3B ~ 32:4 = 8:1, Llama-3 8B 32:8) and 8:1, head_dim
# unlike hidden_size / num_attention_heads (Qwen3-MoE: 128 vs 2048 / 32 = 64).
GQA_4 = dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8)
GQA_8 = dict(num_attention_heads=8, num_key_value_heads=1, head_dim=6)
MADE_BY_TRANSFORMERS = {
    "mixtral": lambda: transformers.MixtralForCausalLM(
        tiny(transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2)
    ),
    "mixtral gqa": lambda: transformers.MixtralForCausalLM(
        tiny(transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2, **GQA_4)
    ),
    "llama": lambda: transformers.LlamaForCausalLM(tiny(transformers.LlamaConfig, tie_word_embeddings=True)),
    "llama3": lambda: transformers.LlamaForCausalLM(
        tiny(transformers.LlamaConfig, rope_parameters=LLAMA3_ROPE, **GQA_4)
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(tiny(transformers.Qwen2Config, **GQA_8)),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(
        tiny(
            transformers.Qwen2MoeConfig,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=16,
            decoder_sparse_step=2,
            **GQA_4,
        )
    ),  # qkv biases, a gated shared expert, dense and MoE blocks
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        tiny(
            transformers.Qwen3MoeConfig,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            norm_topk_prob=True,
            **GQA_8,
        )
    ),
    "olmoe": lambda: transformers.OlmoeForCausalLM(
        tiny(
            transformers.OlmoeConfig,
            num_experts=4,
            num_experts_per_tok=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=4,
        )
    ),
    "glm4_moe": lambda: transformers.Glm4MoeForCausalLM(
        tiny(
            transformers.Glm4MoeConfig,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            first_k_dense_replace=1,
            use_qk_norm=True,
            attention_bias=True,
            partial_rotary_factor=1.0,
            n_group=1,
            topk_group=1,
            **GQA_4,
        )
    ),
}
EXPECTED_SETTINGS = {  # what each import must set (a mapping that ignored the option would fail the logits, too)
    "mixtral gqa": {"n_kv_heads": 2, "head_dim": 8},
    "llama3": {"n_kv_heads": 2, "rope_scaling.type": "llama3"},
    "qwen2": {"n_kv_heads": 1, "head_dim": 6, "qkv_bias": True},
    "qwen2_moe": {"qkv_bias": True, "shared_expert_gate": True},
    "qwen3_moe": {"qk_norm": "head", "n_kv_heads": 1},
    "olmoe": {"qk_norm": "projection", "n_kv_heads": 2},
    "glm4_moe": {"qk_norm": "head", "qkv_bias": True},
}


def _setting(cfg, key: str):
    if key == "shared_expert_gate":
        return cfg.moe.shared_expert_gate
    value = cfg.model
    for part in key.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("name", sorted(MADE_BY_TRANSFORMERS))
def test_directories_saved_by_transformers_give_the_same_logits(tmp_path, name):
    hf_model = randomized(MADE_BY_TRANSFORMERS[name]())
    save_hf(hf_model, tmp_path)
    imported, state_dict = load_hf_weights(tmp_path)
    for key, value in EXPECTED_SETTINGS.get(name, {}).items():
        assert _setting(imported.cfg, key) == value, key
    model = GPT(imported.cfg)
    model.load_state_dict(state_dict)
    ids_BS = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (model.eval()(ids_BS)[0] - hf_model(ids_BS).logits).abs().max().item()
    assert diff <= TOLERANCE, diff


def _deepseek_v3():
    config = transformers.DeepseekV3Config(
        vocab_size=257,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=24,
        moe_intermediate_size=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
    )
    return transformers.DeepseekV3ForCausalLM(config)


REFUSED = {  # what transformers saves, and the words of the refusal
    "deepseek latent attention": (_deepseek_v3, "multi-head latent attention"),
    "mistral sliding window": (
        lambda: transformers.MistralForCausalLM(tiny(transformers.MistralConfig, sliding_window=16)),
        "sliding-window",
    ),
    "qwen2 sliding window": (
        lambda: transformers.Qwen2ForCausalLM(
            tiny(transformers.Qwen2Config, use_sliding_window=True, sliding_window=16, max_window_layers=0)
        ),
        "sliding-window",
    ),
    "olmoe clipped qkv": (
        lambda: transformers.OlmoeForCausalLM(tiny(transformers.OlmoeConfig, num_experts=4, clip_qkv=8.0)),
        "clip_qkv",
    ),
    "yarn rope": (
        lambda: transformers.LlamaForCausalLM(
            tiny(
                transformers.LlamaConfig,
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            )
        ),
        "'yarn'",
    ),
    "llama attention bias": (
        lambda: transformers.LlamaForCausalLM(tiny(transformers.LlamaConfig, attention_bias=True)),
        "attention_bias=true",
    ),
    "gpt2": (
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=257, n_embd=32, n_layer=1, n_head=4, bos_token_id=None, eos_token_id=None
            )
        ),
        "'gpt2'",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_architectures_without_an_exact_counterpart_are_refused(tmp_path, capsys, name):
    make, words = REFUSED[name]
    save_hf(randomized(make()), tmp_path)
    capsys.readouterr()  # transformers' own progress output
    assert import_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("switchyard: error: ") and words in err[0], err


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_cache):
    run = hf_runs.moe_run(tmp_path_factory, data_cache)
    out = tmp_path_factory.mktemp("exported") / "hf"
    assert export_main([str(run), str(out)]) == 0
    return run, out


def test_import_of_an_export_is_bit_identical(exported):
    run, out = exported
    original = load_run_weights(run).state_dict
    _, state_dict = load_hf_weights(out)
    assert state_dict.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(state_dict[key], value), key


def test_training_from_an_import_starts_at_the_original_validation_loss(tmp_path_factory, data_cache, exported, capsys):
    run, out = exported
    assert import_main([str(out)]) == 0
    overrides = capsys.readouterr().out.split()
    assert f"model.init_from=hf:{out}" in overrides and "data.tokenizer.kind=file" in overrides
    root = hf_runs.workdir(tmp_path_factory)
    # Two ranks with parallel.ep=2 (each holds 2 of the 4 experts); the same validation rows.
    done = run_job(
        root,
        data_cache,
        *hf_runs.base_overrides(root),
        "run_name=from_hf",
        "train.steps=1",
        "parallel.ep=2",
        "train.micro_batch=2",
        *overrides,
        nproc=2,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert hf_runs.first_val_loss(root / "outputs/from_hf") == pytest.approx(hf_runs.last_val_loss(run), rel=1e-6)


def break_file(path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        config = json.loads(path.read_text())
        config["vocab_size"] += 3
        path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "how,file,words",
    [
        ("truncated", "model.safetensors", "not a complete safetensors file"),
        ("vocab", "config.json", "mismatched vocab sizes"),
    ],
)
def test_broken_directories_are_refused_with_one_line(tmp_path, capsys, how, file, words):
    model = hf_runs.random_model()
    write_hf_model(model.cfg, model.state_dict(), Tokenizer(), tmp_path / "hf")
    break_file(tmp_path / "hf" / file, how)
    assert import_main([str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


def test_init_from_checks_the_settings_before_any_process_starts(tmp_path, exported):
    from train.config import JobConfig
    from train.preflight import preflight

    _, out = exported
    job = JobConfig()
    job.model.init_from = f"hf:{out}"
    with pytest.raises(ValueError, match=r"model\.n_layers=2, this run model\.n_layers=4; set model\.n_layers=2"):
        preflight(job)
    job.model.init_from = "hf"
    with pytest.raises(ValueError, match=r"model\.init_from must be null, 'hf:"):
        preflight(job)
    job.model.init_from = f"hf:{tmp_path}"
    with pytest.raises(ValueError, match="not a transformers directory"):
        preflight(job)


ROUND_TRIPS = {  # family -> (ranks, extra overrides): each under parallel.ep=2
    "qwen2_moe": (4, ("deepspeed.zero_stage=3",)),  # GQA 4:1, qkv biases, gated shared expert; ZeRO-3 over 4 ranks
    "qwen3_moe": (2, ()),  # GQA 8:1, head_dim 6 (d_model 32 / 8 heads = 4), per-head q/k norms
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_import_train_export_gives_transformers_the_same_loss(tmp_path, tmp_path_factory, data_cache, capsys, name):
    """A checkpoint made by transformers -> import -> 3 training steps under ep=2 -> export -> transformers
    loads it, and its loss on a batch is Switchyard's."""
    nproc, extra = ROUND_TRIPS[name]
    source = randomized(MADE_BY_TRANSFORMERS[name]())
    save_hf(source, tmp_path / "source")
    capsys.readouterr()
    assert import_main([str(tmp_path / "source")]) == 0
    overrides = capsys.readouterr().out.split()
    root = hf_runs.workdir(tmp_path_factory)
    done = run_job(
        root,
        data_cache,
        *hf_runs.base_overrides(root),
        f"run_name=round_trip_{name}",
        "train.steps=3",
        "train.eval_interval=3",
        "parallel.ep=2",
        "train.micro_batch=2",
        *extra,
        *overrides,
        nproc=nproc,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = root / "outputs" / f"round_trip_{name}"
    assert export_main([str(run), str(tmp_path / "out")]) == 0
    weights = load_run_weights(run)
    assert weights.step == 3
    # Training moved the weights (so the comparison below is of the trained model, not the source).
    source_sd = load_hf_weights(tmp_path / "source")[1]
    assert not torch.equal(weights.state_dict["blocks.1.attn.qkv.weight"], source_sd["blocks.1.attn.qkv.weight"])

    ids = weights.tokenizer.encode("The king shall speak upon the sea, and the old bird will rise.")
    ids_BS = torch.tensor([ids[:32], ids[-32:]])  # model.max_seq_len = train.seq_len = 32
    model = weights.build_model().eval()
    with torch.no_grad():
        logits = model(ids_BS)[0]
        ours = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids_BS[:, 1:].flatten()).item()
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert type(hf_model).__name__ == type(source).__name__
        theirs = hf_model(ids_BS, labels=ids_BS).loss.item()
    assert theirs == pytest.approx(ours, rel=1e-5)


def test_each_of_4_ranks_with_ep4_reads_only_its_experts_and_stays_below_the_checkpoints_bytes(tmp_path):
    """Imports at real size: under ep=4 every rank reads the dense weights and its quarter of the
    experts (safetensors tensor by tensor), so its peak memory during the import is below the whole
    checkpoint's bytes; reading the whole checkpoint, as before, exceeds them."""
    from tests.ranks import run_ranks

    # Experts are ~95% of the bytes, as in real MoE checkpoints (Mixtral-8x7B: 96%).
    model = hf_runs.random_model(model_d_model=256, model_n_layers=2, moe_num_experts=8, moe_expert_ffn_hidden=1024)
    write_hf_model(model.cfg, model.state_dict(), Tokenizer(), tmp_path / "hf")
    shapes = SafetensorsWeights(tmp_path / "hf").shapes  # fp32 tensors, as the file headers say
    checkpoint_bytes = sum(4 * math.prod(shape) for shape in shapes.values())
    expert_bytes = sum(4 * math.prod(shape) for name, shape in shapes.items() if ".experts." in name)
    assert expert_bytes > 0.9 * checkpoint_bytes
    run_ranks(4, hf_runs.import_with_ep4, str(tmp_path / "hf"), checkpoint_bytes, expert_bytes)
