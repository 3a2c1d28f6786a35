"""GPT decoder: causality, MoE placement, tied embeddings, parameter counts."""

import torch

from models.config import GPTConfig, ModelConfig, MoEConfig
from models.ffn import FeedForward
from models.gpt import GPT, count_parameters
from models.moe.layer import MoELayer


def tiny(**moe):
    return GPTConfig(
        ModelConfig(vocab_size=50, max_seq_len=16, n_layers=4, d_model=32, n_heads=4, ffn_hidden=64),
        MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden=16, **moe),
    )


def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 50, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_moe_every_second_block():
    model = GPT(tiny(every=2))
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [FeedForward, MoELayer, FeedForward, MoELayer]
    _, stats = model(torch.randint(0, 50, (1, 5)))
    assert len(stats) == 2
    assert all(s.tokens_per_expert.sum() == 5 * 2 for s in stats)


def test_tied_embeddings_share_the_weight():
    model = GPT(tiny())
    assert model.lm_head.weight is model.embed.weight
    untied = GPT(
        GPTConfig(
            ModelConfig(vocab_size=50, max_seq_len=16, n_layers=1, d_model=32, n_heads=4, tie_embeddings=False),
            MoEConfig(num_experts=2, top_k=1),
        )
    )
    assert untied.lm_head.weight is not untied.embed.weight


def test_active_parameters_count_top_k_experts():
    model = GPT(tiny())
    total, active = count_parameters(model)
    per_expert = 3 * 32 * 16  # w1, w3: D x F, w2: F x D (SwiGLU)
    assert total - active == 4 * per_expert * (4 - 2)  # 4 MoE layers, E - k idle experts each
