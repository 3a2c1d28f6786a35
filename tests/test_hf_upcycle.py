"""Upcycling (model.init_from=upcycle:): a dense model turned into an MoE computes the dense model's
function at step 0 — from a dense Switchyard model and from a dense transformers Llama — and a
run started that way begins at the dense run's validation loss."""

import pytest
import torch
import transformers

from models.gpt import GPT
from tests import hf_runs
from tests.hf_runs import one_thread  # noqa: F401  (autouse)
from train.config import JobConfig
from train.hf.files import byte_tokenizer_backend
from train.hf.init_from import source_weights, upcycle_state_dict
from train.preflight import preflight


def moe_like(dense: GPT, **moe) -> GPT:
    """A fresh MoE model of the dense model's shape (random router, random experts)."""
    cfg = dense.cfg
    keys = (
        "n_layers",
        "d_model",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "qk_norm",
        "qkv_bias",
        "ffn_hidden",
        "activation",
        "tie_embeddings",
        "rope_theta",
        "rope_scaling",
        "norm_eps",
        "max_seq_len",
    )
    settings = {f"model_{k}": getattr(cfg.model, k) for k in keys}
    model = hf_runs.random_model(
        seed=7, vocab_size=cfg.model.vocab_size, moe_expert_ffn_hidden=cfg.model.ffn_hidden, **settings, **moe
    )
    return model


def load_upcycled(moe_model: GPT, dense_sd: dict) -> None:
    """What the job does (through the parallel trainer): the upcycled weights over the fresh model's."""
    missing, unexpected = moe_model.load_state_dict(upcycle_state_dict(dense_sd, moe_model.cfg), strict=False)
    assert not unexpected and all(".router." in k or ".shared_experts.w" in k for k in missing), (missing, unexpected)


@pytest.mark.parametrize(
    "moe",
    [
        {"moe_top_k": 2},
        {"moe_top_k": 3, "moe_num_experts": 8},
        {"moe_top_k": 1, "moe_every": 2, "moe_num_shared_experts": 1},
        {"moe_top_k": 2, "moe_score": "sigmoid"},
    ],
    ids=["top2", "top3of8", "top1-every2-shared", "sigmoid"],
)
def test_upcycled_model_computes_the_dense_function(moe):
    dense = hf_runs.random_model(moe_every=5)  # no MoE block
    moe_model = moe_like(dense, **moe)
    ids_BS = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = (moe_model(ids_BS)[0] - dense(ids_BS)[0]).abs().max().item()
        load_upcycled(moe_model, dense.state_dict())
        logits, stats = moe_model(ids_BS)
        want = dense(ids_BS)[0]
    assert before > 1.0  # the comparison can fail
    assert (logits - want).abs().max().item() <= 1e-4
    assert all((s.tokens_per_expert > 0).sum() > 1 for s in stats)  # the random router spreads the tokens


DENSE_SOURCES = {  # transformers dense models people upcycle from, at real head ratios
    "llama": lambda common: transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)),
    "llama3 gqa 4:1, scaled rope": lambda common: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **{
                **common,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "head_dim": 8,
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            }
        )
    ),
    "qwen2.5 gqa 8:1, qkv bias": lambda common: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**{**common, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 6})
    ),
}


@pytest.mark.parametrize("name", sorted(DENSE_SOURCES))
def test_upcycling_a_transformers_dense_model_gives_its_logits(tmp_path, name):
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
    dense = DENSE_SOURCES[name](common)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    dense.save_pretrained(tmp_path)
    byte_tokenizer_backend().save(str(tmp_path / "tokenizer.json"))
    dense_cfg, dense_sd, _ = source_weights("upcycle", tmp_path)
    moe_model = moe_like(GPT(dense_cfg), moe_top_k=2)
    load_upcycled(moe_model, dense_sd)
    ids_BS = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (moe_model.eval()(ids_BS)[0] - dense.eval()(ids_BS).logits).abs().max().item()
    assert diff <= 1e-4


def test_upcycled_run_starts_at_the_dense_runs_validation_loss(tmp_path_factory, data_cache):
    # model=tiny: 2 blocks of width ffn_hidden=128; moe.every=3 leaves both dense.
    dense = hf_runs.trained_run(
        tmp_path_factory, data_cache, "dense", "moe.every=3", "train.steps=2", "train.eval_interval=2"
    )
    upcycled = hf_runs.trained_run(
        tmp_path_factory,
        data_cache,
        "upcycled",
        f"model.init_from=upcycle:{dense}",
        "moe.expert_ffn_hidden=128",
        "train.steps=1",
    )
    assert hf_runs.first_val_loss(upcycled) == pytest.approx(hf_runs.last_val_loss(dense), rel=1e-5)


def test_upcycling_settings_are_checked_up_front(tmp_path_factory, data_cache):
    dense = hf_runs.trained_run(
        tmp_path_factory, data_cache, "dense", "moe.every=3", "train.steps=2", "train.eval_interval=2"
    )
    cases = [
        ({"expert_ffn_hidden": 64}, "moe.expert_ffn_hidden must be 128"),
        ({"expert_ffn_hidden": 128, "normalize_topk": False}, "moe.normalize_topk=false"),
        ({"expert_ffn_hidden": 128, "every": 3}, "no MoE block"),
    ]
    for moe, words in cases:
        job = JobConfig()
        job.model.n_layers, job.model.d_model, job.model.ffn_hidden = 2, 64, 128
        job.model.init_from = f"upcycle:{dense}"
        for key, value in moe.items():
            setattr(job.moe, key, value)
        with pytest.raises(ValueError, match=words):
            preflight(job)
