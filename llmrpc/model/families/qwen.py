"""The Qwen families: qwen2 (QKV biases), qwen2moe (QKV biases, experts and a shared expert
behind a sigmoid gate), qwen3 (Q/K norms), qwen3moe (Q/K norms, experts).

Mirror llama.cpp's ``src/models/qwen2.cpp``, ``qwen2moe.cpp``, ``qwen3.cpp`` and ``qwen3moe.cpp``.
"""

from __future__ import annotations

from typing import Any

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, inv_sqrt
from llmrpc.model.hparams import Gating, KeyReader, Keys


def hparams_moe(r: KeyReader, fields: dict[str, Any]) -> None:
    fields["n_ff_exp"] = int(r.get(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0))


def _build(b: Builder, qk_norm: bool, moe: bool) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur)
        if qk_norm:
            q, k = b.qk_norm(q, k, il)
        q, k = b.name(b.rope(q, il), "Qcur", il), b.name(b.rope(k, il), "Kcur", il)
        cur = b.attention(il, q, k, v, inv_sqrt(hp.head_dim_v(il)), b.w(T.ATTN_OUT, il), b.opt(T.ATTN_OUT, il, "bias"))
        cur, x = b.out_rows(il, cur, x)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.norm(ffn_inp, b.w(T.FFN_NORM, il), "ffn_norm", il)
        if moe:
            cur = b.moe(cur, il, Act.SILU, Gating.SOFTMAX, norm_weights=True, weights_scale=hp.expert_weights_scale)
        else:
            cur = b.ffn(cur, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), Act.SILU)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)


def build_qwen2(b: Builder) -> g.Tensor:
    return _build(b, qk_norm=False, moe=False)


def build_qwen3(b: Builder) -> g.Tensor:
    return _build(b, qk_norm=True, moe=False)


def build_qwen3moe(b: Builder) -> g.Tensor:
    return _build(b, qk_norm=True, moe=True)


def hparams_qwen2moe(r: KeyReader, fields: dict[str, Any]) -> None:
    hparams_moe(r, fields)
    fields["n_ff_shexp"] = int(r.get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0))


def _qwen2moe_ffn(b: Builder, il: int, x: g.Tensor) -> g.Tensor:
    """Experts (weights not normalised) plus the shared expert times sigmoid(gate . x),
    the sigmoid computed as silu(z) / z as llama.cpp does."""
    lib, ctx = b.lib, b.ctx
    moe = b.moe(x, il, Act.SILU, Gating.SOFTMAX, weights_scale=b.hp.expert_weights_scale)
    z = b.mm(b.w(T.FFN_GATE_INP_SHEXP, il), x)
    gate = lib.ggml_div(ctx, lib.ggml_silu(ctx, z), z)
    shared = b.shared_expert(x, il)
    return lib.ggml_add(ctx, moe, lib.ggml_mul(ctx, shared, gate))


def build_qwen2moe(b: Builder) -> g.Tensor:
    lib, ctx = b.lib, b.ctx
    x = b.embeddings()
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur)
        q, k = b.name(b.rope(q, il), "Qcur", il), b.name(b.rope(k, il), "Kcur", il)
        cur = b.attention(
            il, q, k, v, inv_sqrt(b.hp.head_dim_v(il)), b.w(T.ATTN_OUT, il), b.opt(T.ATTN_OUT, il, "bias")
        )
        cur, x = b.out_rows(il, cur, x)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = _qwen2moe_ffn(b, il, b.norm(ffn_inp, b.w(T.FFN_NORM, il), "ffn_norm", il))
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)
