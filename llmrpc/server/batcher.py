"""When a server computes the generation steps that reach it: alone at once, or together.

A generation's steps that are ready at the end of a turn of the compute loop are computed in
one batch (the weights read once for all of them). The first server of a route also waits for
the other generations whose steps are on their way round (at most about one of their periods):
rings that started apart would otherwise never share a batch, each step computed alone
(4 streams through 3 servers: 34 tok/s instead of 80). Once together they stay together, their
frames sent on and back one after the other, marked with a batch tag so that the next server
waits for the whole batch too; the last server says when a generation ends (ENDED).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from llmrpc.server.loop import ComputeLoop
from llmrpc.server.steps import Step

HOLD_MAX = 0.25  # seconds a first server may wait for other generations' steps to share a batch
BATCH_WAIT = 0.005  # seconds a server waits for the rest of a batch the previous one sent on

Key = tuple[int, int]  # a generation: (head link, request)


class Batcher:
    def __init__(
        self, loop: ComputeLoop, port: int, compute: Callable[[list[Step]], None],
        failed: Callable[[list[Step], Exception], None],
    ) -> None:  # fmt: skip
        """``compute(steps)``: run steps in one batch; ``failed(steps, error)``: steps that met a fault."""
        self.loop, self.port = loop, port
        self._compute, self._failed = compute, failed
        self.ready: list[Step] = []  # generation steps to compute at the end of this loop turn
        # at the first server: generations whose steps come round, (last arrival, period)
        self.rounds: dict[Key, tuple[float, float]] = {}
        self._batches = itertools.count(1)

    def lone(self, step: Step) -> bool:
        """A generation step with nothing to batch it with, which need not wait for the end of
        the loop's turn: one that arrived (a hop's work runs cold after the others' compute,
        where a loop turn costs ~0.1 ms), or the next step a GPU server alone queues itself.
        Steps a server computed together come tagged (see :meth:`tag`); the first server waits
        for other generations' steps."""
        if step.gen is None or self.ready or "batch" in step.m:
            return False
        return step.hop > 0 or self.alone(step.key)

    def alone(self, key: Key) -> bool:
        """No other generation's steps come round this (first) server."""
        return set(self.rounds) <= {key}

    def arrived(self, key: Key, now: float) -> None:
        """Note when a generation's step came back to the first server, and its period."""
        last = self.rounds.pop(key, None)
        self.rounds[key] = (now, now - last[0] if last else 0.0)
        for k in [k for k, (t, period) in self.rounds.items() if now - t > (2 * period + 0.01 if period else 1.0)]:
            del self.rounds[k]  # stalled: not waited for

    def ended(self, key: Key) -> None:
        """A generation's steps come here no more: not waited for."""
        self.rounds.pop(key, None)

    def queue(self, step: Step) -> None:
        """Compute ``step`` with the others that are ready at the end of this turn of the loop."""
        self.ready.append(step)
        self.loop.soon(self._compute_ready)

    def tag(self, steps: list[Step]) -> list[Any] | None:
        """The tag of steps computed together that go on together (None: they do not)."""
        if len(steps) > 1 and all(s.gen is not None and not s.last for s in steps):
            return [f"{self.port}.{next(self._batches)}", len(steps)]
        return None

    def _compute_ready(self) -> None:
        """Compute the ready steps (see :meth:`_batch_ready`); a fault fails those steps alone."""
        try:
            steps = self._batch_ready()
        except Exception as e:
            steps, self.ready = self.ready, []
            self._failed(steps, e)
            return
        if steps:
            self._compute(steps)

    def _batch_ready(self) -> list[Step]:
        """The ready steps to compute now, or none yet (called again later)."""
        if not self.ready:
            return []
        now = time.perf_counter()
        # steps one server computed in one batch come as separate frames: wait for them all
        tags: dict[str, list[int]] = {}
        for s in self.ready:
            tag = s.m.get("batch")
            if isinstance(tag, list) and len(tag) == 2:
                tags.setdefault(str(tag[0]), [0, int(tag[1])])[0] += 1
        if any(got < want for got, want in tags.values()) and now - self.ready[0].arrived < BATCH_WAIT:
            self.loop.soon(self._compute_ready, BATCH_WAIT / 10)
            return []
        if all(s.hop == 0 and s.gen is not None for s in self.ready):
            ready = {s.key for s in self.ready}
            first = min(s.arrived for s in self.ready)
            due = [period for k, (t, period) in self.rounds.items() if k not in ready and period > 0]
            hold = min(HOLD_MAX, max(due)) if due else 0.0
            if now - first < hold:
                self.loop.soon(self._compute_ready, first + hold - now)
                return []
        steps, self.ready = self.ready, []
        return steps
