"""The OLMo 2 family (``olmo2``, which OLMo 3 GGUFs use too): no norms before attention and
FFN but norms after them, Q and K normed over all heads at once, a SwiGLU FFN; OLMo 3's
sliding-window layers (three of every four) rotate with plain rope, without the context's
YaRN scaling. OLMoE (``olmoe``): norms before attention and experts, Q and K normed over all
heads at once.

Mirrors llama.cpp's ``src/models/olmo2.cpp`` and ``olmoe.cpp``.
"""

from __future__ import annotations

from typing import Any

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, inv_sqrt
from llmrpc.model.hparams import Gating, KeyReader, Keys, SwaType, read_swa


def hparams_olmo2(r: KeyReader, fields: dict[str, Any]) -> None:
    n_swa = int(r.get(Keys.Attention.SLIDING_WINDOW, 0))
    if n_swa > 0:
        fields["n_swa"] = n_swa
        fields["swa_type"] = SwaType.STANDARD
        fields["is_swa_arr"] = read_swa(r, fields["n_layer"], 4)


def _rope(b: Builder, t: g.Tensor, il: int) -> g.Tensor:
    """Rope; on sliding-window layers without YaRN (frequency scale 1, no extrapolation mix,
    attention factor 1) and with the full layers' base, as llama.cpp's olmo2 graph does."""
    if not b.hp.is_swa(il):
        return b.rope(t, il)
    hp, r = b.hp, b.hp.rope
    return b.lib.ggml_rope_ext(
        b.ctx, t, b.inp.pos, None, hp.n_rot(il), hp.rope_type, r.n_ctx_orig,
        r.freq_base, 1.0, 0.0, 1.0, r.beta_fast, r.beta_slow,
    )  # fmt: skip


def _qkv_normed(b: Builder, il: int, x: g.Tensor) -> tuple[g.Tensor, g.Tensor, g.Tensor]:
    """Q, K and V split into heads, Q and K normed over all heads first."""
    hp, lib, ctx, n = b.hp, b.lib, b.ctx, b.n_tokens
    hd = hp.head_dim_k(il)
    q, k, v = b.qkv_flat(il, x)
    q = b.norm(q, b.w(T.ATTN_Q_NORM, il), "Qcur_normed", il)
    k = b.norm(k, b.w(T.ATTN_K_NORM, il), "Kcur_normed", il)
    return (
        lib.ggml_reshape_3d(ctx, q, hd, hp.n_head(il), n),
        lib.ggml_reshape_3d(ctx, k, hd, hp.n_head_kv(il), n),
        lib.ggml_reshape_3d(ctx, v, hd, hp.n_head_kv(il), n),
    )


def build_olmo2(b: Builder) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    for il in b.layers:
        hd = hp.head_dim_k(il)
        q, k, v = _qkv_normed(b, il, x)
        q, k = b.name(_rope(b, q, il), "Qcur", il), b.name(_rope(b, k, il), "Kcur", il)
        cur = b.attention(il, q, k, v, inv_sqrt(hd), b.w(T.ATTN_OUT, il))
        cur, x = b.out_rows(il, cur, x)
        cur = b.norm(cur, b.w(T.ATTN_POST_NORM, il), "attn_post_norm", il)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.ffn(ffn_inp, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), Act.SILU)
        cur = b.norm(cur, b.w(T.FFN_POST_NORM, il), "ffn_post_norm", il)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)


def build_olmoe(b: Builder) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = _qkv_normed(b, il, cur)
        q, k = b.name(b.rope(q, il), "Qcur", il), b.name(b.rope(k, il), "Kcur", il)
        cur = b.attention(il, q, k, v, inv_sqrt(hp.head_dim_k(il)), b.w(T.ATTN_OUT, il))
        cur, x = b.out_rows(il, cur, x)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.norm(ffn_inp, b.w(T.FFN_NORM, il), "ffn_norm", il)
        cur = b.moe(cur, il, Act.SILU, Gating.SOFTMAX, weights_scale=hp.expert_weights_scale)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)
