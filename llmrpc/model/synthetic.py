"""Random GGUF files of every supported family: tiny ones for tests, large ones for benchmarks.

Written with gguf-py's ``GGUFWriter``, tensor names from its tables, and a small
SentencePiece-style vocabulary (control tokens and the 256 byte tokens), so llama.cpp loads
them as it loads any model of the family.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from gguf.constants import MODEL_TENSOR as T
from gguf.constants import ExpertGatingFuncType, RopeScalingType

from llmrpc.model.arch import tensor_name


@dataclass(frozen=True)
class SyntheticSpec:
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_vocab: int = 320
    n_ctx_train: int = 2048
    weight_type: str = "F32"  # F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K ...: the type of the 2-D matrices
    tied_output: bool = False
    seed: int = 0
    std: float = 0.08
    rope_freq_base: float = 10000.0
    fast_random: bool = False  # random quantized blocks instead of quantizing floats (for big files)
    arch: str = "llama"
    head_dim: int = 0  # 0: n_embd // n_head
    n_rot: int = 0  # dimensions rope rotates (0: the head's)
    n_expert: int = 0  # experts per layer (0: a dense FFN)
    n_expert_used: int = 0
    n_ff_exp: int = 0  # FFN width of one expert (0: n_ff)
    sliding_window: int = 0  # 0: the family's default for a tiny model
    final_softcap: float = 0.0
    chat_template: str = ""  # tokenizer.chat_template (Jinja), when the model should have one

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


def _vocab(n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    types = [2, 3, 3] + [6] * 256  # UNKNOWN, CONTROL, CONTROL, BYTE...
    i = 0
    while len(tokens) < n_vocab:
        tokens.append(f"\u2581w{i}".encode())
        types.append(1)
        i += 1
    tokens, types = tokens[:n_vocab], types[:n_vocab]
    scores = [0.0] * 3 + [-1000.0] * 256 + [-float(j) for j in range(len(tokens) - 259)]
    return tokens, scores[:n_vocab], types


def _matrix(
    rng: np.random.Generator, shape: tuple[int, ...], spec: SyntheticSpec, qtype_name: str
) -> tuple[np.ndarray, Any]:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    qtype = Q[qtype_name]
    if qtype == Q.F32:
        return (rng.standard_normal(shape, dtype=np.float32) * spec.std), qtype
    if qtype == Q.F16:
        return (rng.standard_normal(shape, dtype=np.float32) * spec.std).astype(np.float16), qtype
    if spec.fast_random:
        return _random_blocks(rng, shape, qtype, spec.std), qtype
    data = rng.standard_normal(shape, dtype=np.float32) * spec.std
    return quantize(data, qtype), qtype


def _random_blocks(rng: np.random.Generator, shape: tuple[int, ...], qtype: Any, std: float) -> np.ndarray:
    """Valid quantized blocks with random quants and a fixed scale: no float pass needed."""
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(std / 4).tobytes(), dtype=np.uint8)
    raw[:, 0:2] = scale  # Q4_0/Q8_0/Q4_1 blocks start with an f16 scale
    if size > 2 + block // 2 and qtype != 8:  # Q4_1: f16 min follows the scale
        raw[:, 2:4] = np.frombuffer(np.float16(-std / 2).tobytes(), dtype=np.uint8)
    return raw.reshape(*shape[:-1], cols // block * size)


# -- each family's tensors: (kind, suffix, numpy shape) of one layer ----------------------------
Shape = tuple[int, ...]
LayerTensors = list[tuple[T, str, Shape]]
LayerFn = Callable[["SyntheticSpec", int], LayerTensors]


def _attention(s: SyntheticSpec, bias: bool = False, qk_norm: bool = False) -> LayerTensors:
    q, kv = s.n_head * s.hd, s.n_head_kv * s.hd
    out: LayerTensors = [
        (T.ATTN_NORM, "weight", (s.n_embd,)),
        (T.ATTN_Q, "weight", (q, s.n_embd)),
        (T.ATTN_K, "weight", (kv, s.n_embd)),
        (T.ATTN_V, "weight", (kv, s.n_embd)),
        (T.ATTN_OUT, "weight", (s.n_embd, q)),
    ]
    if bias:
        out += [(T.ATTN_Q, "bias", (q,)), (T.ATTN_K, "bias", (kv,)), (T.ATTN_V, "bias", (kv,))]
    if qk_norm:
        out += [(T.ATTN_Q_NORM, "weight", (s.hd,)), (T.ATTN_K_NORM, "weight", (s.hd,))]
    return out


def _ffn(s: SyntheticSpec) -> LayerTensors:
    if s.n_expert:
        f = s.n_ff_exp or s.n_ff
        return [
            (T.FFN_NORM, "weight", (s.n_embd,)),
            (T.FFN_GATE_INP, "weight", (s.n_expert, s.n_embd)),
            (T.FFN_GATE_EXP, "weight", (s.n_expert, f, s.n_embd)),
            (T.FFN_UP_EXP, "weight", (s.n_expert, f, s.n_embd)),
            (T.FFN_DOWN_EXP, "weight", (s.n_expert, s.n_embd, f)),
        ]
    return [
        (T.FFN_NORM, "weight", (s.n_embd,)),
        (T.FFN_GATE, "weight", (s.n_ff, s.n_embd)),
        (T.FFN_UP, "weight", (s.n_ff, s.n_embd)),
        (T.FFN_DOWN, "weight", (s.n_embd, s.n_ff)),
    ]


def _llama(s: SyntheticSpec, il: int) -> LayerTensors:
    return _attention(s) + _ffn(s)


def _qwen2(s: SyntheticSpec, il: int) -> LayerTensors:
    return _attention(s, bias=True) + _ffn(s)


def _qwen3(s: SyntheticSpec, il: int) -> LayerTensors:
    return _attention(s, qk_norm=True) + _ffn(s)


def _gemma3(s: SyntheticSpec, il: int) -> LayerTensors:
    return (
        _attention(s, qk_norm=True)
        + _ffn(s)
        + [
            (T.ATTN_POST_NORM, "weight", (s.n_embd,)),
            (T.FFN_POST_NORM, "weight", (s.n_embd,)),
        ]
    )


def _phi3(s: SyntheticSpec, il: int) -> LayerTensors:
    qkv = (s.n_head + 2 * s.n_head_kv) * s.hd
    return [
        (T.ATTN_NORM, "weight", (s.n_embd,)),
        (T.ATTN_QKV, "weight", (qkv, s.n_embd)),
        (T.ATTN_OUT, "weight", (s.n_embd, s.n_head * s.hd)),
        (T.FFN_NORM, "weight", (s.n_embd,)),
        (T.FFN_UP, "weight", (2 * s.n_ff, s.n_embd)),
        (T.FFN_DOWN, "weight", (s.n_embd, s.n_ff)),
    ]


def _gptoss(s: SyntheticSpec, il: int) -> LayerTensors:
    f = s.n_ff_exp or s.n_ff
    return _attention(s, bias=True) + [
        (T.ATTN_OUT, "bias", (s.n_embd,)),
        (T.ATTN_SINKS, "weight", (s.n_head,)),
        (T.ATTN_POST_NORM, "weight", (s.n_embd,)),
        (T.FFN_GATE_INP, "weight", (s.n_expert, s.n_embd)),
        (T.FFN_GATE_INP, "bias", (s.n_expert,)),
        (T.FFN_GATE_EXP, "weight", (s.n_expert, f, s.n_embd)),
        (T.FFN_UP_EXP, "weight", (s.n_expert, f, s.n_embd)),
        (T.FFN_DOWN_EXP, "weight", (s.n_expert, s.n_embd, f)),
        (T.FFN_GATE_EXP, "bias", (s.n_expert, f)),
        (T.FFN_UP_EXP, "bias", (s.n_expert, f)),
        (T.FFN_DOWN_EXP, "bias", (s.n_expert, s.n_embd)),
    ]


def _deepseek2(s: SyntheticSpec, il: int) -> LayerTensors:
    """Latent attention (q_lora 64, kv_lora 32, heads of 32 + 16 rope dims, values of 32), a
    dense first layer, then experts with a shared one and a selection bias."""
    q_lora, kv_lora, n_rot, nope, v_mla = 64, 32, 16, 32, 32
    out: LayerTensors = [
        (T.ATTN_NORM, "weight", (s.n_embd,)),
        (T.ATTN_Q_A, "weight", (q_lora, s.n_embd)),
        (T.ATTN_Q_A_NORM, "weight", (q_lora,)),
        (T.ATTN_Q_B, "weight", (s.n_head * (nope + n_rot), q_lora)),
        (T.ATTN_KV_A_MQA, "weight", (kv_lora + n_rot, s.n_embd)),
        (T.ATTN_KV_A_NORM, "weight", (kv_lora,)),
        (T.ATTN_K_B, "weight", (s.n_head, kv_lora, nope)),
        (T.ATTN_V_B, "weight", (s.n_head, v_mla, kv_lora)),
        (T.ATTN_OUT, "weight", (s.n_embd, s.n_head * v_mla)),
    ]
    if il == 0:
        return out + _ffn(replace(s, n_expert=0))
    shared = s.n_ff_exp
    return (
        out
        + _ffn(s)
        + [
            (T.FFN_EXP_PROBS_B, "bias", (s.n_expert,)),
            (T.FFN_GATE_SHEXP, "weight", (shared, s.n_embd)),
            (T.FFN_UP_SHEXP, "weight", (shared, s.n_embd)),
            (T.FFN_DOWN_SHEXP, "weight", (s.n_embd, shared)),
        ]
    )


def _keys_deepseek2(w: Any, s: SyntheticSpec) -> None:
    a = s.arch
    w.add_uint32(f"{a}.leading_dense_block_count", 1)
    w.add_uint32(f"{a}.attention.q_lora_rank", 64)
    w.add_uint32(f"{a}.attention.kv_lora_rank", 32)
    w.add_uint32(f"{a}.attention.key_length", 32 + 16)  # the latent K: kv_lora + rope dims
    w.add_uint32(f"{a}.attention.value_length", 32)
    w.add_uint32(f"{a}.attention.key_length_mla", 32 + 16)
    w.add_uint32(f"{a}.attention.value_length_mla", 32)
    w.add_uint32(f"{a}.rope.dimension_count", 16)
    w.add_uint32(f"{a}.expert_shared_count", 1)
    w.add_float32(f"{a}.expert_weights_scale", 2.5)
    w.add_bool(f"{a}.expert_weights_norm", True)
    w.add_uint32(f"{a}.expert_gating_func", 2)  # sigmoid
    w.add_uint32(f"{a}.expert_group_count", 4)
    w.add_uint32(f"{a}.expert_group_used_count", 2)


def _keys_common(w: Any, s: SyntheticSpec) -> None:
    w.add_block_count(s.n_layer)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    if s.arch != "deepseek2":  # which has latent heads of its own
        if s.hd != s.n_embd // s.n_head:
            w.add_key_length(s.hd)
            w.add_value_length(s.hd)
        w.add_rope_dimension_count(s.n_rot or s.hd)
    w.add_rope_freq_base(s.rope_freq_base)
    w.add_layer_norm_rms_eps(1e-5 if s.arch != "gemma3" else 1e-6)
    w.add_vocab_size(s.n_vocab)
    if s.n_expert:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        if s.n_ff_exp:
            w.add_expert_feed_forward_length(s.n_ff_exp)


def _keys_gemma3(w: Any, s: SyntheticSpec) -> None:
    w.add_sliding_window(s.sliding_window or 8)
    if s.final_softcap:
        w.add_final_logit_softcapping(s.final_softcap)


def _keys_gptoss(w: Any, s: SyntheticSpec) -> None:
    w.add_sliding_window(s.sliding_window or 8)


@dataclass(frozen=True)
class SyntheticFamily:
    layer: LayerFn
    keys: Callable[[Any, SyntheticSpec], None] | None = None
    defaults: dict[str, Any] | None = None  # spec fields a tiny model of the family takes
    tied: bool = False  # the family's GGUFs have no output matrix
    # tensors of no layer besides the embeddings, output norm and output matrix (an output norm's bias)
    more: Callable[[SyntheticSpec], list[tuple[T, str, Shape]]] | None = None


FAMILIES: dict[str, SyntheticFamily] = {
    "llama": SyntheticFamily(_llama),
    "qwen2": SyntheticFamily(_qwen2, defaults={"rope_freq_base": 1000000.0}),
    "qwen3": SyntheticFamily(_qwen3, defaults={"head_dim": 32}),
    "qwen3moe": SyntheticFamily(_qwen3, defaults={"head_dim": 32, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 64}),
    "gemma3": SyntheticFamily(_gemma3, _keys_gemma3, defaults={"head_dim": 32, "n_layer": 6}, tied=True),
    "phi3": SyntheticFamily(_phi3),
    "gpt-oss": SyntheticFamily(
        _gptoss, _keys_gptoss, defaults={"head_dim": 32, "n_expert": 4, "n_expert_used": 2, "n_ff_exp": 64}
    ),
    "deepseek2": SyntheticFamily(
        _deepseek2, _keys_deepseek2, defaults={"n_head_kv": 1, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 32}
    ),
}
FAMILIES["llama-moe"] = SyntheticFamily(_llama, defaults={"n_expert": 4, "n_expert_used": 2})


# -- more families ------------------------------------------------------------------------------
def _gemma2(s: SyntheticSpec, il: int) -> LayerTensors:
    return (
        _attention(s) + _ffn(s) + [(T.ATTN_POST_NORM, "weight", (s.n_embd,)), (T.FFN_POST_NORM, "weight", (s.n_embd,))]
    )


def _keys_gemma2(w: Any, s: SyntheticSpec) -> None:
    w.add_sliding_window(s.sliding_window or 8)
    w.add_attn_logit_softcapping(50.0)
    w.add_final_logit_softcapping(s.final_softcap or 30.0)


def _keys_granite_scales(w: Any, s: SyntheticSpec) -> None:
    w.add_embedding_scale(12.0)
    w.add_residual_scale(0.22)
    w.add_attention_scale(0.03125)
    w.add_logit_scale(8.0)


def _keys_granite(w: Any, s: SyntheticSpec) -> None:
    """Granite without rope (NoPE): its rope layers are those of granitemoe, whose graph it shares."""
    _keys_granite_scales(w, s)
    w.add_rope_scaling_finetuned(False)


def _granitemoe(s: SyntheticSpec, il: int) -> LayerTensors:
    """Experts with a shared expert (Granite MoE Shared)."""
    return (
        _attention(s)
        + _ffn(s)
        + [
            (T.FFN_GATE_SHEXP, "weight", (s.n_ff, s.n_embd)),
            (T.FFN_UP_SHEXP, "weight", (s.n_ff, s.n_embd)),
            (T.FFN_DOWN_SHEXP, "weight", (s.n_embd, s.n_ff)),
        ]
    )


def _keys_granitemoe(w: Any, s: SyntheticSpec) -> None:
    _keys_granite_scales(w, s)
    w.add_expert_shared_feed_forward_length(s.n_ff)


def _olmo2(s: SyntheticSpec, il: int) -> LayerTensors:
    """No norms before attention and FFN; Q and K norms over all heads; norms after both."""
    q, kv = s.n_head * s.hd, s.n_head_kv * s.hd
    return [
        (T.ATTN_Q, "weight", (q, s.n_embd)),
        (T.ATTN_K, "weight", (kv, s.n_embd)),
        (T.ATTN_V, "weight", (kv, s.n_embd)),
        (T.ATTN_OUT, "weight", (s.n_embd, q)),
        (T.ATTN_Q_NORM, "weight", (q,)),
        (T.ATTN_K_NORM, "weight", (kv,)),
        (T.ATTN_POST_NORM, "weight", (s.n_embd,)),
        (T.FFN_GATE, "weight", (s.n_ff, s.n_embd)),
        (T.FFN_UP, "weight", (s.n_ff, s.n_embd)),
        (T.FFN_DOWN, "weight", (s.n_embd, s.n_ff)),
        (T.FFN_POST_NORM, "weight", (s.n_embd,)),
    ]


def _keys_olmo2(w: Any, s: SyntheticSpec) -> None:
    """OLMo 3's: a sliding window on three layers of four, YaRN on the others."""
    w.add_sliding_window(s.sliding_window or 8)
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(4.0)
    w.add_rope_scaling_orig_ctx_len(512)


