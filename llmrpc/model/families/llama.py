"""The llama family (llama, mistral, SmolLM2; Mixtral-style experts when the GGUF has them)
and the families that are llama's layers with a difference: smollm3 (no rope on every fourth
layer), mistral3 (attention temperature), arcee (a ReLU² FFN without gate), seed_oss (the
FFN's norm stored as the post-attention norm), ernie4_5 (no attention output bias; experts
with shared ones in ernie4_5-moe), apertus
(Q/K norms, an xIELU FFN).

Mirrors llama.cpp's ``src/models/llama.cpp``: RMSNorm, RoPE (with llama3 or LongRoPE factors),
grouped-query attention, a SwiGLU FFN or a softmax-gated mixture of experts; and its
``smollm3.cpp``, ``mistral3.cpp``, ``arcee.cpp``, ``seed-oss.cpp``, ``ernie4-5.cpp``, ``ernie4-5-moe.cpp``,
``apertus.cpp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, inv_sqrt
from llmrpc.model.hparams import Gating, HParamsError, KeyReader, Keys, read_yarn_betas


def _ffn(b: Builder, il: int, x: g.Tensor, act: Act) -> g.Tensor:
    if b.opt(T.FFN_GATE_INP, il) is not None:
        return b.moe(x, il, Act.SILU, Gating.SOFTMAX, norm_weights=True, weights_scale=b.hp.expert_weights_scale)
    if act is Act.RELU_SQR:  # up, ReLU², down
        return b.ffn(x, il, b.w(T.FFN_UP, il), None, b.w(T.FFN_DOWN, il), act, parallel=False)
    return b.ffn(
        x, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), act,
        b.opt(T.FFN_UP, il, "bias"), b.opt(T.FFN_GATE, il, "bias"), b.opt(T.FFN_DOWN, il, "bias"),
        label="ffn_swiglu_out",
    )  # fmt: skip


FFN = Callable[[Builder, int, g.Tensor], g.Tensor]


def llama_like(
    b: Builder, rope_factors: bool = True, act: Act = Act.SILU, ffn_norm: T = T.FFN_NORM, wo_bias: bool = True,
    ffn: FFN | None = None,
) -> g.Tensor:  # fmt: skip
    """Layers [start, end) of a llama-like model; hidden states, or logits on the last stage.
    ``rope_factors``: rope with the model's frequency factors (llama3's, LongRoPE's); layers
    whose ``has_rope`` is false skip rope. ``ffn_norm``: the tensor of the norm before the FFN.
    ``wo_bias``: the attention output's bias is added where the GGUF has one. ``ffn``: the
    family's FFN of a layer's normed rows (else llama's: dense, or Mixtral-style experts)."""
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    factors = b.rope_factors() if rope_factors else None
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur)
        if hp.has_rope(il):
            q, k = b.rope(q, il, factors), b.rope(k, il, factors)
        q, k = b.name(q, "Qcur", il), b.name(k, "Kcur", il)
        if hp.attn_temp_scale:
            q = b.name(lib.ggml_mul(ctx, q, b.attn_temp()), "Qcur_attn_temp_scaled", il)
        kq_scale = hp.attn_scale or inv_sqrt(hp.head_dim_k(il))
        wo_b = b.opt(T.ATTN_OUT, il, "bias") if wo_bias else None
        cur = b.attention(il, q, k, v, kq_scale, b.w(T.ATTN_OUT, il), wo_b)
        cur, x = b.out_rows(il, b.name(cur, "attn_out", il), x)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.norm(ffn_inp, b.w(ffn_norm, il), "ffn_norm", il)
        cur = ffn(b, il, cur) if ffn is not None else _ffn(b, il, cur, act)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)


def build(b: Builder) -> g.Tensor:
    return llama_like(b)


def hparams_smollm3(r: KeyReader, fields: dict[str, Any]) -> None:
    fields["rope_layers"] = tuple((il + 1) % 4 != 0 for il in range(fields["n_layer"]))


def build_smollm3(b: Builder) -> g.Tensor:
    return llama_like(b, rope_factors=False)


