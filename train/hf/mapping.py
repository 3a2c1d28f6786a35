"""Switchyard GPT <-> Hugging Face transformers: which transformers class computes exactly the same
function, its config.json, and the weight renaming in both directions.

Checked line by line against the transformers 5.x modeling code:
- Attention. Switchyard rotates interleaved channel pairs (x[2i], x[2i+1]) by angle_i
  (models/gpt.py); every class below uses `rotate_half`, which pairs (x[i], x[i + Dh/2]). The q and
  k projection rows of each head (and their biases and q/k-norm gains) are permuted (even channels
  first, then odd) so HF's pair i is Switchyard's pair i; q·k is unchanged by a permutation applied
  to both, v and o are untouched. The fused qkv projection is [(H + 2·Hkv)·Dh, D], rows q | k | v,
  each head-major. Same inverse frequencies 1/θ^(2i/Dh) (Llama-3's scaling step for step), same
  1/sqrt(Dh) scale; grouped-query attention shares K/V head j among query heads j·H/Hkv ...
  (j+1)·H/Hkv - 1 on both sides (`repeat_kv` there, `enable_gqa` here).
- q/k norms. Qwen3-MoE and Glm4-MoE (`use_qk_norm`) RMS-normalise each head over Dh channels with
  one gain for all heads (model.qk_norm=head); OLMoE normalises all of q (H·Dh) and all of k
  (Hkv·Dh) at once, with gains over the whole projection (model.qk_norm=projection); both before
  RoPE, with rms_norm_eps. Biases: Qwen2 and Qwen2-MoE (`qkv_bias`) and Glm4-MoE (`attention_bias`)
  bias q, k and v but not o (model.qkv_bias); Llama's, Qwen3-MoE's and OLMoE's `attention_bias`
  also biases o, which Switchyard has not, so it is refused.
- Feed-forward. SwiGLU is w2 · (silu(w3 x) ⊙ w1 x) (models/ffn.py, models/moe/experts.py): w3 is
  the GATE and w1 the UP projection — the opposite of Mixtral's file names, where experts.e.w1 is
  the gate and w3 the up projection. Experts are stored [E, D, F] here and per expert [F, D] there.
- RMSNorm x·rsqrt(mean(x²) + eps)·w in fp32 on both sides; tied embeddings map to
  `tie_word_embeddings` (the file then has no lm_head).
- Routers (models/moe/router.py): softmax over all experts, top-k, optional renormalisation —
  Mixtral (always renormalises), Qwen2-MoE, Qwen3-MoE and OLMoE (`norm_topk_prob`); sigmoid scores
  with a selection bias that only picks experts — Glm4-MoE (`e_score_correction_bias`, one group,
  scaling 1).
- Shared experts. Qwen2-MoE multiplies its shared expert by sigmoid(shared_expert_gate · x)
  (moe.shared_expert_gate=true). An ungated Switchyard shared expert is written there with a zero
  gate (sigmoid(0) = 0.5 exactly) and a doubled down projection, both exact in floating point; it
  reads back as a gated one. Glm4-MoE adds its shared experts ungated, as Switchyard does.
- Interleaving. Block i (0-based) is MoE when (i + 1) % moe.every == 0: Qwen2-MoE's and Qwen3-MoE's
  `decoder_sparse_step` use the same rule; Glm4-MoE only puts dense blocks first.

Not exact, so refused: non-gated GELU experts (no transformers MoE class with rotary attention has
them), capacity factors (transformers' MoE classes are dropless), a selection bias with softmax
scores, sliding windows, latent attention (DeepSeek), partial rotary embeddings, RoPE scalings other
than Llama-3's, biases on the output projection or the MLPs, OLMoE's q/k clipping.

Shape legend: E experts, D hidden, F expert/FFN width, H heads, Hkv key/value heads, Dh head size.
"""

from __future__ import annotations

import torch

from models.config import GPTConfig, ModelConfig, MoEConfig, RopeScalingConfig

