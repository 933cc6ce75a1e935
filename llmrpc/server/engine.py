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
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np

from llmrpc import trace
from llmrpc.ggml.device import Backend, release_free_memory
from llmrpc.ggml.lib import ggml
from llmrpc.model.calibrate import Calibration, calibrate
from llmrpc.model.hparams import HParams
from llmrpc.model.kv import CacheConfig
from llmrpc.model.slicefile import IncomingSlice
from llmrpc.model.stage import LayerStage, RowGraph
from llmrpc.server import cores
from llmrpc.server.api import EngineError, ErrorCode, Launched
from llmrpc.server.caches import Session, SessionCaches
from llmrpc.server.intake import SliceIntake, checked_model
from llmrpc.server.loop import ComputeLoop
from llmrpc.server.metrics import StepMeter
from llmrpc.server.native import Hop, NativeHop, hop_library
from llmrpc.server.receive import Chunk
from llmrpc.server.store import WeightStore
from llmrpc.server.turns import HostTurn
from llmrpc.types import CachedSlice, ClosedSession, DeviceInfo, LoadedRange, MemoryParts, OpenedSession, PrefixStart

logger = logging.getLogger(__name__)

OVERLAP_ENV = "LLMRPC_OVERLAP"  # "0": wait for every batch as it starts; "1": never (also on the CPU, for tests)