def _keys_mistral3(w: Any, s: SyntheticSpec) -> None:
    """Ministral 3's YaRN and attention temperature; the temperature steps every 32
    positions (the original context) instead of 16384, so that a test's positions see it, and
    YaRN's betas are small enough to matter at that context."""
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(16.0)
    w.add_rope_scaling_orig_ctx_len(32)
    w.add_rope_scaling_yarn_beta_fast(1.0)
    w.add_rope_scaling_yarn_beta_slow(0.25)
    w.add_rope_scaling_yarn_log_mul(1.0)
    w.add_attn_temperature_scale(0.1)


def _starcoder2(s: SyntheticSpec, il: int) -> LayerTensors:
    """Layer norms with biases, biases on every projection, an FFN of up and down."""
    norms = [(kind, "bias", (s.n_embd,)) for kind in (T.ATTN_NORM, T.FFN_NORM)]
    return (
        _attention(s, bias=True)
        + norms
        + [
            (T.ATTN_OUT, "bias", (s.n_embd,)),
            (T.FFN_NORM, "weight", (s.n_embd,)),
            (T.FFN_UP, "weight", (s.n_ff, s.n_embd)),
            (T.FFN_UP, "bias", (s.n_ff,)),
            (T.FFN_DOWN, "weight", (s.n_embd, s.n_ff)),
            (T.FFN_DOWN, "bias", (s.n_embd,)),
        ]
    )


