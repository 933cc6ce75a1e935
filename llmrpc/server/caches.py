"""The KV caches of a server's loaded layers: open sessions', spares and kept prefixes.

A session's cache is allocated when it opens: a spare of its size if there is one (cleared,
and the graphs built for it reused), else new memory, given back from spares and then from
kept prefixes (least recently used first) when the --mem cap or the device asks for it. A
closed session's cache becomes a spare, or a prefix the head asked to keep. All of it counts
as held, and every cache goes when the layers change. Called on the compute loop's thread
only; the figures are read from any thread (copies, no locks).
"""

from __future__ import annotations

import logging
import time
import uuid

from llmrpc.model.kv import kv_bytes
from llmrpc.model.prefix import copy_cells, refusal, start_from
from llmrpc.model.stage import LayerStage, SessionCache
from llmrpc.server.api import EngineError, ErrorCode
from llmrpc.server.prefix import Kept, KeptCaches
from llmrpc.types import ClosedSession, OpenedSession, PrefixStart, kv_cells

logger = logging.getLogger(__name__)

SPARE_CACHES = 4  # closed sessions' KV caches kept for reuse


class Session:
    """An open session's cache, the positions it holds, and when it was last used."""

    __slots__ = ("cache", "length", "used")

    def __init__(self, cache: SessionCache, length: int) -> None:
        self.cache = cache
        self.length = length
        self.used = time.monotonic()  # opened, or last computed in (monotonic)


