"""The StarCoder 2 family: layer norms with biases, biases on Q, K, V and the attention
output, rope, and a GELU FFN of up and down (no gate) with biases.

Mirrors llama.cpp's ``src/models/starcoder2.cpp``.
"""

from __future__ import annotations

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, Norm, inv_sqrt


def build_starcoder2(b: Builder) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il, b.w(T.ATTN_NORM, il, "bias"), Norm.LAYER)
        q, k, v = b.qkv(il, cur)
        q, k = b.name(b.rope(q, il), "Qcur", il), b.name(b.rope(k, il), "Kcur", il)
        cur = b.attention(il, q, k, v, inv_sqrt(hp.head_dim_v(il)), b.w(T.ATTN_OUT, il), b.w(T.ATTN_OUT, il, "bias"))
        cur, x = b.out_rows(il, cur, x)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.norm(ffn_inp, b.w(T.FFN_NORM, il), "ffn_norm", il, b.w(T.FFN_NORM, il, "bias"), Norm.LAYER)
        cur = b.ffn(
            cur, il, b.w(T.FFN_UP, il), None, b.w(T.FFN_DOWN, il), Act.GELU,
            b.w(T.FFN_UP, il, "bias"), None, b.w(T.FFN_DOWN, il, "bias"), parallel=False,
        )  # fmt: skip
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x, Norm.LAYER)