def hparams_mistral3(r: KeyReader, fields: dict[str, Any]) -> None:
    """Ministral 3: YaRN with its own betas and log multiplier, and attention temperature
    growing every ``n_ctx_orig`` positions."""
    read_yarn_betas(r, fields)
    fields["rope_yarn_log_mul"] = float(r.get(Keys.Rope.SCALING_YARN_LOG_MUL, 0.0))
    fields["attn_temp_scale"] = float(r.get(Keys.Attention.TEMPERATURE_SCALE, 0.0))
    if fields["attn_temp_scale"]:
        fields["attn_temp_floor"] = int(fields["rope"]["n_ctx_orig"])
        if not fields["attn_temp_floor"]:
            raise HParamsError(f"{r.path}: attention temperature scaling needs the rope's original context length")


def build_arcee(b: Builder) -> g.Tensor:
    return llama_like(b, act=Act.RELU_SQR)


def build_seed_oss(b: Builder) -> g.Tensor:
    return llama_like(b, rope_factors=False, ffn_norm=T.ATTN_POST_NORM)


def build_ernie4_5(b: Builder) -> g.Tensor:
    return llama_like(b, rope_factors=False, wo_bias=False)


def hparams_ernie4_5_moe(r: KeyReader, fields: dict[str, Any]) -> None:
    n_ff_exp = r.per_layer(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, fields["n_layer"])
    if n_ff_exp is None:
        raise HParamsError(f"{r.path}: GGUF key {r.key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)} is missing")
    fields["n_ff_exp"] = n_ff_exp[0]
    fields["n_ff_shexp"] = int(r.get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0))
    fields["n_moe_layer_step"] = int(r.req(Keys.LLM.INTERLEAVE_MOE_LAYER_STEP))
    fields["n_layer_dense_lead"] = int(r.get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0))
    if fields["n_moe_layer_step"] <= 0:
        raise HParamsError(f"{r.path}: {r.key(Keys.LLM.INTERLEAVE_MOE_LAYER_STEP)} must be positive")


def _ernie4_5_moe_ffn(b: Builder, il: int, x: g.Tensor) -> g.Tensor:
    """Dense on the leading layers and between MoE layers; else softmax-routed experts (with
    a selection bias where the GGUF has one) plus the shared experts."""
    hp = b.hp
    if il < hp.n_layer_dense_lead or (il + 1) % hp.n_moe_layer_step:
        return b.ffn(x, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), Act.SILU)
    moe = b.moe(
        x, il, Act.SILU, Gating.SOFTMAX, norm_weights=True, weights_scale=hp.expert_weights_scale,
        probs_bias=b.opt(T.FFN_EXP_PROBS_B, il, "bias"),
    )  # fmt: skip
    if not hp.n_ff_shexp:
        return moe
    shared = b.shared_expert(x, il)
    return b.lib.ggml_add(b.ctx, moe, shared)


def build_ernie4_5_moe(b: Builder) -> g.Tensor:
    return llama_like(b, rope_factors=False, wo_bias=False, ffn=_ernie4_5_moe_ffn)


def hparams_apertus(r: KeyReader, fields: dict[str, Any]) -> None:
    n = fields["n_layer"]
    keys = (Keys.xIELU.ALPHA_N, Keys.xIELU.ALPHA_P, Keys.xIELU.BETA, Keys.xIELU.EPS)
    fields["xielu"] = tuple(zip(*(r.per_layer_float(key, n) for key in keys), strict=True))


def build_apertus(b: Builder) -> g.Tensor:
    """Llama's layers with Q/K norms before rope and an FFN of up, xIELU and down."""
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    factors = b.rope_factors()
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur)
        q, k = b.qk_norm(q, k, il)
        q, k = b.name(b.rope(q, il, factors), "Qcur", il), b.name(b.rope(k, il, factors), "Kcur", il)
        kq_scale = hp.attn_scale or inv_sqrt(hp.head_dim_k(il))
        cur = b.attention(il, q, k, v, kq_scale, b.w(T.ATTN_OUT, il), b.opt(T.ATTN_OUT, il, "bias"))
        cur, x = b.out_rows(il, cur, x)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.norm(ffn_inp, b.w(T.FFN_NORM, il), "ffn_norm", il)
        cur = lib.ggml_xielu(ctx, b.mm(b.w(T.FFN_UP, il), cur), *hp.xielu[il])
        cur = b.name(b.mm(b.w(T.FFN_DOWN, il), cur), "ffn_out", il)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)
