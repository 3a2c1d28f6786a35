"""Activation memory of one micro-batch on one rank: what autograd saves in the forward pass, and
the peak of forward + backward, with and without activation checkpointing.

Counted tensor by tensor from what the model's ops save for backward (models/gpt.py,
models/moe/*; checked against the torch profiler in tests/test_plan.py). Legend: T = micro_batch ·
seq_len tokens on this rank, D = d_model, H = heads, V = vocabulary, F = expert width,
Fd = dense FFN width, Fs = shared-expert width, E = experts, k = top-k; r = bytes of the residual
stream (the weights' dtype: the embedding output and every residual sum stay in it, also under
autocast), a = bytes per activation (the matmul outputs: the autocast dtype, else r); the logits
and the router's scores are fp32 (4 bytes); indices int64 (8).

    RMSNorm (each)                2·T·D·r + T·D·a + T·4
        its input and x·rstd (residual dtype), its output as the next matmul saves it, rstd
    per block, attention half     RMSNorm + T·(4·Q + 3·K)·a + T·H·4 (+ q/k norms)
        Q = H·Dh query and K = Hkv·Dh key/value channels (Q = K = D for plain multi-head
        attention: 7·T·D·a): rotated q and k (Q + K), the qkv projection output that v is a view
        of (Q + 2K), attention output and its reshaped copy (2Q), the log-sum-exp; model.qk_norm
        adds an RMSNorm over q and one over k (their rstd per head for `head`)
    per MoE feed-forward          RMSNorm + T·D·(r − a) + 3k·T·D·a + g·k·T·F·a + g·T·Fs·a + router + indices
        the router saves the RMSNorm output in the residual dtype (it runs outside autocast);
        the k token copies the experts compute on (k), their outputs and weighted outputs (2k);
        g = 4 tensors of width F per copy for SwiGLU (w1 out, w3 out, silu, product), 2 for
        GELU; shared experts alike on T tokens (gated: + T·D·a + 2·T·a, their output and the
        sigmoid of the gate); router: logits and probabilities 2·T·E·4, top-k
        weights 2·T·k·4, 3·T·4; indices: 4·T·k·8 (+2·T·k·8 for the regrouping under EP)
    per dense feed-forward        RMSNorm + g·T·Fd·a
    output                        RMSNorm + T·V·4 + 2·T·8
        the log-softmax of the fp32 logits, targets and token ids
    under autocast (a != r), each matmul also saves its a-byte copy of the weight: + a·D·(2Q + 2K) per
    attention half, a·(2 or 3)·D·(F·E/ep + Fs) per MoE and a·(2 or 3)·D·Fd per dense feed-forward,
    a·V·D for the output projection

Routing is assumed uniform: with expert parallelism each rank computes k·T copies, as without.
The peak is the largest of the backward phases, each on top of what is still saved then:
    cross-entropy     everything saved + the logits' two gradients, 2·T·V·4
    a block           what the blocks up to it saved + its gradient working set: attention
                      2·T·(Q + K)·a; MoE max(3k·T·D, g/2·k·T·F − 2k·T·D)·a; dense FFN g/2·T·Fd·a
Activation checkpointing (parallel/activation_checkpointing.py) saves only each checkpointed
module's input in the forward pass and recomputes the module when the backward reaches it, so
that phase also holds the module's saved tensors again: `full` keeps one block input (T·D·r) per
block; `moe` keeps the attention halves and RMSNorms and recomputes each MoE feed-forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import GPTConfig

FP32 = 4
INDEX = 8  # int64


@dataclass(frozen=True)
class ActivationPeak:
    saved: int  # bytes saved for backward at the end of the forward pass
    peak: int  # bytes at the busiest moment of forward + backward, above the model states
    phase: str  # which backward phase reaches the peak
    saved_by_experts: int = 0  # of `saved`: the routed experts' part (token copies, their intermediates, combine)


def _gated(activation: str) -> int:
    return 4 if activation == "swiglu" else 2


def rms_norm_bytes(tokens: int, d_model: int, r: int, a: int) -> int:
    return 2 * tokens * d_model * r + tokens * d_model * a + tokens * FP32


def block_parts(cfg: GPTConfig, tokens: int, heads_tokens: int, ep: int, r: int, a: int) -> dict[str, int]:
    """Bytes saved by one attention half, one MoE and one dense feed-forward, and their backward
    working sets."""
    m, moe, T = cfg.model, cfg.moe, tokens
    D, k, g = m.d_model, moe.top_k, _gated(m.activation)
    Fs = moe.num_shared_experts * moe.expert_ffn_hidden
    norm = rms_norm_bytes(T, D, r, a)
    Q, K = m.n_heads * m.head_size, m.kv_heads * m.head_size
    qk_norms = 0
    if m.qk_norm != "none":
        qk_norms = rms_norm_bytes(T, Q, r, a) + rms_norm_bytes(T, K, r, a)
        if m.qk_norm == "head":  # one rstd per head, not per token
            qk_norms += T * (m.n_heads + m.kv_heads - 2) * FP32
    gated_shared = T * D * a + 2 * T * a if moe.shared_expert_gate else 0
    indices = (4 + (2 if ep > 1 else 0)) * T * k * INDEX
    router = 2 * T * moe.num_experts * FP32 + 2 * T * k * FP32 + 3 * T * FP32
    # Under autocast (a != r) every matmul saves its a-byte copy of the weight it used.
    copies = a if a != r else 0
    mats = g // 2 + 1  # weight matrices per feed-forward: w1, w2 (+ w3 for SwiGLU)
    local_experts = moe.num_experts // ep
    return {
        "attention": norm + T * (4 * Q + 3 * K) * a + heads_tokens * FP32 + qk_norms + D * (2 * Q + 2 * K) * copies,
        # The router reads the RMSNorm output outside autocast: saved in the residual dtype.
        "moe": (
            norm
            + T * D * (r - a)
            + 3 * k * T * D * a
            + g * k * T * moe.expert_ffn_hidden * a
            + g * T * Fs * a
            + gated_shared
            + router
            + indices
            + mats * D * (local_experts * moe.expert_ffn_hidden + Fs) * copies
        ),
        "dense_ffn": norm + g * T * m.ffn_hidden * a + mats * D * m.ffn_hidden * copies,
        "attention_backward": 2 * T * (Q + K) * a,
        "experts": (
            3 * k * T * D * a
            + g * k * T * moe.expert_ffn_hidden * a
            + indices
            + mats * D * local_experts * moe.expert_ffn_hidden * copies
        ),
        "moe_backward": max(3 * k * T * D, g // 2 * k * T * moe.expert_ffn_hidden - 2 * k * T * D) * a,
        "dense_ffn_backward": g // 2 * T * m.ffn_hidden * a,
    }


def activation_peak(
    cfg: GPTConfig,
    micro_batch: int,
    seq_len: int,
    ep: int,
    mode: str,
    bytes_per_activation: int,
    residual_bytes: int = FP32,
    blocks: range | None = None,
    last: bool = True,
) -> ActivationPeak:
    """`residual_bytes`: the weights' dtype (r); `bytes_per_activation`: a (see the module docstring).
    A pipeline stage (planner/pipeline.py): `blocks`, the block indices it runs (default: all);
    `last`, whether it ends with the output (norm, logits, cross-entropy)."""
    m, a, r = cfg.model, bytes_per_activation, residual_bytes
    T = micro_batch * seq_len
    parts = block_parts(cfg, T, micro_batch * m.n_heads * seq_len, ep, r, a)
    blocks = range(m.n_layers) if blocks is None else blocks
    moe_blocks = [(i + 1) % cfg.moe.every == 0 for i in blocks]
    block_input = T * m.d_model * r
    copies = a if a != r else 0
    output = (
        rms_norm_bytes(T, m.d_model, r, a) + T * m.vocab_size * FP32 + 2 * T * INDEX + m.vocab_size * m.d_model * copies
    )
    logits_grads = 2 * T * m.vocab_size * FP32
    if not last:  # the backward starts from the gradient the next stage sends
        output = logits_grads = 0

    def ffn(is_moe: bool) -> tuple[int, int]:
        return (parts["moe"], parts["moe_backward"]) if is_moe else (parts["dense_ffn"], parts["dense_ffn_backward"])

    if mode == "none":
        saved = sum(parts["attention"] + ffn(is_moe)[0] for is_moe in moe_blocks) + output
        block_work = max([parts["attention_backward"]] + [ffn(is_moe)[1] for is_moe in moe_blocks])
        phases = {"cross-entropy": saved + logits_grads, "a block": saved - output + block_work}
    elif mode == "full":
        saved = len(moe_blocks) * block_input + output
        recompute = max(
            parts["attention"] + ffn(is_moe)[0] + max(parts["attention_backward"], ffn(is_moe)[1])
            for is_moe in moe_blocks
        )
        phases = {"cross-entropy": saved + logits_grads, "a recomputed block": saved - output + recompute}
    elif mode == "moe":
        # A checkpointed MoE feed-forward keeps its input: the RMSNorm output, which its router
        # saves anyway (in the residual dtype: the router runs outside autocast).
        kept_moe = 3 * T * m.d_model * r + T * FP32
        saved = sum(parts["attention"] + (kept_moe if is_moe else ffn(False)[0]) for is_moe in moe_blocks) + output
        work = [parts["attention_backward"]] + [ffn(is_moe)[1] for is_moe in moe_blocks if not is_moe]
        phases = {"cross-entropy": saved + logits_grads, "a block": saved - output + max(work)}
        if any(moe_blocks):
            phases["a recomputed MoE"] = saved - output + parts["moe"] - kept_moe + parts["moe_backward"]
    else:
        raise ValueError(f"train.activation_checkpointing must be one of 'none', 'full', 'moe'; got {mode!r}")
    if not last:
        del phases["cross-entropy"]
    phase = max(phases, key=phases.get)
    by_experts = parts["experts"] * sum(moe_blocks) if mode == "none" else 0  # checkpointed: recomputed
    return ActivationPeak(saved, phases[phase], phase, by_experts)
