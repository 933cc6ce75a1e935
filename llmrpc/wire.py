"""One data-plane TCP connection, used by the head and by servers alike.

Sending never blocks the caller on a slow peer: what the socket takes at once goes out on the
caller's thread (no hand-off on the per-token path), the rest is queued, in order, for a
writer thread. So a server's compute loop keeps reading while a large frame drains, and no
two parties can each wait for the other to read. A peer that does not read what is sent to it
is cut off: at most MAX_QUEUED bytes wait for it, or one frame of any size.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmrpc import codec

logger = logging.getLogger(__name__)

RECV_BYTES = 1 << 20
MAX_QUEUED = 256 << 20  # bytes that may wait for a peer to read them (or one frame of any size)
_MAX_IOV = 512  # pieces per sendmsg call (the kernel allows 1024)


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)


def open_tcp(host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None) -> socket.socket:
    """A connected blocking socket; with ``tls``, the handshake done (the server's certificate
    checked) within the timeout."""
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls is None:
        return sock
    try:
        return tls.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def connect(host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None) -> socket.socket:
    """A connected socket, tuned for the data plane (see :func:`open_tcp`)."""
    sock = open_tcp(host, port, timeout, tls)
    tune(sock)
    return sock


def accept_tls(sock: socket.socket, tls: ssl.SSLContext) -> ssl.SSLSocket:
    """An accepted socket as TLS; the handshake goes on as the peer's bytes arrive (Connection)."""
    return tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


class Connection:
    def __init__(
        self, sock: socket.socket, peer: str, max_bytes: int, *, max_meta: int = codec.MAX_DATA_META,
        inbox: memoryview | None = None, max_queued: int = MAX_QUEUED,
    ) -> None:  # fmt: skip
        """``max_bytes``, ``max_meta``: the largest frame it reads (arrays, description; see
        :class:`codec.FrameReader`). ``inbox``: what it reads into, which connections read on one
        thread may share (the frames hold copies); by default one of its own. ``max_queued``:
        bytes that may wait for the peer to read them, or one frame of any size (more: cut off)."""
        self.sock = sock
        self.peer = peer
        # TLS: one SSL object may not be used by two threads at once (reader and writer)
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._tls_io = threading.Lock()
        self.handshaking = self.tls and sock.version() is None  # type: ignore[attr-defined]
        self.reader = codec.FrameReader(max_bytes, max_meta)
        self._inbox = inbox if inbox is not None else memoryview(bytearray(RECV_BYTES))  # reused for every read
        self.link = 0  # the head link id this connection answers to (0: a peer server)
        self.authenticated = False
        self.closed = False
        self.error: OSError | None = None
        self._cond = threading.Condition()
        self._pending: deque[memoryview] = deque()
        self._queued = 0  # bytes queued and not yet all written
        self.max_queued = max_queued
        self._writing = False
        self._writer: threading.Thread | None = None

    def send(
        self, kind: codec.FrameKind, request_id: int, meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()
    ) -> None:
        self.send_encoded(codec.encode_frame(kind, request_id, meta, arrays))

    def send_encoded(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Send a frame the codec has encoded (:func:`codec.encode_frame`, :func:`codec.encode_step`)."""
        views = [memoryview(p).cast("B") for p in pieces]
        with self._cond:
            if self.error is not None or self.closed:
                raise self.error or ConnectionError(f"connection to {self.peer} is closed")
            if not self._pending and not self._writing:
                views = self._send_now(views)
            if views:
                n = sum(v.nbytes for v in views)
                if self._queued and self._queued + n > self.max_queued:
                    self.error = ConnectionError(
                        f"{self.peer} does not read what is sent to it ({self._queued} bytes wait for it): cut off"
                    )
                    raise self.error
                self._queued += n
                self._pending.extend(views)
                if self._writer is None:
                    self._writer = threading.Thread(target=self._drain, name=f"send-{self.peer}", daemon=True)
                    self._writer.start()
                self._cond.notify()

    def idle(self) -> bool:
        """Open, and nothing queued: a frame written to the socket now goes out in order."""
        return not (self._pending or self._writing or self.closed) and self.error is None

    def _send_now(self, views: list[memoryview]) -> list[memoryview]:
        """Send what the socket takes without waiting; returns the rest."""
        if self.tls:
            return self._send_tls(views)
        while views:
            try:
                n = self.sock.sendmsg(views[:_MAX_IOV])
            except (BlockingIOError, InterruptedError):
                break
            views = _advance(views, n)
        return views

    def _send_tls(self, views: list[memoryview]) -> list[memoryview]:
        data = memoryview(b"".join(views)) if len(views) > 1 else views[0]
        while data.nbytes:
            try:
                with self._tls_io:
                    n = self.sock.send(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            data = data[n:]
        return [data] if data.nbytes else []

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self.closed:
                    self._cond.wait()
                if self.closed:
                    return
                views = list(self._pending)
                self._pending.clear()
                self._writing = True
            taken = sum(v.nbytes for v in views)
            try:
                while views:
                    _wait(self.sock, select.POLLOUT, 1.0)
                    views = self._send_now(views)
            except OSError as e:
                logger.warning("sending to %s failed: %s", self.peer, e)
                with self._cond:
                    self.error = e
                    self._writing = False
                return
            with self._cond:
                self._writing = False
                self._queued -= taken

    def receive(self) -> list[codec.DataFrame] | None:
        """Read what is there without waiting: whole frames (maybe none), None at the end."""
        if self.tls:
            return self._receive_tls()
        try:
            n = self.sock.recv_into(self._inbox)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as e:
            self.error = e
            return None
        if not n:
            return None
        return self.reader.feed(self._inbox[:n])

    def _receive_tls(self) -> list[codec.DataFrame] | None:
        """As :meth:`receive`, through TLS: the handshake first, then every decrypted byte (TLS
        may hold some that the socket will never signal again)."""
        assert isinstance(self.sock, ssl.SSLSocket)
        frames: list[codec.DataFrame] = []
        with self._tls_io:
            try:
                if self.handshaking:
                    self.sock.do_handshake()
                    self.handshaking = False
                while True:
                    n = self.sock.recv_into(self._inbox)
                    if not n:
                        return None
                    frames += self.reader.feed(self._inbox[:n])
                    if not self.sock.pending():
                        return frames
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return frames
            except OSError as e:  # ssl.SSLError included: a failed handshake, a damaged record
                self.error = e
                return None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        try:
            self.sock.close()
        except OSError:
            pass


def _wait(sock: socket.socket, event: int, timeout: float) -> None:
    """Wait up to ``timeout`` for ``sock`` to be ready for ``event`` (poll: any descriptor
    number, where select stops at 1024)."""
    if sock.fileno() < 0:
        raise ConnectionError("the connection was closed")
    poller = select.poll()
    poller.register(sock, event)
    poller.poll(max(0, math.ceil(timeout * 1000)))


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    while n and views:
        if n >= views[0].nbytes:
            n -= views[0].nbytes
            views = views[1:]
        else:
            views = [views[0][n:], *views[1:]]
            n = 0
    return views


def wait_frame(conn: Connection, timeout: float) -> codec.DataFrame:
    """Block (up to ``timeout``) for the next frame on ``conn``: handshakes only."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{conn.peer} did not answer within {timeout:.0f} s")
        _wait(conn.sock, select.POLLIN, left)
        frames = conn.receive()
        if frames is None:
            raise ConnectionError(f"{conn.peer} closed the connection")
        if frames:
            return frames[0]
