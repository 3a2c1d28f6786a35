"""Switchyard GPT <-> Hugging Face transformers: which transformers class computes exactly the same
function, its config.json, and the weight renaming in both directions.

Checked line by line against the transformers 5.x modeling code:
- Attention. Switchyard rotates interleaved channel pairs (x[2i], x[2i+1]) by angle_i
  (models/gpt.py); every class below uses `rotate_half`, which pairs (x[i], x[i + Dh/2]). The q and
  k projection rows of each head are permuted (even channels first, then odd) so HF's pair i is
  Switchyard's pair i; q·k is unchanged by a permutation applied to both, v and o are untouched.
  The fused qkv projection is [3D, D], rows q | k | v, each head-major (`view(B, S, 3, H, Dh)`).
  Same inverse frequencies 1/θ^(2i/Dh), same 1/sqrt(Dh) scale, no biases, no q/k norms.
- Feed-forward. SwiGLU is w2 · (silu(w3 x) ⊙ w1 x) (models/ffn.py, models/moe/experts.py): w3 is
  the GATE and w1 the UP projection — the opposite of Mixtral's file names, where experts.e.w1 is
  the gate and w3 the up projection. Experts are stored [E, D, F] here and per expert [F, D] there.
- RMSNorm x·rsqrt(mean(x²) + eps)·w in fp32 on both sides; tied embeddings map to
  `tie_word_embeddings` (the file then has no lm_head).
- Routers (models/moe/router.py): softmax over all experts, top-k, optional renormalisation —
  Mixtral (always renormalises) and Qwen2-MoE (`norm_topk_prob`); sigmoid scores with a selection
  bias that only picks experts — Glm4-MoE (`e_score_correction_bias`, one group, scaling 1).
- Shared experts. Qwen2-MoE multiplies its shared expert by sigmoid(shared_expert_gate · x): the
  gate is written as zeros (sigmoid(0) = 0.5 exactly) and the shared down projection doubled, both
  exact in floating point. Glm4-MoE adds its shared experts ungated, as Switchyard does.
- Interleaving. Block i (0-based) is MoE when (i + 1) % moe.every == 0: Qwen2-MoE's
  `decoder_sparse_step` uses the same rule; Glm4-MoE only puts dense blocks first.

Not exact, so refused: non-gated GELU experts (no transformers MoE class with rotary attention has
them), capacity factors (transformers' MoE classes are dropless), a selection bias with softmax
scores, Qwen3-MoE (q/k RMSNorm), grouped-query attention, qkv biases, sliding windows, scaled RoPE.

Shape legend: E experts, D hidden, F expert/FFN width, H heads, Dh head size.
"""

from __future__ import annotations

import torch

from models.config import GPTConfig, ModelConfig, MoEConfig

LLAMA, ARCEE, MIXTRAL, QWEN2_MOE, GLM4_MOE = "llama", "arcee", "mixtral", "qwen2_moe", "glm4_moe"
ARCHITECTURES = {
    LLAMA: "LlamaForCausalLM",  # dense, SwiGLU
    ARCEE: "ArceeForCausalLM",  # dense, non-gated MLP (here GELU)
    MIXTRAL: "MixtralForCausalLM",  # MoE in every block, softmax + renormalised top-k, no shared expert
    QWEN2_MOE: "Qwen2MoeForCausalLM",  # softmax, interleaved dense/MoE, shared experts, norm_topk_prob
    GLM4_MOE: "Glm4MoeForCausalLM",  # sigmoid scores, selection bias, shared experts
}

KNOWN_INEXACT = {  # why some close relatives are not imported
    "qwen3_moe": "its attention RMS-normalises q and k per head",
    "olmoe": "its attention RMS-normalises q and k",
    "deepseek_v3": "multi-head latent attention",
    "deepseek_v2": "multi-head latent attention",
    "mistral": "sliding-window attention",
    "qwen2": "q/k/v projection biases",
}


def moe_block_ids(cfg: GPTConfig) -> list[int]:
    """The blocks with an MoE feed-forward (the rule of models/gpt.py)."""
    return [i for i in range(cfg.model.n_layers) if (i + 1) % cfg.moe.every == 0]


