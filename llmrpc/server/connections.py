"""A server's data connections: its port, who may talk on it, and the connections it keeps.

A connection authenticates with the server's data token (given by Hello over gRPC) in its
first frame, a HELLO; a head's HELLO names its link id, so a server can answer that head (a
result, or an error of any hop) on the head's own connection, and no other connection may
take a link that an open one holds. Until its HELLO, a connection costs the server little: at
most ``max_connections`` are open at once, a HELLO must come within ``hello_timeout`` seconds
and in one small frame (PRE_AUTH_META bytes), and every connection reads into the one buffer
this server reads with. Running out of descriptors in accept pauses accepting a moment, with a
warning, and the server serves on. Connections to the next servers (server/peers.py) are kept
here once made. Everything runs on the compute loop's thread; the data plane gets the
authenticated frames.
"""

from __future__ import annotations

import errno
import hmac
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmrpc import codec, wire
from llmrpc.codec import FrameKind, shown
from llmrpc.server.loop import ComputeLoop
from llmrpc.server.steps import MAX_LINK
from llmrpc.types import PROTOCOL_VERSION

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # data connections accepted at once (--max-connections)
HELLO_TIMEOUT = 10.0  # seconds a connection may take to authenticate (--hello-timeout)
PRE_AUTH_META = 4096  # bytes of a HELLO's description (it carries no arrays)
ACCEPT_BACKOFF = 0.5  # seconds accepting pauses when the process is out of descriptors
WARN_EVERY = 10.0  # seconds between warnings of one kind (a flood would fill the log)
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

OnFrame = Callable[[wire.Connection, codec.DataFrame, float], None]