def _keys_starcoder2(w: Any, s: SyntheticSpec) -> None:
    w.add_layer_norm_eps(1e-5)


def _output_norm_bias(s: SyntheticSpec) -> list[tuple[T, str, Shape]]:
    return [(T.OUTPUT_NORM, "bias", (s.n_embd,))]


def _exaone4(s: SyntheticSpec, il: int) -> LayerTensors:
    """No norms before attention and FFN; Q/K norms; norms after both."""
    return [t for t in _attention(s, qk_norm=True) + _ffn(s) if t[0] not in (T.ATTN_NORM, T.FFN_NORM)] + [
        (T.ATTN_POST_NORM, "weight", (s.n_embd,)),
        (T.FFN_POST_NORM, "weight", (s.n_embd,)),
    ]


def _keys_exaone4(w: Any, s: SyntheticSpec) -> None:
    w.add_sliding_window(s.sliding_window or 8)


def _cohere2(s: SyntheticSpec, il: int) -> LayerTensors:
    """One norm for attention and FFN."""
    return [t for t in _attention(s) + _ffn(s) if t[0] != T.FFN_NORM]


def _keys_cohere2(w: Any, s: SyntheticSpec) -> None:
    w.add_sliding_window(s.sliding_window or 8)
    w.add_logit_scale(0.25)
    w.add_layer_norm_eps(1e-5)


