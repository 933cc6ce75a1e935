"""Prefix reuse, the head's part: what each pipeline's servers hold, and which rows a new
session may start from.

A prompt is computed in batches of ``batch`` rows up to its last batch's start, then the rest
in one batch, then a row a step (:func:`last_batch_start`, llama.cpp's ``n_batch`` layout). The
bits of a cell depend on the batch it was computed in, so a new session reuses only whole
batches that an earlier session computed exactly as the new one would have (the same tokens,
the same batch boundaries, on the same cells): its cache then holds the bits a fresh
computation would, and its text is the same. Every server of a pipeline gets the same
instruction (the head knows what it sent through each), so the stages never disagree; a
server that no longer holds a prefix refuses, and the session starts empty instead.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from llmrpc.head.client import StageError
from llmrpc.head.pipeline import Pipeline, PipelineSession
from llmrpc.model.hparams import HParams
from llmrpc.model.kv import SWA, kv_groups
from llmrpc.types import ClosedSession, OpenedSession, PrefixStart

logger = logging.getLogger(__name__)


def last_batch_start(n: int, batch: int) -> int:
    """Where a prompt of ``n`` tokens' last batch starts: the rows before it are computed in
    whole batches of ``batch``, the rest (1..batch rows, the last one's logits wanted) in one."""
    return (n - 1) // batch * batch


def common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def reusable_rows(held: list[int], exact: int, prompt: list[int], batch: int, ring: int | None) -> int:
    """Positions of ``prompt`` a new session can take from a cache that holds the tokens
    ``held``, whose first ``exact`` positions were computed in whole batches as a new session
    computes them: whole batches of the same tokens, before the prompt's last batch. ``ring``:
    the cells of the model's sliding-window caches (None: it has none); a cache that has held
    more positions than that may have reused cells a new sequence still holds (none taken)."""
    if ring is not None and len(held) > ring:
        return 0
    rows = min(common_length(held[:exact], prompt), last_batch_start(len(prompt), batch))
    return rows // batch * batch


_USES = itertools.count(1)


@dataclass
class Holder:
    """A sequence one pipeline's servers hold: an open session's cache, or a closed one kept."""

    ids: tuple[str, ...]  # its session id on each stage, in order
    tokens: list[int]  # the tokens in its cache (an open session's own list: it grows)
    exact: int  # positions computed in whole batches, as a new session computes them
    live: bool = True
    used: int = field(default_factory=lambda: next(_USES))


@dataclass
class PrefixStats:
    """Prefix cache queries and hits, counted in prompt tokens (vLLM's ``prefix_cache_queries``
    and ``prefix_cache_hits``), and the requests that asked."""

    requests: int = 0
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, positions taken from a held prefix instead of computed

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    @staticmethod
    def total(stats: list[PrefixStats]) -> PrefixStats:
        return PrefixStats(sum(s.requests for s in stats), sum(s.queries for s in stats), sum(s.hits for s in stats))


class PrefixCache:
    """What one pipeline's servers hold, and sessions that start from it."""

    def __init__(self, pipeline: Pipeline, hp: HParams, n_ctx: int, batch: int, stats: PrefixStats) -> None:
        self.pipeline = pipeline
        self.n_ctx = n_ctx
        self.batch = batch
        self.stats = stats
        rings = [grp.cells(n_ctx) for grp in kv_groups(hp) if grp.name == SWA]
        self.ring = min(rings) if rings else None
        self._holders: dict[str, Holder] = {}  # by the first stage's id
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._holders)

    def kept(self) -> list[Holder]:
        with self._lock:
            return [h for h in self._holders.values() if not h.live]

    def longest(self, prompt: list[int]) -> int:
        """Positions of ``prompt`` a new session here would take from what the servers hold."""
        with self._lock:
            return max((self._rows(h, prompt) for h in self._holders.values()), default=0)

    def _rows(self, h: Holder, prompt: list[int]) -> int:
        return reusable_rows(h.tokens, h.exact, prompt, self.batch, self.ring)

    def _choose(self, prompt: list[int]) -> tuple[Holder | None, int, bool]:
        """The holder to start from, its rows, and whether to take its cache (a kept one whose
        every reusable row is reused: nothing another session could want is lost)."""
        with self._lock:
            self.stats.requests += 1
            self.stats.queries += len(prompt)
            best, rows = None, 0
            for h in self._holders.values():
                n = self._rows(h, prompt)
                if n > rows or (n == rows and n and best is not None and h.used > best.used):
                    best, rows = h, n
            if best is None:
                return None, 0, False
            best.used = next(_USES)
            take = not best.live and rows == best.exact
            if take:
                del self._holders[best.ids[0]]
            return best, rows, take

    @contextmanager
    def session(self, prompt: list[int], *, reuse: bool = True, keep: bool = True) -> Iterator[PipelineSession]:
        """A session for ``prompt`` that holds as many of its first positions as can be taken
        from what the servers hold (``len(session.tokens)``; ``reuse`` False: none). Its
        cache is kept when it closes (``keep``) unless it ends in an exception."""
        s = self._open(prompt, reuse)
        holder = Holder(tuple(s.ids), s.tokens, len(s.tokens))
        with self._lock:
            self._holders[holder.ids[0]] = holder
        ok = False
        try:
            yield s
            ok = True
        finally:
            self._close(s, holder, keep and ok)

    def computed(self, s: PipelineSession, exact: int) -> None:
        """The session's first ``exact`` positions are computed in whole batches, as a new
        session computes them: others may start from them now."""
        with self._lock:
            h = self._holders.get(s.ids[0]) if s.ids else None
            if h is not None:
                h.exact = exact

    def _open(self, prompt: list[int], reuse: bool) -> PipelineSession:
        holder, rows, take = self._choose(prompt) if reuse else (None, 0, False)
        if holder is not None:
            try:
                s = self._open_on_all([PrefixStart(sid, rows, take) for sid in holder.ids])
            except StageError as e:  # freed meanwhile (or refused): start empty
                logger.info("starting without the prefix of %d positions: %s", rows, e)
                if not holder.live:
                    self._forget(holder, drop=True)
            else:
                with self._lock:
                    self.stats.hits += rows
                s.tokens.extend(prompt[:rows])
                logger.debug("%d of %d prompt positions from a held prefix (%s)", rows, len(prompt),
                             "taken" if take else "copied")  # fmt: skip
                return s
        return self._open_on_all(None)

    def _open_on_all(self, starts: list[PrefixStart] | None) -> PipelineSession:
        stages = self.pipeline.stages
        waits = [c.start_open(self.n_ctx, starts[i] if starts else None) for i, c in enumerate(stages)]
        opened: list[OpenedSession | None] = []
        refused: StageError | None = None
        for wait in waits:
            try:
                opened.append(wait())
            except StageError as e:
                opened.append(None)
                refused = refused or e
        self._evicted([o.evicted if o else () for o in opened])
        if refused is not None:
            self._close_all([o.session_id if o else "" for o in opened], keep=False)
            raise refused
        return PipelineSession(self.pipeline, self.n_ctx, ids=[o.session_id for o in opened if o])

    def _close(self, s: PipelineSession, holder: Holder, keep: bool) -> None:
        if self.pipeline.coalescer is not None and s.ids:
            self.pipeline.coalescer.forget(s.ids[0])
        ids, s.ids = s.ids, []  # (closed here: the session's own close has nothing left to do)
        keep = keep and holder.exact > 0
        closed = self._close_all(ids, keep)
        with self._lock:
            self._holders.pop(holder.ids[0], None)
        if keep and all(c is not None and c.kept for c in closed) and holder.exact:
            holder.live, holder.tokens, holder.used = False, list(holder.tokens), next(_USES)
            with self._lock:
                self._holders[holder.ids[0]] = holder
        elif keep:  # not kept everywhere: of no use anywhere
            self._drop([sid for sid, c in zip(ids, closed, strict=True) if c is not None and c.kept], holder)

    def _close_all(self, ids: list[str], keep: bool) -> list[ClosedSession | None]:
        """Close sessions (or free kept prefixes) on every stage at once; "" ids are skipped.
        Once the pipeline has lost a server (dead or hung), nothing is kept and the closes are
        not waited for, as a :class:`PipelineSession`'s (a server left may be waiting for the
        lost one; each server closes a head's sessions when its data link goes)."""
        stages = self.pipeline.stages
        lost = self.pipeline.links.lost if self.pipeline.links is not None else {}
        if lost:
            for c, sid in zip(stages, ids, strict=True):
                if sid and c.data_address not in lost:
                    c.start_close(sid, False)
            return [None] * len(stages)
        waits = [c.start_close(sid, keep) if sid else None for c, sid in zip(stages, ids, strict=True)]
        out: list[ClosedSession | None] = []
        for wait in waits:
            try:
                out.append(wait() if wait else None)
            except StageError as e:
                logger.warning("closing session: %s", e)
                out.append(None)
        self._evicted([c.evicted if c else () for c in out])
        return out

    def _evicted(self, per_stage: list[tuple[str, ...]]) -> None:
        """Forget the holders a server freed, and free them on the other stages."""
        gone = []
        with self._lock:
            for i, ids in enumerate(per_stage):
                freed = set(ids)
                gone += [h for h in self._holders.values() if not h.live and h.ids[i] in freed]
        for h in {id(h): h for h in gone}.values():
            self._forget(h, drop=True)

    def _forget(self, h: Holder, drop: bool) -> None:
        with self._lock:
            if self._holders.get(h.ids[0]) is h:
                del self._holders[h.ids[0]]
        if drop and not h.live:
            self._drop(list(h.ids), h)

    def _drop(self, ids: list[str], h: Holder) -> None:
        """Free a kept prefix on the stages that still hold it (those that freed it refuse)."""
        stages = self.pipeline.stages
        waits = [c.start_close(sid) for c, sid in zip(stages, h.ids, strict=True) if sid in ids]
        for wait in waits:
            try:
                wait()
            except StageError as e:
                logger.debug("freeing a kept prefix: %s", e)

    def clear(self) -> None:
        """Free every kept prefix on the servers and forget them."""
        for h in self.kept():
            self._forget(h, drop=True)
