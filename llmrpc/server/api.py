"""The boundary between the gRPC handler and the compute engine: errors and the interface.

The handler (transport) sees only this module; the engine (compute) implements it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np

from llmrpc.model.kv import CacheConfig
from llmrpc.model.slicefile import IncomingSlice
from llmrpc.server.native import NativeHop
from llmrpc.types import (
    CachedSlice,
    ClosedSession,
    DeviceInfo,
    LoadedRange,
    MemoryParts,
    OpenedSession,
    PrefixStart,
)


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    OUT_OF_RANGE = "out_of_range"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DATA_LOSS = "data_loss"
    INTERNAL = "internal"


class EngineError(Exception):
    """A request the engine refuses; ``code`` maps onto a gRPC status."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Launched:
    """A batch started on the device. :meth:`result` waits for it and reads its outputs (once);
    ``ready``: it has run already (the CPU computes as it starts), nothing would be waited for."""

    def __init__(self, collect: Callable[[], list[np.ndarray]], ready: bool) -> None:
        self._collect: Callable[[], list[np.ndarray]] | None = collect
        self._outs: list[np.ndarray] = []
        self.ready = ready

    def result(self) -> list[np.ndarray]:
        if self._collect is not None:
            collect, self._collect = self._collect, None
            self._outs = collect()
        return self._outs


class StageEngine(Protocol):
    device: DeviceInfo
    threads: int
    overlaps: bool  # launch_batch returns before the device is done (a GPU)

    def loaded(self) -> LoadedRange | None: ...
    def open_sessions(self) -> int: ...

    memory_cap: int

    @property
    def bytes_received(self) -> int: ...

    native_steps: int  # generation steps computed through the native hop (server/hop.c)

    def load(
        self,
        model_path: str,
        layer_start: int,
        layer_end: int,
        model_hash: str = "",
        cache: CacheConfig | None = None,
        digest: str = "",
    ) -> LoadedRange | None: ...
    def share_host(self, name: str) -> None: ...
    def takes_turns(self) -> bool: ...
    def open_upload(self, head: IncomingSlice) -> tuple[int, bytes]: ...
    def push_slice(self, head: IncomingSlice, chunks: Iterable[tuple[int, int, bytes, int]]) -> int: ...
    def memory_budget(self) -> int: ...
    def cached(self) -> list[CachedSlice]: ...
    def calibration_figures(self) -> tuple[float, float]: ...
    def open_session(self, n_ctx: int, prefix: PrefixStart | None = None) -> OpenedSession: ...
    def forward(self, session_id: str, start_pos: int, x: np.ndarray, all_logits: bool) -> np.ndarray: ...
    def forward_batch(
        self, items: list[tuple[str, int, np.ndarray]], all_logits: bool, top1: bool = False
    ) -> list[np.ndarray]: ...
    def launch_batch(
        self, items: list[tuple[str, int, np.ndarray]], all_logits: bool, top1: bool = False
    ) -> Launched: ...
    def close_session(self, session_id: str, keep: bool = False) -> ClosedSession: ...
    def memory_parts(self) -> MemoryParts: ...
    def prefix_figures(self) -> tuple[int, int, int]: ...
    def slice_cache_figures(self) -> tuple[int, int]: ...
    def session_ids(self) -> set[str]: ...
    def has_session(self, session_id: str) -> bool: ...
    def idle_sessions(self, seconds: float) -> list[str]: ...
    def native_hop(self, session_id: str) -> NativeHop | None: ...
    def max_input_elements(self) -> int: ...


def stage_outputs(loaded: LoadedRange | None, out: np.ndarray, top_k: int, f16: bool) -> list[np.ndarray]:
    """What a stage sends on for ``out``: hidden states (f16 on request), or from the last
    stage its logits (always f32): every one, or the ``top_k`` largest as [values, ids]."""
    if loaded is None or not loaded.last:
        return [out.astype(np.float16) if f16 else out]
    if top_k == 0 or top_k >= out.shape[1]:
        return [out]
    ids, values = top_k_logits(out, top_k)
    return [values, ids]


def top_k_logits(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits of each row, largest first (ties: the lower id first, as argmax)."""
    if k == 1:  # greedy decoding, every token: the plain argmax is the cheap path
        best = logits.argmax(axis=1)
        rows = np.arange(logits.shape[0])
        return best.astype(np.int32)[:, None], logits[rows, best][:, None]
    part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(logits, part, axis=1)), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    return ids.astype(np.int32), np.take_along_axis(logits, ids, axis=1)
