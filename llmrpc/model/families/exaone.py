"""The EXAONE 4 family: no norm before attention or FFN but norms after both, Q/K norms;
the 32B model (64 layers) slides a window on three layers of four, and only those rotate
(its full-attention layers have no rope); the others rotate on every layer, without window.

Mirrors llama.cpp's ``src/models/exaone4.cpp``.
"""

from __future__ import annotations

from typing import Any

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, inv_sqrt
from llmrpc.model.hparams import KeyReader, Keys, SwaType, read_swa


def hparams_exaone4(r: KeyReader, fields: dict[str, Any]) -> None:
    if fields["n_layer"] == 64:  # the 32B model
        fields["n_swa"] = int(r.get(Keys.Attention.SLIDING_WINDOW, 4096))
        fields["swa_type"] = SwaType.STANDARD
        fields["is_swa_arr"] = read_swa(r, fields["n_layer"], 4)
        fields["rope_layers"] = fields["is_swa_arr"]


def build_exaone4(b: Builder) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    factors = b.rope_factors()
    for il in b.layers:
        q, k, v = b.qkv(il, x)
        q, k = b.qk_norm(q, k, il)
        if hp.has_rope(il):
            q, k = b.rope_full(q, il, factors), b.rope_full(k, il, factors)
        q, k = b.name(q, "Qcur", il), b.name(k, "Kcur", il)
        cur = b.attention(il, q, k, v, inv_sqrt(hp.head_dim_k(il)), b.w(T.ATTN_OUT, il))
        cur, x = b.out_rows(il, cur, x)
        cur = b.norm(cur, b.w(T.ATTN_POST_NORM, il), "attn_post_norm", il)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.ffn(ffn_inp, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), Act.SILU)
        cur = b.norm(cur, b.w(T.FFN_POST_NORM, il), "ffn_post_norm", il)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)
