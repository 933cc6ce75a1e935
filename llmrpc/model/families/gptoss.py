"""The gpt-oss family: attention sinks, sliding-window layers on every other layer, norms
after attention, and experts with biases, a softmax over the chosen experts' logits and a
clamped SwiGLU.

Mirrors llama.cpp's ``src/models/openai-moe.cpp``.
"""

from __future__ import annotations

from typing import Any

from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act, inv_sqrt
from llmrpc.model.hparams import Gating, KeyReader, Keys, SwaType, read_swa


def hparams(r: KeyReader, fields: dict[str, Any]) -> None:
    fields["n_ff_exp"] = int(r.req(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH))
    fields["n_swa"] = int(r.req(Keys.Attention.SLIDING_WINDOW))
    fields["swa_type"] = SwaType.STANDARD
    fields["is_swa_arr"] = read_swa(r, fields["n_layer"], 2)
    fields["rope_freq_base_swa"] = float(r.get(Keys.Rope.FREQ_BASE_SWA, fields["rope"]["freq_base"]))
    fields["rope_freq_scale_swa"] = fields["rope"]["freq_scale"]


def build(b: Builder) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    for il in b.layers:
        n_rot = hp.n_rot(il)
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = b.qkv(il, cur, head_dim=n_rot)
        q, k = b.name(b.rope(q, il), "Qcur", il), b.name(b.rope(k, il), "Kcur", il)
        cur = b.attention(il, q, k, v, inv_sqrt(n_rot), b.w(T.ATTN_OUT, il), b.w(T.ATTN_OUT, il, "bias"),
                          sinks=b.w(T.ATTN_SINKS, il))  # fmt: skip
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.norm(ffn_inp, b.w(T.ATTN_POST_NORM, il), "attn_post_norm", il)
        cur = b.moe(cur, il, Act.SWIGLU_OAI, Gating.SOFTMAX_WEIGHT, weights_scale=hp.expert_weights_scale, biased=True)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    if b.last:  # the rows that leave are taken after the last layer here
        (x,) = b.out_rows(hp.n_layer - 1, x)
    return b.output(x)
