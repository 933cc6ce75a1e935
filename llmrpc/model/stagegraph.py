"""How a stage's graphs are built: the family's builder over the stage's weights and a batch's
caches, the inputs a graph takes, and a decode row's inputs kept to be updated in place.

Which graphs a stage keeps, and where they live, is :class:`llmrpc.model.stage.LayerStage`'s
business (with :mod:`llmrpc.model.graphs`); this module only makes them.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Mapping

import numpy as np

from llmrpc.ggml import lib as g
from llmrpc.ggml.bufts import MUL_MAT, MUL_MAT_ID
from llmrpc.ggml.checked import CheckedOps
from llmrpc.model.builder import Builder
from llmrpc.model.graph import AttnInputs, CacheView, GraphInputs, LayerCache, Segment
from llmrpc.model.graphs import Graph, GraphKey, Room, RowInputs, SlidingRow, arena, count_tensors
from llmrpc.model.hparams import HParams
from llmrpc.model.kv import FULL, CacheConfig, KVGroup
from llmrpc.types import KV_PAD

logger = logging.getLogger(__name__)

# Nodes per layer of the graph that finds a stage's weights' uses (generous: the families' layers
# take 20-70), which then sizes every graph of the stage by what it really holds
DRY_RUN_NODES_PER_LAYER = 256


class ComputeError(RuntimeError):
    pass


class GraphMaker:
    """The graphs of layers [start, end) with ``build`` (a family's builder), over KV caches of
    ``cache``'s types in ``groups``; ``native_cells``: one-row graphs keep their decode row's
    inputs (:class:`RowInputs`, :class:`SlidingRow`) for the native hop."""

    def __init__(
        self, hp: HParams, start: int, end: int, cache: CacheConfig, groups: list[KVGroup],
        build: Callable[[Builder], g.Tensor], native_cells: bool,
    ) -> None:  # fmt: skip
        self.hp = hp
        self.start, self.end = start, end
        self.first = start == 0
        self.cache = cache
        self.flash_attn = bool(cache.flash_attn)
        # the mask's type: flash attention takes an F16 mask
        self.mask_dtype: type = np.float16 if self.flash_attn else np.float32
        self.groups = groups
        self._build_fn = build
        self.native_cells = native_cells
        self.segment_nodes = 0  # nodes and leafs of one session's rows through the layers (the dry run's)

    def weight_ops(self, meta: dict[str, g.Tensor]) -> dict[str, str]:
        """Which of these (data-less) weights the layers' graph multiplies by, from a one-row
        graph built over them; building it also shows that the GGUF has every tensor the
        family's graph needs, of shapes that fit its hyper-parameters (ops are called through
        :class:`CheckedOps`: a contradiction raises :class:`ShapeError`, not a ggml abort), and
        counts the nodes one session's rows make (``segment_nodes``)."""
        lib = g.ggml()
        nodes = DRY_RUN_NODES_PER_LAYER * (self.end - self.start) + 1024
        mem = arena(nodes)
        ctx = lib.ggml_init(g.ggml_init_params(ctypes.sizeof(mem), ctypes.addressof(mem), True))
        try:
            gf = lib.ggml_new_graph_custom(ctx, nodes, False)
            seg = Segment(0, 1, tuple(CacheView(grp.name, KV_PAD, KV_PAD) for grp in self.groups))
            caches = {}
            for grp in self.groups:
                for il in grp.layers:
                    k = lib.ggml_new_tensor_2d(ctx, self.cache.ggml_k, self.hp.n_embd_k_gqa(il), KV_PAD)
                    v = lib.ggml_new_tensor_2d(ctx, self.cache.ggml_v, grp.n_embd_v, KV_PAD) if grp.n_embd_v else None
                    caches[il] = LayerCache(k, v)
            inp = self._inputs(ctx, [seg], False)
            b = Builder(
                ctx, gf, self.hp, [seg], meta, inp, [caches], self.start, self.end, self.flash_attn, CheckedOps(lib)
            )
            out = self._build_fn(b)
            lib.ggml_build_forward_expand(gf, out)
            # a session's rows in a graph of these layers: these tensors, the weights and caches
            self.segment_nodes = count_tensors(ctx) + len(meta)
            names = {address(t): name for name, t in meta.items()}
            ops = {}
            for i in range(lib.ggml_graph_n_nodes(gf)):
                node = lib.ggml_graph_node(gf, i).contents
                op = lib.ggml_op_name(node.op).decode()
                if op in (MUL_MAT, MUL_MAT_ID) and node.src[0] in names:
                    ops[names[node.src[0]]] = op
            return ops
        finally:
            lib.ggml_free(ctx)

    def build(
        self, key: GraphKey, weights: Mapping[str, g.Tensor], caches: list[Mapping[int, LayerCache]],
        segments: list[Segment], room: Room, own_room: bool,
    ) -> Graph:  # fmt: skip
        """The graph of ``key`` (the batch's caches and shape) built and allocated in ``room``
        (freed with the graph when ``own_room``)."""
        lib, hp = g.ggml(), self.hp
        want_rows, top1 = key[1], key[2]
        ctx = lib.ggml_init(g.ggml_init_params(ctypes.sizeof(room.mem), ctypes.addressof(room.mem), True))
        try:
            gf = lib.ggml_new_graph_custom(ctx, room.nodes, False)
            inp = self._inputs(ctx, segments, want_rows)
            b = Builder(ctx, gf, hp, segments, weights, inp, caches, self.start, self.end, self.flash_attn)
            out = self._build_fn(b)
            if top1:
                out = b.name(lib.ggml_argmax(ctx, out), "result_argmax")
            lib.ggml_set_output(out)
            lib.ggml_build_forward_expand(gf, out)
            lib.ggml_build_forward_expand(gf, inp.pos)  # set for every graph, read by none without rope (NoPE)
            lib.ggml_backend_sched_reset(room.sched)
            if not lib.ggml_backend_sched_alloc_graph(room.sched, gf):
                raise ComputeError("cannot allocate the compute graph")
        except BaseException:
            lib.ggml_free(ctx)
            if own_room:
                room.free()
            raise
        v_rows = [{grp.name: self.v_rows(grp, seg.view(grp.name).size) for grp in self.groups} for seg in segments]
        shape = (int(out.contents.ne[1]), int(out.contents.ne[0]))
        dtype = np.int32 if top1 else np.float32
        graph = Graph(key, ctx, gf, inp, out, room, own_room, shape, dtype, v_rows)
        if own_room and self.native_cells and len(segments) == 1 and segments[0].n == 1 and inp.attn_scale is None:
            self._keep_row(graph, segments[0], inp.segments[0], v_rows[0])
        return graph

    def _keep_row(
        self, graph: Graph, segment: Segment, inputs: dict[str, AttnInputs], v_rows: dict[str, np.ndarray]
    ) -> None:
        """A decode row's inputs, kept with its graph to be updated in place."""
        views = {v.group: v for v in segment.views}
        full = views.get(FULL)
        graph.row = RowInputs(
            inputs.get(FULL), graph.inputs.pos, full.n_kv if full else 1, v_rows.get(FULL, np.zeros(1, np.int64)),
            self.mask_dtype,
        )  # fmt: skip
        for group in self.groups:
            if group.name != FULL:
                view = views[group.name]
                graph.sliding = SlidingRow(
                    inputs[group.name], view.n_kv, view.size, v_rows[group.name], self.mask_dtype
                )

    def v_rows(self, grp: KVGroup, size: int) -> np.ndarray:
        """The first V row of each of a position's values ([1, rows]): the V indices are these
        plus the position's cell."""
        if self.flash_attn:
            return np.zeros((1, 1), dtype=np.int64)
        return np.arange(grp.n_embd_v, dtype=np.int64)[None, :] * size

    def _v_index_rows(self, grp: KVGroup) -> int:
        """V cache rows a position writes: one per value of a transposed cache, else one."""
        return 1 if self.flash_attn else grp.n_embd_v

    def _inputs(self, ctx: int, segments: list[Segment], want_rows: bool) -> GraphInputs:
        lib, hp = g.ggml(), self.hp
        n = sum(seg.n for seg in segments)
        mask_type = g.GGML_TYPE_F16 if self.flash_attn else g.GGML_TYPE_F32

        def new(ggml_type: int, *ne: int, label: str) -> g.Tensor:
            t = (
                lib.ggml_new_tensor_1d(ctx, ggml_type, *ne)
                if len(ne) == 1
                else lib.ggml_new_tensor_2d(ctx, ggml_type, *ne)
            )
            lib.ggml_set_input(t)
            lib.ggml_set_name(t, label.encode())
            return t

        def attn(grp: KVGroup, seg: Segment, j: int) -> AttnInputs:
            return AttnInputs(
                kq_mask=new(mask_type, seg.view(grp.name).n_kv, seg.n, label=f"kq_mask.{grp.name}.{j}"),
                k_idxs=new(g.GGML_TYPE_I64, seg.n, label=f"k_idxs.{grp.name}.{j}"),
                v_idxs=new(g.GGML_TYPE_I64, seg.n * self._v_index_rows(grp), label=f"v_idxs.{grp.name}.{j}")
                if grp.n_embd_v
                else None,
            )

        return GraphInputs(
            tokens=new(g.GGML_TYPE_I32, n, label="inp_tokens") if self.first else None,
            embd=None if self.first else new(g.GGML_TYPE_F32, hp.n_embd, n, label="inp_embd"),
            pos=new(g.GGML_TYPE_I32, n, label="inp_pos"),
            segments=[{grp.name: attn(grp, seg, j) for grp in self.groups} for j, seg in enumerate(segments)],
            out_ids=new(g.GGML_TYPE_I32, len(segments), label="out_ids") if want_rows else None,
        )


def address(t: g.Tensor | None) -> int:
    """A tensor's address, as a node's sources hold it (0: none)."""
    return 0 if t is None else int(ctypes.cast(t, ctypes.c_void_p).value or 0)