def _glm4(s: SyntheticSpec, il: int) -> LayerTensors:
    """Q/K/V biases, norms after attention and FFN too, one gate-and-up matrix."""
    return [t for t in _attention(s, bias=True) + _ffn(s) if t[0] not in (T.FFN_GATE, T.FFN_UP)] + [
        (T.FFN_UP, "weight", (2 * s.n_ff, s.n_embd)),
        (T.ATTN_POST_NORM, "weight", (s.n_embd,)),
        (T.FFN_POST_NORM, "weight", (s.n_embd,)),
    ]


def _qwen2moe(s: SyntheticSpec, il: int) -> LayerTensors:
    """QKV biases, experts, a shared expert with its sigmoid gate."""
    return (
        _attention(s, bias=True)
        + _ffn(s)
        + [
            (T.FFN_GATE_INP_SHEXP, "weight", (s.n_embd,)),
            (T.FFN_GATE_SHEXP, "weight", (s.n_ff, s.n_embd)),
            (T.FFN_UP_SHEXP, "weight", (s.n_ff, s.n_embd)),
            (T.FFN_DOWN_SHEXP, "weight", (s.n_embd, s.n_ff)),
        ]
    )


def _keys_qwen2moe(w: Any, s: SyntheticSpec) -> None:
    w.add_expert_shared_feed_forward_length(s.n_ff)