class SessionCaches:
    """The caches of ``stage``'s sessions: with its weights within ``memory_cap`` bytes (0: as
    the device allows), kept prefixes within ``prefix_budget``."""

    def __init__(self, stage: LayerStage, memory_cap: int, prefix_budget: int, max_sessions: int, max_ctx: int) -> None:
        self.stage = stage
        self.memory_cap = memory_cap
        self.max_sessions = max_sessions
        self.max_ctx = max_ctx
        self.sessions: dict[str, Session] = {}
        self.kept = KeptCaches(prefix_budget)
        # Caches of closed sessions, kept for the next sessions of the same size (oldest first).
        # They are freed before any new cache is allocated, when there are too many, or when the
        # layers change: the memory held never exceeds what open sessions held at their peak.
        self.spare: list[SessionCache] = []
        self.n_bytes = 0  # of every cache held here (sessions', spares, kept prefixes)

    # -- open and close -----------------------------------------------------------------
    def open(self, n_ctx: int, prefix: PrefixStart | None) -> OpenedSession:
        """A new session; with ``prefix``, holding the first rows of another session's cache."""
        limit = min(self.max_ctx, self.stage.hp.n_ctx_train)
        if not 1 <= n_ctx <= limit:
            raise EngineError(ErrorCode.OUT_OF_RANGE, f"n_ctx {n_ctx} must be within 1..{limit}")
        if len(self.sessions) >= self.max_sessions:
            raise EngineError(ErrorCode.RESOURCE_EXHAUSTED, f"{self.max_sessions} sessions are open; close one first")
        evicted: list[str] = []
        rows = 0
        if prefix is None:
            cache = self._new_cache(n_ctx, evicted)
        elif prefix.take:
            cache, rows = self._adopt(prefix, kv_cells(n_ctx)), prefix.rows
        else:
            source = self._prefix_source(prefix, kv_cells(n_ctx))
            cache = self._new_cache(n_ctx, evicted, protect=prefix.session_id)
            copy_cells(source, cache)
            start_from(cache, prefix.rows)
            rows = prefix.rows
        session_id = uuid.uuid4().hex
        self.sessions[session_id] = Session(cache, rows)
        logger.debug("session %s opened: n_ctx %d, %d bytes, %d positions reused", session_id, n_ctx, cache.n_bytes,
                     rows)  # fmt: skip
        return OpenedSession(session_id, n_ctx, cache.n_bytes, tuple(evicted))

    def close(self, session_id: str, keep: bool) -> ClosedSession:
        """Close an open session (``keep``: its cache kept as a prefix under its id, within the
        prefix budget), or free a kept prefix."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            kept = self.kept.take(session_id)
            if kept is None:
                raise EngineError(ErrorCode.NOT_FOUND, f"unknown session {session_id!r}")
            self._to_spare(kept.cache)
            return ClosedSession(False)
        over = (
            self.kept.put(session_id, Kept(session.cache, session.length))
            if keep
            else [(session_id, Kept(session.cache, 0))]
        )
        for _, kept in over:
            self._to_spare(kept.cache)
        return ClosedSession(session_id in self.kept, tuple(sid for sid, _ in over if sid != session_id))

    def free_all(self) -> None:
        """Free every cache (the layers change)."""
        for cache in [s.cache for s in self.sessions.values()] + self.spare + [k.cache for k in self.kept.clear()]:
            self.stage.forget(cache)
            cache.free()
        self.sessions.clear()
        self.spare.clear()
        self.n_bytes = 0

    def idle(self, seconds: float) -> list[str]:
        """The sessions nothing has computed in for ``seconds`` (nor opened)."""
        since = time.monotonic() - seconds
        return [sid for sid, s in list(self.sessions.items()) if s.used < since]

    # -- memory -------------------------------------------------------------------------
    def _new_cache(self, n_ctx: int, evicted: list[str], protect: str = "") -> SessionCache:
        """An empty cache: a spare of its size, else new memory, freeing spares and then kept
        prefixes (least recently used first, all but ``protect``; their ids go to ``evicted``)
        when the --mem cap or the device asks for it."""
        stage = self.stage
        cache = self._reuse_spare(kv_cells(n_ctx))
        if cache is not None:
            return cache
        # Give the spares back before taking more memory, so that idle caches never add to what
        # the open sessions hold (on a CPU, where allocations do not fail but the machine swaps,
        # this matters most).
        while self.spare:
            self._free(self.spare.pop(0))
        want = kv_bytes(stage.hp, stage.start, stage.end, n_ctx, stage.cache)
        while True:
            if not self.memory_cap or stage.weight_bytes + self.n_bytes + want <= self.memory_cap:
                try:
                    cache = stage.new_cache(n_ctx)
                except MemoryError as e:
                    if not self._evict_one(evicted, protect):
                        raise EngineError(ErrorCode.RESOURCE_EXHAUSTED, f"{e} ({want} bytes)") from e
                    continue
                self.n_bytes += cache.n_bytes
                return cache
            if not self._evict_one(evicted, protect):
                raise EngineError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"a KV cache of {want} bytes would take this server past its --mem cap of {self.memory_cap}",
                )

    def _evict_one(self, evicted: list[str], protect: str) -> bool:
        """Free the least recently used kept prefix other than ``protect``; False when none is."""
        oldest = self.kept.pop_oldest()
        if oldest is not None and oldest[0] == protect:
            again = self.kept.pop_oldest()
            self.kept.put(*oldest)  # (it was within the budget: nothing leaves with it)
            oldest = again
        if oldest is None:
            return False
        evicted.append(oldest[0])
        self._free(oldest[1].cache)
        return True

    def _reuse_spare(self, kv_size: int) -> SessionCache | None:
        """The newest spare cache of ``kv_size`` cells, cleared, if there is one."""
        for i in range(len(self.spare) - 1, -1, -1):
            if self.spare[i].kv_size == kv_size:
                cache = self.spare.pop(i)
                self.stage.clear_cache(cache)
                return cache
        return None

    def _to_spare(self, cache: SessionCache) -> None:
        self.spare.append(cache)
        while len(self.spare) > SPARE_CACHES:
            self._free(self.spare.pop(0))

    def _free(self, cache: SessionCache) -> None:
        self.stage.forget(cache)
        cache.free()
        self.n_bytes -= cache.n_bytes

    # -- prefixes -----------------------------------------------------------------------
    def _prefix_source(self, prefix: PrefixStart, kv_size: int) -> SessionCache:
        """The cache a new session copies its first rows from, checked."""
        live = self.sessions.get(prefix.session_id)
        if live is not None:
            cache, length = live.cache, live.length
        else:
            kept = self.kept.get(prefix.session_id)
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
        if prefix.session_id in self.sessions:
            raise EngineError(
                ErrorCode.FAILED_PRECONDITION, f"{prefix.session_id!r} is open: its cache can be copied, not taken"
            )
        self._prefix_source(prefix, kv_size)
        kept = self.kept.take(prefix.session_id)
        assert kept is not None
        start_from(kept.cache, prefix.rows)
        return kept.cache
