"""Text generation: greedy `train.generate` gives the tokens transformers' `generate()` gives on the
exported model, for every family (grouped-query attention, q/k norms, qkv biases included); the KV
cache gives the tokens and logits of the no-cache path (the oracle); sampling follows its seed,
temperature and top-k."""

import pytest
import torch
import transformers

from models.config import RopeScalingConfig
from models.generate import generate, generate_ids
from models.gpt import KVCache
from tests import hf_runs
from tests.hf_runs import one_thread  # noqa: F401  (autouse)
from tests.ranks import run_ranks
from train.checkpoint.run_weights import load_run_weights
from train.data.tokenizer import Tokenizer
from train.export_hf import main as export_main
from train.generate import main as generate_main
from train.hf.exporting import write_hf_model


def transformers_greedy(out_dir, prompt_ids: list[int], n: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_tokens_equal_transformers_generate(tmp_path):
    # Weights far from initialisation, so that the 20 tokens are not one token repeated.
    model = hf_runs.random_model(moe_every=2)
    write_hf_model(model.cfg, model.state_dict(), Tokenizer(), tmp_path / "hf")
    prompt = list(b"To be, or not")
    ours = generate_ids(model, prompt, 20)
    assert len(ours) == 20 and len(set(ours)) > 5
    assert ours == transformers_greedy(tmp_path / "hf", prompt, 20)


FAMILIES = {  # random_model settings per transformers class the export picks
    "mixtral gqa 4:1": {"model_n_heads": 8, "model_n_kv_heads": 2, "model_head_dim": 6},
    "qwen2_moe": {
        "model_qkv_bias": True,
        "model_n_kv_heads": 2,
        "moe_every": 2,
        "moe_num_shared_experts": 1,
        "moe_shared_expert_gate": True,
    },
    "qwen3_moe gqa 8:1": {"model_n_heads": 8, "model_n_kv_heads": 1, "model_head_dim": 8, "model_qk_norm": "head"},
    "olmoe": {"model_qk_norm": "projection", "model_n_kv_heads": 2, "moe_normalize_topk": False},
    "glm4_moe": {"moe_score": "sigmoid", "moe_num_shared_experts": 1, "model_qk_norm": "head", "model_n_kv_heads": 1},
    "llama3 dense": {
        "moe_every": 5,
        "model_n_heads": 8,
        "model_n_kv_heads": 2,
        "model_rope_scaling": RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 16),
    },
    "qwen2 dense": {"moe_every": 5, "model_qkv_bias": True, "model_n_kv_heads": 1},
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cached_greedy_tokens_equal_transformers_generate_for_every_family(tmp_path, name):
    model = hf_runs.random_model(**FAMILIES[name])
    write_hf_model(model.cfg, model.state_dict(), Tokenizer(), tmp_path / "hf")
    prompt = list(b"To be, or not")
    ours = generate_ids(model, prompt, 20)  # with the KV cache
    assert len(set(ours)) > 1  # random weights repeat themselves, but not one token only
    assert ours == transformers_greedy(tmp_path / "hf", prompt, 20)


@pytest.mark.parametrize("name", ["default", *sorted(FAMILIES)])
def test_kv_cache_gives_the_no_cache_tokens(name):
    model = hf_runs.random_model(**FAMILIES.get(name, {}))
    prompt = list(b"Now is the winter")  # 17 tokens + 40 new > max_seq_len 48: past it, the context slides
    for temperature, top_k in ((0.0, 0), (1.0, 20)):
        cached = generate_ids(model, prompt, 40, temperature=temperature, top_k=top_k, seed=1)
        assert cached == generate_ids(model, prompt, 40, temperature=temperature, top_k=top_k, seed=1, use_cache=False)


def test_cached_forward_in_chunks_gives_the_full_forward_logits():
    """Chunks of several tokens after cached ones (the masked path), single tokens and a prompt."""
    model = hf_runs.random_model(model_n_heads=8, model_n_kv_heads=2, model_qk_norm="head")
    ids_BS = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids_BS)[0]
        cache, pieces = KVCache(model.cfg.model), []
        for start, end in ((0, 10), (10, 11), (11, 30), (30, 31), (31, 48)):
            pieces.append(model(ids_BS[:, start:end], cache)[0])
    assert cache.length == 48
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        model(ids_BS[:, :1], cache)


def test_generate_cli_on_a_run_equals_transformers(tmp_path, tmp_path_factory, data_cache, capsys):
    run = hf_runs.moe_run(tmp_path_factory, data_cache)
    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    weights = load_run_weights(run)
    prompt = "The old king"
    prompt_ids = weights.tokenizer.encode(prompt)
    theirs = transformers_greedy(tmp_path / "hf", prompt_ids, 20)
    if weights.tokenizer.eot_id in theirs:  # both stop at end-of-text
        theirs = theirs[: theirs.index(weights.tokenizer.eot_id)]
    capsys.readouterr()
    assert generate_main([str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == prompt + weights.tokenizer.decode(theirs) + "\n"
    assert generate_main([str(run), "--prompt", prompt, "--step", "9"]) == 2
    assert "--step 9" in capsys.readouterr().err


def test_sampling_follows_seed_temperature_and_top_k():
    model = hf_runs.random_model()
    tokenizer = Tokenizer()
    prompt = "Speak"
    draws = {seed: generate(model, tokenizer, prompt, 15, temperature=1.0, top_k=0, seed=seed) for seed in (0, 0, 1, 2)}
    assert generate(model, tokenizer, prompt, 15, temperature=1.0, top_k=0, seed=0) == draws[0]  # reproducible
    assert len(set(draws.values())) > 1  # and random
    greedy = generate(model, tokenizer, prompt, 15, temperature=0)
    assert generate(model, tokenizer, prompt, 15, temperature=5.0, top_k=1, seed=3) == greedy  # top-1 is greedy
    assert model.training is False


def test_sampling_under_expert_parallelism_gives_the_one_process_tokens_on_every_rank():
    """The training loop samples from its live, sharded model: every rank must take part and agree."""
    expected = generate_ids(hf_runs.random_model(), list(b"To be"), 12, temperature=0.8, top_k=20, seed=5)
    run_ranks(2, hf_runs.generate_with_ep2, expected)  # spawned ranks import hf_runs only: no transformers


def test_generation_stops_before_the_stop_token():
    model = hf_runs.random_model()
    greedy = generate_ids(model, list(b"Hi"), 10)
    stop = greedy[3]
    assert generate_ids(model, list(b"Hi"), 10, stop_id=stop) == greedy[: greedy.index(stop)]


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-k", "-2"), ("--max-new-tokens", "-3")])
def test_bad_sampling_settings_fail_with_one_line(tmp_path_factory, data_cache, capsys, flag, value):
    run = hf_runs.moe_run(tmp_path_factory, data_cache)
    assert generate_main([str(run), "--prompt", "x", flag, value]) == 2
    assert flag in capsys.readouterr().err