def _olmoe(s: SyntheticSpec, il: int) -> LayerTensors:
    """Q and K norms over all heads, experts."""
    return (
        [t for t in _attention(s) if t[0] not in (T.ATTN_Q_NORM, T.ATTN_K_NORM)]
        + _ffn(s)
        + [
            (T.ATTN_Q_NORM, "weight", (s.n_head * s.hd,)),
            (T.ATTN_K_NORM, "weight", (s.n_head_kv * s.hd,)),
        ]
    )


def _arcee(s: SyntheticSpec, il: int) -> LayerTensors:
    """An FFN of up and down."""
    return [t for t in _llama(s, il) if t[0] != T.FFN_GATE]


def _seed_oss(s: SyntheticSpec, il: int) -> LayerTensors:
    """QKV biases; the FFN's norm named attn_post_norm."""
    return [(T.ATTN_POST_NORM if t[0] == T.FFN_NORM else t[0], t[1], t[2]) for t in _qwen2(s, il)]


def _apertus(s: SyntheticSpec, il: int) -> LayerTensors:
    """Q/K norms; an FFN of up and down."""
    return [t for t in _attention(s, qk_norm=True) + _ffn(s) if t[0] != T.FFN_GATE]


def _keys_apertus(w: Any, s: SyntheticSpec) -> None:
    """xIELU's parameters per layer."""
    n = s.n_layer
    w.add_xielu_alpha_n([0.8 + 0.1 * i for i in range(n)])
    w.add_xielu_alpha_p([0.6 + 0.2 * i for i in range(n)])
    w.add_xielu_beta([0.5] * n)
    w.add_xielu_eps([-1e-6] * n)


