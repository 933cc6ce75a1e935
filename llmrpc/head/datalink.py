"""The head's side of the data plane: one connection to each server's data port.

A forward goes to the first server of its route and comes back, as a RESULT or an ERROR,
from whichever server ends it; the servers pass activations among themselves. Any thread may
wait for its request: one of the waiting threads reads the sockets for all of them (no reader
thread, so a single stream pays no hand-off between threads). A generation (a forward that
generates on its own, see the servers' data plane) answers with a stream of TOKEN frames.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from llmrpc import codec, trace, wire
from llmrpc.codec import FrameKind
from llmrpc.head.client import HungError, StageError
from llmrpc.types import HUNG_AFTER, PROTOCOL_VERSION, split_address

logger = logging.getLogger(__name__)

NO_LIMIT = 1 << 62  # servers' answers are trusted for size: logits of a batch can be large


@dataclass(frozen=True)
class Hop:
    address: str  # the server's gRPC address: how errors name it
    layers: str
    data_address: str
    token: str
    session_id: str


class DataLinks:
    def __init__(
        self, timeout: float = 600.0, connect_timeout: float = 10.0, tls: ssl.SSLContext | None = None,
        hung_after: float = HUNG_AFTER,
    ) -> None:  # fmt: skip
        """``timeout``: the most a request may take; ``hung_after``: see :class:`Liveness`."""
        self.timeout = timeout
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.link_id = secrets.randbits(62) + 1
        self._conns: dict[str, wire.Connection] = {}  # data address -> connection
        self._cond = threading.Condition()
        self._reading = False
        self._ids = itertools.count(1)
        self._pending: dict[int, list[Hop]] = {}  # request id -> its route
        self._done: dict[int, tuple[codec.DataFrame | StageError, list[Hop]]] = {}
        self._streams: dict[int, deque[codec.DataFrame | StageError]] = {}  # generations' frames
        self.lost: dict[str, str] = {}  # data address -> why its server was given up
        self.hung: set[str] = set()  # data addresses of those given up as hung
        self.liveness = Liveness(self, hung_after)

    def connect(
        self, address: str, layers: str, data_address: str, token: str, answers: Callable[[float], bool] | None = None
    ) -> None:
        """Connect to a server's data port. ``answers(timeout)``: whether the server answers a
        health check (see :class:`Liveness`); without it, only the request's timeout ends a wait."""
        if answers is not None:
            self.liveness.checks[data_address] = answers
        if data_address in self._conns:
            return
        try:
            host, port = split_address(data_address)
            conn = wire.Connection(wire.connect(host, port, self.connect_timeout, self.tls), data_address, NO_LIMIT)
            conn.send(FrameKind.HELLO, 0, {"token": token, "link": self.link_id, "protocol": PROTOCOL_VERSION})
            reply = wire.wait_frame(conn, self.connect_timeout)
        except (OSError, ValueError, codec.CodecError) as e:
            raise StageError(address, layers, grpc.StatusCode.UNAVAILABLE, f"data port {data_address}: {e}") from None
        if reply.kind != FrameKind.WELCOME:
            conn.close()
            raise StageError(address, layers, None, f"data port {data_address}: {reply.meta.get('message')}")
        self._conns[data_address] = conn

    def send(
        self,
        routes: list[list[Hop]],
        positions: list[int],
        xs: list[np.ndarray],
        *,
        all_logits: bool = False,
        top_k: int = 0,
        f16: bool = False,
        gen: codec.Generation | None = None,
    ) -> int:
        """Start one forward of one or more sessions (``routes[j]`` is session j's, through the
        same servers; its rows ``xs[j]`` go at ``positions[j]``) in one batch; returns the
        request id for :meth:`wait`, whose rows come in the same order. With ``gen`` (one
        session) it generates: read its tokens with :meth:`stream`."""
        rid = next(self._ids)
        route = routes[0]
        meta = {
            "route": [
                [h.data_address, h.token, [r[i].session_id for r in routes]] for i, h in enumerate(route)
            ],
            "hop": 0, "link": self.link_id, "pos": positions, "rows": [int(x.shape[0]) for x in xs],
            "all_logits": all_logits, "top_k": top_k, "f16": f16,
        }  # fmt: skip
        if gen is not None:
            meta["gen"] = gen.to_meta()
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        first = route[0]
        with self._cond:
            self._pending[rid] = route
            self.liveness.progressed(rid)
            if gen is not None:
                self._streams[rid] = deque()
            conn = self._conns.get(first.data_address)
        try:
            if conn is None:
                raise ConnectionError("its data connection was lost earlier (the server stopped or crashed)")
            conn.send(FrameKind.FORWARD, rid, meta, [x])
        except OSError as e:
            with self._cond:
                del self._pending[rid]
                self._streams.pop(rid, None)
                self.liveness.forget(rid)
            raise StageError(first.address, first.layers, grpc.StatusCode.UNAVAILABLE, f"data plane: {e}") from None
        return rid

    def wait(self, rid: int) -> list[np.ndarray]:
        """The arrays of request ``rid``'s answer; a server's refusal raises :class:`StageError`."""
        self._wait_for(rid, lambda: rid in self._done)
        with self._cond:
            done, route = self._done.pop(rid)
        if isinstance(done, StageError):
            raise done
        if done.kind == FrameKind.ERROR:
            raise _refusal(done, route)
        return done.arrays

    def stream(self, rid: int) -> list[dict[str, Any]]:
        """The TOKEN reports of generation ``rid`` that came since the last call (waiting for at
        least one): each {"token", "step", "end"}. The one whose ``end`` is set is the last; a
        server's refusal raises :class:`StageError`. Either ends the stream."""
        self._wait_for(rid, lambda: bool(self._streams.get(rid, True)))
        with self._cond:
            frames = self._streams.get(rid) or deque()
            route = self._pending.get(rid, [])
            out: list[dict[str, Any]] = []
            while frames:
                f = frames.popleft()
                if isinstance(f, StageError) or f.kind == FrameKind.ERROR:
                    self._end_stream(rid)
                    raise f if isinstance(f, StageError) else _refusal(f, route)
                out.append(f.meta)
                if f.meta.get("end") is not None:
                    self._end_stream(rid)
                    break
        return out

    def cancel(self, rid: int) -> None:
        """Ask generation ``rid`` to stop (after the step in flight): its stream then ends with
        ``end`` "cancelled", unless it ended on its own first."""
        with self._cond:
            route = self._pending.get(rid)
            conn = self._conns.get(route[-1].data_address) if route else None
        if conn is not None:
            try:
                conn.send(FrameKind.CANCEL, rid, {})
            except OSError as e:
                logger.warning("cancelling generation %d: %s", rid, e)

    def _end_stream(self, rid: int) -> None:
        self._streams.pop(rid, None)
        self._pending.pop(rid, None)
        self.liveness.forget(rid)

    def _wait_for(self, rid: int, ready: Callable[[], bool]) -> None:
        """Read the sockets (or let another waiting thread read them) until ``ready()``."""
        deadline = time.monotonic() + self.timeout
        while True:
            with self._cond:
                if ready():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    route = self._pending.pop(rid, [])
                    self._streams.pop(rid, None)
                    self.liveness.forget(rid)
                    names = ", ".join(h.address for h in route)
                    raise StageError(names, "", grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer in {self.timeout:.0f} s")
                if self._reading:
                    self._cond.wait(min(left, 0.5))
                    continue
                self._reading = True
            try:
                self._read(min(left, 0.5))
            finally:
                with self._cond:
                    self._reading = False
                    self._cond.notify_all()

    def _read(self, timeout: float) -> None:
        """Read whatever the servers sent (waiting up to ``timeout``) and file it by request."""
        with self._cond:
            socks = {c.sock: c for c in self._conns.values() if not c.closed}
        if not socks:
            time.sleep(timeout)
            return
        try:
            ready, _, _ = select.select(list(socks), [], [], timeout)
        except (OSError, ValueError):  # a connection closed meanwhile (given up as hung): filed already
            return
        woke = time.perf_counter()
        for sock in ready:
            conn = socks[sock]
            try:
                frames = conn.receive()
            except codec.CodecError as e:
                frames = None
                logger.warning("data plane %s: %s", conn.peer, e)
            with self._cond:
                if frames is None:
                    self._lost(conn)
                    continue
                for f in frames:
                    stream = self._streams.get(f.request_id)
                    if stream is not None and f.kind in (FrameKind.TOKEN, FrameKind.ERROR):
                        stream.append(f)
                        self.liveness.progressed(f.request_id)
                        trace.stamp(self.link_id, f.request_id, "head.recv", woke, f.meta.get("step"))
                        continue
                    answer = f.kind in (FrameKind.RESULT, FrameKind.ERROR)
                    route = self._pending.pop(f.request_id, None) if answer else None
                    if route is not None:
                        self.liveness.forget(f.request_id)
                        self._done[f.request_id] = (f, route)
                        trace.stamp(self.link_id, f.request_id, "head.recv", woke)
                    elif f.kind != FrameKind.WELCOME:
                        logger.warning("data plane %s: unexpected %s frame %d", conn.peer, f.kind.name, f.request_id)

    def _lost(self, conn: wire.Connection) -> None:
        """A server closed its connection, or was given up (:meth:`give_up`): fail every request
        whose route runs through it. Under ``_cond``."""
        conn.close()
        if self._conns.get(conn.peer) is not conn:
            return
        del self._conns[conn.peer]
        why = self.lost.setdefault(conn.peer, "the server closed its data connection")
        for rid, route in list(self._pending.items()):
            hop = next((h for h in route if h.data_address == conn.peer), None)
            if hop is not None:
                lost = (
                    HungError(hop.address, hop.layers, self.liveness.hung_after)
                    if conn.peer in self.hung
                    else StageError(hop.address, hop.layers, grpc.StatusCode.UNAVAILABLE, why)
                )
                self._fail(rid, route, lost)
        self._cond.notify_all()

    def _fail(self, rid: int, route: list[Hop], error: StageError) -> None:
        """End request ``rid`` with ``error``: a generation's stream gets it as its next item,
        anything else as its answer. Under ``_cond``."""
        if rid in self._streams:
            self._streams[rid].append(error)
            return
        del self._pending[rid]
        self.liveness.forget(rid)
        self._done[rid] = (error, route)

    def give_up(self, data_address: str) -> None:
        """Treat the server at ``data_address`` as gone (it is hung): its requests fail with a
        :class:`HungError`, and whatever it sends later on this connection is never read."""
        with self._cond:
            conn = self._conns.get(data_address)
            if conn is None:
                return
            self.hung.add(data_address)
            self.lost[data_address] = f"no answer within {self.liveness.hung_after:g} s, nor to a health check"
            logger.warning("data plane %s: %s", data_address, self.lost[data_address])
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader waiting on it
            except OSError:
                pass
            self._lost(conn)

    def stalled(self, since: float) -> dict[int, list[Hop]]:
        """The requests (their routes) that have made no progress since ``since``."""
        with self._cond:
            return {rid: self._pending[rid] for rid in self.liveness.stalled(since) if rid in self._pending}

    def close(self) -> None:
        """Close every link; a request still waiting on them fails (UNAVAILABLE) at once: a
        re-plan closes the links while another generation's step may be in flight on them."""
        self.liveness.stop()
        with self._cond:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()
            for rid, route in list(self._pending.items()):
                names = ", ".join(h.address for h in route)
                self._fail(
                    rid, route,
                    StageError(names, "", grpc.StatusCode.UNAVAILABLE, "the head closed its data links (a re-plan)"),
                )  # fmt: skip
            self._cond.notify_all()


class Liveness:
    """Tells a hung server from a slow one, for :class:`DataLinks`. A request that has made no
    progress (sent, or a frame of its answer come) for ``hung_after`` seconds has every server
    on its route asked for a health check, answered by its gRPC handlers while its layers
    compute; a server that does not answer within ``hung_after`` either is given up, as if it
    had closed its connection: its requests fail (UNAVAILABLE, naming it), and a farm fails it
    over. So a hung server is noticed within 2.25 times ``hung_after`` (its silence, a look
    every quarter of it, the check); one that answers is waited for, up to the request's timeout."""

    def __init__(self, links: DataLinks, hung_after: float) -> None:
        if not hung_after > 0:
            raise ValueError(f"hung_after must be a positive number of seconds, got {hung_after!r}")
        self.links = links
        self.hung_after = hung_after
        self.checks: dict[str, Callable[[float], bool]] = {}  # data address -> health check
        self._progress: dict[int, float] = {}  # request id -> when it last made progress
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.checked = 0  # health checks made

    def progressed(self, rid: int) -> None:
        """Request ``rid`` was sent, or a frame of its answer came."""
        with self._lock:
            self._progress[rid] = time.monotonic()
            if self._watcher is None and self.checks:
                self._watcher = threading.Thread(target=self._watch, daemon=True, name="data-liveness")
                self._watcher.start()

    def forget(self, rid: int) -> None:
        with self._lock:
            self._progress.pop(rid, None)

    def stalled(self, since: float) -> list[int]:
        with self._lock:
            return [rid for rid, t in self._progress.items() if t < since]

    def _watch(self) -> None:
        while not self._stop.wait(self.hung_after / 4):
            started = time.monotonic()
            stalled = self.links.stalled(started - self.hung_after)
            addresses = {h.data_address for route in stalled.values() for h in route} & set(self.checks)
            if not addresses:
                continue
            answered = self._check(sorted(addresses))
            self.checked += len(answered)
            for address, ok in answered.items():
                if not ok:
                    self.links.give_up(address)
            with self._lock:  # the rest are slow, not hung: wait for them again
                for rid in stalled:
                    if rid in self._progress and self._progress[rid] < started:
                        self._progress[rid] = started

    def _check(self, addresses: list[str]) -> dict[str, bool]:
        """Each server's health check, all at once."""
        answers: dict[str, bool] = {}
        threads = [
            threading.Thread(target=lambda a=a: answers.__setitem__(a, self.checks[a](self.hung_after)), daemon=True)
            for a in addresses
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.hung_after + 5)
        return {a: answers.get(a, False) for a in addresses}

    def stop(self) -> None:
        self._stop.set()


def _refusal(frame: codec.DataFrame, route: list[Hop]) -> StageError:
    """The error a server's ERROR frame stands for, naming that server and its layers."""
    m = frame.meta
    code = getattr(grpc.StatusCode, str(m.get("code", "")).upper(), None)
    where = str(m.get("server", ""))
    hop = next((h for h in route if h.data_address == where), None)
    name, layers = (hop.address, hop.layers) if hop else (where, "")
    return StageError(name, str(m.get("layers") or layers), code, str(m.get("message")))
