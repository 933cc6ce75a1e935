"""The llama family (llama, mistral, SmolLM2; Mixtral-style experts when the GGUF has them).

Mirrors llama.cpp's ``src/models/llama.cpp``: RMSNorm, RoPE (with llama3 or LongRoPE factors),
grouped-query attention, a SwiGLU FFN or a softmax-gated mixture of experts.
"""

from __future__ import annotations

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.graph import Act, Builder, inv_sqrt
from llmrpc.model.hparams import Gating


def build(b: Builder) -> g.Tensor:
    """Layers [start, end) of the model; hidden states, or logits on the last stage."""
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    factors = b.rope_factors()
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur)
        q, k = b.name(b.rope(q, il, factors), "Qcur", il), b.name(b.rope(k, il, factors), "Kcur", il)
        kq_scale = hp.attn_scale or inv_sqrt(hp.head_dim_k(il))
        cur = b.attention(il, q, k, v, kq_scale, b.w(T.ATTN_OUT, il), b.opt(T.ATTN_OUT, il, "bias"))
        cur, x = b.out_rows(il, b.name(cur, "attn_out", il), x)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.norm(ffn_inp, b.w(T.FFN_NORM, il), "ffn_norm", il)
        if b.opt(T.FFN_GATE_INP, il) is None:
            cur = b.ffn(
                cur, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), Act.SILU,
                b.opt(T.FFN_UP, il, "bias"), b.opt(T.FFN_GATE, il, "bias"), b.opt(T.FFN_DOWN, il, "bias"),
                label="ffn_swiglu_out",
            )  # fmt: skip
        else:
            cur = b.moe(cur, il, Act.SILU, Gating.SOFTMAX, norm_weights=True, weights_scale=hp.expert_weights_scale)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)
