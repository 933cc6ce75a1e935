"""Attention over the KV cache, shared by the family graph builders: each segment (one
session's rows) stores its K and V in its cache and attends over its cells, with ggml's
flash attention or the plain softmax path, MLA's latent attention and sinks (llama.cpp's
``build_attn``)."""

from __future__ import annotations

from collections.abc import Mapping

from llmrpc.ggml import lib as g
from llmrpc.model.graph import AttnInputs, BuilderBase, CacheView, LayerCache, Segment
from llmrpc.model.kv import layer_group


class AttentionOps(BuilderBase):
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
