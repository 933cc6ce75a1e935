"""Several pipelines over one farm's servers (replicas), when they can hold the model more than
once, and the choice of the replica for each request.

The servers are dealt in turn into as many groups as replicas (the first, the second, ..., the
first again), and each group is planned on its own (:func:`plan_replicas`). A request goes to the replica that holds the longest reusable
prefix of its prompt, unless the replicas' loads are too far apart or no replica holds much of it:
then to the least loaded one (SGLang's cache-aware policy, :class:`Router`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from llmrpc.head.pipeline import Pipeline, PipelineSession
from llmrpc.head.planner import ModelLayout, Plan, PlanError, ServerReport, plan
from llmrpc.head.prefix import PrefixCache

logger = logging.getLogger(__name__)

AUTO = 0  # replicas: as many as the servers hold


def plan_replicas(
    layout: ModelLayout, servers: Sequence[ServerReport], count: int, *, fewer: bool = False, **kw: int
) -> list[Plan]:
    """``count`` plans over disjoint groups of ``servers`` (:data:`AUTO`: as many as fit, at least
    one); ``fewer``: as many as fit up to ``count``. ``kw``: :func:`plan`'s arguments."""

    def attempt(n: int) -> list[Plan]:
        return [plan(layout, servers[i::n], **kw) for i in range(n)]  # type: ignore[arg-type]

    if count != AUTO and not fewer:
        try:
            return attempt(count)
        except PlanError as e:
            raise PlanError(f"{count} replicas do not fit on {len(servers)} servers: {e}") from e
    for n in range(min(count or len(servers), len(servers)), 1, -1):
        try:
            return attempt(n)
        except PlanError:
            continue
    return attempt(1)


@dataclass
class Replica:
    index: int
    pipeline: Pipeline
    prefix: PrefixCache
    load: int = 0  # generations running on it


class Router:
    """The replica for each request. ``cache_threshold``: the share of the prompt the best held
    prefix must cover to be followed; ``balance_abs`` and ``balance_rel``: the loads are
    imbalanced (the least loaded replica takes the request) when the largest exceeds the smallest
    by more than ``balance_abs`` and is more than ``balance_rel`` times it."""

    def __init__(
        self, replicas: list[Replica], *, cache_threshold: float = 0.5, balance_abs: int = 2, balance_rel: float = 1.5
    ) -> None:
        self.replicas = replicas
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self._lock = threading.Lock()

    def pick(self, prompt: list[int]) -> Replica:
        loads = [r.load for r in self.replicas]
        least = min(self.replicas, key=lambda r: (r.load, len(r.prefix.kept()), r.index))
        if max(loads) - min(loads) > self.balance_abs and max(loads) > self.balance_rel * min(loads):
            return least
        held = [r.prefix.longest(prompt) for r in self.replicas]
        best = max(self.replicas, key=lambda r: (held[r.index], -r.load, -r.index))
        if prompt and held[best.index] / len(prompt) >= self.cache_threshold:
            return best
        return least

    @contextmanager
    def route(self, prompt: list[int]) -> Iterator[Replica]:
        """The replica for ``prompt``, counted as loaded while the caller uses it."""
        with self._lock:
            replica = self.pick(prompt)
            replica.load += 1
        logger.debug("request of %d tokens to replica %d", len(prompt), replica.index)
        try:
            yield replica
        finally:
            with self._lock:
                replica.load -= 1

    @contextmanager
    def session(self, prompt: list[int], *, reuse: bool = True, keep: bool = True) -> Iterator[PipelineSession]:
        """A session for ``prompt`` on the replica it is routed to (:meth:`PrefixCache.session`)."""
        with (
            self.route(prompt if reuse else []) as replica,
            replica.prefix.session(prompt, reuse=reuse, keep=keep) as s,
        ):
            yield s

    def computed(self, s: PipelineSession, exact: int) -> None:
        """:meth:`PrefixCache.computed` on the session's replica."""
        for r in self.replicas:
            if r.pipeline is s.pipeline:
                r.prefix.computed(s, exact)

    def fine(self, s: PipelineSession) -> bool:
        """Whether the session's replica reuses rows one by one (:func:`row_exact`)."""
        return any(r.prefix.fine for r in self.replicas if r.pipeline is s.pipeline)