def _command_r(s: SyntheticSpec, il: int) -> LayerTensors:
    """One norm for attention and FFN; per-head Q and K norms from 64 layers on (Command R+)."""
    out = _cohere2(s, il)
    if s.n_layer >= 64:
        out += [(T.ATTN_Q_NORM, "weight", (s.n_head, s.hd)), (T.ATTN_K_NORM, "weight", (s.n_head_kv, s.hd))]
    return out


def _keys_command_r(w: Any, s: SyntheticSpec) -> None:
    w.add_logit_scale(0.25)
    w.add_layer_norm_eps(1e-5)


def _ernie4_5_moe(s: SyntheticSpec, il: int) -> LayerTensors:
    """A dense first layer, then experts with a selection bias and a shared expert."""
    if il == 0:
        return _llama(replace(s, n_expert=0), il)
    return _llama(s, il) + [
        (T.FFN_EXP_PROBS_B, "bias", (s.n_expert,)),
        (T.FFN_GATE_SHEXP, "weight", (s.n_ff, s.n_embd)),
        (T.FFN_UP_SHEXP, "weight", (s.n_ff, s.n_embd)),
        (T.FFN_DOWN_SHEXP, "weight", (s.n_embd, s.n_ff)),
    ]


def _keys_ernie4_5_moe(w: Any, s: SyntheticSpec) -> None:
    w.add_expert_shared_feed_forward_length(s.n_ff)
    w.add_interleave_moe_layer_step(1)
    w.add_leading_dense_block_count(1)


