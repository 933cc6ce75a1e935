"""A contiguous layer range of a GGUF model held on one device: weights, KV caches, forward.

This is the compute side of a server; it knows nothing of gRPC. Weights keep their GGUF
quantization: tensor bytes go to the device buffer as they are in the file.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llmrpc.ggml import lib as g
from llmrpc.ggml.device import Backend, prefer_huge_pages
from llmrpc.model.families import family
from llmrpc.model.gguf_model import ModelInfo
from llmrpc.model.graph import CacheView, LayerCache, Segment, padded_n_kv
from llmrpc.model.graphs import (
    KEPT_GRAPH_ROWS,
    Graph,
    GraphKey,
    KeptGraphs,
    Room,
    RowInputs,
    SlidingRow,
    room_nodes,
)
from llmrpc.model.hparams import SwaType, attn_temp_scales
from llmrpc.model.kv import FULL, CacheConfig, KVGroup, NoCellError, SlidingCells, check_cache, full_mask, kv_groups
from llmrpc.model.stagegraph import ComputeError, GraphMaker, address
from llmrpc.model.weights import StageWeights
from llmrpc.types import KV_PAD, kv_cells

logger = logging.getLogger(__name__)

# Cells a batch attends to are padded to this on the CPU (llama.cpp's 256 elsewhere). Every
# padded cell is computed, then masked: at 256, that was ~8% of a SmolLM2 token at short
# contexts. The decode graph is rebuilt every 64 positions instead (~1.2 ms per 10 layers, its
# scheduler and arena recycled). 64 keeps llama.cpp's numbers bit for bit where ggml's f16 dot
# products take 64 values a step or fewer (AVX-512 64, AVX2 and NEON 32): the masked cells add
# exact zeros. (At 32, AVX-512 sums the row in its scalar tail and the last bits differ.)
CPU_ATTEND_PAD = 64


@dataclass(frozen=True)
class RowGraph:
    """A kept one-row decode graph as C code that computes it sees it (server/hop.c): the
    addresses of its scheduler, graph, output and inputs, and of the row's input buffers, which
    that code fills as :meth:`RowInputs.write` does."""

    graph: Graph
    row: RowInputs
    n_kv: int
    sched: int
    gf: int
    out: int
    inp_x: int  # token ids (the first layers) or hidden states
    inp_pos: int
    inp_k: int
    inp_v: int
    inp_mask: int
    pos_buf: int
    k_buf: int
    v_rows: int
    v_buf: int
    mask_buf: int
    has_full: bool  # the layers have a full-attention group (the inputs above but pos: its)
    swa: dict[str, int]  # the native hop's sliding-window fields (server/native.py's Hop), or none


def _placed_used(cells: SlidingCells, pos: int) -> int:
    """The sliding cells used (to the last held, +1) once the row at ``pos`` is placed in them,
    the cells themselves unchanged (a copy is placed in)."""
    twin = SlidingCells(cells.size, cells.window, cells.swa_type)
    twin.pos[:] = cells.pos
    twin.head = cells.head
    if pos <= twin.pos_max:
        return -1  # a rewind: not a step the kept graph takes
    try:
        twin.place(np.array([pos], dtype=np.int64))
    except NoCellError:
        return -1
    return twin.used_max_p1


def _native_sliding(cells: SlidingCells, row: SlidingRow, pad: int) -> dict[str, int]:
    """The native hop's fields (server/native.py's Hop) for a sliding-window group: its cells,
    the row's buffers and the graph's inputs they go to."""
    fields = {
        "swa_size": cells.size, "swa_window": cells.window, "swa_n_kv": row.n_kv, "swa_pad": pad,
        "swa_n_v": len(row.v_rows), "swa_inp_k": address(row.inputs.k_idxs),
        "swa_inp_v": address(row.inputs.v_idxs), "swa_inp_mask": address(row.inputs.kq_mask),
    }  # fmt: skip
    for name, a in (("swa_pos", cells.pos), ("swa_heads", cells.heads), ("swa_scratch", row.scratch),
                    ("swa_k_buf", row.k_idx), ("swa_v_rows", row.v_rows), ("swa_v_buf", row.v_idx),
                    ("swa_mask_buf", row.mask)):  # fmt: skip
        fields[name] = a.__array_interface__["data"][0]
    return fields


_SERIALS = itertools.count(1)


@dataclass
class SessionCache:
    """One session's KV cache for the layers of a stage, on the stage's device."""

    kv_size: int  # cells of the full-attention layers: the session's context
    sizes: dict[str, int]  # cells of each KV group
    layers: dict[int, LayerCache]
    ctx: int
    buffer: int
    n_bytes: int
    sliding: dict[str, SlidingCells] = field(default_factory=dict)  # cell allocation of window groups
    serial: int = field(default_factory=lambda: next(_SERIALS))

    def free(self) -> None:
        lib = g.ggml()
        if self.buffer:
            lib.ggml_backend_buffer_free(self.buffer)
        if self.ctx:
            lib.ggml_free(self.ctx)
        self.buffer = self.ctx = 0


class LayerStage:
    def __init__(
        self,
        info: ModelInfo,
        start: int,
        end: int,
        backend: Backend,
        progress: Callable[[int], None] | None = None,
        cache: CacheConfig | None = None,
    ) -> None:
        if not 0 <= start < end <= info.hparams.n_layer:
            raise ValueError(f"layer range [{start}, {end}) is outside the model's 0..{info.hparams.n_layer}")
        self.info = info
        self.hp = info.hparams
        self.start, self.end = start, end
        self.first, self.last = start == 0, end == info.hparams.n_layer
        self.backend = backend
        self.cache = (cache or CacheConfig()).resolved()
        check_cache(self.hp, self.cache)
        self.flash_attn = bool(self.cache.flash_attn)
        # Flash attention splits the attended cells among the threads by their number: only
        # llama.cpp's pad gives its numbers (masked cells cost it little)
        self.attend_pad = CPU_ATTEND_PAD if backend.device.kind == "cpu" and not self.flash_attn else KV_PAD
        self.groups: list[KVGroup] = kv_groups(self.hp, start, end)
        # one full-attention cache layout: a decode row's inputs can be kept and updated in
        # place (cell = position), and the native hop can compute it
        self.simple_cells = [(grp.name, grp.n_embd_v > 0) for grp in self.groups] == [(FULL, True)]
        # ... or that and/or one standard sliding-window group: the native hop places a decode
        # row in its cells as SlidingCells does (server/hop.c)
        full = [g for g in self.groups if g.name == FULL]
        swa = [g for g in self.groups if g.name != FULL]
        self.native_cells = (
            all(g.n_embd_v > 0 for g in self.groups) and len(full) <= 1 and len(swa) <= 1 and len(self.groups) >= 1
            and all(g.swa_type == SwaType.STANDARD and g.window > 0 for g in swa)
        )  # fmt: skip
        self._maker = GraphMaker(self.hp, start, end, self.cache, self.groups, family(info.arch).build,
                                 self.native_cells)  # fmt: skip
        self.mask_dtype = self._maker.mask_dtype
        self._stage_weights = StageWeights(info, start, end, backend, self._maker.weight_ops, progress)
        self.weights: dict[str, g.Tensor] = self._stage_weights.tensors
        self.weight_bytes = self._stage_weights.n_bytes
        # the large-batch graphs' room, grown when a batch needs more: one graph lives at a time
        self._room = Room.new(self.backend.backends(), room_nodes(self._maker.segment_nodes, 1))
        self._graph: Graph | None = None  # the last large-batch graph (in self._room)
        self._kept = KeptGraphs()
        # bytes of the graphs' rooms, counted when a graph is built or freed (read from any thread)
        self.graph_bytes = self._room.n_bytes(self.backend.backends())

    def new_cache(self, n_ctx: int) -> SessionCache:
        lib = g.ggml()
        kv_size = kv_cells(n_ctx)
        n_layers = self.end - self.start
        params = g.ggml_init_params(lib.ggml_tensor_overhead() * (2 * n_layers + 1), None, True)
        ctx = lib.ggml_init(params)
        layers, sizes, sliding = {}, {}, {}
        for group in self.groups:
            size = sizes[group.name] = group.cells(n_ctx)
            if group.name != FULL:
                sliding[group.name] = SlidingCells(size, group.window, group.swa_type)
            for il in group.layers:
                k = lib.ggml_new_tensor_2d(ctx, self.cache.ggml_k, self.hp.n_embd_k_gqa(il), size)
                lib.ggml_set_name(k, f"cache_k_l{il}".encode())
                v = None
                if group.n_embd_v:
                    v = lib.ggml_new_tensor_2d(ctx, self.cache.ggml_v, group.n_embd_v, size)
                    lib.ggml_set_name(v, f"cache_v_l{il}".encode())
                layers[il] = LayerCache(k, v)
        buf = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, self.backend.buffer_type)
        if not buf:
            lib.ggml_free(ctx)
            raise MemoryError(f"cannot allocate the KV cache for {n_ctx} positions")
        prefer_huge_pages(buf)  # attention reads the whole attended cache every token
        lib.ggml_backend_buffer_clear(buf, 0)  # unused cells are read (masked): keep them finite
        return SessionCache(kv_size, sizes, layers, ctx, buf, lib.ggml_backend_buffer_get_size(buf), sliding)

    def clear_cache(self, cache: SessionCache) -> None:
        """Zero a cache for a new session (cells past a session's positions are read, masked:
        they must hold finite numbers, as a new cache's do)."""
        g.ggml().ggml_backend_buffer_clear(cache.buffer, 0)
        for cells in cache.sliding.values():
            cells.clear()

    def forward(self, cache: SessionCache, x: np.ndarray, start_pos: int, all_outputs: bool) -> np.ndarray:
        """Run ``x`` (I32 token ids [n] on the first stage, F32 hidden [n, n_embd] elsewhere)
        at positions ``start_pos..start_pos+n`` and return hidden states [n, n_embd], or on the
        last stage logits [n or 1, n_vocab] (every row when ``all_outputs``, else the last)."""
        return self.forward_batch([(cache, x, start_pos)], all_outputs)[0]

    def forward_batch(
        self, items: list[tuple[SessionCache, np.ndarray, int]], all_outputs: bool, top1: bool = False
    ) -> list[np.ndarray]:
        """:meth:`forward` for several sessions in one graph (each (cache, x, start_pos) a
        different session): the weights are read once for all their rows. ``top1`` (last stage):
        each session's largest logit's id, I32 [1], found on the device (greedy decoding reads
        4 bytes back instead of the vocabulary's logits)."""
        return self.launch(items, all_outputs, top1)()

    def launch(
        self, items: list[tuple[SessionCache, np.ndarray, int]], all_outputs: bool, top1: bool = False
    ) -> Callable[[], list[np.ndarray]]:
        """:meth:`forward_batch` in two halves: the inputs set and the graph started (on a GPU
        it runs while the caller goes on; on the CPU it has run when this returns), then the
        returned function waits for it and reads the outputs. Call that before starting
        another graph on this stage."""
        lib = g.ggml()
        segments, cells, offset = [], [], 0
        for cache, x, start_pos in items:
            n = int(x.shape[0])
            if start_pos + n > cache.kv_size:
                raise ComputeError(f"positions up to {start_pos + n} exceed the cache of {cache.kv_size}")
            views, seg_cells = self._place(cache, start_pos, n)
            segments.append(Segment(offset, n, views))
            cells.append(seg_cells)
            offset += n
        want_rows = self.last and not all_outputs and any(seg.n > 1 for seg in segments)
        top1 = top1 and self.last and not all_outputs
        key = (
            tuple(
                (c.serial, seg.n, tuple(v.n_kv for v in seg.views))
                for (c, _, _), seg in zip(items, segments, strict=True)
            ),
            want_rows,
            top1,
        )
        graph = self._graph_for(key, [c for c, _, _ in items], segments)
        inp = graph.inputs
        dtype = np.int32 if self.first else np.float32
        if graph.row is not None and graph.sliding is None and self.simple_cells:  # decoding, every token
            _set(inp.tokens if self.first else inp.embd, items[0][1].astype(dtype, copy=False))
            graph.row.write(items[0][2])
        else:
            _set(
                inp.tokens if self.first else inp.embd,
                np.concatenate([x.astype(dtype, copy=False) for _, x, _ in items]),
            )
            pos = np.concatenate(
                [np.arange(p, p + seg.n, dtype=np.int32) for (_, _, p), seg in zip(items, segments, strict=True)]
            )
            _set(inp.pos, pos)
            _set(inp.attn_scale, None if inp.attn_scale is None else attn_temp_scales(self.hp, pos))
            for j, ((cache, _, _), seg) in enumerate(zip(items, segments, strict=True)):
                self._set_cells(graph, j, cache, pos[seg.offset : seg.offset + seg.n], cells[j])
        if want_rows:
            _set(inp.out_ids, np.array([seg.offset + seg.n - 1 for seg in segments], dtype=np.int32))
        status = lib.ggml_backend_sched_graph_compute_async(graph.sched, graph.gf)
        if status != 0:
            lib.ggml_backend_sched_synchronize(graph.sched)
            if not self._kept.drop(graph):
                self._drop_graph()
            self._count_graph_bytes()
            raise ComputeError(f"graph compute failed: {lib.ggml_status_to_string(status).decode()}")

        def collect() -> list[np.ndarray]:
            lib.ggml_backend_sched_synchronize(graph.sched)
            result: np.ndarray = np.empty(graph.out_shape, dtype=graph.out_dtype)
            lib.ggml_backend_tensor_get(graph.out, result.__array_interface__["data"][0], 0, result.nbytes)
            if top1:
                return [result[0, i : i + 1] for i in range(len(segments))]
            if want_rows:
                return [result[i : i + 1] for i in range(len(segments))]
            return [result[seg.offset : seg.offset + seg.n] for seg in segments]

        return collect

    def _place(
        self, cache: SessionCache, start_pos: int, n: int
    ) -> tuple[tuple[CacheView, ...], dict[str, np.ndarray]]:
        """The cells of a session's rows at ``start_pos..start_pos+n`` in each KV group, and
        how many cells of each the batch attends to. A full-attention group holds position p at
        cell p; a sliding-window group places them as llama.cpp does (which moves its state)."""
        views, cells = [], {}
        for group in self.groups:
            size = cache.sizes[group.name]
            sliding = cache.sliding.get(group.name)
            if sliding is None:
                views.append(CacheView(group.name, padded_n_kv(start_pos + n, size, self.attend_pad), size))
                continue
            if start_pos <= sliding.pos_max:  # a rewind
                if not sliding.can_rewind(start_pos):
                    raise ComputeError(
                        f"cannot go back to position {start_pos}: the sliding window's cache no longer holds "
                        "the positions before it (start a new session instead)"
                    )
                sliding.remove_from(start_pos)
            try:
                cells[group.name] = sliding.place(np.arange(start_pos, start_pos + n, dtype=np.int64))
            except NoCellError as e:
                raise ComputeError(str(e)) from e
            views.append(CacheView(group.name, padded_n_kv(sliding.used_max_p1, size, self.attend_pad), size))
        return tuple(views), cells

    def _set_cells(self, graph: Graph, j: int, cache: SessionCache, rows: np.ndarray,
                   placed: dict[str, np.ndarray]) -> None:  # fmt: skip
        """Segment j's attention inputs: each KV group's mask, K cells and V cells."""
        for group, inputs in graph.inputs.segments[j].items():
            n_kv = int(inputs.kq_mask.contents.ne[0])
            sliding = cache.sliding.get(group)
            if sliding is None:
                mask, k_cells = full_mask(rows, n_kv), rows.astype(np.int64)
            else:
                mask, k_cells = sliding.mask(rows, n_kv), placed[group]
            _set(inputs.kq_mask, mask.astype(self.mask_dtype, copy=False))
            _set(inputs.k_idxs, k_cells)
            if inputs.v_idxs is not None:
                _set(inputs.v_idxs, graph.v_rows[j][group] + k_cells[:, None])

    def row_graph(self, cache: SessionCache, pos: int) -> RowGraph | None:
        """The kept graph that decodes the row at ``pos`` of ``cache``'s session, if it is built:
        to hidden states, or on the last layers to the greedy token (top1). None otherwise, and
        for layers whose cells the native hop cannot place (see ``native_cells``)."""
        if not self.native_cells:
            return None
        n_kvs = []
        for group in self.groups:
            sliding = cache.sliding.get(group.name)
            if sliding is None:
                n_kvs.append(padded_n_kv(pos + 1, cache.kv_size, self.attend_pad))
                continue
            used = _placed_used(sliding, pos)
            if used < 0:
                return None
            n_kvs.append(padded_n_kv(used, sliding.size, self.attend_pad))
        graph = self._kept.get((((cache.serial, 1, tuple(n_kvs)),), False, self.last))
        if graph is None or graph.row is None or (len(cache.sliding) != (graph.sliding is not None)):
            return None
        inp, row = graph.inputs, graph.row
        full = inp.segments[0].get(FULL)
        pos_buf, k_buf, v_rows, v_buf, mask_buf = (
            a.__array_interface__["data"][0] for a in (row.pos, row.k_idx, row.v_rows, row.v_idx, row.mask)
        )
        swa = {} if graph.sliding is None else _native_sliding(next(iter(cache.sliding.values())), graph.sliding,
                                                                 self.attend_pad)  # fmt: skip
        n_kv = n_kvs[[g.name for g in self.groups].index(FULL)] if full is not None else cache.kv_size
        return RowGraph(
            graph, row, n_kv, graph.sched, graph.gf, address(graph.out),
            address(inp.tokens if self.first else inp.embd), address(inp.pos),
            address(full.k_idxs if full else None), address(full.v_idxs if full else None),
            address(full.kq_mask if full else None), pos_buf, k_buf, v_rows, v_buf, mask_buf, full is not None, swa,
        )  # fmt: skip

    def holds(self, graph: Graph) -> bool:
        """Whether ``graph`` is still kept (not freed)."""
        return self._kept.get(graph.key) is graph

    def _graph_for(self, key: GraphKey, caches: list[SessionCache], segments: list[Segment]) -> Graph:
        """The built and allocated graph for this batch's shape and caches; rebuilt only when
        the key changes (the attended length moves in steps of the pad, so decode reuses one)."""
        kept = self._kept.use(key)
        if kept is not None:
            return kept
        if self._graph is not None and self._graph.key == key:
            return self._graph
        nodes = room_nodes(self._maker.segment_nodes, len(segments))
        backends = self.backend.backends()
        if sum(seg.n for seg in segments) <= KEPT_GRAPH_ROWS:
            room = self._kept.room_of_superseded(key) or Room.new(backends, nodes)
            graph = self._maker.build(key, self.weights, [c.layers for c in caches], segments, room, own_room=True)
            self._kept.put(graph)
            self._count_graph_bytes()
            return graph
        self._drop_graph()
        if self._room.nodes < nodes:
            self._room.free()
            self._room = Room.new(backends, nodes)
        self._graph = self._maker.build(key, self.weights, [c.layers for c in caches], segments, self._room, False)
        self._count_graph_bytes()
        return self._graph

    def _count_graph_bytes(self) -> None:
        """Memory of this stage's graphs: the kept graphs' rooms and the large-batch room."""
        backends = self.backend.backends()
        self.graph_bytes = self._kept.n_bytes(backends) + self._room.n_bytes(backends)

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._graph.free()
            self._graph = None

    def forget(self, cache: SessionCache) -> None:
        """Called before a session's cache is freed: graphs that point into it must go."""
        if self._graph is not None and any(serial == cache.serial for serial, _, _ in self._graph.key[0]):
            self._drop_graph()
        self._kept.forget(cache.serial)
        self._count_graph_bytes()

    def close(self) -> None:
        self._drop_graph()
        self._kept.clear()
        self._room.free()
        self.graph_bytes = 0
        self._stage_weights.close()


def _set(tensor: g.Tensor | None, data: np.ndarray | None) -> None:
    if tensor is None or data is None:
        return
    data = np.ascontiguousarray(data)
    address = data.__array_interface__["data"][0]  # cheaper than .ctypes.data, per input per token
    g.ggml().ggml_backend_tensor_set(tensor, address, 0, data.nbytes)
