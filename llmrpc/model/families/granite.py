"""The Granite families (``granite``, ``granitemoe``): llama's layers with scales: token
embeddings times ``embedding_scale``, each block's output times ``residual_scale`` before
its residual add, the attention's own ``attention.scale``, and logits divided by
``logit_scale``; ``granite`` runs without rope (NoPE) when ``rope.scaling.finetuned`` is
false. Experts (softmax-routed, weights normalised) with an optional shared expert.

Mirrors llama.cpp's ``src/models/granite.cpp`` (whose graph ``granite-moe.cpp`` uses too).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, inv_sqrt
from llmrpc.model.hparams import Gating, KeyReader, Keys


def hparams_granitemoe(r: KeyReader, fields: dict[str, Any]) -> None:
    fields["logit_scale"] = float(r.req(Keys.LLM.LOGIT_SCALE))
    fields["residual_scale"] = float(r.get(Keys.LLM.RESIDUAL_SCALE, 0.0))
    fields["embedding_scale"] = float(r.get(Keys.LLM.EMBEDDING_SCALE, 0.0))
    fields["attn_scale"] = float(r.get(Keys.Attention.SCALE, 0.0))
    fields["n_ff_shexp"] = int(r.get(Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0))


def hparams_granite(r: KeyReader, fields: dict[str, Any]) -> None:
    hparams_granitemoe(r, fields)
    fields["rope_layers"] = (bool(r.get(Keys.Rope.SCALING_FINETUNED, True)),) * fields["n_layer"]


def _residual(b: Builder, cur: g.Tensor, inp: g.Tensor) -> g.Tensor:
    if b.hp.residual_scale:
        cur = b.scale(cur, b.hp.residual_scale)
    return b.lib.ggml_add(b.ctx, cur, inp)


def _ffn(b: Builder, il: int, x: g.Tensor) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    cur = b.norm(x, b.w(T.FFN_NORM, il), "ffn_norm", il)
    if b.opt(T.FFN_GATE_INP, il) is None:
        return b.ffn(
            cur, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), Act.SILU,
            b.opt(T.FFN_UP, il, "bias"), b.opt(T.FFN_GATE, il, "bias"), b.opt(T.FFN_DOWN, il, "bias"),
        )  # fmt: skip
    moe = b.moe(cur, il, Act.SILU, Gating.SOFTMAX, norm_weights=True, weights_scale=hp.expert_weights_scale)
    if not hp.n_ff_shexp:
        return moe
    shared = b.shared_expert(cur, il)
    return lib.ggml_add(ctx, moe, shared)


def build(b: Builder) -> g.Tensor:
    hp = b.hp
    x = b.embeddings()
    factors = b.rope_factors()
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur)
        if hp.has_rope(il):
            q, k = b.rope(q, il, factors), b.rope(k, il, factors)
        kq_scale = hp.attn_scale or inv_sqrt(hp.head_dim_v(il))
        cur = b.attention(il, q, k, v, kq_scale, b.w(T.ATTN_OUT, il), b.opt(T.ATTN_OUT, il, "bias"))
        cur, x = b.out_rows(il, b.name(cur, "attn_out", il), x)
        ffn_inp = b.name(_residual(b, cur, x), "ffn_inp", il)
        x = b.name(_residual(b, _ffn(b, il, ffn_inp), ffn_inp), "l_out", il)
    out = b.output(x)
    if b.last:
        out = b.name(b.scale(out, float(np.float32(1.0) / np.float32(hp.logit_scale))), "result_output")
    return out