def _glm4moe(s: SyntheticSpec, il: int) -> LayerTensors:
    """QKV biases, Q/K norms (GLM-4.5's largest), the FFN's norm named attn_post_norm; a dense
    first layer, then experts with a selection bias and a shared expert."""
    attn = [(T.ATTN_POST_NORM, "weight", (s.n_embd,))] + _attention(s, bias=True, qk_norm=True)
    if il == 0:
        return attn + _ffn(replace(s, n_expert=0))[1:]
    f = s.n_ff_exp
    return (
        attn
        + _ffn(s)[1:]
        + [
            (T.FFN_EXP_PROBS_B, "bias", (s.n_expert,)),
            (T.FFN_GATE_SHEXP, "weight", (f, s.n_embd)),
            (T.FFN_UP_SHEXP, "weight", (f, s.n_embd)),
            (T.FFN_DOWN_SHEXP, "weight", (s.n_embd, f)),
        ]
    )


def _keys_glm4moe(w: Any, s: SyntheticSpec) -> None:
    w.add_expert_shared_count(1)
    w.add_leading_dense_block_count(1)
    w.add_expert_weights_scale(2.5)
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)


FAMILIES.update(
    {
        # std 0.03: with tied embeddings scaled by sqrt(n_embd), a random model of std 0.08 repeats its input token
        "gemma2": SyntheticFamily(_gemma2, _keys_gemma2, defaults={"head_dim": 32, "std": 0.03}, tied=True),
        "granite": SyntheticFamily(_llama, _keys_granite),
        "olmo2": SyntheticFamily(_olmo2, _keys_olmo2),
        "smollm3": SyntheticFamily(_llama),  # rope on layers 0-2, none on layer 3
        "mistral3": SyntheticFamily(_llama, _keys_mistral3),
        # std 0.2: with biases on every projection, a random model of std 0.08 repeats one token
        # 64 layers: the 32B model's rules (sliding-window layers, rope only on them)
        "exaone4": SyntheticFamily(_exaone4, _keys_exaone4, {"n_layer": 64}),
        "cohere2": SyntheticFamily(_cohere2, _keys_cohere2, tied=True),
        "glm4": SyntheticFamily(_glm4, defaults={"head_dim": 32, "n_rot": 16}),  # rope on half of each head
        # std 0.12: a random model of std 0.08 repeats one token
        "qwen2moe": SyntheticFamily(
            _qwen2moe, _keys_qwen2moe, {"n_expert": 4, "n_expert_used": 2, "n_ff_exp": 64, "std": 0.12}
        ),
        "olmoe": SyntheticFamily(_olmoe, defaults={"n_head_kv": 4, "n_expert": 4, "n_expert_used": 2, "n_ff": 64}),
        "arcee": SyntheticFamily(_arcee),
        # std 0.2: a random model of std 0.08 repeats one token
        "seed_oss": SyntheticFamily(_seed_oss, defaults={"head_dim": 32, "std": 0.2}),
        "ernie4_5": SyntheticFamily(_llama),
        "apertus": SyntheticFamily(_apertus, _keys_apertus),
        # std 0.2: with tied embeddings (scaled by sqrt(n_embd) in gemma's case) a random model of
        # std 0.08 repeats its input token
        "gemma": SyntheticFamily(_llama, defaults={"std": 0.2}, tied=True),
        "command-r": SyntheticFamily(_command_r, _keys_command_r, {"std": 0.2}, tied=True),
        "ernie4_5-moe": SyntheticFamily(
            _ernie4_5_moe, _keys_ernie4_5_moe, {"n_expert": 4, "n_expert_used": 2, "n_ff_exp": 64}
        ),
        "glm4moe": SyntheticFamily(
            _glm4moe, _keys_glm4moe, {"head_dim": 32, "n_rot": 16, "n_expert": 8, "n_expert_used": 2, "n_ff_exp": 32}
        ),
        "starcoder2": SyntheticFamily(_starcoder2, _keys_starcoder2, {"std": 0.2}, more=_output_norm_bias),
        "granitemoe": SyntheticFamily(
            _granitemoe, _keys_granitemoe, defaults={"n_expert": 4, "n_expert_used": 2, "n_ff": 64}
        ),
    }
)


