"""Prefix reuse, the head's part: what each pipeline's servers hold, and which rows a new
session may start from.

A prompt is computed in batches of ``batch`` rows up to its last batch's start, then the rest
in one batch, then a row a step (:func:`last_batch_start`, llama.cpp's ``n_batch`` layout). A
new session reuses only rows whose bits are those a fresh computation of its prompt would give,
so that its text is the same:

- rows of whole batches that another session computed as the new one would (the same tokens,
  the same batch boundaries, on the same cells);
- where batches are large enough (:func:`row_exact`), any row of a batch computed with at least
  :data:`EXACT_ROWS` rows, short of its last ``n % ROW_GROUP``: from that size on ggml's kernels
  compute each row as in any other such batch (its CPU flash attention tiles the queries by 64,
  one row at a time below; its matrix products take activation rows four at a time, the rest
  one at a time). The session then computes the rest of the reused row's batch as one batch of
  at least :data:`EXACT_ROWS` rows, and goes on on the batch grid.

Every server of a pipeline gets the same instruction (the head knows what it sent through each),
so the stages never disagree; a server that no longer holds a prefix refuses, and the session
starts empty instead.
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


EXACT_ROWS = 64  # a batch of this many rows or more computes each row as any other such batch does
ROW_GROUP = 4  # activation rows a matrix product takes at once (the last n % 4 one at a time)


def row_exact(batch: int, micro_batch: int) -> bool:
    """Whether rows may be reused one by one (not only in whole batches) when prompts are
    computed in batches of ``batch`` rows sent ``micro_batch`` rows at a time: every batch
    before a prompt's last then computes its rows in pieces of at least :data:`EXACT_ROWS` rows
    that leave none to the one-at-a-time rest."""
    return batch % micro_batch == 0 and micro_batch % ROW_GROUP == 0 and micro_batch >= EXACT_ROWS


def exact_in_batch(start: int, n: int, fine: bool) -> int:
    """Of a batch of ``n`` rows from position ``start`` (computed as one piece), the end of the
    rows a new session may reuse (``start``: none): all but its last group of rows and the rest
    after it, which a server computing the batch together with another session's rows may take
    one at a time."""
    if not fine or n < EXACT_ROWS:
        return start
    return start + n - n % ROW_GROUP - ROW_GROUP


def reusable_rows(
    held: list[int], exact: int, prompt: list[int], batch: int, ring: int | None, fine: bool = False
) -> int:
    """Positions of ``prompt`` a new session can take from a cache that holds the tokens
    ``held``, whose first ``exact`` positions have the bits a new session's batches give them:
    rows of the same tokens; whole batches of them before the prompt's last batch unless
    ``fine`` (:func:`row_exact`), else as many as leave at least :data:`EXACT_ROWS` rows of
    their batch to compute (of the last batch too, where it has that many). ``ring``: the cells of the model's sliding-window caches (None: it
    has none); a cache that has held more positions than that may have reused cells a new
    sequence still holds (none taken)."""
    if ring is not None and len(held) > ring:
        return 0
    common, n = common_length(held[:exact], prompt), len(prompt)
    cut = last_batch_start(n, batch)
    if fine and common > cut and n - cut >= EXACT_ROWS:  # into the last batch, leaving it EXACT_ROWS rows
        rows = min(common, n - EXACT_ROWS)
        return max(cut, rows - (rows - cut) % ROW_GROUP)
    rows = min(common, cut)
    whole = rows // batch * batch
    if not fine or rows == whole:
        return whole
    rows = min(rows, whole + batch - EXACT_ROWS)
    return max(whole, rows - rows % ROW_GROUP)


_USES = itertools.count(1)


@dataclass
class Holder:
    """A sequence one pipeline's servers hold: an open session's cache, or a closed one kept."""

    ids: tuple[str, ...]  # its session id on each stage, in order
    tokens: list[int]  # the tokens in its cache (an open session's own list: it grows)
    exact: int  # positions whose bits are those a new session's batches give them
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

    def __init__(
        self, pipeline: Pipeline, hp: HParams, n_ctx: int, batch: int, stats: PrefixStats, fine: bool = False
    ) -> None:
        self.pipeline = pipeline
        self.n_ctx = n_ctx
        self.batch = batch
        self.fine = fine  # rows reused one by one (row_exact), not only in whole batches
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
        return reusable_rows(h.tokens, h.exact, prompt, self.batch, self.ring, self.fine)

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
        """The session's first ``exact`` positions are computed and have the bits a new
        session's batches give them: others may start from them now."""
        with self._lock:
            h = self._holders.get(s.ids[0]) if s.ids else None
            if h is not None:
                h.exact = max(h.exact, exact)

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
