"""Shared pieces of the layer graph builders: inputs, norm, attention over the KV cache, FFN.

They follow llama.cpp's ``llm_graph_context`` (``src/llama-graph.cpp``) op for op, so the
same batch through llmrpc and through llama.cpp gives the same numbers. Every intermediate
is named with its layer (``attn_norm-12``) so activations can be dumped and diffed.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmrpc.ggml import lib as g
from llmrpc.model.gguf_model import HParams
from llmrpc.types import KV_PAD


def padded_n_kv(used: int, kv_size: int, pad: int = KV_PAD) -> int:
    """How many cache cells a batch attends to: the ``used`` ones rounded up to ``pad``, within
    the cache. With llama.cpp's pad (``get_n_kv``, 256) a decode graph keeps its shape for 256
    tokens; a smaller one attends to fewer masked cells and rebuilds the graph more often."""
    return min(kv_size, max(pad, -(-used // pad) * pad))


@dataclass(frozen=True)
class Segment:
    """The rows of one session in a batch: they attend to that session's own KV cache."""

    offset: int  # first row in the batch
    n: int  # rows
    n_kv: int  # cells attended (padded)
    kv_size: int  # cells in the session's cache


@dataclass
class SegmentInputs:
    kq_mask: g.Tensor  # F32 [n_kv, n]
    k_idxs: g.Tensor  # I64 [n]
    v_idxs: g.Tensor  # I64 [n * n_embd_kv]: the V cache is stored transposed


@dataclass
class GraphInputs:
    """The input tensors of one forward graph; filled by the caller after allocation."""

    tokens: g.Tensor | None  # I32 [n] on the first stage
    embd: g.Tensor | None  # F32 [n_embd, n] elsewhere
    pos: g.Tensor  # I32 [n]
    segments: list[SegmentInputs]  # one per session in the batch
    out_ids: g.Tensor | None  # I32 [n_out] when only some rows leave the last layer


@dataclass
class LayerCache:
    k: g.Tensor  # F16 [n_embd_kv, kv_size]
    v: g.Tensor  # F16 [n_embd_kv, kv_size], used transposed as in llama.cpp without flash-attn