def choose_model_type(cfg: GPTConfig, has_selection_bias: bool) -> str:
    """The transformers model_type that computes this model's function, or one ValueError naming the
    setting that has no exact counterpart."""
    m, moe = cfg.model, cfg.moe
    moe_blocks = moe_block_ids(cfg)
    if not moe_blocks:
        return LLAMA if m.activation == "swiglu" else ARCEE
    if m.activation != "swiglu":
        raise ValueError(
            f"model.activation={m.activation}: no transformers MoE class has non-gated GELU experts with rotary "
            "attention (NemotronH's experts are non-gated, but its attention has no RoPE); only model.activation=swiglu "
            "MoE models, or dense ones (moe.every > model.n_layers), export"
        )
    if moe.capacity_factor is not None:
        raise ValueError(
            f"moe.capacity_factor={moe.capacity_factor}: this model drops tokens over capacity and transformers' MoE "
            "classes are dropless, so they would compute another function; only moe.capacity_factor=null exports"
        )
    if moe.score == "sigmoid":
        if moe_blocks != list(range(moe_blocks[0], m.n_layers)):
            raise ValueError(
                f"moe.every={moe.every} with moe.score=sigmoid: Glm4-MoE, the transformers class with sigmoid scores, "
                "has its dense blocks first (first_k_dense_replace), never interleaved; use moe.every=1"
            )
        if moe.num_experts < 2:
            raise ValueError("moe.num_experts=1 with moe.score=sigmoid: Glm4-MoE's expert selection needs at least 2 experts")
        return GLM4_MOE
    if has_selection_bias:
        raise ValueError(
            "moe.bias_update_rate: this model's router has a non-zero selection bias (expert_bias) on softmax scores; "
            "no transformers class has that (Glm4-MoE has it for moe.score=sigmoid)"
        )
    if moe.every == 1 and moe.num_shared_experts == 0 and moe.normalize_topk:
        return MIXTRAL
    return QWEN2_MOE


def has_selection_bias(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("router.expert_bias") and bool(v.any()) for k, v in state_dict.items())


# --- config.json ------------------------------------------------------------------------------


def hf_config(cfg: GPTConfig, model_type: str, eot_id: int) -> dict:
    """config.json for `model_type`; every field that changes the function is written explicitly."""
    m, moe = cfg.model, cfg.moe
    rope = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads,
        "head_dim": m.d_model // m.n_heads,
        "hidden_act": "silu" if m.activation == "swiglu" else "gelu",
        "intermediate_size": m.ffn_hidden,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "attention_dropout": 0.0,
        "bos_token_id": None,  # Switchyard prepends nothing; documents are separated by end-of-text
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "dtype": "float32",
        "use_cache": True,
    }
    if model_type in (LLAMA, ARCEE):
        config.update(attention_bias=False, mlp_bias=False)
    elif model_type == MIXTRAL:
        config.update(
            intermediate_size=moe.expert_ffn_hidden, num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
            sliding_window=None, router_jitter_noise=moe.jitter, router_aux_loss_coef=moe.aux_loss_coef,
        )
    elif model_type == QWEN2_MOE:
        config.update(
            qkv_bias=False, use_sliding_window=False, decoder_sparse_step=moe.every, mlp_only_layers=[],
            num_experts=moe.num_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_ffn_hidden,
            shared_expert_intermediate_size=moe.num_shared_experts * moe.expert_ffn_hidden,
            norm_topk_prob=moe.normalize_topk, router_aux_loss_coef=moe.aux_loss_coef,
        )
    else:
        assert model_type == GLM4_MOE, model_type
        config.update(
            attention_bias=False, use_qk_norm=False, rope_parameters={**rope, "partial_rotary_factor": 1.0},
            n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k, n_shared_experts=moe.num_shared_experts,
            moe_intermediate_size=moe.expert_ffn_hidden, first_k_dense_replace=moe_block_ids(cfg)[0],
            norm_topk_prob=moe.normalize_topk, routed_scaling_factor=1.0, n_group=1, topk_group=1, num_mtp_layers=0,
        )
    return config


def _require(config: dict, key: str, where: str):
    if config.get(key) is None:
        raise ValueError(f"{where}: config.json has no {key}")
    return config[key]


