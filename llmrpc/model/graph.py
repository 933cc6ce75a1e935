"""Shared pieces of the family graph builders: inputs, norms, QKV, rope, attention over the
KV cache, feed-forward networks, mixtures of experts and the output head.

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
from llmrpc.model.hparams import Gating, HParams
from llmrpc.model.kv import FULL, layer_group
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


class Builder:
    """A ggml context for one graph of layers [start, end) plus the shared pieces of the
    builders. A batch holds the rows of one or more sessions (segments): every matrix
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

    # -- attention -----------------------------------------------------------------------
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

    def attention(
        self, il: int, q: g.Tensor, k: g.Tensor, v: g.Tensor, kq_scale: float,
        wo: g.Tensor | None, wo_b: g.Tensor | None = None, sinks: g.Tensor | None = None,
        v_mla: g.Tensor | None = None,
    ) -> g.Tensor:  # fmt: skip
        """Each segment stores its K and V in its cache and attends over its cells; the
        segments' results are joined back into one batch [n_embd_v * n_head, n], then
        projected by ``wo`` (llama.cpp's ``build_attn``). ``v_mla``: latent attention (MLA),
        whose cache holds K alone and whose V is K's first columns, decompressed by ``v_mla``."""
        lib, ctx = self.lib, self.ctx
        group = layer_group(self.hp, il)

        def attend(seg: Segment, inp: Mapping[str, AttnInputs], cache: Mapping[int, LayerCache],
                   q: g.Tensor, k: g.Tensor, v: g.Tensor) -> g.Tensor:  # fmt: skip
            if v_mla is not None:
                return self._attend_mla(seg.view(group), inp[group], cache[il], q, k, v, kq_scale, v_mla, il)
            return self._attend(seg.view(group), inp[group], cache[il], q, k, v, kq_scale, sinks, il)

        if len(self.segments) == 1:
            out = attend(self.segments[0], self.inp.segments[0], self.caches[0], q, k, v)
        else:
            out = None
            for seg, seg_inp, cache in zip(self.segments, self.inp.segments, self.caches, strict=True):

                def rows(t: g.Tensor, seg: Segment = seg) -> g.Tensor:
                    c = t.contents
                    return lib.ggml_view_3d(ctx, t, c.ne[0], c.ne[1], seg.n, c.nb[1], c.nb[2], seg.offset * c.nb[2])

                cur = attend(seg, seg_inp, cache, rows(q), rows(k), rows(v))
                out = cur if out is None else lib.ggml_concat(ctx, out, cur, 1)
            assert out is not None
        if wo is not None:
            out = self.mm(wo, out)
        return self.add(out, wo_b)

    def _store_k(self, inp: AttnInputs, cache: LayerCache, k: g.Tensor) -> None:
        """cpy_k: rows of [n_embd_k] go to the cells in k_idxs."""
        lib, ctx = self.lib, self.ctx
        c = k.contents
        k2 = lib.ggml_view_2d(ctx, k, c.ne[0] * c.ne[1], c.ne[2], c.nb[2], 0)
        lib.ggml_build_forward_expand(self.gf, lib.ggml_set_rows(ctx, cache.k, k2, inp.k_idxs))

    def _attend_mla(
        self, view: CacheView, inp: AttnInputs, cache: LayerCache, q: g.Tensor, k: g.Tensor, v: g.Tensor,
        kq_scale: float, v_mla: g.Tensor, il: int,
    ) -> g.Tensor:  # fmt: skip
        """Latent attention over a K-only cache (llama.cpp's ``build_attn`` with a K input)."""
        lib, ctx = self.lib, self.ctx
        self._store_k(inp, cache, k)
        kc = self._cells(cache.k, k.contents.ne[0], k.contents.ne[1], view)
        c = kc.contents
        vc = lib.ggml_view_4d(ctx, kc, v.contents.ne[0], c.ne[1], c.ne[2], c.ne[3], c.nb[1], c.nb[2], c.nb[3], 0)
        q = lib.ggml_permute(ctx, q, 0, 2, 1, 3)
        kc = lib.ggml_permute(ctx, kc, 0, 2, 1, 3)
        vc = lib.ggml_permute(ctx, vc, 0, 2, 1, 3)
        if self.flash_attn:
            return self._flash(q, kc, vc, inp.kq_mask, kq_scale, None, v_mla)
        kq = self._scores(kc, q, inp.kq_mask, kq_scale, None, il)
        vc = lib.ggml_cont(ctx, lib.ggml_transpose(ctx, vc))
        kqv = lib.ggml_mul_mat(ctx, v_mla, lib.ggml_mul_mat(ctx, vc, kq))
        cur = lib.ggml_permute(ctx, kqv, 0, 2, 1, 3)
        c = cur.contents
        return lib.ggml_cont_2d(ctx, cur, c.ne[0] * c.ne[1], c.ne[2] * c.ne[3])

    def _attend(
        self, view: CacheView, inp: AttnInputs, cache: LayerCache, q: g.Tensor, k: g.Tensor, v: g.Tensor,
        kq_scale: float, sinks: g.Tensor | None, il: int,
    ) -> g.Tensor:  # fmt: skip
        lib, ctx = self.lib, self.ctx
        n = q.contents.ne[2]
        hd_k, hd_v, n_head_kv = k.contents.ne[0], v.contents.ne[0], k.contents.ne[1]
        n_embd_v = hd_v * n_head_kv
        self._store_k(inp, cache, k)
        assert cache.v is not None and inp.v_idxs is not None
        if lib.ggml_row_size(g.GGML_TYPE_F32, n_embd_v) == v.contents.nb[2]:
            v2 = lib.ggml_reshape_2d(ctx, v, n_embd_v, n)
        else:
            v2 = lib.ggml_cont_2d(ctx, v, n_embd_v, n)  # a view of a fused QKV
        q = lib.ggml_permute(ctx, q, 0, 2, 1, 3)
        k_view = lib.ggml_permute(ctx, self._cells(cache.k, hd_k, n_head_kv, view), 0, 2, 1, 3)
        if self.flash_attn:  # V stored a row per cell, as K
            lib.ggml_build_forward_expand(self.gf, lib.ggml_set_rows(ctx, cache.v, v2, inp.v_idxs))
            v_view = lib.ggml_permute(ctx, self._cells(cache.v, hd_v, n_head_kv, view), 0, 2, 1, 3)
            return self._flash(q, k_view, v_view, inp.kq_mask, kq_scale, sinks)
        # cpy_v (transposed cache): each element is its own row
        v_flat = lib.ggml_reshape_2d(ctx, v2, 1, n_embd_v * n)
        v_cells = lib.ggml_reshape_2d(ctx, cache.v, 1, n_embd_v * view.size)
        lib.ggml_build_forward_expand(self.gf, lib.ggml_set_rows(ctx, v_cells, v_flat, inp.v_idxs))
        tv = cache.v.contents.type
        v_view = lib.ggml_view_3d(
            ctx, cache.v, view.n_kv, hd_v, n_head_kv,
            lib.ggml_row_size(tv, view.size), lib.ggml_row_size(tv, view.size * hd_v), 0,
        )  # fmt: skip
        kq = self._scores(k_view, q, inp.kq_mask, kq_scale, sinks, il)
        kqv = lib.ggml_mul_mat(ctx, v_view, kq)
        cur = lib.ggml_permute(ctx, kqv, 0, 2, 1, 3)
        return lib.ggml_cont_2d(ctx, cur, hd_v * q.contents.ne[2], n)

    def _cells(self, t: g.Tensor, hd: int, n_head_kv: int, view: CacheView) -> g.Tensor:
        """A cache of rows per cell seen as [hd, n_head_kv, n_kv] (llama.cpp's ``get_k``)."""
        lib, typ = self.lib, t.contents.type
        width = t.contents.ne[0]
        return lib.ggml_view_4d(
            self.ctx, t, hd, n_head_kv, view.n_kv, 1, lib.ggml_row_size(typ, hd), lib.ggml_row_size(typ, width),
            lib.ggml_row_size(typ, width * view.size), 0,
        )  # fmt: skip

    def _scores(
        self, k: g.Tensor, q: g.Tensor, mask: g.Tensor, kq_scale: float, sinks: g.Tensor | None, il: int
    ) -> g.Tensor:
        """softmax(K.Q * scale + mask) without flash attention (soft-capped where the model says)."""
        lib, ctx = self.lib, self.ctx
        kq = lib.ggml_mul_mat(ctx, k, q)
        lib.ggml_prec_set_acc(kq, g.GGML_PREC_F32)
        if self.hp.attn_softcap:
            kq = self.softcap(kq, self.hp.attn_softcap)
        kq = lib.ggml_soft_max_ext(ctx, kq, mask, kq_scale, 0.0)
        if sinks is not None:
            lib.ggml_soft_max_add_sinks(kq, sinks)
        return self.name(kq, "kq_soft_max", il)

    def _flash(
        self, q: g.Tensor, k: g.Tensor, v: g.Tensor, mask: g.Tensor, kq_scale: float, sinks: g.Tensor | None,
        v_mla: g.Tensor | None = None,
    ) -> g.Tensor:  # fmt: skip
        """ggml's fused attention (llama.cpp's ``build_attn_mha`` with flash attention)."""
        lib, ctx = self.lib, self.ctx
        cur = lib.ggml_flash_attn_ext(ctx, q, k, v, mask, kq_scale, 0.0, self.hp.attn_softcap)
        if sinks is not None:
            lib.ggml_flash_attn_ext_add_sinks(cur, sinks)
        lib.ggml_prec_set_acc(cur, g.GGML_PREC_F32)
        if v_mla is not None:
            cur = lib.ggml_mul_mat(ctx, v_mla, lib.ggml_permute(ctx, cur, 0, 2, 1, 3))
            cur = lib.ggml_cont(ctx, lib.ggml_permute(ctx, cur, 0, 2, 1, 3))
        c = cur.contents
        return lib.ggml_reshape_2d(ctx, cur, c.ne[0] * c.ne[1], c.ne[2] * c.ne[3])

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

    def shared_expert(self, x: g.Tensor, il: int) -> g.Tensor:
        """The layer's shared expert: a SwiGLU FFN every row goes through next to the routed ones."""
        up, gate, down = (self.w(kind, il) for kind in (T.FFN_UP_SHEXP, T.FFN_GATE_SHEXP, T.FFN_DOWN_SHEXP))
        return self.ffn(x, il, up, gate, down, Act.SILU, label="ffn_shexp")

    def moe(
        self, x: g.Tensor, il: int, act: Act = Act.SILU, gating: Gating = Gating.SOFTMAX,
        norm_weights: bool = False, weights_scale: float = 0.0, biased: bool = False,
        probs_bias: g.Tensor | None = None,
    ) -> g.Tensor:  # fmt: skip
        """A mixture of experts (llama.cpp's ``build_moe_ffn``): the router picks the top
        ``n_expert_used`` experts per row, each runs its FFN (``ggml_mul_mat_id``), and their
        outputs are summed with the router's weights. ``biased``: the router and the experts
        have biases (gpt-oss)."""
        lib, ctx, hp = self.lib, self.ctx, self.hp
        n_embd, n = x.contents.ne[0], x.contents.ne[1]  # rows: fewer than the batch's after out_rows
        n_exp, n_used = hp.n_expert, hp.n_expert_used

        def bias(kind: T) -> g.Tensor | None:
            return self.w(kind, il, "bias") if biased else None

        logits = self.add(self.mm(self.w(T.FFN_GATE_INP, il), x), bias(T.FFN_GATE_INP))
        if gating is Gating.SOFTMAX:
            probs = lib.ggml_soft_max(ctx, logits)
        elif gating is Gating.SIGMOID:
            probs = lib.ggml_sigmoid(ctx, logits)
        elif gating is Gating.SOFTMAX_WEIGHT:
            probs = logits
        else:
            raise ValueError(f"{hp.arch}: expert gating {gating!r} is not supported")
        selection = lib.ggml_add(ctx, probs, probs_bias) if probs_bias is not None else probs
        if hp.n_expert_groups > 1:
            selection = self._best_groups(selection, n)
        selected = lib.ggml_argsort_top_k(ctx, selection, n_used)  # I32 [n_used, n]
        probs = lib.ggml_reshape_3d(ctx, probs, 1, n_exp, n)
        weights = lib.ggml_get_rows(ctx, probs, selected)  # [1, n_used, n]
        if gating is Gating.SOFTMAX_WEIGHT:
            weights = lib.ggml_reshape_2d(ctx, weights, n_used, n)
            weights = lib.ggml_reshape_3d(ctx, lib.ggml_soft_max(ctx, weights), 1, n_used, n)
        if norm_weights:
            weights = lib.ggml_reshape_2d(ctx, weights, n_used, n)
            total = lib.ggml_clamp(ctx, lib.ggml_sum_rows(ctx, weights), 6.103515625e-5, float("inf"))
            weights = lib.ggml_reshape_3d(ctx, lib.ggml_div(ctx, weights, total), 1, n_used, n)
        if weights_scale not in (0.0, 1.0):
            weights = self.scale(weights, weights_scale)
        lib.ggml_build_forward_expand(self.gf, weights)

        cur = lib.ggml_reshape_3d(ctx, x, n_embd, 1, n)

        def experts(kind: T, inp: g.Tensor) -> g.Tensor:
            out = lib.ggml_mul_mat_id(ctx, self.w(kind, il), inp, selected)
            b = bias(kind)
            return out if b is None else lib.ggml_add_id(ctx, out, b, selected)

        if self.opt(T.FFN_GATE_UP_EXP, il) is not None:  # gate and up in one matrix
            gate_up = experts(T.FFN_GATE_UP_EXP, cur)
            c = gate_up.contents
            half = c.ne[0] // 2
            gate = lib.ggml_view_3d(ctx, gate_up, half, c.ne[1], c.ne[2], c.nb[1], c.nb[2], 0)
            up = lib.ggml_view_3d(ctx, gate_up, half, c.ne[1], c.ne[2], c.nb[1], c.nb[2], half * c.nb[0])
        else:
            up = experts(T.FFN_UP_EXP, cur)
            gate = experts(T.FFN_GATE_EXP, cur) if self.opt(T.FFN_GATE_EXP, il) is not None else None
        if act is Act.SILU:
            cur = lib.ggml_swiglu_split(ctx, gate, up) if gate is not None else lib.ggml_silu(ctx, up)
        elif act is Act.GELU:
            cur = lib.ggml_geglu_split(ctx, gate, up) if gate is not None else lib.ggml_gelu(ctx, up)
        elif act is Act.SWIGLU_OAI:
            cur = lib.ggml_swiglu_oai(ctx, gate, up, 1.702, 7.0)
        else:
            raise ValueError(f"{act} is not an expert activation")
        out = lib.ggml_mul(ctx, experts(T.FFN_DOWN_EXP, cur), weights)  # [n_embd, n_used, n]
        lib.ggml_build_forward_expand(self.gf, out)
        views = [lib.ggml_view_2d(ctx, out, n_embd, n, out.contents.nb[2], i * out.contents.nb[1])
                 for i in range(n_used)]  # fmt: skip
        for view in views:
            lib.ggml_build_forward_expand(self.gf, view)
        moe_out = views[0]
        for view in views[1:]:
            moe_out = lib.ggml_add(ctx, moe_out, view)
            lib.ggml_build_forward_expand(self.gf, moe_out)
        if n_used == 1:
            moe_out = lib.ggml_cont(ctx, moe_out)
        return self.name(moe_out, "ffn_moe_out", il)

    def _best_groups(self, selection: g.Tensor, n: int) -> g.Tensor:
        """Only the experts of the ``n_group_used`` groups whose two best experts score
        highest stay selectable (DeepSeek V3's group-limited routing)."""
        lib, ctx, hp = self.lib, self.ctx, self.hp
        n_groups = hp.n_expert_groups
        per_group = hp.n_expert // n_groups
        groups = lib.ggml_reshape_3d(ctx, selection, per_group, n_groups, n)
        top2 = lib.ggml_argsort_top_k(ctx, groups, 2)  # [2, n_groups, n]
        scores = lib.ggml_get_rows(ctx, lib.ggml_reshape_4d(ctx, groups, 1, per_group, n_groups, n), top2)
        c = scores.contents
        scores = lib.ggml_sum_rows(ctx, lib.ggml_reshape_3d(ctx, scores, c.ne[1], c.ne[2], c.ne[3]))
        c = scores.contents
        scores = lib.ggml_reshape_2d(ctx, scores, c.ne[1], c.ne[2])  # [n_groups, n]
        best = lib.ggml_argsort_top_k(ctx, scores, hp.n_group_used)
        kept = lib.ggml_get_rows(ctx, groups, best)  # [per_group, n_group_used, n]
        masked = lib.ggml_set_rows(ctx, lib.ggml_fill(ctx, groups, float("-inf")), kept, best)
        return lib.ggml_reshape_2d(ctx, masked, hp.n_expert, n)