class Builder:
    """A ggml context for one graph plus the shared helpers of the builders. A batch holds
    the rows of one or more sessions (segments): every matrix multiplication runs once over
    all rows, and each segment attends to its own cache."""

    def __init__(self, ctx: int, gf: int, hp: HParams, segments: list[Segment]):
        self.lib = g.ggml()
        self.ctx = ctx
        self.gf = gf
        self.hp = hp
        self.segments = segments
        self.n_tokens = sum(s.n for s in segments)

    def name(self, t: g.Tensor, label: str, il: int = -1) -> g.Tensor:
        self.lib.ggml_set_name(t, (f"{label}-{il}" if il >= 0 else label).encode())
        return t

    def input(self, ggml_type: int, *ne: int, label: str) -> g.Tensor:
        lib = self.lib
        t = {
            1: lib.ggml_new_tensor_1d,
            2: lib.ggml_new_tensor_2d,
        }[len(ne)](self.ctx, ggml_type, *ne)
        lib.ggml_set_input(t)
        return self.name(t, label)

    def rms_norm(self, x: g.Tensor, weight: g.Tensor, label: str, il: int) -> g.Tensor:
        lib = self.lib
        cur = lib.ggml_rms_norm(self.ctx, x, self.hp.rms_eps)
        cur = lib.ggml_mul(self.ctx, cur, weight)
        return self.name(cur, label, il)

    def linear(self, w: g.Tensor, x: g.Tensor, bias: g.Tensor | None = None) -> g.Tensor:
        cur = self.lib.ggml_mul_mat(self.ctx, w, x)
        if bias is not None:
            cur = self.lib.ggml_add(self.ctx, cur, bias)
        return cur

    def attention(
        self,
        inp: GraphInputs,
        caches: list[LayerCache],  # one per segment
        q: g.Tensor,  # [head_dim, n_head, n]
        k: g.Tensor,  # [head_dim, n_head_kv, n]
        v: g.Tensor,  # [head_dim, n_head_kv, n]
        il: int,
    ) -> g.Tensor:
        """Each segment stores its K and V in its cache and attends over its cells; the
        segments' results are joined back into one batch [n_embd, n]."""
        if len(self.segments) == 1:
            return self._attend(self.segments[0], inp.segments[0], caches[0], q, k, v, il)
        lib, ctx = self.lib, self.ctx
        out = None
        for seg, seg_inp, cache in zip(self.segments, inp.segments, caches, strict=True):

            def rows(t: g.Tensor, seg: Segment = seg) -> g.Tensor:
                c = t.contents
                return lib.ggml_view_3d(ctx, t, c.ne[0], c.ne[1], seg.n, c.nb[1], c.nb[2], seg.offset * c.nb[2])

            cur = self._attend(seg, seg_inp, cache, rows(q), rows(k), rows(v), il)
            out = cur if out is None else lib.ggml_concat(ctx, out, cur, 1)
        assert out is not None
        return out

    def _attend(
        self, seg: Segment, inp: SegmentInputs, cache: LayerCache, q: g.Tensor, k: g.Tensor, v: g.Tensor, il: int
    ) -> g.Tensor:
        lib, ctx, hp = self.lib, self.ctx, self.hp
        n, hd, n_kv, kv = seg.n, hp.head_dim, seg.n_kv, seg.kv_size
        f16 = g.GGML_TYPE_F16
        # cpy_k: rows of [n_embd_kv] go to the cells in k_idxs
        k2 = lib.ggml_view_2d(ctx, k, hp.n_embd_kv, n, k.contents.nb[2], 0)
        lib.ggml_build_forward_expand(self.gf, lib.ggml_set_rows(ctx, cache.k, k2, inp.k_idxs))
        # cpy_v (transposed cache): each element is its own row
        v_flat = lib.ggml_reshape_2d(ctx, v, 1, hp.n_embd_kv * n)  # a segment's rows are contiguous
        v_rows = lib.ggml_reshape_2d(ctx, cache.v, 1, hp.n_embd_kv * kv)
        lib.ggml_build_forward_expand(self.gf, lib.ggml_set_rows(ctx, v_rows, v_flat, inp.v_idxs))

        q = lib.ggml_permute(ctx, q, 0, 2, 1, 3)
        k_view = lib.ggml_view_3d(
            ctx, cache.k, hd, n_kv, hp.n_head_kv,
            lib.ggml_row_size(f16, hp.n_embd_kv), lib.ggml_row_size(f16, hd), 0,
        )  # fmt: skip
        v_view = lib.ggml_view_3d(
            ctx, cache.v, n_kv, hd, hp.n_head_kv,
            lib.ggml_row_size(f16, kv), lib.ggml_row_size(f16, kv * hd), 0,
        )  # fmt: skip
        kq = lib.ggml_mul_mat(ctx, k_view, q)
        lib.ggml_prec_set_acc(kq, g.GGML_PREC_F32)
        kq = self.name(lib.ggml_soft_max_ext(ctx, kq, inp.kq_mask, hp.attn_scale, 0.0), "kq_soft_max", il)
        kqv = lib.ggml_mul_mat(ctx, v_view, kq)
        cur = lib.ggml_permute(ctx, kqv, 0, 2, 1, 3)
        return lib.ggml_cont_2d(ctx, cur, hd * hp.n_head, n)

    def swiglu_ffn(self, x: g.Tensor, gate: g.Tensor, up: g.Tensor, down: g.Tensor, il: int) -> g.Tensor:
        lib, ctx = self.lib, self.ctx
        tmp = lib.ggml_mul_mat(ctx, up, x)
        cur = lib.ggml_mul_mat(ctx, gate, x)
        cur = self.name(lib.ggml_swiglu_split(ctx, cur, tmp), "ffn_swiglu", il)
        return self.name(lib.ggml_mul_mat(ctx, down, cur), "ffn_out", il)