def _refuse_unless(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise ValueError(f"{where}: {what}; Switchyard has no exact counterpart, so it is not imported")


def gpt_config_from_hf(config: dict, where: str) -> tuple[GPTConfig, str]:
    """The Switchyard GPTConfig computing the same function as this config.json, and its model_type;
    one ValueError naming the first option without an exact counterpart."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        why = f" ({KNOWN_INEXACT[model_type]})" if model_type in KNOWN_INEXACT else ""
        raise ValueError(f"{where}: model_type {model_type!r} has no exact Switchyard counterpart{why}; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    _check_attention(config, model_type, where)
    act = config.get("hidden_act", "silu")
    activation = "gelu" if model_type == ARCEE else "swiglu"
    _refuse_unless(act == {"gelu": "gelu", "swiglu": "silu"}[activation], where,
                   f"hidden_act={act!r} (Switchyard's {'non-gated MLP is GELU' if model_type == ARCEE else 'gated MLP is SwiGLU'})")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    n_layers = _require(config, "num_hidden_layers", where)
    model = ModelConfig(
        vocab_size=_require(config, "vocab_size", where),
        max_seq_len=config.get("max_position_embeddings", 2048),
        n_layers=n_layers,
        d_model=_require(config, "hidden_size", where),
        n_heads=_require(config, "num_attention_heads", where),
        ffn_hidden=_require(config, "intermediate_size", where),
        activation=activation,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_eps=float(_require(config, "rms_norm_eps", where)),
        init_std=float(config.get("initializer_range", 0.02)),
    )
    moe = MoEConfig(every=n_layers + 1)  # dense unless set below
    if model_type == MIXTRAL:
        moe = MoEConfig(
            num_experts=_require(config, "num_local_experts", where), top_k=_require(config, "num_experts_per_tok", where),
            every=1, expert_ffn_hidden=model.ffn_hidden, normalize_topk=True, jitter=float(config.get("router_jitter_noise", 0.0)),
        )
    elif model_type == QWEN2_MOE:
        moe = _qwen2_moe_config(config, model, where)
    elif model_type == GLM4_MOE:
        moe = _glm4_moe_config(config, model, where)
    cfg = GPTConfig(model, moe)
    try:
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{where}: config.json gives an invalid Switchyard model: {err}") from err
    return cfg, model_type


def _check_attention(config: dict, model_type: str, where: str) -> None:
    """Plain multi-head attention with full, unscaled RoPE and no biases, norms or windows."""
    d_model, n_heads = _require(config, "hidden_size", where), _require(config, "num_attention_heads", where)
    kv_heads = config.get("num_key_value_heads") or n_heads
    _refuse_unless(kv_heads == n_heads, where, f"grouped-query attention (num_key_value_heads={kv_heads} < num_attention_heads={n_heads})")
    head_dim = config.get("head_dim") or d_model // n_heads
    _refuse_unless(head_dim * n_heads == d_model, where, f"head_dim={head_dim} * num_attention_heads != hidden_size={d_model}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _refuse_unless(rope_type == "default", where, f"scaled RoPE (rope_type={rope_type!r})")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5 if model_type == GLM4_MOE else 1.0))
    _refuse_unless(partial == 1.0, where, f"partial rotary embeddings (partial_rotary_factor={partial})")
    for bias in ("attention_bias", "mlp_bias"):
        _refuse_unless(not config.get(bias, False), where, f"{bias}=true")
    _refuse_unless(not config.get("qkv_bias", model_type == QWEN2_MOE), where, "q/k/v projection biases (qkv_bias=true)")
    _refuse_unless(not config.get("use_qk_norm", False), where, "q/k RMSNorm (use_qk_norm=true)")
    window = config.get("sliding_window")
    _refuse_unless(window is None or not config.get("use_sliding_window", model_type == MIXTRAL), where,
                   f"sliding-window attention (sliding_window={window})")


def _qwen2_moe_config(config: dict, model: ModelConfig, where: str) -> MoEConfig:
    every = config.get("decoder_sparse_step", 1)
    width = _require(config, "moe_intermediate_size", where)
    shared = config.get("shared_expert_intermediate_size", 0)
    _refuse_unless(shared % width == 0, where,
                   f"shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size={width}")
    moe = MoEConfig(
        num_experts=_require(config, "num_experts", where), top_k=_require(config, "num_experts_per_tok", where), every=every,
        expert_ffn_hidden=width, num_shared_experts=shared // width, normalize_topk=bool(config.get("norm_topk_prob", False)),
    )
    dense_only = config.get("mlp_only_layers") or []
    sparse = [i for i in range(model.n_layers) if i not in dense_only and (i + 1) % every == 0]
    _refuse_unless(sparse == moe_block_ids(GPTConfig(model, moe)), where,
                   f"mlp_only_layers={dense_only} (MoE blocks other than every decoder_sparse_step-th)")
    return moe


def _glm4_moe_config(config: dict, model: ModelConfig, where: str) -> MoEConfig:
    _refuse_unless(config.get("n_group", 1) == config.get("topk_group", 1), where, "group-limited routing (topk_group < n_group)")
    scaling = config.get("routed_scaling_factor", 1.0)
    _refuse_unless(scaling == 1.0, where, f"routed_scaling_factor={scaling}")
    first = config.get("first_k_dense_replace", 1)
    # Switchyard's MoE blocks are every `every`-th: "dense first, then MoE" is that for 0 or L-1 dense blocks.
    _refuse_unless(first in (0, model.n_layers - 1), where, f"first_k_dense_replace={first} (dense blocks first, then MoE)")
    return MoEConfig(
        num_experts=_require(config, "n_routed_experts", where), top_k=_require(config, "num_experts_per_tok", where),
        every=first + 1, expert_ffn_hidden=_require(config, "moe_intermediate_size", where),
        num_shared_experts=config.get("n_shared_experts", 1), score="sigmoid", normalize_topk=bool(config.get("norm_topk_prob", True)),
    )


# --- weights ----------------------------------------------------------------------------------


def rope_rows_to_hf(w_RD: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k projection rows [H·Dh, D]: per head, channel 2i -> i and 2i+1 -> i + Dh/2."""
    rows, d = w_RD.shape
    return w_RD.view(n_heads, rows // n_heads // 2, 2, d).transpose(1, 2).reshape(rows, d)


def rope_rows_from_hf(w_RD: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, d = w_RD.shape
    return w_RD.view(n_heads, 2, rows // n_heads // 2, d).transpose(1, 2).reshape(rows, d)


def _mlp_names(model_type: str) -> tuple[str, str, str]:
    """HF file names of (gate, up, down) in an expert."""
    return ("w1", "w3", "w2") if model_type == MIXTRAL else ("gate_proj", "up_proj", "down_proj")


def _moe_prefix(model_type: str, layer: int) -> str:
    return f"model.layers.{layer}." + ("block_sparse_moe." if model_type == MIXTRAL else "mlp.")


def _shared_names(model_type: str, prefix: str) -> dict[str, str]:
    """Switchyard shared-expert weight -> HF name (Qwen2-MoE and Glm4-MoE)."""
    sub = prefix + ("shared_expert." if model_type == QWEN2_MOE else "shared_experts.")
    return {"w3.weight": sub + "gate_proj.weight", "w1.weight": sub + "up_proj.weight", "w2.weight": sub + "down_proj.weight"}


def to_hf_tensors(sd: dict[str, torch.Tensor], cfg: GPTConfig, model_type: str) -> dict[str, torch.Tensor]:
    """Switchyard state dict -> HF weights (contiguous copies, no shared storage, as safetensors wants)."""
    m, moe = cfg.model, cfg.moe
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    moe_blocks = set(moe_block_ids(cfg))
    for i in range(m.n_layers):
        sy, hf = f"blocks.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[sy + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[sy + "ffn_norm.weight"]
        q_DD, k_DD, v_DD = sd[sy + "attn.qkv.weight"].chunk(3)
        out[hf + "self_attn.q_proj.weight"] = rope_rows_to_hf(q_DD, m.n_heads)
        out[hf + "self_attn.k_proj.weight"] = rope_rows_to_hf(k_DD, m.n_heads)
        out[hf + "self_attn.v_proj.weight"] = v_DD
        out[hf + "self_attn.o_proj.weight"] = sd[sy + "attn.proj.weight"]
        if i not in moe_blocks:
            out[hf + "mlp.up_proj.weight"] = sd[sy + "ffn.w1.weight"]
            out[hf + "mlp.down_proj.weight"] = sd[sy + "ffn.w2.weight"]
            if m.activation == "swiglu":
                out[hf + "mlp.gate_proj.weight"] = sd[sy + "ffn.w3.weight"]
            continue
        prefix = _moe_prefix(model_type, i)
        gate, up, down = _mlp_names(model_type)
        out[prefix + "gate.weight"] = sd[sy + "ffn.router.gate_ED"]
        w1_EDF, w2_EFD, w3_EDF = (sd[sy + f"ffn.experts.{n}"] for n in ("w1_EDF", "w2_EFD", "w3_EDF"))
        for e in range(moe.num_experts):
            out[f"{prefix}experts.{e}.{gate}.weight"] = w3_EDF[e].T  # [F, D]
            out[f"{prefix}experts.{e}.{up}.weight"] = w1_EDF[e].T  # [F, D]
            out[f"{prefix}experts.{e}.{down}.weight"] = w2_EFD[e].T  # [D, F]
        if model_type == GLM4_MOE:
            out[prefix + "gate.e_score_correction_bias"] = sd[sy + "ffn.router.expert_bias"]
        if model_type in (QWEN2_MOE, GLM4_MOE):
            for name, hf_name in _shared_names(model_type, prefix).items():
                # Without shared experts the HF module still exists, with width 0 (it adds exactly 0).
                shape = (0, m.d_model) if name != "w2.weight" else (m.d_model, 0)
                out[hf_name] = sd.get(sy + "ffn.shared_experts." + name, w1_EDF.new_zeros(shape))
        if model_type == QWEN2_MOE:
            # sigmoid(0) = 0.5 scales the shared expert: a zero gate and a doubled down projection cancel exactly.
            out[prefix + "shared_expert_gate.weight"] = w1_EDF.new_zeros(1, m.d_model)
            out[prefix + "shared_expert.down_proj.weight"] = out[prefix + "shared_expert.down_proj.weight"] * 2
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_hf_tensors(hf: dict[str, torch.Tensor], cfg: GPTConfig, model_type: str, where: str) -> dict[str, torch.Tensor]:
    """HF weights -> Switchyard state dict (fp32). The names and shapes are checked against what
    `to_hf_tensors` writes for this config: a missing, extra or misshapen weight is refused."""
    from models.gpt import GPT

    with torch.device("meta"):
        expected = to_hf_tensors(GPT(cfg).state_dict(), cfg, model_type)
    if missing := sorted(set(expected) - set(hf)):
        raise ValueError(f"{where}: weight {missing[0]} is missing ({len(missing)} missing in all)")
    if extra := sorted(set(hf) - set(expected)):
        raise ValueError(f"{where}: unexpected weight {extra[0]} ({len(extra)} in all): a part Switchyard's model does not have")
    for name, want in expected.items():
        if hf[name].shape != want.shape:
            raise ValueError(f"{where}: weight {name} has shape {list(hf[name].shape)}, expected {list(want.shape)} from config.json")
    hf = {k: v.float() for k, v in hf.items()}

    m, moe = cfg.model, cfg.moe
    sd = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    sd["lm_head.weight"] = sd["embed.weight"] if m.tie_embeddings else hf["lm_head.weight"]
    moe_blocks = set(moe_block_ids(cfg))
    for i in range(m.n_layers):
        sy, pre = f"blocks.{i}.", f"model.layers.{i}."
        sd[sy + "attn_norm.weight"] = hf[pre + "input_layernorm.weight"]
        sd[sy + "ffn_norm.weight"] = hf[pre + "post_attention_layernorm.weight"]
        sd[sy + "attn.qkv.weight"] = torch.cat([
            rope_rows_from_hf(hf[pre + "self_attn.q_proj.weight"], m.n_heads),
            rope_rows_from_hf(hf[pre + "self_attn.k_proj.weight"], m.n_heads),
            hf[pre + "self_attn.v_proj.weight"],
        ])
        sd[sy + "attn.proj.weight"] = hf[pre + "self_attn.o_proj.weight"]
        if i not in moe_blocks:
            sd[sy + "ffn.w1.weight"] = hf[pre + "mlp.up_proj.weight"]
            sd[sy + "ffn.w2.weight"] = hf[pre + "mlp.down_proj.weight"]
            if m.activation == "swiglu":
                sd[sy + "ffn.w3.weight"] = hf[pre + "mlp.gate_proj.weight"]
            continue
        prefix = _moe_prefix(model_type, i)
        gate, up, down = _mlp_names(model_type)
        sd[sy + "ffn.router.gate_ED"] = hf[prefix + "gate.weight"]
        sd[sy + "ffn.router.expert_bias"] = hf.get(prefix + "gate.e_score_correction_bias", torch.zeros(moe.num_experts))
        experts = range(moe.num_experts)
        sd[sy + "ffn.experts.w1_EDF"] = torch.stack([hf[f"{prefix}experts.{e}.{up}.weight"].T for e in experts])
        sd[sy + "ffn.experts.w2_EFD"] = torch.stack([hf[f"{prefix}experts.{e}.{down}.weight"].T for e in experts])
        sd[sy + "ffn.experts.w3_EDF"] = torch.stack([hf[f"{prefix}experts.{e}.{gate}.weight"].T for e in experts])
        if model_type == QWEN2_MOE:
            gate_w = hf[prefix + "shared_expert_gate.weight"]
            _refuse_unless(not gate_w.any(), where, f"{prefix}shared_expert_gate.weight is not zero (a gated shared expert)")
        if moe.num_shared_experts:
            for name, hf_name in _shared_names(model_type, prefix).items():
                sd[sy + "ffn.shared_experts." + name] = hf[hf_name]
            if model_type == QWEN2_MOE:
                sd[sy + "ffn.shared_experts.w2.weight"] = sd[sy + "ffn.shared_experts.w2.weight"] / 2
    return {k: v.contiguous() for k, v in sd.items()}