class Connections:
    def __init__(
        self, loop: ComputeLoop, host: str, port: int, *, on_frame: OnFrame,
        on_drop: Callable[[wire.Connection, bool], None], frame_limit: Callable[[], int],
        intercept: Callable[[wire.Connection, float], bool] | None = None,
        tls_server: ssl.SSLContext | None = None, max_connections: int = MAX_CONNECTIONS,
        hello_timeout: float = HELLO_TIMEOUT,
    ) -> None:  # fmt: skip
        """``on_frame(conn, frame, arrived)``: an authenticated connection's frame;
        ``on_drop(conn, head)``: a connection closed (``head``: it held a head's link);
        ``frame_limit()``: the array bytes an authenticated frame may carry; ``intercept(conn,
        arrived)``: given first go at a readable connection (True: it read what was there).
        ``tls_server``: connections to this port are TLS."""
        self.loop = loop
        self.on_frame, self.on_drop, self.frame_limit, self.intercept = on_frame, on_drop, frame_limit, intercept
        self.tls_server = tls_server
        self.max_connections, self.hello_timeout = max_connections, hello_timeout
        self.token = secrets.token_hex(16)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=64)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self.open: set[wire.Connection] = set()
        self.accepted: set[wire.Connection] = set()  # of ``open``, those accepted on this port
        self.links: dict[int, wire.Connection] = {}  # head link id -> that head's connection
        self._inbox = memoryview(bytearray(wire.RECV_BYTES))  # every read on the loop thread lands here
        self._warned: dict[str, tuple[float, int]] = {}  # kind of warning -> (when logged, since unlogged)

    def start(self) -> None:
        """Accept connections (once what the callbacks need exists)."""
        self.loop.watch(self._listener, self._accept)

    def _accept(self) -> None:
        try:
            sock, addr = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in _OUT_OF_DESCRIPTORS:  # pause (the listener would wake the loop at once)
                self._warn("accept", "data port: cannot accept a connection (%s); pausing %.1f s", e, ACCEPT_BACKOFF)
                self.loop.unwatch(self._listener)
                self.loop.soon(self._resume_accepting, ACCEPT_BACKOFF)
            else:  # the peer gave up before it was accepted, and the like
                logger.debug("data port: accept failed: %s", e)
            return
        if len(self.accepted) >= self.max_connections:
            sock.close()
            self._warn(
                "full", "data port: %d connections open, the most allowed (--max-connections)", len(self.accepted)
            )
            return
        try:
            wire.tune(sock)
            if self.tls_server is not None:
                sock = wire.accept_tls(sock, self.tls_server)
        except OSError as e:  # (reset already)
            sock.close()
            logger.debug("data port: connection from %s lost before it started: %s", addr, e)
            return
        conn = wire.Connection(sock, f"{addr[0]}:{addr[1]}", 0, max_meta=PRE_AUTH_META, inbox=self._inbox)
        self.open.add(conn)
        self.accepted.add(conn)
        self.loop.watch(sock, lambda: self._on_readable(conn))
        self.loop.soon(lambda: self._hello_due(conn), self.hello_timeout)

    def _resume_accepting(self) -> None:
        if self._listener.fileno() >= 0:  # (not closed meanwhile)
            self.loop.watch(self._listener, self._accept)

    def _hello_due(self, conn: wire.Connection) -> None:
        if not conn.authenticated and not conn.closed:
            self.refuse(conn, 0, f"no HELLO within {self.hello_timeout:g} s")

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        """Log a warning of this kind at most once every WARN_EVERY seconds (with how many
        were left out in between)."""
        now = time.monotonic()
        last, left_out = self._warned.get(kind, (-WARN_EVERY, 0))
        if now - last < WARN_EVERY:
            self._warned[kind] = (last, left_out + 1)
            return
        self._warned[kind] = (now, 0)
        logger.warning(message + (f" ({left_out} more like it since the last warning)" if left_out else ""), *args)

    def _on_readable(self, conn: wire.Connection) -> None:
        arrived = time.perf_counter()
        if self.intercept is not None and self.intercept(conn, arrived):
            return
        if conn.authenticated:
            conn.reader.max_bytes = self.frame_limit()
        try:
            frames = conn.receive()
        except codec.CodecError as e:
            if conn.authenticated:
                self.refuse(conn, 0, f"bad frame: {e}")
            else:
                self.refuse(conn, 0, f"a data connection starts with a HELLO frame and the server's token ({e})")
            return
        if frames is None:
            self.drop(conn)
            return
        for frame in frames:
            if conn.closed:
                return
            if conn.authenticated:
                self.on_frame(conn, frame, arrived)
            else:
                self._authenticate(conn, frame)

    def _authenticate(self, conn: wire.Connection, frame: codec.DataFrame) -> None:
        """A connection's first frame: HELLO with the data token; a head's names its link (a
        server's, 0), which no other open connection may hold (it would take that head's results)."""
        token, link = frame.meta.get("token"), frame.meta.get("link") or 0
        if frame.kind != FrameKind.HELLO or not isinstance(token, str):
            self.refuse(conn, frame.request_id, "a data connection starts with HELLO and the server's token")
        elif not hmac.compare_digest(token.encode(errors="replace"), self.token.encode()):  # (a lone surrogate)
            self.refuse(conn, frame.request_id, "wrong data token (ask the server's Hello for it)")
        elif not isinstance(link, int) or isinstance(link, bool) or not 0 <= link <= MAX_LINK:
            self.refuse(conn, frame.request_id, f"link must be an integer within [0, {MAX_LINK}]")
        elif link and link in self.links:
            self.refuse(conn, frame.request_id, "that link is another connection's")
        else:
            conn.authenticated = True
            conn.reader.max_meta = codec.MAX_DATA_META
            conn.link = link
            if link:
                self.links[link] = conn
            self.send(conn, FrameKind.WELCOME, frame.request_id, {"protocol": PROTOCOL_VERSION})

    def refuse(self, conn: wire.Connection, request_id: int, message: str) -> None:
        """Answer ``message`` and hang up."""
        if conn.authenticated:
            logger.warning("data connection from %s: %s", conn.peer, message)
        else:  # (anyone can make these: a flood of them must not fill the log)
            self._warn("refused", "data connection from %s: %s", conn.peer, message)
        self.send(conn, FrameKind.ERROR, request_id, {"code": "invalid_argument", "message": message})
        self.drop(conn)

    def drop(self, conn: wire.Connection) -> None:
        if conn.closed:
            return
        self.loop.unwatch(conn.sock)
        conn.close()
        self.open.discard(conn)
        self.accepted.discard(conn)
        head = self.links.get(conn.link) is conn
        if head:
            del self.links[conn.link]
        self.on_drop(conn, head)

    def send(
        self, conn: wire.Connection, kind: FrameKind, rid: int, meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()
    ) -> bool:
        return self.send_encoded(conn, codec.encode_frame(kind, rid, meta, arrays))

    def send_encoded(self, conn: wire.Connection, pieces: Sequence[bytes | memoryview]) -> bool:
        """Send an encoded frame; a broken connection is dropped (False)."""
        try:
            conn.send_encoded(pieces)
            return True
        except OSError as e:
            logger.warning("sending to %s: %s", conn.peer, e)
            self.drop(conn)
            return False

    def to_head(self, link: Any, rid: int, pieces: Sequence[bytes | memoryview], what: str = "a token") -> None:
        """Send an encoded frame (a TOKEN report: codec.encode_token) to the head on ``link``."""
        conn = self.links.get(link) if isinstance(link, int) else None
        if conn is None:
            logger.warning("no connection to head link %s for request %d (%s)", shown(link), rid, shown(what, 200))
            return
        self.send_encoded(conn, pieces)

    def adopt(self, conn: wire.Connection) -> None:
        """Keep and read an authenticated connection this server made (to a next server)."""
        self.open.add(conn)
        self.loop.watch(conn.sock, lambda: self._on_readable(conn))

    def close(self) -> None:
        def shut() -> None:
            for conn in list(self.open):
                self.drop(conn)
            self.loop.unwatch(self._listener)
            self._listener.close()

        self.loop.call(shut)