LLAMA, QWEN2, ARCEE = "llama", "qwen2", "arcee"
MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, GLM4_MOE = "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe"
ARCHITECTURES = {
    LLAMA: "LlamaForCausalLM",  # dense, SwiGLU (GQA, Llama-3 RoPE scaling)
    QWEN2: "Qwen2ForCausalLM",  # dense, SwiGLU, q/k/v biases (GQA)
    ARCEE: "ArceeForCausalLM",  # dense, non-gated MLP (here GELU)
    MIXTRAL: "MixtralForCausalLM",  # MoE in every block, softmax + renormalised top-k, no shared expert
    # softmax, interleaved dense/MoE, gated shared experts, norm_topk_prob, qkv biases
    QWEN2_MOE: "Qwen2MoeForCausalLM",
    QWEN3_MOE: "Qwen3MoeForCausalLM",  # softmax, per-head q/k RMSNorm, no shared expert
    OLMOE: "OlmoeForCausalLM",  # softmax, q/k RMSNorm over the whole projection, MoE in every block
    GLM4_MOE: "Glm4MoeForCausalLM",  # sigmoid scores, selection bias, shared experts
}
DENSE = (LLAMA, QWEN2, ARCEE)

KNOWN_INEXACT = {  # why some close relatives are not imported
    "deepseek_v3": "multi-head latent attention (MLA): keys and values from a compressed latent, not implemented",
    "deepseek_v2": "multi-head latent attention (MLA): keys and values from a compressed latent, not implemented",
    "mistral": "sliding-window attention",
    "qwen3": "a dense Qwen3 (per-head q/k norms) is not mapped; only Qwen3-MoE is",
    "gpt_oss": "sliding-window attention, attention sinks and clamped SwiGLU experts",
    "jamba": "Mamba layers",
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
        if m.qk_norm != "none":
            raise ValueError(f"model.qk_norm={m.qk_norm}: no dense transformers class here has q/k norms (Qwen3 dense "
                             "is "
                             "not mapped); dense models export with model.qk_norm=none")
        if m.activation != "swiglu":
            if m.qkv_bias or m.n_kv_heads is not None or m.head_dim is not None or m.rope_scaling.type != "none":
                raise ValueError("model.activation=gelu: Arcee, the dense GELU class, is exported with plain "
                                 "multi-head attention only (model.qkv_bias=false, model.n_kv_heads/head_dim=null, "
                                 "no rope_scaling)")
            return ARCEE
        return QWEN2 if m.qkv_bias else LLAMA
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
        if m.qk_norm == "projection":
            raise ValueError("model.qk_norm=projection with moe.score=sigmoid: Glm4-MoE normalises q and k per head; "
                             "use model.qk_norm=head")
        if moe.shared_expert_gate:
            raise ValueError("moe.shared_expert_gate=true with moe.score=sigmoid: Glm4-MoE's shared experts are ungated")
        return GLM4_MOE
    if has_selection_bias:
        raise ValueError(
            "moe.bias_update_rate: this model's router has a non-zero selection bias (expert_bias) on softmax scores; "
            "no transformers class has that (Glm4-MoE has it for moe.score=sigmoid)"
        )
    if m.qk_norm == "projection":
        _require_setting(moe.every == 1,
                         f"model.qk_norm=projection with moe.every={moe.every}: OLMoE has MoE in every block")
        _require_setting(moe.num_shared_experts == 0,
                         "model.qk_norm=projection with moe.num_shared_experts > 0: OLMoE has no shared experts")
        _require_setting(not m.qkv_bias,
                         "model.qk_norm=projection with model.qkv_bias=true: OLMoE has no q/k/v-only biases")
        _require_setting(m.head_size * m.n_heads == m.d_model,
                         f"model.head_dim={m.head_dim} with model.qk_norm=projection: OLMoE sizes its norms from "
                         "d_model / n_heads")
        return OLMOE
    if m.qk_norm == "head":
        _require_setting(moe.num_shared_experts == 0,
                         "model.qk_norm=head with moe.num_shared_experts > 0: Qwen3-MoE has no shared experts")
        _require_setting(not m.qkv_bias, "model.qk_norm=head with model.qkv_bias=true: Qwen3-MoE's attention_bias "
                         "also biases the output projection")
        return QWEN3_MOE
    if moe.every == 1 and moe.num_shared_experts == 0 and moe.normalize_topk and not m.qkv_bias:
        return MIXTRAL
    return QWEN2_MOE


def _require_setting(condition: bool, why: str) -> None:
    if not condition:
        raise ValueError(f"{why}; no transformers class computes this model exactly")


def has_selection_bias(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("router.expert_bias") and bool(v.any()) for k, v in state_dict.items())


# --- config.json ------------------------------------------------------------------------------


def _rope_parameters(m: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    if m.rope_scaling.type == "llama3":
        s = m.rope_scaling
        rope.update(rope_type="llama3", factor=float(s.factor), low_freq_factor=float(s.low_freq_factor),
                    high_freq_factor=float(s.high_freq_factor), original_max_position_embeddings=s.original_max_seq_len)
    return rope


def hf_config(cfg: GPTConfig, model_type: str, eot_id: int) -> dict:
    """config.json for `model_type`; every field that changes the function is written explicitly."""
    m, moe = cfg.model, cfg.moe
    rope = _rope_parameters(m)
    config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_size,
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
    sparse = {"num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "moe_intermediate_size": moe.expert_ffn_hidden,
              "norm_topk_prob": moe.normalize_topk, "router_aux_loss_coef": moe.aux_loss_coef}
    if model_type in (LLAMA, ARCEE):
        config.update(attention_bias=False, mlp_bias=False)
    elif model_type == QWEN2:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.n_layers)
    elif model_type == MIXTRAL:
        config.update(
            intermediate_size=moe.expert_ffn_hidden, num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
            sliding_window=None, router_jitter_noise=moe.jitter, router_aux_loss_coef=moe.aux_loss_coef,
        )
    elif model_type == QWEN2_MOE:
        config.update(
            qkv_bias=m.qkv_bias, use_sliding_window=False, decoder_sparse_step=moe.every, mlp_only_layers=[],
            shared_expert_intermediate_size=moe.num_shared_experts * moe.expert_ffn_hidden, **sparse,
        )
    elif model_type == QWEN3_MOE:
        config.update(attention_bias=False, use_sliding_window=False, sliding_window=None, decoder_sparse_step=moe.every,
                      mlp_only_layers=[], **sparse)
    elif model_type == OLMOE:
        del sparse["moe_intermediate_size"]
        config.update(intermediate_size=moe.expert_ffn_hidden, attention_bias=False, clip_qkv=None, **sparse)
    else:
        assert model_type == GLM4_MOE, model_type
        config.update(
            attention_bias=m.qkv_bias, use_qk_norm=m.qk_norm == "head", rope_parameters={**rope, "partial_rotary_factor": 1.0},
            n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k, n_shared_experts=moe.num_shared_experts,
            moe_intermediate_size=moe.expert_ffn_hidden, first_k_dense_replace=moe_block_ids(cfg)[0],
            norm_topk_prob=moe.normalize_topk, routed_scaling_factor=1.0, n_group=1, topk_group=1, num_mtp_layers=0,
        )
    return config


def _require(config: dict, key: str, where: str):
    if config.get(key) is None:
        raise ValueError(f"{where}: config.json has no {key}")
    return config[key]


def _num_experts(config: dict, where: str) -> int:
    """Hub files name it num_experts (Qwen, OLMoE) or num_local_experts (Mixtral); transformers 5 may
    save either, through its attribute maps."""
    return config.get("num_experts") or _require(config, "num_local_experts", where)


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
    attention = _attention_settings(config, model_type, where)
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
        ffn_hidden=config.get("intermediate_size") or _require(config, "moe_intermediate_size", where),
        activation=activation,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_eps=float(_require(config, "rms_norm_eps", where)),
        init_std=float(config.get("initializer_range", 0.02)),
        **attention,
    )
    moe = MoEConfig(every=n_layers + 1)  # dense unless set below
    if model_type == MIXTRAL:
        moe = MoEConfig(
            num_experts=_num_experts(config, where), top_k=_require(config, "num_experts_per_tok", where),
            every=1, expert_ffn_hidden=model.ffn_hidden, normalize_topk=True, jitter=float(config.get("router_jitter_noise", 0.0)),
        )
    elif model_type in (QWEN2_MOE, QWEN3_MOE):
        moe = _qwen_moe_config(config, model, model_type, where)
    elif model_type == OLMOE:
        moe = MoEConfig(num_experts=_num_experts(config, where), top_k=_require(config, "num_experts_per_tok", where),
                        every=1, expert_ffn_hidden=model.ffn_hidden, normalize_topk=bool(config.get("norm_topk_prob", False)))
    elif model_type == GLM4_MOE:
        moe = _glm4_moe_config(config, model, where)
    cfg = GPTConfig(model, moe)
    try:
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{where}: config.json gives an invalid Switchyard model: {err}") from err
    return cfg, model_type