def family_spec(name: str, **overrides: Any) -> SyntheticSpec:
    """A tiny model of a family (``llama-moe``: llama with Mixtral-style experts)."""
    fam = FAMILIES[name]
    arch = "llama" if name == "llama-moe" else name
    return replace(SyntheticSpec(arch=arch, tied_output=fam.tied), **{**(fam.defaults or {}), **overrides})


def write_gguf(path: str | os.PathLike[str], spec: SyntheticSpec) -> str:
    """Write a random model of ``spec.arch``; 2-D and larger matrices in ``spec.weight_type``,
    norms, biases and sinks in F32."""
    from gguf import GGUFWriter

    fam = FAMILIES[spec.arch]
    path = os.fspath(path)
    rng = np.random.default_rng(spec.seed)
    w = GGUFWriter(path, spec.arch)
    w.add_name("llmrpc-synthetic")
    _keys_common(w, spec)
    if fam.keys is not None:
        fam.keys(w, spec)
    w.add_file_type(0)
    tokens, scores, types = _vocab(spec.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)

    def tensor(kind: T, il: int | None, suffix: str, shape: Shape) -> None:
        name = tensor_name(kind, il, suffix)
        if len(shape) == 1 or suffix == "bias":
            vec = rng.standard_normal(shape, dtype=np.float32)
            data = (1.0 + 0.1 * vec) if _is_norm(kind) else vec * spec.std
            w.add_tensor(name, data.astype(np.float32))
        else:
            data, qtype = _matrix(rng, shape, spec, spec.weight_type)
            w.add_tensor(name, data, raw_dtype=qtype)

    tensor(T.TOKEN_EMBD, None, "weight", (spec.n_vocab, spec.n_embd))
    tensor(T.OUTPUT_NORM, None, "weight", (spec.n_embd,))
    if not spec.tied_output:
        tensor(T.OUTPUT, None, "weight", (spec.n_vocab, spec.n_embd))
    for kind, suffix, shape in fam.more(spec) if fam.more is not None else []:
        tensor(kind, None, suffix, shape)
    for il in range(spec.n_layer):
        for kind, suffix, shape in fam.layer(spec, il):
            tensor(kind, il, suffix, shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _is_norm(kind: T) -> bool:
    return kind.name.endswith("_NORM")


# llama.cpp's file types, by the names its quantize tool takes
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_M": 12,
          "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25}  # fmt: skip


def quantize_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str, threads: int = 2) -> str:
    """``src`` (F32 or F16) quantized by llama.cpp's own quantizer, as people make their files:
    ``Q4_K_M`` mixes Q4_K and Q6_K by tensor; tensors whose rows do not fit a type's blocks
    get llama.cpp's fallback type."""
    import llama_cpp

    if ftype not in FTYPES:
        raise ValueError(f"unknown file type {ftype!r} (known: {', '.join(FTYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(os.fspath(src).encode(), os.fspath(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {os.fspath(src)} to {ftype}")
    return os.fspath(dst)
