"""The GLM-4 families. ``glm4`` (GLM-4-0414): norms before and after attention and FFN, rope
on part of each head, a SwiGLU FFN over one gate-and-up matrix. ``glm4moe`` (GLM-4.5):
optional Q/K norms, dense leading layers, then sigmoid-routed experts with a selection bias
and a shared expert. Both project the attention output with F32 accumulation. GGUFs with
multimodal rope sections (GLM-4.1V) are not supported: their positions are per section.

Mirrors llama.cpp's ``src/models/glm4.cpp`` and ``glm4-moe.cpp``.
"""

from __future__ import annotations

from typing import Any

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, inv_sqrt
from llmrpc.model.hparams import Gating, HParamsError, KeyReader, Keys


def hparams_glm4(r: KeyReader, fields: dict[str, Any]) -> None:
    sections = r.array(Keys.Rope.DIMENSION_SECTIONS) or (r.get(Keys.Rope.DIMENSION_SECTIONS, 0),)
    if any(sections):
        raise HParamsError(f"{r.path}: multimodal rope (rope.dimension_sections) is not supported")


def _attn_out(b: Builder, il: int, x: g.Tensor) -> g.Tensor:
    """The attention output projection, accumulated in F32 (llama.cpp's ``build_attn`` for GLM)."""
    cur = b.mm(b.w(T.ATTN_OUT, il), x)
    b.lib.ggml_prec_set_acc(cur, g.GGML_PREC_F32)
    return cur


def build_glm4(b: Builder) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur)
        q, k = b.name(b.rope(q, il), "Qcur", il), b.name(b.rope(k, il), "Kcur", il)
        cur = _attn_out(b, il, b.attention(il, q, k, v, inv_sqrt(hp.head_dim_v(il)), None))
        cur, x = b.out_rows(il, cur, x)
        cur = b.norm(cur, b.w(T.ATTN_POST_NORM, il), "attn_post_norm", il)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.norm(ffn_inp, b.w(T.FFN_NORM, il), "ffn_norm", il)
        cur = b.ffn(cur, il, b.w(T.FFN_UP, il), None, b.w(T.FFN_DOWN, il), Act.SWIGLU, parallel=False)
        cur = b.norm(cur, b.w(T.FFN_POST_NORM, il), "ffn_post_norm", il)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)


def hparams_glm4moe(r: KeyReader, fields: dict[str, Any]) -> None:
    hparams_glm4(r, fields)
    n_ff_exp = r.per_layer(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, fields["n_layer"])
    if n_ff_exp is None:
        raise HParamsError(f"{r.path}: GGUF key {r.key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)} is missing")
    fields["n_ff_exp"] = n_ff_exp[0]
    fields["n_expert_shared"] = int(r.req(Keys.LLM.EXPERT_SHARED_COUNT))
    fields["n_layer_dense_lead"] = int(r.get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0))
    fields["expert_weights_scale"] = float(r.get(Keys.LLM.EXPERT_WEIGHTS_SCALE, 0.0))
    fields["expert_weights_norm"] = bool(r.get(Keys.LLM.EXPERT_WEIGHTS_NORM, False))
    fields["expert_gating"] = Gating(int(r.get(Keys.LLM.EXPERT_GATING_FUNC, 0)) or Gating.SIGMOID)


def _glm4moe_ffn(b: Builder, il: int, x: g.Tensor) -> g.Tensor:
    hp = b.hp
    if il < hp.n_layer_dense_lead:
        return b.ffn(x, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), Act.SILU)
    moe = b.moe(
        x, il, Act.SILU, hp.expert_gating, hp.expert_weights_norm, hp.expert_weights_scale,
        probs_bias=b.w(T.FFN_EXP_PROBS_B, il, "bias"),
    )  # fmt: skip
    shared = b.shared_expert(x, il)
    return b.lib.ggml_add(b.ctx, moe, shared)


def build_glm4moe(b: Builder) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur)
        q_norm, k_norm = b.opt(T.ATTN_Q_NORM, il), b.opt(T.ATTN_K_NORM, il)
        if q_norm is not None:
            q = b.norm(q, q_norm, "Qcur_normed", il)
        if k_norm is not None:
            k = b.norm(k, k_norm, "Kcur_normed", il)
        q, k = b.name(b.rope(q, il), "Qcur", il), b.name(b.rope(k, il), "Kcur", il)
        cur = _attn_out(b, il, b.attention(il, q, k, v, inv_sqrt(hp.head_dim_v(il)), None))
        cur, x = b.out_rows(il, cur, x)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = _glm4moe_ffn(b, il, b.norm(ffn_inp, b.w(T.ATTN_POST_NORM, il), "attn_post_norm", il))
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)
