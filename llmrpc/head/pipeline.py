"""A chain of servers holding consecutive layer ranges, and sessions that run through it."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field

import numpy as np

from llmrpc.codec import Generation
from llmrpc.head.batching import Coalescer
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.datalink import DataLinks, Hop
from llmrpc.sampling import SamplingParams

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
    tls: ssl.SSLContext | None = None  # the data plane over TLS (the servers' certificates checked)
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
            first = self.stages[0]
            self.links = DataLinks(first.timeout, first.connect_timeout, self.tls, first.hung_after)
            try:
                for c in self.stages:
                    self.links.connect(c.address, c.layers, c.data_address, c.data_token, answers=c.answers)
                self._declare_peers(self.links.link_id)
            except BaseException:
                self.close()
                raise
            self.coalescer = Coalescer(self.links, self.f16_activations)

    def _declare_peers(self, link: int) -> None:
        """Each server's next servers on this plan's routes: the next stage, and for the last
        stage the first (a generation's next step); servers send on to no others."""
        stages = self.stages
        for i, c in enumerate(stages):
            nxt = stages[(i + 1) % len(stages)]
            if nxt is not c:
                c.declare_peers(link, [(nxt.data_address, nxt.data_token)])

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
    on_close: Callable[[], None] | None = None  # called once, when the session is closed

    def __post_init__(self) -> None:
        if not self.ids:  # (ids given: sessions opened already, one on each stage)
            self._open()
        self.route = [
            Hop(c.address, c.layers, c.data_address, c.data_token, sid)
            for c, sid in zip(self.pipeline.stages, self.ids, strict=True)
        ]

    def _open(self) -> None:
        waits = [c.start_open_session(self.n_ctx) for c in self.pipeline.stages]  # all servers at once
        opened: list[tuple[StageClient, str]] = []
        refused: StageError | None = None
        for client, wait in zip(self.pipeline.stages, waits, strict=True):
            try:
                opened.append((client, wait()))
            except StageError as e:
                refused = refused or e
        if refused is not None:
            _close_all(opened)
            raise refused
        self.ids = [sid for _, sid in opened]

    def forward(self, tokens: list[int], start_pos: int | None = None, *, all_logits: bool = False) -> np.ndarray:
        """Run ``tokens`` at ``start_pos`` (default: after what the session holds) through
        every stage; returns logits [n or 1, n_vocab]."""
        if self.pipeline.links is not None:
            return self._send_chunks(tokens, self._position(tokens, start_pos), max(len(tokens), 1), all_logits)
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
        if self.pipeline.links is None:
            return self.forward(tokens, all_logits=all_logits)
        return self._send_chunks(tokens, self._position(tokens, None), chunk, all_logits)

    def _send_chunks(self, tokens: list[int], pos: int, chunk: int, all_logits: bool) -> np.ndarray:
        """Send ``tokens`` over the data plane in chunks, all before waiting for any answer."""
        links = self.pipeline.links
        assert links is not None
        f16 = self.pipeline.f16_activations
        rids = [
            links.send([self.route], [pos + i], [_ids(tokens[i : i + chunk])], all_logits=all_logits, f16=f16)
            for i in range(0, max(len(tokens), 1), chunk)
        ]
        outs = [links.wait(rid)[0] for rid in rids]  # in order: a refusal stops at its chunk
        self.tokens[pos:] = list(tokens)
        if len(outs) == 1:
            return outs[0]
        return np.concatenate(outs) if all_logits else outs[-1]

    def generate(
        self, tokens: list[int], max_tokens: int, sampling: SamplingParams, eog: Iterable[int] = ()
    ) -> Generator[int, None, None]:
        """Feed ``tokens`` and generate up to ``max_tokens`` after them, the servers on their own:
        the last samples each token and sends it straight back to the first (the head only reads
        the reports). Stops after a token of ``eog`` (which is yielded) or when the context is
        full. Closing the iterator early stops the servers after the step in flight. Needs the
        data plane (:attr:`Pipeline.links`)."""
        links = self.pipeline.links
        if links is None:
            raise RuntimeError("generating on the servers needs their data plane")
        if max_tokens < 1:
            return
        pos = self._position(tokens, None)
        gen = Generation(max_tokens, 0, self.n_ctx, frozenset(eog), sampling)
        rid = links.send([self.route], [pos], [_ids(tokens)], f16=self.pipeline.f16_activations, gen=gen)
        self.tokens[pos:] = list(tokens)
        last: int | None = None  # the newest token: in the cache once the next one comes
        ended = False
        try:
            while not ended:
                for report in links.stream(rid):
                    if last is not None:
                        self.tokens.append(last)
                    last = int(report["token"])
                    ended = report["end"] is not None
                    if report["end"] == "context":
                        logger.warning("stopping: the context of %d positions is full", self.n_ctx)
                    yield last
        except StageError:  # the stream has ended
            ended = True
            raise
        finally:
            if not ended:  # the caller stopped early: stop the servers before the session is reused
                links.cancel(rid)
                try:
                    while not any(r["end"] is not None for r in links.stream(rid)):
                        pass
                except StageError as e:
                    logger.warning("cancelling a generation: %s", e)

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
        """Close the session on every server, but those the data plane gave up (dead or hung:
        a close would only wait for them). When the pipeline has lost a server, the closes are
        not waited for: a server left may be waiting for the lost one (its turn on a shared
        machine), and each server also closes a head's sessions when its data link goes."""
        if self.pipeline.coalescer is not None and self.ids:
            self.pipeline.coalescer.forget(self.ids[0])
        lost = self.pipeline.links.lost if self.pipeline.links is not None else {}
        stages = list(zip(self.pipeline.stages, self.ids, strict=False))
        try:
            _close_all([(c, sid) for c, sid in stages if c.data_address not in lost], wait=not lost)
        finally:
            self.ids = []
            done, self.on_close = self.on_close, None
            if done is not None:
                done()

    def __enter__(self) -> PipelineSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ids(tokens: list[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


def _close_all(sessions: list[tuple[StageClient, str]], wait: bool = True) -> None:
    """Close sessions on their servers, all at once; a refusal is only logged."""
    waits = [client.start_close_session(sid) for client, sid in sessions]
    for done in waits if wait else []:
        try:
            done()
        except StageError as e:
            logger.warning("closing session: %s", e)