def _attention_settings(config: dict, model_type: str, where: str) -> dict:
    """The ModelConfig attention fields (n_kv_heads, head_dim, qk_norm, qkv_bias, rope_scaling) of
    this config.json; one ValueError for anything else (windows, partial or other scaled RoPE, ...)."""
    d_model, n_heads = _require(config, "hidden_size", where), _require(config, "num_attention_heads", where)
    kv_heads = config.get("num_key_value_heads") or n_heads
    _refuse_unless(n_heads % kv_heads == 0, where,
                   f"num_key_value_heads={kv_heads} does not divide num_attention_heads={n_heads}")
    head_dim = config.get("head_dim") or d_model // n_heads
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _refuse_unless(rope_type in ("default", "llama3"), where,
                   f"scaled RoPE of type {rope_type!r} (only Llama-3's, rope_type='llama3', is implemented)")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5 if model_type == GLM4_MOE else 1.0))
    _refuse_unless(partial == 1.0, where, f"partial rotary embeddings (partial_rotary_factor={partial})")
    _refuse_unless(not config.get("mlp_bias", False), where, "mlp_bias=true")
    # Which biases the family's attention has: q/k/v only (Switchyard's qkv_bias), or o as well (refused).
    if model_type == QWEN2:
        qkv_bias = True
    elif model_type == QWEN2_MOE:
        qkv_bias = bool(config.get("qkv_bias", True))
    elif model_type == GLM4_MOE:
        qkv_bias = bool(config.get("attention_bias", False))
    else:
        _refuse_unless(not config.get("attention_bias", False), where,
                       "attention_bias=true (a bias on the output projection too)")
        qkv_bias = False
    qk_norm = {QWEN3_MOE: "head", OLMOE: "projection"}.get(model_type, "none")
    if model_type == GLM4_MOE and config.get("use_qk_norm", False):
        qk_norm = "head"
    if model_type == OLMOE:
        _refuse_unless(config.get("clip_qkv") is None, where, f"clip_qkv={config.get('clip_qkv')} (q/k/v clamped)")
        _refuse_unless(head_dim * n_heads == d_model, where,
                       f"head_dim={head_dim} * num_attention_heads != hidden_size={d_model} "
                       "(OLMoE sizes its q/k norms from hidden_size)")
    window = config.get("sliding_window")
    # Families without a use_sliding_window flag use their window whenever one is set.
    flagless = model_type in (MIXTRAL, LLAMA, ARCEE, OLMOE, GLM4_MOE)
    windowed = window is not None and window != 0 and config.get("use_sliding_window", flagless)
    layer_types = config.get("layer_types") or []
    windowed = windowed or any(t != "full_attention" for t in layer_types)
    _refuse_unless(not windowed, where, f"sliding-window attention (sliding_window={window}, use_sliding_window="
                   f"{config.get('use_sliding_window')}); Switchyard attends over the whole context")
    scaling = RopeScalingConfig()
    if rope_type == "llama3":
        scaling = RopeScalingConfig(
            type="llama3", factor=float(_require(rope, "factor", where)), low_freq_factor=float(_require(rope, "low_freq_factor", where)),
            high_freq_factor=float(_require(rope, "high_freq_factor", where)),
            original_max_seq_len=int(_require(rope, "original_max_position_embeddings", where)))
    return {
        "n_kv_heads": None if kv_heads == n_heads else kv_heads,
        "head_dim": None if head_dim * n_heads == d_model else head_dim,
        "qk_norm": qk_norm, "qkv_bias": qkv_bias, "rope_scaling": scaling,
    }


