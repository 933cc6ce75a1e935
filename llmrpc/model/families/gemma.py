"""The Gemma families: embeddings scaled by sqrt(n_embd), Q scaled before attention, GeGLU;
Gemma 2 and 3 have norms after attention and FFN too and sliding-window layers; Gemma 2 soft-caps attention scores and logits
(always, 50 and 30 by default) and slides the window on every other layer; Gemma 3 has Q/K
norms, five sliding-window layers of every six with their own rope base, and soft-capped
logits where the GGUF says so.

Mirrors llama.cpp's ``src/models/gemma.cpp``, ``gemma2.cpp`` and ``gemma3.cpp``.
"""

from __future__ import annotations

import math
from typing import Any

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, inv_sqrt
from llmrpc.model.hparams import KeyReader, Keys, SwaType, read_swa


def _attn_scale(fields: dict[str, Any], n_layer_largest: int) -> float:
    """1/sqrt(head dim); the largest model of a generation scales by the hidden size per head."""
    if fields["n_layer"] == n_layer_largest:
        return inv_sqrt(fields["n_embd"] // fields["n_head_arr"][0])
    return inv_sqrt(fields["head_dim_k_full"])


def hparams_gemma(r: KeyReader, fields: dict[str, Any]) -> None:
    fields["attn_scale"] = inv_sqrt(fields["head_dim_v_full"])


def hparams_gemma2(r: KeyReader, fields: dict[str, Any]) -> None:
    fields["n_swa"] = int(r.get(Keys.Attention.SLIDING_WINDOW, 4096))
    fields["swa_type"] = SwaType.STANDARD
    fields["is_swa_arr"] = read_swa(r, fields["n_layer"], 2)
    fields["rope_freq_base_swa"] = float(r.get(Keys.Rope.FREQ_BASE_SWA, fields["rope"]["freq_base"]))
    fields["rope_freq_scale_swa"] = fields["rope"]["freq_scale"]
    fields["attn_softcap"] = float(r.get(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, 50.0))
    fields["final_softcap"] = float(r.get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, 30.0))
    fields["attn_scale"] = _attn_scale(fields, 46)


def hparams_gemma3(r: KeyReader, fields: dict[str, Any]) -> None:
    n_swa = int(r.get(Keys.Attention.SLIDING_WINDOW, 0))
    if n_swa > 0:
        fields["n_swa"] = n_swa
        fields["swa_type"] = SwaType.STANDARD
        fields["is_swa_arr"] = read_swa(r, fields["n_layer"], 6)
        fields["rope_freq_base_swa"] = float(r.get(Keys.Rope.FREQ_BASE_SWA, 10000.0))
    fields["final_softcap"] = float(r.get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, 0.0))
    fields["attn_scale"] = _attn_scale(fields, 62)


def _build(b: Builder, qk_norm: bool, post_norms: bool = True) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings(scale=math.sqrt(hp.n_embd))
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur)
        if qk_norm:
            q, k = b.qk_norm(q, k, il)
        q, k = b.name(b.rope(q, il), "Qcur", il), b.name(b.rope(k, il), "Kcur", il)
        q = b.scale(q, hp.attn_scale)
        cur = b.attention(il, q, k, v, 1.0, b.w(T.ATTN_OUT, il))
        cur, x = b.out_rows(il, cur, x)
        if post_norms:
            cur = b.norm(cur, b.w(T.ATTN_POST_NORM, il), "attn_post_norm", il)
        sa_out = b.name(lib.ggml_add(ctx, cur, x), "sa_out", il)
        cur = b.norm(sa_out, b.w(T.FFN_NORM, il), "ffn_norm", il)
        cur = b.ffn(cur, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), Act.GELU)
        if post_norms:
            cur = b.norm(cur, b.w(T.FFN_POST_NORM, il), "ffn_post_norm", il)
        x = b.name(lib.ggml_add(ctx, cur, sa_out), "l_out", il)
    return b.output(x)


def build_gemma(b: Builder) -> g.Tensor:
    return _build(b, qk_norm=False, post_norms=False)


def build_gemma2(b: Builder) -> g.Tensor:
    return _build(b, qk_norm=False)


def build_gemma3(b: Builder) -> g.Tensor:
    return _build(b, qk_norm=True)
