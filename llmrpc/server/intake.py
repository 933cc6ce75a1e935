"""Where a server's weights come from: a received slice, a file of its model directories, or
a slice pushed to it now (over gRPC or its upload port), within the cache's disk budget."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable

from llmrpc.model.arch import UnsupportedArchitectureError
from llmrpc.model.gguf_model import ModelInfo, read_model
from llmrpc.model.kv import CacheConfig, check_cache
from llmrpc.model.slicefile import IncomingSlice
from llmrpc.server.api import EngineError, ErrorCode
from llmrpc.server.receive import Chunk, TransferError
from llmrpc.server.store import CacheFullError, Reservation, WeightStore
from llmrpc.server.upload import UploadReceiver
from llmrpc.types import CachedSlice

logger = logging.getLogger(__name__)

# the one answer to a model path outside the model directories, missing, or unreadable
NOT_AVAILABLE = "that model is not available on this server (a path must name a file in its --model-dir)"


class SliceIntake:
    """The weights this server can load, and those it receives. ``memory_cap`` (0: none) also
    bounds one slice; uploads listen on ``data_host`` (over TLS with ``upload_tls``)."""

    def __init__(
        self, store: WeightStore | None, memory_cap: int, data_host: str, upload_tls: ssl.SSLContext | None
    ) -> None:
        self.store = store
        self.memory_cap = memory_cap
        self.data_host = data_host
        self.upload_tls = upload_tls
        self.bytes_received = 0

    def cached(self) -> list[CachedSlice]:
        return self.store.cached() if self.store else []

    def figures(self) -> tuple[int, int]:
        """The slice cache's bytes on disk and the most it may take."""
        if self.store is None:
            return 0, 0
        return self.store.disk_bytes(), self.store.max_bytes

    def locate(self, model_path: str, model_hash: str, start: int, end: int, digest: str = "") -> tuple[str, str]:
        """Where to load [start, end) from: (path, source); EngineError NOT_FOUND when the
        weights must be pushed. With a hash: the received slice of ``digest``, or a file of the
        model directories with that content (``model_path`` tried first). Without: ``model_path``,
        if it lies in a model directory; one error for every path that does not, so that
        nothing is told about the files outside them."""
        if self.store is None:
            raise EngineError(ErrorCode.NOT_FOUND, NOT_AVAILABLE)
        try:
            if model_hash:
                path = self.store.verified_slice(digest, model_hash, start, end) if digest else None
                if path:
                    return path, "cache"
                path = self.store.model_file(model_hash, model_path)
                if path:
                    return path, "model-dir"
            elif model_path:
                path = self.store.model_path(model_path)
                if path:
                    return path, "path"
        except ValueError as e:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, str(e)) from e
        raise EngineError(ErrorCode.NOT_FOUND, NOT_AVAILABLE)

    def push_slice(self, head: IncomingSlice, chunks: Iterable[Chunk]) -> int:
        store, reservation = self._reserve(head)
        try:
            with reservation:
                _, received = store.receive(reservation, self._counted(chunks))
        except TransferError as e:
            raise EngineError(ErrorCode.DATA_LOSS, f"slice [{head.layer_start}, {head.layer_end}) rejected: {e}") from e
        except ValueError as e:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, str(e)) from e
        return received

    def open_upload(self, head: IncomingSlice) -> tuple[int, bytes]:
        """Open the bulk path for one slice; returns (port, token)."""
        store, reservation = self._reserve(head)
        try:
            receiver = UploadReceiver(store, reservation, self.data_host, self._count, self.upload_tls)
        except OSError as e:
            reservation.release()
            raise EngineError(ErrorCode.RESOURCE_EXHAUSTED, f"cannot open an upload port: {e}") from e
        return receiver.port, receiver.token

    def use(self, path: str | None) -> None:
        """The slice at ``path`` is the one loaded (None: a file of the model directories)."""
        if self.store is not None:
            self.store.use(path)

    def _reserve(self, head: IncomingSlice) -> tuple[WeightStore, Reservation]:
        """Room for a slice whose header is sound, before anything of it is written or opened."""
        if self.store is None:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, "this server has no cache directory")
        what = f"slice [{head.layer_start}, {head.layer_end})"
        try:
            return self.store, self.store.reserve(head, self.memory_cap or (1 << 62))
        except CacheFullError as e:
            raise EngineError(ErrorCode.RESOURCE_EXHAUSTED, f"{what}: {e}") from e
        except TransferError as e:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"{what}: {e}") from e

    def _count(self, n: int) -> None:
        self.bytes_received += n

    def _counted(self, chunks: Iterable[Chunk]) -> Iterable[Chunk]:
        for chunk in chunks:
            self._count(len(chunk[2]))
            yield chunk


def checked_model(path: str, start: int, end: int, memory_cap: int, cache: CacheConfig) -> ModelInfo:
    """The model at ``path`` read, for layers [start, end) in at most ``memory_cap`` bytes (0:
    any) with KV caches of ``cache``'s types: refused before anything this server holds is let go."""
    try:
        info = read_model(path)
    except FileNotFoundError as e:
        raise EngineError(ErrorCode.NOT_FOUND, NOT_AVAILABLE) from e
    except UnsupportedArchitectureError as e:
        raise EngineError(ErrorCode.FAILED_PRECONDITION, f"{path}: {e}") from e
    except ValueError as e:
        raise EngineError(ErrorCode.INVALID_ARGUMENT, str(e)) from e
    n_layer = info.hparams.n_layer
    if info.slice_range is not None and info.slice_range != (start, end):
        raise EngineError(ErrorCode.FAILED_PRECONDITION, f"{path} holds layers {list(info.slice_range)} only")
    if not 0 <= start < end <= n_layer:
        raise EngineError(
            ErrorCode.OUT_OF_RANGE,
            f"layer range [{start}, {end}) is outside the model's {n_layer} layers "
            f"(a non-empty range within [0, {n_layer}))",
        )
    need = info.range_bytes(start, end)
    if memory_cap and need > memory_cap:
        raise EngineError(
            ErrorCode.RESOURCE_EXHAUSTED,
            f"layers [{start}, {end}) need {need} bytes; this server is capped at {memory_cap} (--mem)",
        )
    try:
        check_cache(info.hparams, cache)
    except ValueError as e:
        raise EngineError(ErrorCode.FAILED_PRECONDITION, f"{path}: {e}") from e
    return info
