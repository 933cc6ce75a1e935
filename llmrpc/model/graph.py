"""Shared pieces of the family graph builders: inputs, norms, QKV, rope, feed-forward
networks and the output head (attention over the KV cache: :mod:`llmrpc.model.attention`;
mixtures of experts: :mod:`llmrpc.model.experts`).

They follow llama.cpp's ``llm_graph_context`` (``src/llama-graph.cpp``) op for op, so the
same batch through llmrpc and through llama.cpp gives the same numbers. Every intermediate
is named with its layer (``attn_norm-12``) so activations can be dumped and diffed. A family
builder (:mod:`llmrpc.model.families`) is a loop over :attr:`Builder.layers` calling these.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import MODEL_TENSOR as T

from llmrpc.ggml import lib as g
from llmrpc.model.arch import tensor_name
from llmrpc.model.hparams import HParams
from llmrpc.model.kv import FULL
from llmrpc.types import KV_PAD


def padded_n_kv(used: int, kv_size: int, pad: int = KV_PAD) -> int:
    """How many cache cells a batch attends to: the ``used`` ones rounded up to ``pad``, within
    the cache. With llama.cpp's pad (``get_n_kv``, 256) a decode graph keeps its shape for 256
    tokens; a smaller one attends to fewer masked cells and rebuilds the graph more often."""
    return min(kv_size, max(pad, -(-used // pad) * pad))


def inv_sqrt(x: float) -> float:
    """``1.0f/sqrtf(x)`` in float32, as llama.cpp computes its attention scales."""
    return float(np.float32(1.0) / np.sqrt(np.float32(x)))


class MissingTensorError(ValueError):
    """The GGUF lacks a tensor its family's graph needs."""


@dataclass(frozen=True)
class CacheView:
    """The part of one session's KV group a batch sees: ``n_kv`` of its ``size`` cells."""

    group: str
    n_kv: int
    size: int


@dataclass(frozen=True)
class Segment:
    """The rows of one session in a batch: they attend to that session's own KV cache."""

    offset: int  # first row in the batch
    n: int  # rows
    views: tuple[CacheView, ...]  # one per KV group of the stage's layers

    def view(self, group: str) -> CacheView:
        for v in self.views:
            if v.group == group:
                return v
        raise KeyError(group)


@dataclass
class AttnInputs:
    kq_mask: g.Tensor  # F32 [n_kv, n]
    k_idxs: g.Tensor  # I64 [n]: the cell of each row
    v_idxs: g.Tensor | None  # I64 [n * n_embd_v]: the V cache is stored transposed (None: K only)


@dataclass
class GraphInputs:
    """The input tensors of one forward graph; filled by the caller after allocation."""

    tokens: g.Tensor | None  # I32 [n] on the first stage
    embd: g.Tensor | None  # F32 [n_embd, n] elsewhere
    pos: g.Tensor  # I32 [n]
    segments: list[dict[str, AttnInputs]]  # per segment, per KV group
    out_ids: g.Tensor | None  # I32 [n_out] when only some rows leave the last layer
    attn_scale: g.Tensor | None = None  # F32 [1, 1, n]: each row's attention temperature, where the graph uses it


@dataclass
class LayerCache:
    k: g.Tensor  # F16 [n_embd_k_gqa, cells]
    v: g.Tensor | None  # F16 [n_embd_v_gqa, cells], used transposed as in llama.cpp without flash-attn;
    # None for latent attention (MLA), whose V is the first columns of K


class Norm(enum.Enum):
    RMS = "rms"
    LAYER = "layer"


class Act(enum.Enum):
    """The activation of a feed-forward network (llama.cpp's ``llm_ffn_op_type``)."""

    SILU = "silu"
    GELU = "gelu"
    RELU = "relu"
    RELU_SQR = "relu_sqr"
    SWIGLU = "swiglu"  # the up projection holds gate and up halves (phi3)
    SWIGLU_OAI = "swiglu_oai"  # gpt-oss's clamped SwiGLU


