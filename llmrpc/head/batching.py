"""Decode steps of concurrent sessions gathered into one batch for the servers."""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np

from llmrpc import trace
from llmrpc.head.client import StageError
from llmrpc.head.datalink import DataLinks, Hop


@dataclass
class _Step:
    route: list[Hop]
    pos: int
    x: np.ndarray
    k: int
    result: tuple[np.ndarray, np.ndarray] | None = None
    error: StageError | None = None


class Coalescer:
    """Decode steps of concurrent sessions travel together: while one batch is in flight,
    the steps that arrive wait, and go as the next batch, one graph per server for all of
    them (the weights are read once per batch instead of once per session). A refused batch
    is retried step by step (servers check a whole batch before computing any of it), so
    one session's bad request fails only that session."""

    GATHER = 0.002  # seconds a batch waits for the other decoding sessions' steps

    def __init__(self, links: DataLinks, f16: bool) -> None:
        self.links = links
        self.f16 = f16
        self._cond = threading.Condition()
        self._queue: list[_Step] = []
        self._busy = False
        # Sessions that decode here, in the order they came: a batch waits (briefly) for all of
        # them and lists them in this order, so consecutive batches have the same shape and
        # the servers reuse one graph for it instead of building one per combination.
        self._active: dict[str, int] = {}
        self._order = 0
        self.batches = 0  # how many batches went out, and with how many steps: for tests and benches
        self.steps = 0
        self.retried = 0  # steps sent again alone after their batch was refused

    def call(self, route: list[Hop], pos: int, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids [k], logits [k]) of the k largest logits of the last row of ``x``."""
        step = _Step(route, pos, x, k)
        with self._cond:
            if route[0].session_id not in self._active:
                self._active[route[0].session_id] = self._order
                self._order += 1
            self._queue.append(step)
            self._cond.notify_all()
            while step.result is None and step.error is None and self._busy:
                self._cond.wait()
            if step.result is None and step.error is None:
                self._busy = True
                deadline = time.monotonic() + self.GATHER
                while len(self._queue) < len(self._active) and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                batch, self._queue = self._queue, []
                if len(batch) < len(self._active):
                    # The late ones are idle (a chat between turns, say): stop waiting for them
                    # until they come back.
                    here = {s.route[0].session_id for s in batch}
                    self._active = {sid: o for sid, o in self._active.items() if sid in here}
                batch.sort(key=lambda s: self._active.get(s.route[0].session_id, 0))
            else:
                batch = []
        if batch:
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if step.error is not None:
            raise step.error
        assert step.result is not None
        return step.result

    @property
    def decoding(self) -> int:
        """How many sessions a batch waits for."""
        with self._cond:
            return len(self._active)

    def forget(self, session_id: str) -> None:
        """A session stopped decoding (closed): batches no longer wait for it."""
        with self._cond:
            self._active.pop(session_id, None)
            self._cond.notify_all()

    def _run(self, batch: list[_Step]) -> None:
        try:
            self._send(batch)
        except StageError as e:
            if len(batch) == 1 or e.code == grpc.StatusCode.UNAVAILABLE:
                for s in batch:  # each its own copy: raised in its own thread, with its own traceback
                    s.error = copy.copy(e)
                return
            self.retried += len(batch)
            for s in batch:
                try:
                    self._send([s])
                except StageError as one:
                    s.error = one

    def _send(self, batch: list[_Step]) -> None:
        k = max(s.k for s in batch)
        started = time.perf_counter()
        rid = self.links.send(
            [s.route for s in batch], [s.pos for s in batch], [s.x for s in batch], top_k=k, f16=self.f16
        )
        trace.stamp(self.links.link_id, rid, "head.send", started)  # a decode step: the timeline follows these
        got = self.links.wait(rid)
        trace.stamp(self.links.link_id, rid, "head.done")
        self.batches += 1
        self.steps += len(batch)
        values = got[0]  # one row per session: the last of its rows
        ids = got[1] if len(got) > 1 else np.broadcast_to(np.arange(values.shape[1], dtype=np.int32), values.shape)
        for i, s in enumerate(batch):
            s.result = ids[i, : s.k], values[i, : s.k]
