"""The boundary between the gRPC handler and the compute engine: errors and the interface.

The handler (transport) sees only this module; the engine (compute) implements it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from llmrpc.model.slicefile import IncomingSlice
from llmrpc.types import CachedSlice, DeviceInfo, LoadedRange


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


class StageEngine(Protocol):
    device: DeviceInfo
    threads: int

    def loaded(self) -> LoadedRange | None: ...
    def open_sessions(self) -> int: ...

    memory_cap: int
    bytes_received: int

    def load(self, model_path: str, layer_start: int, layer_end: int, model_hash: str = "") -> LoadedRange | None: ...
    def open_upload(self, head: IncomingSlice) -> tuple[int, bytes]: ...
    def push_slice(self, head: IncomingSlice, chunks: Iterable[tuple[int, int, bytes, int]]) -> int: ...
    def memory_budget(self) -> int: ...
    def cached(self) -> list[CachedSlice]: ...
    def calibration_figures(self) -> tuple[float, float]: ...
    def open_session(self, n_ctx: int) -> tuple[str, int, int]: ...
    def forward(self, session_id: str, start_pos: int, x: np.ndarray, all_logits: bool) -> np.ndarray: ...
    def close_session(self, session_id: str) -> None: ...
    def max_input_elements(self) -> int: ...
