"""The Phi-3 family: a fused QKV matrix, a fused gate-and-up FFN (SwiGLU over halves), Q
scaled before attention, LongRoPE factors on the long-context models.

Mirrors llama.cpp's ``src/models/phi3.cpp`` (which, as there, ignores a sliding window).
"""

from __future__ import annotations

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, inv_sqrt
from llmrpc.model.hparams import Gating


def build_phi3(b: Builder) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    factors = b.rope_factors()
    for il in b.layers:
        residual = x
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il, b.opt(T.ATTN_NORM, il, "bias"))
        q, k, v = b.qkv(il, cur)
        q, k = b.rope(q, il, factors), b.rope(k, il, factors)
        q = b.scale(q, inv_sqrt(hp.head_dim_v(il)))
        cur = b.attention(il, q, k, v, 1.0, b.w(T.ATTN_OUT, il), b.opt(T.ATTN_OUT, il, "bias"))
        cur, residual = b.out_rows(il, cur, residual)
        residual = lib.ggml_add(ctx, cur, residual)
        cur = b.norm(residual, b.w(T.FFN_NORM, il), "ffn_norm", il, b.opt(T.FFN_NORM, il, "bias"))
        if b.opt(T.FFN_GATE_INP, il) is None:
            cur = b.ffn(cur, il, b.w(T.FFN_UP, il), None, b.w(T.FFN_DOWN, il), Act.SWIGLU, parallel=False)
        else:
            cur = b.moe(cur, il, Act.SILU, Gating.SOFTMAX, norm_weights=True, weights_scale=hp.expert_weights_scale)
        x = b.name(lib.ggml_add(ctx, residual, cur), "l_out", il)
    return b.output(x)
