"""Built graphs of a stage and the memory they live in.

A graph is built in a room: a ggml scheduler, which allocates the graph's compute buffer, and
an arena for the graph's tensor and node metadata, both sized for a number of nodes and leafs.
A stage sizes its rooms by what its layers need (:func:`room_nodes`): one fixed size for the
largest graph any model could need (8,192 nodes) would cost ~4 MB of resident memory per kept
graph, and a batch of many sessions through many layers could still overflow it (ggml aborts
the process then).

Decode-sized graphs are kept per session and shape (:class:`KeptGraphs`), each in a room of
its own, so sessions that take turns do not rebuild theirs (1-2 ms per 10 layers). At most
:data:`KEPT_GRAPHS` are kept: their memory is bounded, and counted by :meth:`KeptGraphs.n_bytes`.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from llmrpc.ggml import lib as g
from llmrpc.model.graph import AttnInputs, GraphInputs

logger = logging.getLogger(__name__)

KEPT_GRAPH_ROWS = 16  # a batch of at most this many rows is built as a kept graph
KEPT_GRAPHS = 16  # kept graphs per stage, least recently used dropped first
ROOM_STEP = 512  # room sizes are rounded up to this many nodes
ROOM_MARGIN = 256  # nodes a room has beyond the estimate (outputs, argmax, row selection)

# ((cache serial, rows, attended cells of each KV group) for each session in the batch, last
# rows only, argmax)
GraphKey = tuple[tuple[tuple[int, int, tuple[int, ...]], ...], bool, bool]


def room_nodes(segment_nodes: int, n_segments: int) -> int:
    """Nodes and leafs a room must hold for a graph of ``n_segments`` sessions' rows, when one
    session's graph of the same layers holds at most ``segment_nodes``: every session adds its
    own attention, so ``n_segments`` one-session graphs bound it."""
    need = segment_nodes * max(n_segments, 1) + ROOM_MARGIN
    return -(-need // ROOM_STEP) * ROOM_STEP


@dataclass
class Room:
    """A scheduler and a metadata arena for graphs of up to ``nodes`` nodes and leafs."""

    sched: int
    mem: ctypes.Array[ctypes.c_char]
    nodes: int

    @staticmethod
    def new(backends: list[int], nodes: int) -> Room:
        lib = g.ggml()
        arr = (ctypes.c_void_p * len(backends))(*backends)
        sched = int(lib.ggml_backend_sched_new(arr, None, len(backends), nodes, False, True))
        return Room(sched, arena(nodes), nodes)

    def n_bytes(self, backends: list[int]) -> int:
        """The compute buffers this room's scheduler holds, and its arena."""
        lib = g.ggml()
        return sum(int(lib.ggml_backend_sched_get_buffer_size(self.sched, b)) for b in backends) + len(self.mem)

    def free(self) -> None:
        if self.sched:
            g.ggml().ggml_backend_sched_free(self.sched)
            self.sched = 0


def arena(nodes: int) -> ctypes.Array[ctypes.c_char]:
    """Memory for the tensor and node metadata of a graph of ``nodes`` nodes and leafs (the
    data lives in the scheduler)."""
    lib = g.ggml()
    return ctypes.create_string_buffer(
        lib.ggml_tensor_overhead() * nodes + lib.ggml_graph_overhead_custom(nodes, False)
    )


def count_tensors(ctx: int) -> int:
    """The tensors made in a ggml context."""
    lib, n = g.ggml(), 0
    t = lib.ggml_get_first_tensor(ctx)
    while t:
        n += 1
        t = lib.ggml_get_next_tensor(ctx, t)
    return n


class RowInputs:
    """The position inputs of a graph that computes one row of one session (decoding), kept
    from step to step and changed in place: the row's position, its KV cell and V cells, and
    its mask row, whose allowed cells grow by one a step (and shrink on a rewind). A hop's work
    runs cold (the layers' compute has just flushed the caches), where building the mask anew
    with np.where costs ~150 us and each new array ~20-40. Only for a full-attention cache,
    where position p is at cell p."""

    def __init__(
        self, inputs: AttnInputs | None, pos: g.Tensor, n_kv: int, v_rows: np.ndarray, mask_dtype: type
    ) -> None:
        """``inputs``: the full-attention group's (None: the layers have none; only the position
        is set then)."""
        self.pos = np.zeros(1, dtype=np.int32)
        self.k_idx = np.zeros(1, dtype=np.int64)
        self.v_rows = v_rows.reshape(-1)
        self.v_idx = self.v_rows.copy()
        self.mask: np.ndarray = np.full(n_kv, -np.inf, dtype=mask_dtype)
        self.allowed = 0  # mask cells [0, allowed) are 0, the rest -inf
        pairs: list[tuple[g.Tensor, np.ndarray]] = [(pos, self.pos)]
        if inputs is not None:
            pairs += [(inputs.k_idxs, self.k_idx), (inputs.v_idxs, self.v_idx), (inputs.kq_mask, self.mask)]
        self._sets = [(t, a.__array_interface__["data"][0], a.nbytes) for t, a in pairs]

    def write(self, p: int) -> None:
        """Set the inputs for the row at position ``p``: it attends to cells 0..p."""
        self.pos[0] = self.k_idx[0] = p
        np.add(self.v_rows, p, out=self.v_idx)
        if p + 1 > self.allowed:
            self.mask[self.allowed : p + 1] = 0.0
        elif p + 1 < self.allowed:
            self.mask[p + 1 : self.allowed] = -np.inf
        self.allowed = p + 1
        tensor_set = g.ggml().ggml_backend_tensor_set
        for tensor, address, nbytes in self._sets:
            tensor_set(tensor, address, 0, nbytes)