class BuilderBase:
    """A ggml context for one graph of layers [start, end) plus the shared pieces of the
    builders that are not attention or experts (:class:`llmrpc.model.builder.Builder` adds
    those). A batch holds the rows of one or more sessions (segments): every matrix
    multiplication runs once over all rows, and each segment attends to its own cache."""

    def __init__(
        self,
        ctx: int,
        gf: int,
        hp: HParams,
        segments: list[Segment],
        weights: Mapping[str, g.Tensor],
        inputs: GraphInputs,
        caches: Sequence[Mapping[int, LayerCache]],  # one per segment
        start: int,
        end: int,
        flash_attn: bool = False,
        lib: Any = None,  # the ggml binding ops are called through (default: the loaded one)
    ) -> None:
        self.lib = lib or g.ggml()
        self.flash_attn = flash_attn  # ggml's fused attention; the V cache a row per cell
        self.ctx = ctx
        self.gf = gf
        self.hp = hp
        self.segments = segments
        self.weights = weights
        self.inp = inputs
        self.caches = caches
        self.start, self.end = start, end
        self.first, self.last = start == 0, end == hp.n_layer
        self.n_tokens = sum(s.n for s in segments)

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    # -- tensors -------------------------------------------------------------------------
    def w(self, kind: T, il: int | None = None, suffix: str = "weight") -> g.Tensor:
        """A tensor the graph needs; a clear error when the GGUF lacks it."""
        name = tensor_name(kind, il, suffix)
        t = self.weights.get(name)
        if t is None:
            raise MissingTensorError(f"{self.hp.arch}: the model has no tensor {name}, which its graph needs")
        return t

    def opt(self, kind: T, il: int | None = None, suffix: str = "weight") -> g.Tensor | None:
        """A tensor the graph uses where the GGUF has it (biases, optional norms)."""
        return self.weights.get(tensor_name(kind, il, suffix))

    def name(self, t: g.Tensor, label: str, il: int = -1) -> g.Tensor:
        self.lib.ggml_set_name(t, (f"{label}-{il}" if il >= 0 else label).encode())
        return t

    # -- basic ops -----------------------------------------------------------------------
    def add(self, a: g.Tensor, b: g.Tensor | None) -> g.Tensor:
        return a if b is None else self.lib.ggml_add(self.ctx, a, b)

    def scale(self, x: g.Tensor, s: float) -> g.Tensor:
        return self.lib.ggml_scale(self.ctx, x, s)

    def mm(self, w: g.Tensor, x: g.Tensor) -> g.Tensor:
        return self.lib.ggml_mul_mat(self.ctx, w, x)

    def linear(self, w: g.Tensor, x: g.Tensor, bias: g.Tensor | None = None) -> g.Tensor:
        return self.add(self.mm(w, x), bias)

    def norm(
        self, x: g.Tensor, weight: g.Tensor | None, label: str, il: int,
        bias: g.Tensor | None = None, kind: Norm = Norm.RMS,
    ) -> g.Tensor:  # fmt: skip
        """llama.cpp's ``build_norm``: normalise, then scale and shift by the weights."""
        lib, ctx = self.lib, self.ctx
        if kind is Norm.RMS:
            cur = lib.ggml_rms_norm(ctx, x, self.hp.rms_eps)
        else:
            cur = lib.ggml_norm(ctx, x, self.hp.norm_eps)
        if weight is not None:
            cur = lib.ggml_mul(ctx, cur, weight)
        cur = self.add(cur, bias)
        return self.name(cur, label, il)

    def softcap(self, x: g.Tensor, cap: float) -> g.Tensor:
        """``cap * tanh(x / cap)``."""
        x = self.scale(x, float(np.float32(1.0) / np.float32(cap)))
        return self.scale(self.lib.ggml_tanh(self.ctx, x), cap)

    # -- inputs and outputs --------------------------------------------------------------
    def embeddings(self, scale: float = 0.0) -> g.Tensor:
        """The token embeddings on the first stage (times ``scale`` where the family scales
        them), the previous stage's hidden states elsewhere."""
        if self.inp.tokens is None:
            assert self.inp.embd is not None
            return self.inp.embd
        x = self.name(self.lib.ggml_get_rows(self.ctx, self.w(T.TOKEN_EMBD), self.inp.tokens), "inp_embd")
        scale = scale or self.hp.embedding_scale
        return self.scale(x, scale) if scale else x

    def out_rows(self, il: int, *ts: g.Tensor) -> list[g.Tensor]:
        """On the model's last layer, only the rows that leave it (llama.cpp's ``inp_out_ids``)."""
        if il != self.hp.n_layer - 1 or self.inp.out_ids is None:
            return list(ts)
        return [self.lib.ggml_get_rows(self.ctx, t, self.inp.out_ids) for t in ts]

    def output(self, x: g.Tensor, norm: Norm = Norm.RMS) -> g.Tensor:
        """Hidden states for the next stage; on the last, the output norm and the logits."""
        if not self.last:
            return x
        cur = self.norm(x, self.w(T.OUTPUT_NORM), "result_norm", -1, self.opt(T.OUTPUT_NORM, None, "bias"), norm)
        head = self.opt(T.OUTPUT) or self.w(T.TOKEN_EMBD)
        cur = self.add(self.mm(head, cur), self.opt(T.OUTPUT, None, "bias"))
        if self.hp.final_softcap:
            cur = self.softcap(cur, self.hp.final_softcap)
        return self.name(cur, "result_output")

    def attn_temp(self) -> g.Tensor:
        """The attention temperature of each row's position, F32 [1, 1, n] (llama.cpp's
        ``build_inp_attn_scale``): an input of the graph, which the stage sets from the
        positions (:func:`llmrpc.model.hparams.attn_temp_scales`)."""
        if self.inp.attn_scale is None:
            t = self.lib.ggml_new_tensor_3d(self.ctx, g.GGML_TYPE_F32, 1, 1, self.n_tokens)
            self.lib.ggml_set_input(t)
            self.inp.attn_scale = self.name(t, "inp_attn_scale")
        return self.inp.attn_scale

    # -- queries, keys and values --------------------------------------------------------
    def qkv(self, il: int, x: g.Tensor, head_dim: int | None = None) -> tuple[g.Tensor, g.Tensor, g.Tensor]:
        """Q [hd, n_head, n], K and V [hd, n_head_kv, n]: from a fused QKV matrix or three,
        with their biases (llama.cpp's ``build_qkv``)."""
        lib, ctx, hp, n = self.lib, self.ctx, self.hp, self.n_tokens
        hd_q = hd_k = head_dim or hp.head_dim_k(il)
        hd_v = head_dim or hp.head_dim_v(il)
        n_q, n_kv = hp.n_head(il), hp.n_head_kv(il)
        wqkv = self.opt(T.ATTN_QKV, il)
        if wqkv is not None:
            qkv = self.mm(wqkv, x)
            bias = self.opt(T.ATTN_QKV, il, "bias")
            if bias is not None:
                qkv = lib.ggml_add(ctx, qkv, bias)
            else:
                parts = [self.opt(kind, il, "bias") for kind in (T.ATTN_Q, T.ATTN_K, T.ATTN_V)]
                if all(p is not None for p in parts):
                    qkv = lib.ggml_add(ctx, qkv, lib.ggml_concat(ctx, lib.ggml_concat(ctx, *parts[:2], 0), parts[2], 0))
            f32 = g.GGML_TYPE_F32
            row = qkv.contents.nb[1]
            q = lib.ggml_view_3d(ctx, qkv, hd_q, n_q, n, lib.ggml_row_size(f32, hd_q), row, 0)
            k = lib.ggml_view_3d(ctx, qkv, hd_k, n_kv, n, lib.ggml_row_size(f32, hd_k), row,
                                 lib.ggml_row_size(f32, hd_q * n_q))  # fmt: skip
            v = lib.ggml_view_3d(ctx, qkv, hd_v, n_kv, n, lib.ggml_row_size(f32, hd_v), row,
                                 lib.ggml_row_size(f32, hd_q * n_q + hd_k * n_kv))  # fmt: skip
            return q, k, v
        q = self.linear(self.w(T.ATTN_Q, il), x, self.opt(T.ATTN_Q, il, "bias"))
        k = self.linear(self.w(T.ATTN_K, il), x, self.opt(T.ATTN_K, il, "bias"))
        v = self.linear(self.w(T.ATTN_V, il), x, self.opt(T.ATTN_V, il, "bias"))
        return (
            lib.ggml_reshape_3d(ctx, q, hd_q, n_q, n),
            lib.ggml_reshape_3d(ctx, k, hd_k, n_kv, n),
            lib.ggml_reshape_3d(ctx, v, hd_v, n_kv, n),
        )

    def qkv_flat(self, il: int, x: g.Tensor) -> tuple[g.Tensor, g.Tensor, g.Tensor]:
        """Q [n_embd_q, n], K and V [n_embd_kv, n], not split into heads (llama.cpp's
        ``build_qkv`` with ``reshape`` false: for norms over all heads at once)."""
        lib, ctx, hp, n = self.lib, self.ctx, self.hp, self.n_tokens
        n_q, n_k = hp.head_dim_k(il) * hp.n_head(il), hp.n_embd_k_gqa(il)
        wqkv = self.opt(T.ATTN_QKV, il)
        if wqkv is None:
            q = self.linear(self.w(T.ATTN_Q, il), x, self.opt(T.ATTN_Q, il, "bias"))
            k = self.linear(self.w(T.ATTN_K, il), x, self.opt(T.ATTN_K, il, "bias"))
            v = self.linear(self.w(T.ATTN_V, il), x, self.opt(T.ATTN_V, il, "bias"))
            return q, k, v
        qkv = self.mm(wqkv, x)
        bias = self.opt(T.ATTN_QKV, il, "bias")
        biases = [self.opt(kind, il, "bias") for kind in (T.ATTN_Q, T.ATTN_K, T.ATTN_V)]
        if bias is None and all(b is not None for b in biases):  # separate biases of a fused matrix
            bias = lib.ggml_concat(ctx, lib.ggml_concat(ctx, biases[0], biases[1], 0), biases[2], 0)
        qkv = self.add(qkv, bias)
        row, f32 = qkv.contents.nb[1], g.GGML_TYPE_F32
        parts = ((n_q, 0), (n_k, n_q), (hp.n_embd_v_gqa(il), n_q + n_k))
        q, k, v = (lib.ggml_cont(ctx, lib.ggml_view_2d(ctx, qkv, width, n, row, lib.ggml_row_size(f32, at)))
                   for width, at in parts)  # fmt: skip
        return q, k, v

    def rope_factors(self) -> g.Tensor | None:
        """The rope frequency factors, where the model has them (llama.cpp's
        ``get_rope_factors``): llama3's, or LongRoPE's long or short ones by context size."""
        factors = self.opt(T.ROPE_FREQS)
        if factors is not None:
            return factors
        n_ctx = max((v.size for s in self.segments for v in s.views if v.group == FULL), default=0)
        return self.opt(T.ROPE_FACTORS_LONG if n_ctx > self.hp.rope.n_ctx_orig else T.ROPE_FACTORS_SHORT)

    def rope(self, t: g.Tensor, il: int, factors: g.Tensor | None = None, n_rot: int | None = None) -> g.Tensor:
        hp, r = self.hp, self.hp.rope
        return self.lib.ggml_rope_ext(
            self.ctx, t, self.inp.pos, factors, n_rot or hp.n_rot(il), hp.rope_type, r.n_ctx_orig,
            hp.rope_base(il), hp.rope_scale(il), r.ext_factor, r.attn_factor, r.beta_fast, r.beta_slow,
        )  # fmt: skip

    def rope_full(self, t: g.Tensor, il: int, factors: g.Tensor | None = None) -> g.Tensor:
        """Rope with the full-attention layers' base and scale on any layer (families whose
        sliding-window layers rotate as their full ones do)."""
        hp, r = self.hp, self.hp.rope
        return self.lib.ggml_rope_ext(
            self.ctx, t, self.inp.pos, factors, hp.n_rot(il), hp.rope_type, r.n_ctx_orig,
            r.freq_base, r.freq_scale, r.ext_factor, r.attn_factor, r.beta_fast, r.beta_slow,
        )  # fmt: skip

    # -- feed-forward --------------------------------------------------------------------
    def ffn(
        self, x: g.Tensor, il: int, up: g.Tensor, gate: g.Tensor | None, down: g.Tensor, act: Act,
        up_b: g.Tensor | None = None, gate_b: g.Tensor | None = None, down_b: g.Tensor | None = None,
        parallel: bool = True, label: str = "ffn_out",
    ) -> g.Tensor:  # fmt: skip
        """llama.cpp's ``build_ffn``: up (and gate) projections, the activation, down."""
        lib, ctx = self.lib, self.ctx
        tmp = self.add(self.mm(up, x), up_b)
        if gate is not None:
            cur = self.add(self.mm(gate, x if parallel else tmp), gate_b)
        else:
            cur = tmp
        gated = gate is not None and parallel
        if act is Act.SILU:
            cur = lib.ggml_swiglu_split(ctx, cur, tmp) if gated else lib.ggml_silu(ctx, cur)
        elif act is Act.GELU:
            cur = lib.ggml_geglu_split(ctx, cur, tmp) if gated else lib.ggml_gelu(ctx, cur)
        elif act is Act.RELU:
            cur = lib.ggml_reglu_split(ctx, cur, tmp) if gated else lib.ggml_relu(ctx, cur)
        elif act is Act.RELU_SQR:
            cur = lib.ggml_sqr(ctx, lib.ggml_relu(ctx, cur))
            if gated:
                cur = lib.ggml_mul(ctx, cur, tmp)
        elif act is Act.SWIGLU:
            cur = lib.ggml_swiglu(ctx, cur)
        else:
            raise ValueError(f"{act} is not a dense FFN activation")
        cur = self.add(self.mm(down, cur), down_b)
        return self.name(cur, label, il)

    def qk_norm(self, q: g.Tensor, k: g.Tensor, il: int) -> tuple[g.Tensor, g.Tensor]:
        """Q and K normed per head by the layer's ``attn_q_norm`` and ``attn_k_norm``."""
        q = self.norm(q, self.w(T.ATTN_Q_NORM, il), "Qcur_normed", il)
        return q, self.norm(k, self.w(T.ATTN_K_NORM, il), "Kcur_normed", il)
