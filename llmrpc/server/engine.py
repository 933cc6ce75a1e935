"""The compute engine of a server: one loaded layer range, its sessions, validated requests.

Every request is checked before it reaches ggml (which aborts the process on bad input),
and refused with an :class:`EngineError` that names the problem.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np

from llmrpc import trace
from llmrpc.ggml.device import Backend, release_free_memory
from llmrpc.ggml.lib import ggml
from llmrpc.model.arch import UnsupportedArchitectureError
from llmrpc.model.calibrate import Calibration, calibrate
from llmrpc.model.gguf_model import read_model
from llmrpc.model.kv import CacheConfig, check_cache, kv_bytes
from llmrpc.model.prefix import copy_cells, refusal, start_from
from llmrpc.model.slicefile import IncomingSlice
from llmrpc.model.stage import LayerStage, SessionCache
from llmrpc.server import cores
from llmrpc.server.api import EngineError, ErrorCode, Launched
from llmrpc.server.loop import ComputeLoop
from llmrpc.server.metrics import StepMeter
from llmrpc.server.native import Hop, NativeHop, hop_library
from llmrpc.server.prefix import Kept, KeptCaches
from llmrpc.server.receive import Chunk, TransferError
from llmrpc.server.store import CacheFullError, Reservation, WeightStore
from llmrpc.server.turns import HostTurn
from llmrpc.server.upload import UploadReceiver
from llmrpc.types import (
    CachedSlice,
    ClosedSession,
    DeviceInfo,
    LoadedRange,
    MemoryParts,
    OpenedSession,
    PrefixStart,
    kv_cells,
)

logger = logging.getLogger(__name__)

OVERLAP_ENV = "LLMRPC_OVERLAP"  # "0": wait for every batch as it starts; "1": never (also on the CPU, for tests)

SPARE_CACHES = 4  # closed sessions' KV caches kept for reuse

MAX_BATCH = 8192  # rows per Forward
# the one answer to a model path outside the model directories, missing, or unreadable
NOT_AVAILABLE = "that model is not available on this server (a path must name a file in its --model-dir)"
T = TypeVar("T")


class Engine:
    def __init__(
        self,
        device: DeviceInfo,
        threads: int,
        max_sessions: int = 64,
        max_ctx: int = 32768,
        *,
        memory_cap: int = 0,
        store: WeightStore | None = None,
        data_host: str = "127.0.0.1",
        host_lock: str | None = None,
        calibrate_device: bool = True,
        loop: ComputeLoop | None = None,
        release_threads: bool = False,
        upload_tls: ssl.SSLContext | None = None,
        prefix_cache: int | None = None,
    ) -> None:
        """``prefix_cache``: the most bytes of closed sessions' caches kept as prefixes (None: the
        --mem cap, or a quarter of the device's free memory without one; 0: none kept)."""
        self.device = device
        self.memory_cap = memory_cap
        self.store = store
        self.data_host = data_host
        self.upload_tls = upload_tls  # weight uploads over TLS
        # Servers that share a machine's cores take turns computing: several OpenMP teams
        # at once on the same cores thrash at every barrier (4 streams through 3 servers on
        # 2 cores fell to 5 tok/s; one at a time keeps the cores busy with one team).
        self._turn = HostTurn(host_lock) if host_lock else None
        # ... and let their compute threads go after each batch: an idle stage whose threads
        # spin (as OpenMP's do for ~3 ms) takes a core from the stage that computes now.
        self.release_threads = release_threads
        self.bytes_received = 0
        self.native_steps = 0
        self.meter = StepMeter()  # every step's rows, time and bytes (llmrpc-server --metrics-port)
        self.threads = threads
        self.max_sessions = max_sessions
        self.max_ctx = max_ctx
        self._stage: LayerStage | None = None
        self._range: LoadedRange | None = None
        # what the loaded range was asked as: ((kind, key), start, end, flash attention, K type, V type)
        self._loaded_from: tuple[object, ...] | None = None
        self._sessions: dict[str, tuple[SessionCache, list[int]]] = {}  # id -> (cache, [length])
        self._used: dict[str, float] = {}  # id -> when it was opened or last computed (monotonic)
        self._inflight: Launched | None = None  # a batch started on the device, not waited for yet
        # the data plane works while the device computes (a GPU; the CPU computes as it starts)
        self.overlaps = {"1": True, "0": False}.get(os.environ.get(OVERLAP_ENV, ""), device.kind != "cpu")
        # Caches of closed sessions, kept for the next sessions of the same size (oldest first):
        # a new session then takes one (cleared) instead of allocating device memory, and the
        # graphs built for that cache (prefill, decode) are reused. They count as held, and are
        # freed before any new cache is allocated, when there are too many, or when the layers
        # change: the memory held never exceeds what open sessions held at their peak.
        self._spare: list[SessionCache] = []
        # Every ggml call and every change of state runs on the loop's one thread (see
        # loop.py): no locks, and the data plane computes without a hand-off.
        self.loop = loop or ComputeLoop()
        self._backend = self.loop.call(lambda: Backend(device, threads, share_cores=release_threads))
        if release_threads:  # released workers wake as soon as the loop has work
            self.loop.on_wake = self._backend.wake_threads
        self.calibration = (
            self.loop.call(lambda: calibrate(self._backend)) if calibrate_device else Calibration(0.0, 0.0)
        )
        self._held = 0  # bytes of weights and caches this engine holds on the device
        if prefix_cache is None:
            prefix_cache = memory_cap or device.memory_free // 4
        # Closed sessions' caches the head asked to keep as prefixes. They count as held, and are
        # freed (least recently used first) when a new session needs their memory.
        self._kept = KeptCaches(prefix_cache)

    # -- state --------------------------------------------------------------------------
    def loaded(self) -> LoadedRange | None:
        return self._range

    def open_sessions(self) -> int:
        return len(self._sessions)

    def memory_used(self) -> int:
        """Bytes of weights and KV caches this server holds on its device."""
        return self._held

    def max_input_elements(self) -> int:
        n_embd = self._range.n_embd if self._range else 1
        return MAX_BATCH * max(n_embd, 1)

    def memory_budget(self) -> int:
        """What a plan may use here: the --mem cap, or the device's free memory plus what
        this server holds now (a new plan replaces it)."""
        if self.memory_cap:
            return self.memory_cap
        return self.device_free() + self._held

    def device_free(self) -> int:
        from llmrpc.ggml.device import find_device

        return find_device(self.device.name).memory_free

    def calibration_figures(self) -> tuple[float, float]:
        return self.calibration.bandwidth, self.calibration.matmul_flops

    def cached(self) -> list[CachedSlice]:
        return self.store.cached() if self.store else []

    # -- load ---------------------------------------------------------------------------
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

    def _count(self, n: int) -> None:
        self.bytes_received += n

    def _counted(self, chunks: Iterable[Chunk]) -> Iterable[Chunk]:
        for chunk in chunks:
            self._count(len(chunk[2]))
            yield chunk

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

    def slice_cache_figures(self) -> tuple[int, int]:
        """The slice cache's bytes on disk and the most it may take."""
        if self.store is None:
            return 0, 0
        return self.store.disk_bytes(), self.store.max_bytes

    def takes_turns(self) -> bool:
        """Whether this server takes turns with others on its machine's cores."""
        return self._turn is not None

    def share_host(self, name: str) -> None:
        """Take turns with the other servers on this machine's cores that got ``name`` (their
        head saw them on one machine): hold the machine's lock of that name while computing, and
        let the compute threads go after each batch. Once on, it stays on; a new name (a new
        plan: each takes turns under a lock of its own) replaces the lock."""
        if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"share_host {name!r}: letters, digits, - and _ only")
        if self.device.kind != "cpu":
            return
        path = os.path.join(tempfile.gettempdir(), f"{name}.lock")
        if self._turn is not None and self._turn.path != path:  # a new plan's lock: the old one's
            self._turn.call_off()  # holder may be stopped mid-turn, and the loop waiting for it

        def share() -> None:
            if self._turn is None or self._turn.path != path:
                old, self._turn = self._turn, HostTurn(path)
                if old is not None:
                    old.close()
            if not self.release_threads:
                self._backend.share_cores()
                self.release_threads = True
                self.loop.on_wake = self._backend.wake_threads
            logger.info("taking turns on this machine's cores with the servers told %r", name)

        self.loop.call(share)

    def load(
        self, model_path: str, layer_start: int, layer_end: int, model_hash: str = "", cache: CacheConfig | None = None,
        digest: str = "",
    ) -> LoadedRange | None:  # fmt: skip
        """Load a range; None when this server has no copy of the weights (push them). With a
        model hash, ``digest`` names the received slice that may be loaded (slicefile.py)."""
        if not model_path and not model_hash:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "neither a model path nor a model hash was given")
        cache = (cache or CacheConfig()).resolved()
        current = self._range
        settings = (layer_start, layer_end, cache.flash_attn, cache.type_k, cache.type_v)
        if current and self._loaded_from is not None and self._loaded_from[1:] == settings and (
            self._loaded_from[0] in ((("model", model_hash), ("slice", digest)) if model_hash else (("path", model_path),))
        ):  # fmt: skip
            return current
        try:
            path, source = self.locate(model_path, model_hash, layer_start, layer_end, digest)
        except EngineError as e:
            if model_hash and e.code is ErrorCode.NOT_FOUND:
                return None
            raise
        try:
            info = read_model(path)
        except FileNotFoundError as e:
            raise EngineError(ErrorCode.NOT_FOUND, NOT_AVAILABLE) from e
        except UnsupportedArchitectureError as e:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, f"{path}: {e}") from e
        except ValueError as e:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, str(e)) from e
        n_layer = info.hparams.n_layer
        if info.slice_range is not None and info.slice_range != (layer_start, layer_end):
            raise EngineError(ErrorCode.FAILED_PRECONDITION, f"{path} holds layers {list(info.slice_range)} only")
        if not 0 <= layer_start < layer_end <= n_layer:
            raise EngineError(
                ErrorCode.OUT_OF_RANGE,
                f"layer range [{layer_start}, {layer_end}) is outside the model's {n_layer} layers "
                f"(a non-empty range within [0, {n_layer}))",
            )
        need = info.range_bytes(layer_start, layer_end)
        if self.memory_cap and need > self.memory_cap:
            raise EngineError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"layers [{layer_start}, {layer_end}) need {need} bytes; "
                f"this server is capped at {self.memory_cap} (--mem)",
            )
        try:  # refused before what this server holds is let go
            check_cache(info.hparams, cache)
        except ValueError as e:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, f"{path}: {e}") from e

        def swap() -> LoadedRange:
            self._settle()
            self._unload()
            if self.store is not None:
                self.store.use(path if source == "cache" else None)
            try:
                with cores.any_core():  # copying and repacking weights: single-threaded work
                    self._stage = LayerStage(info, layer_start, layer_end, self._backend, cache=cache)
            except MemoryError as e:
                raise EngineError(ErrorCode.RESOURCE_EXHAUSTED, str(e)) from e
            except ValueError as e:  # the GGUF lacks a tensor its family needs, or the cache does not fit its rows
                raise EngineError(ErrorCode.FAILED_PRECONDITION, f"{path}: {e}") from e
            hp = info.hparams
            self._held = self._stage.weight_bytes
            self._range = LoadedRange(
                path, hp.arch, layer_start, layer_end, n_layer, hp.n_embd, hp.n_vocab, self._stage.weight_bytes,
                model_hash=model_hash, source=source, flash_attn=bool(cache.flash_attn), cache_type_k=cache.type_k,
                cache_type_v=cache.type_v,
            )  # fmt: skip
            kind = {"cache": ("slice", digest), "model-dir": ("model", model_hash)}.get(source, ("path", model_path))
            self._loaded_from = (kind, *settings)
            return self._range

        return self.loop.call(swap)

    def _unload(self) -> None:
        self._settle()
        for cache in [c for c, _ in self._sessions.values()] + self._spare + [k.cache for k in self._kept.clear()]:
            if self._stage is not None:
                self._stage.forget(cache)
            cache.free()
        self._sessions.clear()
        self._used.clear()
        self._spare.clear()
        self._held = 0
        if self._stage is not None:
            self._stage.close()
        self._stage, self._range, self._loaded_from = None, None, None
        release_free_memory()

    # -- sessions -----------------------------------------------------------------------
    def open_session(self, n_ctx: int, prefix: PrefixStart | None = None) -> OpenedSession:
        """A new session; with ``prefix``, holding the first rows of another session's cache."""
        return self.loop.call(lambda: self._open_session(n_ctx, prefix))

    def _open_session(self, n_ctx: int, prefix: PrefixStart | None) -> OpenedSession:
        self._settle()
        stage = self._require_stage()
        limit = min(self.max_ctx, stage.hp.n_ctx_train)
        if not 1 <= n_ctx <= limit:
            raise EngineError(ErrorCode.OUT_OF_RANGE, f"n_ctx {n_ctx} must be within 1..{limit}")
        if len(self._sessions) >= self.max_sessions:
            raise EngineError(ErrorCode.RESOURCE_EXHAUSTED, f"{self.max_sessions} sessions are open; close one first")
        evicted: list[str] = []
        rows = 0
        if prefix is None:
            cache = self._new_cache(stage, n_ctx, evicted)
        elif prefix.take:
            cache, rows = self._adopt(prefix, kv_cells(n_ctx)), prefix.rows
        else:
            source = self._prefix_source(prefix, kv_cells(n_ctx))
            cache = self._new_cache(stage, n_ctx, evicted, protect=prefix.session_id)
            copy_cells(source, cache)
            start_from(cache, prefix.rows)
            rows = prefix.rows
        session_id = uuid.uuid4().hex
        self._sessions[session_id] = (cache, [rows])
        self._used[session_id] = time.monotonic()
        logger.debug("session %s opened: n_ctx %d, %d bytes, %d positions reused", session_id, n_ctx, cache.n_bytes,
                     rows)  # fmt: skip
        return OpenedSession(session_id, n_ctx, cache.n_bytes, tuple(evicted))

    def _new_cache(self, stage: LayerStage, n_ctx: int, evicted: list[str], protect: str = "") -> SessionCache:
        """An empty cache: a spare of its size, else new memory, freeing spares and then kept
        prefixes (least recently used first, all but ``protect``; their ids go to ``evicted``)
        when the --mem cap or the device asks for it."""
        cache = self._reuse_spare(stage, kv_cells(n_ctx))
        if cache is not None:
            return cache
        # Give the spares back before taking more memory, so that idle caches never add to what
        # the open sessions hold (on a CPU, where allocations do not fail but the machine swaps,
        # this matters most).
        while self._spare:
            self._free_spare(stage)
        want = kv_bytes(stage.hp, stage.start, stage.end, n_ctx, stage.cache)
        while True:
            if not self.memory_cap or self._held + want <= self.memory_cap:
                try:
                    cache = stage.new_cache(n_ctx)
                except MemoryError as e:
                    if not self._evict_one(stage, evicted, protect):
                        raise EngineError(ErrorCode.RESOURCE_EXHAUSTED, f"{e} ({want} bytes)") from e
                    continue
                self._held += cache.n_bytes
                return cache
            if not self._evict_one(stage, evicted, protect):
                raise EngineError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"a KV cache of {want} bytes would take this server past its --mem cap of {self.memory_cap}",
                )

    def _evict_one(self, stage: LayerStage, evicted: list[str], protect: str) -> bool:
        """Free the least recently used kept prefix other than ``protect``; False when none is."""
        oldest = self._kept.pop_oldest()
        if oldest is not None and oldest[0] == protect:
            again = self._kept.pop_oldest()
            self._kept.put(*oldest)  # (it was within the budget: nothing leaves with it)
            oldest = again
        if oldest is None:
            return False
        evicted.append(oldest[0])
        self._free_cache(stage, oldest[1].cache)
        return True

    def _prefix_source(self, prefix: PrefixStart, kv_size: int) -> SessionCache:
        """The cache a new session copies its first rows from, checked."""
        live = self._sessions.get(prefix.session_id)
        if live is not None:
            cache, length = live[0], live[1][0]
        else:
            kept = self._kept.get(prefix.session_id)
            if kept is None:
                raise EngineError(
                    ErrorCode.NOT_FOUND, f"no open session or kept prefix {prefix.session_id!r} (freed, or never kept)"
                )
            cache, length = kept.cache, kept.length
        if not 1 <= prefix.rows <= length:
            raise EngineError(
                ErrorCode.OUT_OF_RANGE, f"prefix of {prefix.rows} positions: {prefix.session_id!r} holds {length}"
            )
        why = refusal(cache, prefix.rows, kv_size)
        if why:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, f"cannot start from {prefix.session_id!r}: {why}")
        return cache

    def _adopt(self, prefix: PrefixStart, kv_size: int) -> SessionCache:
        """A kept cache taken over by a new session, holding its first ``prefix.rows`` positions."""
        if prefix.session_id in self._sessions:
            raise EngineError(
                ErrorCode.FAILED_PRECONDITION, f"{prefix.session_id!r} is open: its cache can be copied, not taken"
            )
        self._prefix_source(prefix, kv_size)
        kept = self._kept.take(prefix.session_id)
        assert kept is not None
        start_from(kept.cache, prefix.rows)
        return kept.cache

    def close_session(self, session_id: str, keep: bool = False) -> ClosedSession:
        """Close an open session (``keep``: its cache kept as a prefix under its id, within the
        prefix budget), or free a kept prefix."""

        def close() -> ClosedSession:
            self._settle()
            stage = self._require_stage()
            entry = self._sessions.pop(session_id, None)
            if entry is None:
                kept = self._kept.take(session_id)
                if kept is None:
                    raise EngineError(ErrorCode.NOT_FOUND, f"unknown session {session_id!r}")
                self._to_spare(stage, kept.cache)
                return ClosedSession(False)
            self._used.pop(session_id, None)
            trace.flush()  # a session's steps are on disk once it ends, whatever ends the server
            over = (
                self._kept.put(session_id, Kept(entry[0], entry[1][0])) if keep else [(session_id, Kept(entry[0], 0))]
            )
            for _, kept in over:
                self._to_spare(stage, kept.cache)
            return ClosedSession(session_id in self._kept, tuple(sid for sid, _ in over if sid != session_id))

        return self.loop.call(close)

    def memory_parts(self) -> MemoryParts:
        """What this server's memory holds, by part (read from any thread: copies, no locks)."""
        stage = self._stage
        sessions = list(self._sessions.values())
        return MemoryParts(
            weights=stage.weight_bytes if stage else 0,
            sessions=sum(cache.n_bytes for cache, _ in sessions),
            spare=sum(cache.n_bytes for cache in list(self._spare)),
            prefixes=self._kept.bytes,
            graphs=stage.graph_bytes if stage else 0,
        )

    def prefix_figures(self) -> tuple[int, int, int]:
        """Kept prefixes: how many, their bytes, and the most bytes they may take."""
        return len(self._kept), self._kept.bytes, self._kept.budget

    def _to_spare(self, stage: LayerStage, cache: SessionCache) -> None:
        self._spare.append(cache)
        while len(self._spare) > SPARE_CACHES:
            self._free_spare(stage)

    def session_ids(self) -> set[str]:
        return set(self._sessions)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def idle_sessions(self, seconds: float) -> list[str]:
        """The sessions nothing has computed in for ``seconds`` (nor opened)."""
        since = time.monotonic() - seconds
        return [sid for sid, used in self._used.items() if used < since]

    def _reuse_spare(self, stage: LayerStage, kv_size: int) -> SessionCache | None:
        """The newest spare cache of ``kv_size`` cells, cleared, if there is one."""
        for i in range(len(self._spare) - 1, -1, -1):
            if self._spare[i].kv_size == kv_size:
                cache = self._spare.pop(i)
                stage.clear_cache(cache)
                return cache
        return None

    def _free_spare(self, stage: LayerStage) -> None:
        self._free_cache(stage, self._spare.pop(0))

    def _free_cache(self, stage: LayerStage, cache: SessionCache) -> None:
        stage.forget(cache)
        cache.free()
        self._held -= cache.n_bytes

    # -- forward ------------------------------------------------------------------------
    def forward(self, session_id: str, start_pos: int, x: np.ndarray, all_logits: bool) -> np.ndarray:
        """Run a batch through the loaded layers (on the compute loop; inline when called there)."""
        return self.forward_batch([(session_id, start_pos, x)], all_logits)[0]

    def forward_batch(
        self, items: list[tuple[str, int, np.ndarray]], all_logits: bool, top1: bool = False
    ) -> list[np.ndarray]:
        """Several sessions' rows in one graph. Every item is checked before any is computed,
        so a refused batch leaves every session as it was. ``top1`` (the last layers): each
        session's greedy token id, I32 [1], instead of its logits."""
        return self.loop.call(lambda: self._launch(items, all_logits, top1).result())

    def launch_batch(self, items: list[tuple[str, int, np.ndarray]], all_logits: bool, top1: bool = False) -> Launched:
        """:meth:`forward_batch` started, for the compute loop's own thread: on a GPU the caller
        goes on (sends the last token's report, reads sockets) while the device computes, then
        takes the outputs from :meth:`Launched.result`. Whatever the engine does next on its
        layers waits for this batch first."""
        assert self.loop.on_loop(), "launch_batch runs on the compute loop"
        return self._launch(items, all_logits, top1)

    def native_hop(self, session_id: str) -> NativeHop | None:
        """The session's next decode step, set up for the native hop (server/hop.c): its kept
        one-row graph and inputs (on the last layers, the greedy token's), this host's lock and
        the parked team. None where the step must go through :meth:`launch_batch`: a GPU (its
        steps overlap), no native hop here, or no graph built for the session's next position
        yet (the step that builds it goes through Python)."""
        stage, entry = self._stage, self._sessions.get(session_id)
        if self.overlaps or stage is None or entry is None:
            return None
        lib = hop_library()
        team = self._backend.parked_team()
        if lib is None or (self.release_threads and team is None):
            return None
        cache, length = entry
        row = stage.row_graph(cache, length[0])
        if row is None:
            return None
        self._settle()
        lib_ggml, hp = ggml(), stage.hp
        turn = self._turn
        h = Hop(lock_fd=turn.fileno() if turn else -1, first=int(stage.first))
        h.n_embd, h.n_vocab, h.n_embd_kv = hp.n_embd, hp.n_vocab, len(row.row.v_rows)
        h.mask_f16 = int(row.row.mask.dtype == np.float16)
        h.length, h.limit, h.n_kv, h.allowed = length[0], min(row.n_kv, self.max_ctx), row.n_kv, row.row.allowed
        for name in ("pos_buf", "k_buf", "v_rows", "v_buf", "mask_buf", "sched", "gf", "out", "inp_x", "inp_pos",
                     "inp_k", "inp_v", "inp_mask"):  # fmt: skip
            setattr(h, name, getattr(row, name))
        h.has_full = int(row.has_full)
        for name, value in row.swa.items():  # a sliding-window group's cells and inputs
            setattr(h, name, value)
        if self.release_threads and team is not None:
            h.team_state, h.sem, h.n_threads, h.sem_wait_fn, h.gomp_start, h.gomp_end = team.native_fields()
        for field, fn in (
            ("tensor_set", lib_ggml.ggml_backend_tensor_set), ("tensor_get", lib_ggml.ggml_backend_tensor_get),
            ("compute", lib_ggml.ggml_backend_sched_graph_compute_async),
            ("synchronize", lib_ggml.ggml_backend_sched_synchronize),
        ):  # fmt: skip
            setattr(h, field, ctypes.cast(fn, ctypes.c_void_p).value)

        def valid() -> bool:
            return (
                self._stage is stage and self._sessions.get(session_id) is entry and stage.holds(row.graph)
                and self._turn is turn
            )  # fmt: skip

        def done(h: Hop) -> None:
            length[0], row.row.allowed = int(h.length), int(h.allowed)
            self.native_steps += 1
            width = 4 * hp.n_embd  # F32 hidden states in and out; an I32 token at either end
            self.meter.step("native", 1, native.seconds, 4 if stage.first else width, 4 if stage.last else width)
            self._used[session_id] = time.monotonic()

        native = NativeHop(lib, h, valid, done, row)
        return native

    def _settle(self) -> None:
        """Wait for the batch in flight, if any (its outputs stay with its Launched)."""
        if self._inflight is not None:
            launched, self._inflight = self._inflight, None
            launched.result()

    def _launch(self, items: list[tuple[str, int, np.ndarray]], all_logits: bool, top1: bool) -> Launched:
        self._settle()
        started = time.perf_counter()
        stage = self._require_stage()
        if not items:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "an empty batch")
        if len({sid for sid, _, _ in items}) != len(items):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "a batch holds each session at most once")
        work = []
        for session_id, start_pos, x in items:
            entry = self._sessions.get(session_id)
            if entry is None:
                raise EngineError(ErrorCode.NOT_FOUND, f"unknown session {session_id!r}")
            cache, length = entry
            n = self._check_input(stage, x)
            if start_pos < 0:  # (ggml would abort the process on the KV cell it names)
                raise EngineError(ErrorCode.INVALID_ARGUMENT, f"start_pos {start_pos} is negative")
            if start_pos > length[0]:
                raise EngineError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"start_pos {start_pos} leaves a gap: the session holds {length[0]} positions",
                )
            if start_pos + n > cache.kv_size or start_pos + n > self.max_ctx:
                raise EngineError(
                    ErrorCode.OUT_OF_RANGE,
                    f"positions {start_pos}..{start_pos + n - 1} are beyond the session's context of "
                    f"{min(cache.kv_size, self.max_ctx)}",
                )
            work.append((cache, x, start_pos))
        if sum(int(x.shape[0]) for _, _, x in items) > MAX_BATCH:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"a batch of more than {MAX_BATCH} rows")
        if self.release_threads:
            self._backend.claim_threads()
        collect = self._locked(lambda: stage.launch(work, all_logits, top1))
        # Release before the output leaves: released after the send instead, our threads met the
        # next stage's on the same cores (3 servers on 2 cores: 17 -> 28 ms per token).
        if self.release_threads:
            self._backend.release_threads()
        now = time.monotonic()
        for session_id, start_pos, x in items:
            self._sessions[session_id][1][0] = start_pos + int(x.shape[0])
            self._used[session_id] = now
        rows, bytes_in = sum(int(x.shape[0]) for _, _, x in items), sum(int(x.nbytes) for _, _, x in items)
        self._inflight = Launched(self.meter.timed(collect, started, rows, bytes_in), ready=not self.overlaps)
        return self._inflight

    def _check_input(self, stage: LayerStage, x: np.ndarray) -> int:
        hp = stage.hp
        if stage.first:
            if x.ndim != 1 or x.dtype != np.int32:
                raise EngineError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"the first stage takes token ids as I32 [n]; got {x.dtype} {list(x.shape)}",
                )
            bad = (x < 0) | (x >= hp.n_vocab)
            if bad.any():
                raise EngineError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"token id {int(x[bad][0])} is outside the vocabulary of {hp.n_vocab}",
                )
        else:
            if x.ndim != 2 or x.shape[1] != hp.n_embd or x.dtype not in (np.float32, np.float16):
                raise EngineError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"layers [{stage.start}, {stage.end}) take hidden states as F32/F16 [n, {hp.n_embd}]; "
                    f"got {x.dtype} {list(x.shape)}",
                )
            if not np.isfinite(x).all():
                raise EngineError(ErrorCode.INVALID_ARGUMENT, "hidden states contain NaN or infinity")
        n = int(x.shape[0])
        if not 1 <= n <= MAX_BATCH:
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"batch of {n} rows; 1..{MAX_BATCH} allowed")
        return n

    def _require_stage(self) -> LayerStage:
        if self._stage is None:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, "no layers are loaded on this server; call Load first")
        return self._stage

    def close(self) -> None:
        self.loop.call(self._unload)
        self.loop.call(self._backend.close)
        self.loop.stop()

    def _locked(self, fn: Callable[[], T]) -> T:
        turn = self._turn
        if turn is None:
            return fn()
        turn.acquire()  # (False: the wait was called off, a new plan's lock on its way)
        try:
            return fn()
        finally:
            turn.release()