MAX_BATCH = 8192  # rows per Forward
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
        self.intake = SliceIntake(store, memory_cap, data_host, upload_tls)
        # Servers that share a machine's cores take turns computing: several OpenMP teams
        # at once on the same cores thrash at every barrier (4 streams through 3 servers on
        # 2 cores fell to 5 tok/s; one at a time keeps the cores busy with one team).
        self._turn = HostTurn(host_lock) if host_lock else None
        # ... and let their compute threads go after each batch: an idle stage whose threads
        # spin (as OpenMP's do for ~3 ms) takes a core from the stage that computes now.
        self.release_threads = release_threads
        self.native_steps = 0
        self.meter = StepMeter()  # every step's rows, time and bytes (llmrpc-server --metrics-port)
        self.threads = threads
        self.max_sessions = max_sessions
        self.max_ctx = max_ctx
        self._stage: LayerStage | None = None
        self._range: LoadedRange | None = None
        # what the loaded range was asked as: ((kind, key), start, end, flash attention, K type, V type)
        self._loaded_from: tuple[object, ...] | None = None
        # Closed sessions' caches the head asks to keep as prefixes take at most this many bytes.
        self._prefix_budget = (memory_cap or device.memory_free // 4) if prefix_cache is None else prefix_cache
        self._caches: SessionCaches | None = None  # the loaded layers' sessions, spares and prefixes
        self._inflight: Launched | None = None  # a batch started on the device, not waited for yet
        # the data plane works while the device computes (a GPU; the CPU computes as it starts)
        self.overlaps = {"1": True, "0": False}.get(os.environ.get(OVERLAP_ENV, ""), device.kind != "cpu")
        # Every ggml call and every change of state runs on the loop's one thread (see
        # loop.py): no locks, and the data plane computes without a hand-off.
        self.loop = loop or ComputeLoop()
        self._backend = self.loop.call(lambda: Backend(device, threads, share_cores=release_threads))
        if release_threads:  # released workers wake as soon as the loop has work
            self.loop.on_wake = self._backend.wake_threads
        self.calibration = (
            self.loop.call(lambda: calibrate(self._backend)) if calibrate_device else Calibration(0.0, 0.0)
        )

    # -- state --------------------------------------------------------------------------
    def loaded(self) -> LoadedRange | None:
        return self._range

    def open_sessions(self) -> int:
        caches = self._caches
        return len(caches.sessions) if caches else 0

    def memory_used(self) -> int:
        """Bytes of weights and KV caches this server holds on its device."""
        stage, caches = self._stage, self._caches
        return (stage.weight_bytes if stage else 0) + (caches.n_bytes if caches else 0)

    def max_input_elements(self) -> int:
        n_embd = self._range.n_embd if self._range else 1
        return MAX_BATCH * max(n_embd, 1)

    def memory_budget(self) -> int:
        """What a plan may use here: the --mem cap, or the device's free memory plus what
        this server holds now (a new plan replaces it)."""
        if self.memory_cap:
            return self.memory_cap
        return self.device_free() + self.memory_used()

    def device_free(self) -> int:
        from llmrpc.ggml.device import find_device

        return find_device(self.device.name).memory_free

    def calibration_figures(self) -> tuple[float, float]:
        return self.calibration.bandwidth, self.calibration.matmul_flops

    def memory_parts(self) -> MemoryParts:
        """What this server's memory holds, by part (read from any thread: copies, no locks)."""
        stage, caches = self._stage, self._caches
        if stage is None or caches is None:
            return MemoryParts(weights=0, sessions=0, spare=0, prefixes=0, graphs=0)
        return MemoryParts(
            weights=stage.weight_bytes,
            sessions=sum(s.cache.n_bytes for s in list(caches.sessions.values())),
            spare=sum(cache.n_bytes for cache in list(caches.spare)),
            prefixes=caches.kept.bytes,
            graphs=stage.graph_bytes,
        )

    def prefix_figures(self) -> tuple[int, int, int]:
        """Kept prefixes: how many, their bytes, and the most bytes they may take."""
        caches = self._caches
        return (len(caches.kept), caches.kept.bytes, self._prefix_budget) if caches else (0, 0, self._prefix_budget)

    # -- weights ------------------------------------------------------------------------
    @property
    def bytes_received(self) -> int:
        return self.intake.bytes_received

    def cached(self) -> list[CachedSlice]:
        return self.intake.cached()

    def locate(self, model_path: str, model_hash: str, start: int, end: int, digest: str = "") -> tuple[str, str]:
        return self.intake.locate(model_path, model_hash, start, end, digest)

    def push_slice(self, head: IncomingSlice, chunks: Iterable[Chunk]) -> int:
        return self.intake.push_slice(head, chunks)

    def open_upload(self, head: IncomingSlice) -> tuple[int, bytes]:
        """Open the bulk path for one slice; returns (port, token)."""
        return self.intake.open_upload(head)

    def slice_cache_figures(self) -> tuple[int, int]:
        """The slice cache's bytes on disk and the most it may take."""
        return self.intake.figures()

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
        info = checked_model(path, layer_start, layer_end, self.memory_cap, cache)
        n_layer = info.hparams.n_layer

        def swap() -> LoadedRange:
            self._settle()
            self._unload()
            self.intake.use(path if source == "cache" else None)
            try:
                with cores.any_core():  # copying and repacking weights: single-threaded work
                    self._stage = LayerStage(info, layer_start, layer_end, self._backend, cache=cache)
            except MemoryError as e:
                raise EngineError(ErrorCode.RESOURCE_EXHAUSTED, str(e)) from e
            except ValueError as e:  # the GGUF lacks a tensor its family needs, or the cache does not fit its rows
                raise EngineError(ErrorCode.FAILED_PRECONDITION, f"{path}: {e}") from e
            hp = info.hparams
            self._caches = SessionCaches(
                self._stage, self.memory_cap, self._prefix_budget, self.max_sessions, self.max_ctx
            )
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
        if self._caches is not None:
            self._caches.free_all()
        if self._stage is not None:
            self._stage.close()
        self._stage, self._caches, self._range, self._loaded_from = None, None, None, None
        release_free_memory()

    # -- sessions -----------------------------------------------------------------------
    def open_session(self, n_ctx: int, prefix: PrefixStart | None = None) -> OpenedSession:
        """A new session; with ``prefix``, holding the first rows of another session's cache."""

        def open_() -> OpenedSession:
            self._settle()
            return self._require_caches().open(n_ctx, prefix)

        return self.loop.call(open_)

    def close_session(self, session_id: str, keep: bool = False) -> ClosedSession:
        """Close an open session (``keep``: its cache kept as a prefix under its id, within the
        prefix budget), or free a kept prefix."""

        def close() -> ClosedSession:
            self._settle()
            closed = self._require_caches().close(session_id, keep)
            trace.flush()  # a session's steps are on disk once it ends, whatever ends the server
            return closed

        return self.loop.call(close)

    def session_ids(self) -> set[str]:
        caches = self._caches
        return set(caches.sessions) if caches else set()

    def has_session(self, session_id: str) -> bool:
        caches = self._caches
        return caches is not None and session_id in caches.sessions

    def idle_sessions(self, seconds: float) -> list[str]:
        """The sessions nothing has computed in for ``seconds`` (nor opened)."""
        caches = self._caches
        return caches.idle(seconds) if caches else []

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
        stage, caches = self._stage, self._caches
        if self.overlaps or stage is None or caches is None:
            return None
        session = caches.sessions.get(session_id)
        if session is None:
            return None
        lib = hop_library()
        team = self._backend.parked_team()
        if lib is None or (self.release_threads and team is None and self.threads > 1):  # (one thread: no team)
            return None
        row = stage.row_graph(session.cache, session.length)
        if row is None:
            return None
        self._settle()
        turn = self._turn
        h = Hop(lock_fd=turn.fileno() if turn else -1, first=int(stage.first))
        fill_hop(h, row, stage.hp, session.length, min(row.n_kv, self.max_ctx))
        if self.release_threads and team is not None:
            h.team_state, h.sem, h.n_threads, h.sem_wait_fn, h.gomp_start, h.gomp_end = team.native_fields()

        def valid() -> bool:
            return (
                self._stage is stage and caches is self._caches and caches.sessions.get(session_id) is session
                and stage.holds(row.graph) and self._turn is turn
            )  # fmt: skip

        def done(h: Hop) -> None:
            session.length, row.row.allowed = int(h.length), int(h.allowed)
            session.used = time.monotonic()
            self.native_steps += 1
            width = 4 * stage.hp.n_embd  # F32 hidden states in and out; an I32 token at either end
            self.meter.step("native", 1, native.seconds, 4 if stage.first else width, 4 if stage.last else width)

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
        caches = self._require_caches()
        stage = caches.stage
        sessions = checked_batch(stage, caches, items, self.max_ctx)
        if self.release_threads:
            self._backend.claim_threads()
        work = [(session.cache, x, start_pos) for session, (_, start_pos, x) in zip(sessions, items, strict=True)]
        collect = self._locked(lambda: stage.launch(work, all_logits, top1))
        # Release before the output leaves: released after the send instead, our threads met the
        # next stage's on the same cores (3 servers on 2 cores: 17 -> 28 ms per token).
        if self.release_threads:
            self._backend.release_threads()
        now = time.monotonic()
        for session, (_, start_pos, x) in zip(sessions, items, strict=True):
            session.length, session.used = start_pos + int(x.shape[0]), now
        rows, bytes_in = sum(int(x.shape[0]) for _, _, x in items), sum(int(x.nbytes) for _, _, x in items)
        self._inflight = Launched(self.meter.timed(collect, started, rows, bytes_in), ready=not self.overlaps)
        return self._inflight

    def _require_caches(self) -> SessionCaches:
        """The loaded layers' caches (there are caches exactly while layers are loaded)."""
        if self._caches is None:
            raise EngineError(ErrorCode.FAILED_PRECONDITION, "no layers are loaded on this server; call Load first")
        return self._caches

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


def fill_hop(h: Hop, row: RowGraph, hp: HParams, length: int, limit: int) -> None:
    """``h``'s fields for the decode row ``row`` at position ``length`` (up to ``limit``): the
    graph, its inputs and buffers, a sliding-window group's cells, and ggml's functions."""
    lib = ggml()
    h.n_embd, h.n_vocab, h.n_embd_kv = hp.n_embd, hp.n_vocab, len(row.row.v_rows)
    h.mask_f16 = int(row.row.mask.dtype == np.float16)
    h.length, h.limit, h.n_kv, h.allowed = length, limit, row.n_kv, row.row.allowed
    for name in ("pos_buf", "k_buf", "v_rows", "v_buf", "mask_buf", "sched", "gf", "out", "inp_x", "inp_pos",
                 "inp_k", "inp_v", "inp_mask"):  # fmt: skip
        setattr(h, name, getattr(row, name))
    h.has_full = int(row.has_full)
    for name, value in row.swa.items():  # a sliding-window group's cells and inputs
        setattr(h, name, value)
    for field, fn in (
        ("tensor_set", lib.ggml_backend_tensor_set), ("tensor_get", lib.ggml_backend_tensor_get),
        ("compute", lib.ggml_backend_sched_graph_compute_async), ("synchronize", lib.ggml_backend_sched_synchronize),
    ):  # fmt: skip
        setattr(h, field, ctypes.cast(fn, ctypes.c_void_p).value)


def checked_batch(
    stage: LayerStage, caches: SessionCaches, items: list[tuple[str, int, np.ndarray]], max_ctx: int
) -> list[Session]:
    """The sessions of a batch's items, each item checked (its session, rows and positions)
    before any is computed, so that a refused batch leaves every session as it was."""
    if not items:
        raise EngineError(ErrorCode.INVALID_ARGUMENT, "an empty batch")
    if len({sid for sid, _, _ in items}) != len(items):
        raise EngineError(ErrorCode.INVALID_ARGUMENT, "a batch holds each session at most once")
    sessions = []
    for session_id, start_pos, x in items:
        session = caches.sessions.get(session_id)
        if session is None:
            raise EngineError(ErrorCode.NOT_FOUND, f"unknown session {session_id!r}")
        n = check_input(stage, x)
        if start_pos < 0:  # (ggml would abort the process on the KV cell it names)
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"start_pos {start_pos} is negative")
        if start_pos > session.length:
            raise EngineError(
                ErrorCode.INVALID_ARGUMENT,
                f"start_pos {start_pos} leaves a gap: the session holds {session.length} positions",
            )
        context = min(session.cache.kv_size, max_ctx)
        if start_pos + n > context:
            raise EngineError(
                ErrorCode.OUT_OF_RANGE,
                f"positions {start_pos}..{start_pos + n - 1} are beyond the session's context of {context}",
            )
        sessions.append(session)
    if sum(int(x.shape[0]) for _, _, x in items) > MAX_BATCH:
        raise EngineError(ErrorCode.INVALID_ARGUMENT, f"a batch of more than {MAX_BATCH} rows")
    return sessions


def check_input(stage: LayerStage, x: np.ndarray) -> int:
    """The rows of one session's input to ``stage``: token ids on the first layers, hidden
    states elsewhere; refused when ggml could not take them."""
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