def _qwen_moe_config(config: dict, model: ModelConfig, model_type: str, where: str) -> MoEConfig:
    every = config.get("decoder_sparse_step", 1)
    width = _require(config, "moe_intermediate_size", where)
    shared = config.get("shared_expert_intermediate_size", 0) if model_type == QWEN2_MOE else 0
    _refuse_unless(shared % width == 0, where,
                   f"shared_expert_intermediate_size={shared} is not a multiple of moe_intermediate_size={width}")
    moe = MoEConfig(
        num_experts=_num_experts(config, where), top_k=_require(config, "num_experts_per_tok", where), every=every,
        expert_ffn_hidden=width, num_shared_experts=shared // width, normalize_topk=bool(config.get("norm_topk_prob", False)),
        shared_expert_gate=shared > 0,  # Qwen2-MoE gates its shared expert
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
    """q or k projection rows [H·Dh, D] (or a bias / norm gain viewed [H·Dh, 1]): per head, channel
    2i -> i and 2i+1 -> i + Dh/2."""
    rows, d = w_RD.shape
    return w_RD.view(n_heads, rows // n_heads // 2, 2, d).transpose(1, 2).reshape(rows, d)


def rope_rows_from_hf(w_RD: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, d = w_RD.shape
    return w_RD.view(n_heads, 2, rows // n_heads // 2, d).transpose(1, 2).reshape(rows, d)


def _rope_vector(permute, v_R: torch.Tensor, n_heads: int) -> torch.Tensor:
    return permute(v_R.view(-1, 1), n_heads).view(-1)


def _norm_heads(m: ModelConfig, which: str) -> int:
    """How many heads a q/k norm gain spans: 1 for model.qk_norm=head (one gain per head channel),
    H or Hkv for projection (a gain per channel of the whole projection)."""
    if m.qk_norm == "head":
        return 1
    return m.n_heads if which == "q" else m.kv_heads


def _mlp_names(model_type: str) -> tuple[str, str, str]:
    """HF file names of (gate, up, down) in an expert."""
    return ("w1", "w3", "w2") if model_type == MIXTRAL else ("gate_proj", "up_proj", "down_proj")


def _moe_prefix(model_type: str, layer: int) -> str:
    return f"model.layers.{layer}." + ("block_sparse_moe." if model_type == MIXTRAL else "mlp.")


def _shared_names(model_type: str, prefix: str) -> dict[str, str]:
    """Switchyard shared-expert weight -> HF name (Qwen2-MoE and Glm4-MoE)."""
    sub = prefix + ("shared_expert." if model_type == QWEN2_MOE else "shared_experts.")
    return {"w3.weight": sub + "gate_proj.weight", "w1.weight": sub + "up_proj.weight", "w2.weight": sub + "down_proj.weight"}


def _attention_to_hf(sd: dict[str, torch.Tensor], m: ModelConfig, sy: str, hf: str) -> dict[str, torch.Tensor]:
    out = {}
    widths = [m.n_heads * m.head_size, m.kv_heads * m.head_size, m.kv_heads * m.head_size]
    q, k, v = sd[sy + "attn.qkv.weight"].split(widths)
    out[hf + "self_attn.q_proj.weight"] = rope_rows_to_hf(q, m.n_heads)
    out[hf + "self_attn.k_proj.weight"] = rope_rows_to_hf(k, m.kv_heads)
    out[hf + "self_attn.v_proj.weight"] = v
    if m.qkv_bias:
        q_b, k_b, v_b = sd[sy + "attn.qkv.bias"].split(widths)
        out[hf + "self_attn.q_proj.bias"] = _rope_vector(rope_rows_to_hf, q_b, m.n_heads)
        out[hf + "self_attn.k_proj.bias"] = _rope_vector(rope_rows_to_hf, k_b, m.kv_heads)
        out[hf + "self_attn.v_proj.bias"] = v_b
    if m.qk_norm != "none":
        for which in ("q", "k"):
            gain = sd[sy + f"attn.{which}_norm.weight"]
            out[hf + f"self_attn.{which}_norm.weight"] = _rope_vector(rope_rows_to_hf, gain, _norm_heads(m, which))
    out[hf + "self_attn.o_proj.weight"] = sd[sy + "attn.proj.weight"]
    return out


def _attention_from_hf(hf: dict[str, torch.Tensor], m: ModelConfig, sy: str, pre: str) -> dict[str, torch.Tensor]:
    sd = {sy + "attn.qkv.weight": torch.cat([
        rope_rows_from_hf(hf[pre + "self_attn.q_proj.weight"], m.n_heads),
        rope_rows_from_hf(hf[pre + "self_attn.k_proj.weight"], m.kv_heads),
        hf[pre + "self_attn.v_proj.weight"],
    ])}
    if m.qkv_bias:
        sd[sy + "attn.qkv.bias"] = torch.cat([
            _rope_vector(rope_rows_from_hf, hf[pre + "self_attn.q_proj.bias"], m.n_heads),
            _rope_vector(rope_rows_from_hf, hf[pre + "self_attn.k_proj.bias"], m.kv_heads),
            hf[pre + "self_attn.v_proj.bias"],
        ])
    if m.qk_norm != "none":
        for which in ("q", "k"):
            gain = hf[pre + f"self_attn.{which}_norm.weight"]
            sd[sy + f"attn.{which}_norm.weight"] = _rope_vector(rope_rows_from_hf, gain, _norm_heads(m, which))
    sd[sy + "attn.proj.weight"] = hf[pre + "self_attn.o_proj.weight"]
    return sd


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
        out.update(_attention_to_hf(sd, m, sy, hf))
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
        if model_type == QWEN2_MOE and moe.shared_expert_gate:
            out[prefix + "shared_expert_gate.weight"] = sd[sy + "ffn.shared_expert_gate.weight"]
        elif model_type == QWEN2_MOE:
            # sigmoid(0) = 0.5 scales the shared expert: a zero gate and a doubled down projection cancel exactly.
            out[prefix + "shared_expert_gate.weight"] = w1_EDF.new_zeros(1, m.d_model)
            out[prefix + "shared_expert.down_proj.weight"] = out[prefix + "shared_expert.down_proj.weight"] * 2
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def expected_hf_shapes(cfg: GPTConfig, model_type: str) -> dict[str, torch.Size]:
    """Every weight name `to_hf_tensors` writes for this config, with its shape (built on meta)."""
    from models.gpt import GPT

    with torch.device("meta"):
        return {k: v.shape for k, v in to_hf_tensors(GPT(cfg).state_dict(), cfg, model_type).items()}


class ExpertRows:
    """A routed-expert weight [E, ...] that reads experts from the checkpoint only when sliced
    (`rows[first:first + n]`, as parallel.trainer.Trainer.load_model_state takes this rank's experts)."""

    def __init__(self, read_expert, num_experts: int, expert_shape: tuple[int, ...]):
        self.read_expert = read_expert  # e -> that expert's [D, F] or [F, D] tensor, read now
        self.shape = torch.Size((num_experts, *expert_shape))

    def __getitem__(self, index: slice) -> torch.Tensor:
        assert isinstance(index, slice), index
        return torch.stack([self.read_expert(e) for e in range(self.shape[0])[index]])

    def materialize(self) -> torch.Tensor:
        return self[:]


def from_hf_tensors(hf, cfg: GPTConfig, model_type: str, where: str, lazy_experts: bool = False) -> dict[str, torch.Tensor]:
    """HF weights -> Switchyard state dict (fp32). `hf`: a dict of tensors or a
    train.hf.files.SafetensorsWeights (read tensor by tensor). The names and shapes are checked
    against what `to_hf_tensors` writes for this config: a missing, extra or misshapen weight is
    refused. With `lazy_experts`, routed-expert weights are `ExpertRows`, read only for the experts
    a caller slices out (the rest is read whole)."""
    from train.hf.files import TensorsInMemory

    if isinstance(hf, dict):
        hf = TensorsInMemory(hf)
    expected = expected_hf_shapes(cfg, model_type)
    if missing := sorted(set(expected) - hf.names()):
        raise ValueError(f"{where}: weight {missing[0]} is missing ({len(missing)} missing in all)")
    if extra := sorted(hf.names() - set(expected)):
        raise ValueError(f"{where}: unexpected weight {extra[0]} ({len(extra)} in all): a part Switchyard's model does not have")
    for name, want in expected.items():
        if hf.shapes[name] != tuple(want):
            raise ValueError(f"{where}: weight {name} has shape {list(hf.shapes[name])}, "
                             f"expected {list(want)} from config.json")

    class Read(dict):  # name -> fp32 tensor, read from the file on first use
        def __missing__(self, name: str) -> torch.Tensor:
            return hf.tensor(name).float()

    return _state_dict_from_hf(Read(), cfg, model_type, lazy_experts)


def _state_dict_from_hf(hf: dict[str, torch.Tensor], cfg: GPTConfig, model_type: str, lazy_experts: bool) -> dict[str, torch.Tensor]:
    m, moe = cfg.model, cfg.moe
    sd = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    sd["lm_head.weight"] = sd["embed.weight"] if m.tie_embeddings else hf["lm_head.weight"]
    moe_blocks = set(moe_block_ids(cfg))
    for i in range(m.n_layers):
        sy, pre = f"blocks.{i}.", f"model.layers.{i}."
        sd[sy + "attn_norm.weight"] = hf[pre + "input_layernorm.weight"]
        sd[sy + "ffn_norm.weight"] = hf[pre + "post_attention_layernorm.weight"]
        sd.update(_attention_from_hf(hf, m, sy, pre))
        if i not in moe_blocks:
            sd[sy + "ffn.w1.weight"] = hf[pre + "mlp.up_proj.weight"]
            sd[sy + "ffn.w2.weight"] = hf[pre + "mlp.down_proj.weight"]
            if m.activation == "swiglu":
                sd[sy + "ffn.w3.weight"] = hf[pre + "mlp.gate_proj.weight"]
            continue
        prefix = _moe_prefix(model_type, i)
        gate, up, down = _mlp_names(model_type)
        sd[sy + "ffn.router.gate_ED"] = hf[prefix + "gate.weight"]
        bias = prefix + "gate.e_score_correction_bias"
        sd[sy + "ffn.router.expert_bias"] = hf[bias] if model_type == GLM4_MOE else torch.zeros(moe.num_experts)
        D, F = m.d_model, moe.expert_ffn_hidden
        for ours, theirs, shape in (("w1_EDF", up, (D, F)), ("w2_EFD", down, (F, D)), ("w3_EDF", gate, (D, F))):
            # Stored [F, D] (or [D, F]) per expert there, [E, D, F] (or [E, F, D]) here.
            names = [f"{prefix}experts.{e}.{theirs}.weight" for e in range(moe.num_experts)]  # bound now, read later
            rows = ExpertRows(lambda e, names=names: hf[names[e]].T, moe.num_experts, shape)
            sd[sy + f"ffn.experts.{ours}"] = rows if lazy_experts else rows.materialize()
        if moe.num_shared_experts:
            for name, hf_name in _shared_names(model_type, prefix).items():
                sd[sy + "ffn.shared_experts." + name] = hf[hf_name]
        if moe.shared_expert_gate:
            sd[sy + "ffn.shared_expert_gate.weight"] = hf[prefix + "shared_expert_gate.weight"]
    return {k: v if isinstance(v, ExpertRows) else v.contiguous() for k, v in sd.items()}