class SlidingRow:
    """A one-row decode graph's buffers for a sliding-window group's inputs, which the native
    hop (server/hop.c) fills as :class:`llmrpc.model.kv.SlidingCells` places the row: its K
    cell, V cells and mask row over the graph's attended cells, and a scratch copy of the cells
    to place the row in before the step is taken."""

    def __init__(self, inputs: AttnInputs, n_kv: int, size: int, v_rows: np.ndarray, mask_dtype: type) -> None:
        self.inputs, self.n_kv = inputs, n_kv
        self.k_idx = np.zeros(1, dtype=np.int64)
        self.v_rows = v_rows.reshape(-1)
        self.v_idx = self.v_rows.copy()
        self.mask: np.ndarray = np.full(n_kv, -np.inf, dtype=mask_dtype)
        self.scratch = np.zeros(size, dtype=np.int64)


@dataclass
class Graph:
    key: GraphKey
    ctx: int
    gf: int
    inputs: GraphInputs
    out: g.Tensor
    room: Room
    own_room: bool  # a kept graph's room is its own, freed with it
    out_shape: tuple[int, int]  # rows, columns of ``out``
    out_dtype: type  # of ``out``: float32 (hidden states, logits) or int32 (argmax)
    # per segment and KV group, the first V cell of each of the n_embd_v rows of the
    # transposed V cache (what the V indices are made from every time)
    v_rows: list[dict[str, np.ndarray]]
    row: RowInputs | None = None  # a one-row decode graph's inputs, kept and updated in place
    sliding: SlidingRow | None = None  # ... and its sliding-window group's, for the native hop

    @property
    def sched(self) -> int:
        return self.room.sched

    def free(self) -> None:
        self.free_graph()
        if self.own_room:
            self.room.free()

    def free_graph(self) -> None:
        """Free the graph itself; its room stays, for a graph that supersedes it."""
        g.ggml().ggml_free(self.ctx)


def shape(key: GraphKey) -> tuple[object, ...]:
    """A graph key without the attended cells: graphs of one shape differ only in those."""
    return tuple((serial, rows) for serial, rows, _ in key[0]), key[1], key[2]


class KeptGraphs:
    """Decode-sized graphs kept by key, least recently used first, at most :data:`KEPT_GRAPHS`."""

    def __init__(self) -> None:
        self._graphs: OrderedDict[GraphKey, Graph] = OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, key: GraphKey) -> Graph | None:
        return self._graphs.get(key)

    def use(self, key: GraphKey) -> Graph | None:
        """The kept graph of ``key``, now the most recently used."""
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
        return graph

    def put(self, graph: Graph) -> None:
        self._graphs[graph.key] = graph
        while len(self._graphs) > KEPT_GRAPHS:
            self._graphs.popitem(last=False)[1].free()

    def drop(self, graph: Graph) -> bool:
        """Free ``graph`` if it is kept; False if it is not."""
        if self._graphs.get(graph.key) is not graph:
            return False
        self._graphs.pop(graph.key).free()
        return True

    def room_of_superseded(self, key: GraphKey) -> Room | None:
        """The room of a kept graph that ``key``'s supersedes (the same sessions, rows and
        outputs, attending to another number of cells: a decoding session's attended cells grew
        past the pad), which is not used again unless a session rewinds; its graph is freed.
        A new room costs ~2.5 ms per rebuild (the arena's fresh pages above all)."""
        want = shape(key)
        for old_key in self._graphs:
            if shape(old_key) == want:
                old = self._graphs.pop(old_key)
                old.free_graph()
                return old.room
        return None

    def forget(self, serial: int) -> None:
        """Free the graphs that compute the rows of the cache ``serial`` (it is being freed)."""
        for key in [k for k in self._graphs if any(s == serial for s, _, _ in k[0])]:
            self._graphs.pop(key).free()

    def n_bytes(self, backends: list[int]) -> int:
        return sum(graph.room.n_bytes(backends) for graph in self._graphs.values())

    def clear(self) -> None:
        for graph in self._graphs.values():
            graph.free()
        self._graphs.clear()
