"""Graph builder for the llama family (llama, mistral, SmolLM2): one layer range at a time.

Mirrors llama.cpp's ``src/models/llama.cpp``: RMSNorm, RoPE, grouped-query attention,
SwiGLU; token embeddings on the first stage, output norm and matrix on the last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llmrpc.ggml import lib as g
from llmrpc.model.graph import Builder, GraphInputs, LayerCache


def build(
    b: Builder,
    weights: Mapping[str, g.Tensor],
    caches: Sequence[Mapping[int, LayerCache]],  # one per segment of the batch
    inp: GraphInputs,
    start: int,
    end: int,
    rope_type: int,
) -> g.Tensor:
    """Layers [start, end) of the model; returns hidden states, or logits on the last stage."""
    lib, ctx, hp, n = b.lib, b.ctx, b.hp, b.n_tokens
    last = end == hp.n_layer
    if inp.tokens is not None:
        x = b.name(lib.ggml_get_rows(ctx, weights["token_embd.weight"], inp.tokens), "inp_embd")
    else:
        assert inp.embd is not None
        x = inp.embd
    rope_factors = weights.get("rope_freqs.weight")
    hd = hp.head_dim

    def rope(t: g.Tensor) -> g.Tensor:
        return lib.ggml_rope_ext(
            ctx, t, inp.pos, rope_factors, hp.n_rot, rope_type, hp.n_ctx_train,
            hp.rope_freq_base, hp.rope_freq_scale, 0.0, 1.0, 32.0, 1.0,
        )  # fmt: skip

    for il in range(start, end):
        w = lambda kind, il=il: weights.get(f"blk.{il}.{kind}")  # noqa: E731
        inp_sa = x
        cur = b.rms_norm(x, w("attn_norm.weight"), "attn_norm", il)
        q = lib.ggml_reshape_3d(ctx, b.linear(w("attn_q.weight"), cur, w("attn_q.bias")), hd, hp.n_head, n)
        k = lib.ggml_reshape_3d(ctx, b.linear(w("attn_k.weight"), cur, w("attn_k.bias")), hd, hp.n_head_kv, n)
        v = lib.ggml_reshape_3d(ctx, b.linear(w("attn_v.weight"), cur, w("attn_v.bias")), hd, hp.n_head_kv, n)
        q, k = b.name(rope(q), "Qcur", il), b.name(rope(k), "Kcur", il)
        cur = b.attention(inp, [c[il] for c in caches], q, k, v, il)
        cur = b.name(b.linear(w("attn_output.weight"), cur, w("attn_output.bias")), "attn_out", il)
        if il == hp.n_layer - 1 and inp.out_ids is not None:
            cur = lib.ggml_get_rows(ctx, cur, inp.out_ids)
            inp_sa = lib.ggml_get_rows(ctx, inp_sa, inp.out_ids)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, inp_sa), "ffn_inp", il)
        cur = b.rms_norm(ffn_inp, w("ffn_norm.weight"), "ffn_norm", il)
        cur = b.swiglu_ffn(cur, w("ffn_gate.weight"), w("ffn_up.weight"), w("ffn_down.weight"), il)
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)

    if not last:
        return x
    cur = b.rms_norm(x, weights["output_norm.weight"], "result_norm", -1)
    output = weights.get("output.weight") or weights["token_embd.weight"]
    return b.name(lib.ggml_mul_mat(ctx, output, cur), "result_output")
