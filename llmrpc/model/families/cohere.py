"""The Cohere families: attention and FFN in parallel on one layer norm (no bias), a tied
output times ``logit_scale``. Command R (``command-r``): rope on every layer, per-head
layer norms of Q and K on the 64-layer and larger models (Command R+). Command R7B
(``cohere2``): sliding-window layers (three of every four) that alone rotate, the full layers
without rope.

Mirrors llama.cpp's ``src/models/command-r.cpp`` and ``cohere2.cpp``.
"""

from __future__ import annotations

from typing import Any

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, Norm, inv_sqrt
from llmrpc.model.hparams import KeyReader, Keys, SwaType, read_swa


def hparams_cohere2(r: KeyReader, fields: dict[str, Any]) -> None:
    fields["n_swa"] = int(r.req(Keys.Attention.SLIDING_WINDOW))
    fields["swa_type"] = SwaType.STANDARD
    fields["is_swa_arr"] = read_swa(r, fields["n_layer"], 4)
    fields["rope_layers"] = fields["is_swa_arr"]
    fields["logit_scale"] = float(r.req(Keys.LLM.LOGIT_SCALE))


def hparams_command_r(r: KeyReader, fields: dict[str, Any]) -> None:
    fields["logit_scale"] = float(r.get(Keys.LLM.LOGIT_SCALE, 0.0))


def _build(b: Builder, rope_factors: bool) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    factors = b.rope_factors() if rope_factors else None
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il, kind=Norm.LAYER)
        ffn_inp = cur
        q, k, v = b.qkv(il, cur)
        q_norm, k_norm = b.opt(T.ATTN_Q_NORM, il), b.opt(T.ATTN_K_NORM, il)
        if q_norm is not None and k_norm is not None:
            q = b.norm(q, q_norm, "Qcur_normed", il, kind=Norm.LAYER)
            k = b.norm(k, k_norm, "Kcur_normed", il, kind=Norm.LAYER)
        if hp.has_rope(il):
            q, k = b.rope_full(q, il, factors), b.rope_full(k, il, factors)
        q, k = b.name(q, "Qcur", il), b.name(k, "Kcur", il)
        cur = b.attention(il, q, k, v, inv_sqrt(hp.head_dim_v(il)), b.w(T.ATTN_OUT, il), b.opt(T.ATTN_OUT, il, "bias"))
        cur, x, ffn_inp = b.out_rows(il, cur, x, ffn_inp)
        attn_out = cur
        cur = b.ffn(ffn_inp, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), Act.SILU)
        cur = lib.ggml_add(ctx, lib.ggml_add(ctx, cur, x), attn_out)
        x = b.name(cur, "l_out", il)
    out = b.output(x, Norm.LAYER)
    if b.last and hp.logit_scale:
        out = b.name(b.scale(out, hp.logit_scale), "result_output")
    return out


def build_command_r(b: Builder) -> g.Tensor:
    return _build(b, rope_factors=False)


def build_cohere2(b: Builder) -> g.Tensor:
    return _build(b, rope_factors=True)
