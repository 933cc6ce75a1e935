"""Closed sessions' KV caches kept as prefixes for later sessions: least recently used first,
within a byte budget.

Which prefix a new session reuses is the head's decision (it knows what it sent through each
pipeline, so every server of one reuses the same rows); a server only keeps what it is asked
to keep, frees the least recently used when its budget or a new session's memory needs it,
and says which it freed in its answers, so that the head forgets them too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from llmrpc.model.stage import SessionCache

logger = logging.getLogger(__name__)


@dataclass
class Kept:
    """A closed session's cache and the positions it holds."""

    cache: SessionCache
    length: int


class KeptCaches:
    """Kept caches by the id their session had, least recently used first. ``budget``: the most
    bytes they may take together."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._kept: OrderedDict[str, Kept] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._kept

    def get(self, session_id: str) -> Kept | None:
        """A kept cache, now the most recently used (it stays kept)."""
        kept = self._kept.get(session_id)
        if kept is not None:
            self._kept.move_to_end(session_id)
        return kept

    def take(self, session_id: str) -> Kept | None:
        """A kept cache, no longer kept (a session adopts it)."""
        kept = self._kept.pop(session_id, None)
        if kept is not None:
            self.bytes -= kept.cache.n_bytes
        return kept

    def put(self, session_id: str, kept: Kept) -> list[tuple[str, Kept]]:
        """Keep ``kept``; returns what no longer fits the budget, least recently used first (for
        the caller to free), ``kept`` itself when it alone is over the budget."""
        if kept.cache.n_bytes > self.budget:
            return [(session_id, kept)]
        self._kept[session_id] = kept
        self.bytes += kept.cache.n_bytes
        out = []
        while self.bytes > self.budget:
            oldest = self.pop_oldest()
            assert oldest is not None
            out.append(oldest)
        return out

    def pop_oldest(self) -> tuple[str, Kept] | None:
        """The least recently used kept cache, no longer kept; None when none is."""
        if not self._kept:
            return None
        session_id, kept = self._kept.popitem(last=False)
        self.bytes -= kept.cache.n_bytes
        return session_id, kept

    def clear(self) -> list[Kept]:
        out = list(self._kept.values())
        self._kept.clear()
        self.bytes = 0
        return out
