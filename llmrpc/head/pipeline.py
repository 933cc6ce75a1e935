"""A chain of servers holding consecutive layer ranges, and sessions that run through it."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from llmrpc.head.client import StageClient, StageError
from llmrpc.head.datalink import DataLinks, Hop

logger = logging.getLogger(__name__)


@dataclass
class Pipeline:
    stages: list[StageClient]  # in layer order, each with ``loaded`` set
    n_vocab: int
    n_layer: int
    f16_activations: bool = False  # hidden states cross the wire as f16 (half the bytes, ~1e-3 error)
    # Activations go server to server over the data plane; False: through the head over gRPC
    # (six messages per token through three servers instead of four, each a slower one).
    data_plane: bool = True
    links: DataLinks | None = None
    coalescer: Coalescer | None = None

    def __post_init__(self) -> None:
        expect = 0
        for c in self.stages:
            r = c.loaded
            if r is None or r.layer_start != expect:
                raise ValueError(f"server {c.address} does not hold the layers from {expect}")
            expect = r.layer_end
        if expect != self.n_layer:
            raise ValueError(f"the servers hold layers [0, {expect}) of {self.n_layer}")
        if self.data_plane and all(c.data_address for c in self.stages):
            self.links = DataLinks(timeout=self.stages[0].timeout, connect_timeout=self.stages[0].connect_timeout)
            for c in self.stages:
                self.links.connect(c.address, c.layers, c.data_address, c.data_token)
            self.coalescer = Coalescer(self.links, self.f16_activations)

    def close(self) -> None:
        if self.links is not None:
            self.links.close()
            self.links = None
            self.coalescer = None

    def session(self, n_ctx: int) -> PipelineSession:
        return PipelineSession(self, n_ctx)


@dataclass
class PipelineSession:
    """One sequence's state on every stage; the head keeps its tokens so it can be replayed."""

    pipeline: Pipeline
    n_ctx: int
    ids: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    route: list[Hop] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            for c in self.pipeline.stages:
                self.ids.append(c.open_session(self.n_ctx))
        except StageError:
            self.close()
            raise
        self.route = [
            Hop(c.address, c.layers, c.data_address, c.data_token, sid)
            for c, sid in zip(self.pipeline.stages, self.ids, strict=True)
        ]

    def forward(self, tokens: list[int], start_pos: int | None = None, *, all_logits: bool = False) -> np.ndarray:
        """Run ``tokens`` at ``start_pos`` (default: after what the session holds) through
        every stage; returns logits [n or 1, n_vocab]."""
        links = self.pipeline.links
        if links is not None:
            pos = self._position(tokens, start_pos)
            rid = links.send(
                [self.route], [pos], [_ids(tokens)], all_logits=all_logits, f16=self.pipeline.f16_activations
            )
            out = links.wait(rid)[0]
            self.tokens[pos:] = list(tokens)
            return out
        pos, x = self._through_all_but_last(tokens, start_pos)
        client, sid = self.pipeline.stages[-1], self.ids[-1]
        x = client.forward(sid, pos, x, all_logits=all_logits, f16=self.pipeline.f16_activations)
        self.tokens[pos:] = list(tokens)
        return x

    def forward_pipelined(self, tokens: list[int], chunk: int, *, all_logits: bool = False) -> np.ndarray:
        """Like :meth:`forward` for a long run of tokens, sent as micro-batches of ``chunk``
        rows without waiting in between: while the second server works on the first chunk,
        the first works on the second, and so on. Returns the logits of every row
        (``all_logits``) or of the last one."""
        links = self.pipeline.links
        if links is None or len(tokens) <= chunk:
            return self.forward(tokens, all_logits=all_logits)
        pos = self._position(tokens, None)
        f16 = self.pipeline.f16_activations
        rids = [
            links.send([self.route], [pos + i], [_ids(tokens[i : i + chunk])], all_logits=all_logits, f16=f16)
            for i in range(0, len(tokens), chunk)
        ]
        outs = [links.wait(rid)[0] for rid in rids]  # in order: a refusal stops at its chunk
        self.tokens[pos:] = list(tokens)
        return np.concatenate(outs) if all_logits else outs[-1]

    def forward_top_k(self, tokens: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`forward` for the last row only, returning (ids [k], logits [k]) of its k
        largest logits: the last stage sends k values instead of the whole vocabulary."""
        coalescer = self.pipeline.coalescer
        if coalescer is not None:
            pos = self._position(tokens, None)
            ids, values = coalescer.call(self.route, pos, _ids(tokens), k)
            self.tokens[pos:] = list(tokens)
            return ids, values
        pos, x = self._through_all_but_last(tokens, None)
        ids, values = self.pipeline.stages[-1].forward_top_k(self.ids[-1], pos, x, k)
        self.tokens[pos:] = list(tokens)
        return ids[-1], values[-1]

    def _through_all_but_last(self, tokens: list[int], start_pos: int | None) -> tuple[int, np.ndarray]:
        """Check the positions fit, then run every stage but the last: (position, its input)."""
        pos = self._position(tokens, start_pos)
        x = _ids(tokens)
        for client, sid in zip(self.pipeline.stages[:-1], self.ids[:-1], strict=True):
            x = client.forward(sid, pos, x, f16=self.pipeline.f16_activations)
        return pos, x

    def _position(self, tokens: list[int], start_pos: int | None) -> int:
        """Where ``tokens`` go (default: after what the session holds), checked against the context."""
        pos = len(self.tokens) if start_pos is None else start_pos
        if pos + len(tokens) > self.n_ctx:
            raise ValueError(f"{pos + len(tokens)} positions exceed the context size of {self.n_ctx}")
        return pos

    def close(self) -> None:
        if self.pipeline.coalescer is not None and self.ids:
            self.pipeline.coalescer.forget(self.ids[0])
        for client, sid in zip(self.pipeline.stages, self.ids, strict=False):
            try:
                client.close_session(sid)
            except StageError as e:
                logger.warning("closing session: %s", e)
        self.ids = []

    def __enter__(self) -> PipelineSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ids(tokens: list[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


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
                for s in batch:
                    s.error = e
                return
            self.retried += len(batch)
            for s in batch:
                try:
                    self._send([s])
                except StageError as one:
                    s.error = one

    def _send(self, batch: list[_Step]) -> None:
        k = max(s.k for s in batch)
        rid = self.links.send(
            [s.route for s in batch], [s.pos for s in batch], [s.x for s in batch], top_k=k, f16=self.f16
        )
        got = self.links.wait(rid)
        self.batches += 1
        self.steps += len(batch)
        values = got[0]  # one row per session: the last of its rows
        ids = got[1] if len(got) > 1 else np.broadcast_to(np.arange(values.shape[1], dtype=np.int32), values.shape)
        for i, s in enumerate(batch):
            s.result = ids[i, : s.k], values[i, : s.k]
