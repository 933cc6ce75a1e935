"""The DeepSeek V2/V3 family (``deepseek2``): multi-head latent attention (one compressed K
per position in the cache; queries absorbed into it, values decompressed after), dense FFNs on
the leading layers, then experts with shared experts, sigmoid or softmax routing, an
expert-selection bias and group-limited routing.

Mirrors llama.cpp's ``src/models/deepseek2.cpp`` for GGUFs with split K/V decompression
matrices (``attn_k_b``/``attn_v_b``, llama.cpp's MLA path).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf.constants import MODEL_TENSOR as T
from gguf.constants import Keys

from llmrpc.ggml import lib as g
from llmrpc.model.builder import Builder
from llmrpc.model.graph import Act
from llmrpc.model.hparams import Gating, HParams, HParamsError, KeyReader


def hparams(r: KeyReader, fields: dict[str, Any]) -> None:
    fields["n_layer_dense_lead"] = int(r.get(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0))
    fields["n_lora_q"] = int(r.get(Keys.Attention.Q_LORA_RANK, 0))  # 0: the lite models' plain Q
    fields["n_lora_kv"] = int(r.req(Keys.Attention.KV_LORA_RANK))
    fields["head_dim_k_mla"] = int(r.get(Keys.Attention.KEY_LENGTH_MLA, 0))
    fields["head_dim_v_mla"] = int(r.get(Keys.Attention.VALUE_LENGTH_MLA, 0))
    n_ff_exp = r.per_layer(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, fields["n_layer"])
    if n_ff_exp is None:
        raise HParamsError(f"{r.path}: GGUF key {r.key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)} is missing")
    fields["n_ff_exp"] = n_ff_exp[0]
    fields["n_expert_shared"] = int(r.req(Keys.LLM.EXPERT_SHARED_COUNT))
    fields["expert_weights_scale"] = float(r.get(Keys.LLM.EXPERT_WEIGHTS_SCALE, 0.0))
    fields["expert_weights_norm"] = bool(r.get(Keys.LLM.EXPERT_WEIGHTS_NORM, False))
    fields["expert_gating"] = Gating(int(r.get(Keys.LLM.EXPERT_GATING_FUNC, 0)) or Gating.SOFTMAX)
    if r.has(Keys.Rope.SCALING_YARN_LOG_MUL):  # the converter stores it times 0.1
        fields["rope_yarn_log_mul"] = float(np.float32(r.get(Keys.Rope.SCALING_YARN_LOG_MUL)) / np.float32(0.1))
    if float(r.get(Keys.Attention.TEMPERATURE_SCALE, 0.0)):
        raise HParamsError(f"{r.path}: attention temperature scaling is not supported")
    if not (fields["head_dim_k_mla"] and fields["head_dim_v_mla"]):
        raise HParamsError(f"{r.path}: only GGUFs with latent attention (key_length_mla, attn_k_b) are supported")


def kq_scale(hp: HParams) -> float:
    """YaRN's pre-scaled attention scale (llama.cpp's deepseek2 graph), in float32."""
    f32 = np.float32
    log = np.log(f32(1.0) / f32(hp.rope.freq_scale))
    attn_factor_org = f32(hp.rope.attn_factor) * (f32(1.0) + f32(0.1) * log)
    mscale = f32(attn_factor_org * (f32(1.0) + f32(0.1) * f32(hp.rope_yarn_log_mul) * log))
    return float(f32(f32(1.0) * mscale * mscale / np.sqrt(f32(hp.head_dim_k_mla))))


def _latent_qkv(b: Builder, il: int, x: g.Tensor) -> tuple[g.Tensor, g.Tensor, g.Tensor]:
    """Q absorbed into the latent space [kv_lora + n_rot, n_head, n], the cached K
    [kv_lora + n_rot, 1, n] and V (its first kv_lora values)."""
    hp, lib, ctx, n = b.hp, b.lib, b.ctx, b.n_tokens
    hd_k, n_rot, kv_lora = hp.head_dim_k_mla, hp.n_rot(il), hp.n_lora_kv
    nope = hd_k - n_rot
    if b.opt(T.ATTN_Q_A, il) is not None:
        q = b.norm(b.mm(b.w(T.ATTN_Q_A, il), x), b.w(T.ATTN_Q_A_NORM, il), "q", il)
        q = b.mm(b.w(T.ATTN_Q_B, il), q)
    else:
        q = b.mm(b.w(T.ATTN_Q, il), x)
    q = lib.ggml_reshape_3d(ctx, q, hd_k, hp.n_head(il), n)
    kv_pe = b.mm(b.w(T.ATTN_KV_A_MQA, il), x)
    f32 = g.GGML_TYPE_F32
    row = lib.ggml_row_size(f32, kv_lora + n_rot)
    kv = lib.ggml_view_2d(ctx, kv_pe, kv_lora, n, row, 0)
    k_pe = b.rope(lib.ggml_view_3d(ctx, kv_pe, n_rot, 1, n, row, row, lib.ggml_row_size(f32, kv_lora)), il)
    kv = b.norm(kv, b.w(T.ATTN_KV_A_NORM, il), "kv_cmpr", il)
    qc = q.contents
    q_nope = lib.ggml_view_3d(ctx, q, nope, hp.n_head(il), n, qc.nb[1], qc.nb[2], 0)
    q_pe = lib.ggml_view_3d(ctx, q, n_rot, hp.n_head(il), n, qc.nb[1], qc.nb[2], lib.ggml_row_size(f32, nope))
    q_pe = b.rope(q_pe, il)
    absorbed = b.mm(b.w(T.ATTN_K_B, il), lib.ggml_permute(ctx, q_nope, 0, 2, 1, 3))
    q = lib.ggml_concat(ctx, lib.ggml_permute(ctx, absorbed, 0, 2, 1, 3), q_pe, 0)
    kv = lib.ggml_reshape_3d(ctx, kv, kv_lora, 1, n)
    return q, lib.ggml_concat(ctx, kv, k_pe, 0), kv


def build(b: Builder) -> g.Tensor:
    hp, lib, ctx = b.hp, b.lib, b.ctx
    x = b.embeddings()
    scale = kq_scale(hp)
    for il in b.layers:
        cur = b.norm(x, b.w(T.ATTN_NORM, il), "attn_norm", il)
        q, k, v = _latent_qkv(b, il, cur)
        cur = b.attention(il, q, k, v, scale, b.w(T.ATTN_OUT, il), v_mla=b.w(T.ATTN_V_B, il))
        cur, x = b.out_rows(il, cur, x)
        ffn_inp = b.name(lib.ggml_add(ctx, cur, x), "ffn_inp", il)
        cur = b.norm(ffn_inp, b.w(T.FFN_NORM, il), "ffn_norm", il)
        if il < hp.n_layer_dense_lead:
            cur = b.ffn(cur, il, b.w(T.FFN_UP, il), b.w(T.FFN_GATE, il), b.w(T.FFN_DOWN, il), Act.SILU)
        else:
            moe = b.moe(
                cur, il, Act.SILU, hp.expert_gating, hp.expert_weights_norm, hp.expert_weights_scale,
                probs_bias=b.opt(T.FFN_EXP_PROBS_B, il, "bias"),
            )  # fmt: skip
            cur = lib.ggml_add(ctx, moe, b.shared_expert(cur, il))
        x = b.name(lib.ggml_add(ctx, cur, ffn_inp), "l_out", il)
    return b.output(x)
