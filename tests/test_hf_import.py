"""Import from Hugging Face: directories written by transformers itself read as Switchyard models
with the same logits; an exported run reads back bit for bit and training started from it
(model.init_from=hf:, at parallel.ep=2) starts at the original run's validation loss; directories
Switchyard cannot compute exactly are refused with one line."""

import json

import pytest
import torch
import transformers

from tests import hf_runs
from tests.hf_runs import one_thread  # noqa: F401  (autouse)
from models.gpt import GPT
from tests.jobs import run_job
from train.data.tokenizer import Tokenizer
from train.export_hf import main as export_main
from train.hf.exporting import write_hf_model
from train.hf.files import byte_tokenizer_backend
from train.hf.importing import load_hf_weights
from train.import_hf import main as import_main
from train.checkpoint.run_weights import load_run_weights

TOLERANCE = 1e-4


def save_hf(model, out_dir, tokenizer_backend=None) -> None:
    """A directory as transformers writes it, plus the bytes tokenizer."""
    model.save_pretrained(out_dir)
    (tokenizer_backend or byte_tokenizer_backend()).save(str(out_dir / "tokenizer.json"))


def tiny(config_class, **fields):
    common = dict(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=24, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    return config_class(**{**common, **fields})


def randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


MADE_BY_TRANSFORMERS = {
    "mixtral": lambda: transformers.MixtralForCausalLM(tiny(transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2)),
    "llama": lambda: transformers.LlamaForCausalLM(tiny(transformers.LlamaConfig, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", sorted(MADE_BY_TRANSFORMERS))
def test_directories_saved_by_transformers_give_the_same_logits(tmp_path, name):
    hf_model = randomized(MADE_BY_TRANSFORMERS[name]())
    save_hf(hf_model, tmp_path)
    imported, state_dict = load_hf_weights(tmp_path)
    model = GPT(imported.cfg)
    model.load_state_dict(state_dict)
    ids_BS = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (model.eval()(ids_BS)[0] - hf_model(ids_BS).logits).abs().max().item()
    assert diff <= TOLERANCE, diff


REFUSED = {  # what transformers saves, and the words of the refusal
    "gqa": (lambda: transformers.MixtralForCausalLM(tiny(transformers.MixtralConfig, num_key_value_heads=2, num_local_experts=4)), "num_key_value_heads=2"),
    "qwen2 qkv bias": (lambda: transformers.Qwen2MoeForCausalLM(tiny(transformers.Qwen2MoeConfig, num_experts=4, moe_intermediate_size=8,
                                                                     shared_expert_intermediate_size=8)), "qkv_bias"),
    "qwen2 gated shared expert": (lambda: transformers.Qwen2MoeForCausalLM(tiny(transformers.Qwen2MoeConfig, num_experts=4, moe_intermediate_size=8,
                                                                                shared_expert_intermediate_size=8, qkv_bias=False)), "shared_expert_gate"),
    "qwen3 q/k norms": (lambda: transformers.Qwen3MoeForCausalLM(tiny(transformers.Qwen3MoeConfig, num_experts=4, moe_intermediate_size=8)), "qwen3_moe"),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=257, n_embd=32, n_layer=1, n_head=4, bos_token_id=None, eos_token_id=None)), "'gpt2'"),
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
    done = run_job(root, data_cache, *hf_runs.base_overrides(root), "run_name=from_hf", "train.steps=1",
                   "parallel.ep=2", "train.micro_batch=2", *overrides, nproc=2)
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


@pytest.mark.parametrize("how,file,words", [
    ("truncated", "model.safetensors", "not a complete safetensors file"),
    ("vocab", "config.json", "mismatched vocab sizes"),
])
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
