"""Whose sessions are whose, and how long one may sit idle.

Sessions are opened over gRPC, which names no head; the first data-plane step that uses a
session makes the head link it came for (a link connected to this server: see the data
plane) its owner. When that head's connection goes (the head closed, crashed, or planned
again), the sessions it owns are closed: a head that dies leaks none. A step for a session
that another link owns is refused. Any session nothing has computed in for ``ttl`` seconds is
closed too (sessions a head opened and never used, or used only over gRPC).
"""

from __future__ import annotations

import logging
from collections import defaultdict

from llmrpc.server.api import EngineError, StageEngine
from llmrpc.server.loop import ComputeLoop

logger = logging.getLogger(__name__)

SESSION_TTL = 600.0  # seconds a session may sit idle (llmrpc-server --session-ttl)
SWEEP_EVERY = 30.0  # seconds between looks for idle sessions, at most


class SessionKeeper:
    def __init__(self, engine: StageEngine, loop: ComputeLoop, ttl: float = SESSION_TTL) -> None:
        """``ttl``: seconds a session may sit idle (0: for ever). On the loop's thread."""
        self.engine, self.loop, self.ttl = engine, loop, ttl
        self._owners: dict[str, int] = {}  # session id -> the head link that owns it
        self._owned: defaultdict[int, set[str]] = defaultdict(set)  # head link -> its sessions
        self.closed = 0  # sessions this keeper closed
        self._every = min(SWEEP_EVERY, ttl / 4) if ttl > 0 else SWEEP_EVERY
        loop.soon(self._sweep, self._every)

    def claim(self, link: int, session_id: str) -> bool:
        """A step of head ``link`` uses ``session_id``: whether that link owns it (it does from
        its first step; a session this server does not have is the engine's to refuse)."""
        owner = self._owners.get(session_id)
        if owner is None and self.engine.has_session(session_id):
            owner = self._owners[session_id] = link
            self._owned[link].add(session_id)
        return owner is None or owner == link

    def link_gone(self, link: int) -> None:
        """Head ``link``'s connection closed: close the sessions it owns."""
        for session_id in self._owned.pop(link, set()):
            self._owners.pop(session_id, None)
            self._close(session_id, "its head's data connection closed")

    def _sweep(self) -> None:
        """Close idle sessions; forget owners of sessions closed meanwhile."""
        try:
            if self.ttl > 0:
                for session_id in self.engine.idle_sessions(self.ttl):
                    self._close(session_id, f"idle for {self.ttl:g} s")
            open_now = self.engine.session_ids()
            for session_id in [s for s in self._owners if s not in open_now]:
                link = self._owners.pop(session_id)
                self._owned[link].discard(session_id)
                if not self._owned[link]:
                    del self._owned[link]
        finally:
            self.loop.soon(self._sweep, self._every)

    def _close(self, session_id: str, why: str) -> None:
        try:
            self.engine.close_session(session_id)
        except EngineError:  # closed already (by its head, or its layers replaced)
            return
        self.closed += 1
        logger.info("session %s closed: %s", session_id, why)
