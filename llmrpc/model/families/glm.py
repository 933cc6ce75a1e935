"""The GLM-4 family (``glm4``, GLM-4-0414): norms before and after attention and FFN, rope
on part of each head, the attention output projected with F32 accumulation, a SwiGLU FFN
over one gate-and-up matrix. GGUFs with multimodal rope sections (GLM-4.1V) are not
supported: their positions are per section.

Mirrors llama.cpp's ``src/models/glm4.cpp``.
"""

from __future__ import annotations

from typing import Any

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.graph import Act, Builder, inv_sqrt
from llmrpc.model.hparams import HParamsError, KeyReader, Keys


def hparams_glm4(r: KeyReader, fields: dict[str, Any]) -> None:
    sections = r.array(Keys.Rope.DIMENSION_SECTIONS) or (r.get(Keys.Rope.DIMENSION_SECTIONS, 0),)
    if any(sections):
        raise HParamsError(f"{r.path}: multimodal rope (rope.dimension_sections) is not supported")


def build_glm4(b: Builder) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur)
        q, k = b.name(b.rope(q, il), "Qcur", il), b.name(b.rope(k, il), "Kcur", il)
        cur = b.attention(il, q, k, v, inv_sqrt(hp.head_dim_v(il)), None)
        cur = b.mm(b.w(T.ATTN_OUT, il), cur)
        lib.ggml_prec_set_acc(cur, g.GGML_PREC_F32)
        cur, x = b.out_rows(il, cur, x)
        cur = b.norm(cur, b.w(T.ATTN_POST_NORM, il), "attn_post_norm", il)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.norm(ffn_inp, b.w(T.FFN_NORM, il), "ffn_norm", il)
        cur = b.ffn(cur, il, b.w(T.FFN_UP, il), None, b.w(T.FFN_DOWN, il), Act.SWIGLU, parallel=False)
        cur = b.norm(cur, b.w(T.FFN_POST_NORM, il), "ffn_post_norm", il)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)
