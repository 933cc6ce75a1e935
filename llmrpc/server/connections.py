"""A server's data connections: its port, who may talk on it, and the connections it keeps.

A connection authenticates with the server's data token (given by Hello over gRPC) in its
first frame, a HELLO; a head's HELLO names its link id, so a server can answer that head (a
result, or an error of any hop) on the head's own connection, and no other connection may
take a link that an open one holds. A server's connections to the next servers of its routes
are made here too, on first use. Everything runs on the compute loop's thread; the data plane
gets the authenticated frames.
"""

from __future__ import annotations

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
from llmrpc.types import PROTOCOL_VERSION, split_address

logger = logging.getLogger(__name__)

HELLO_LIMIT = 1 << 16  # bytes a connection may send before it has authenticated

OnFrame = Callable[[wire.Connection, codec.DataFrame, float], None]


class Connections:
    def __init__(
        self, loop: ComputeLoop, host: str, port: int, *, on_frame: OnFrame,
        on_drop: Callable[[wire.Connection, bool], None], frame_limit: Callable[[], int],
        intercept: Callable[[wire.Connection, float], bool] | None = None, connect_timeout: float = 5.0,
        tls_server: ssl.SSLContext | None = None, tls_client: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        """``on_frame(conn, frame, arrived)``: an authenticated connection's frame;
        ``on_drop(conn, head)``: a connection closed (``head``: it held a head's link);
        ``frame_limit()``: the array bytes an authenticated frame may carry; ``intercept(conn,
        arrived)``: given first go at a readable connection (True: it read what was there).
        ``tls_server``: connections to this port are TLS; ``tls_client``: so are this server's
        connections to the next ones (their certificates checked)."""
        self.loop = loop
        self.on_frame, self.on_drop, self.frame_limit, self.intercept = on_frame, on_drop, frame_limit, intercept
        self.connect_timeout = connect_timeout
        self.tls_server, self.tls_client = tls_server, tls_client
        self.token = secrets.token_hex(16)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=64)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self.open: set[wire.Connection] = set()
        self.links: dict[int, wire.Connection] = {}  # head link id -> that head's connection
        self.peers: dict[str, wire.Connection] = {}  # next server's data address -> connection
        loop.watch(self._listener, self._accept)

    def _accept(self) -> None:
        try:
            sock, addr = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        wire.tune(sock)
        if self.tls_server is not None:
            sock = wire.accept_tls(sock, self.tls_server)
        conn = wire.Connection(sock, f"{addr[0]}:{addr[1]}", HELLO_LIMIT)
        self.open.add(conn)
        self.loop.watch(sock, lambda: self._on_readable(conn))

    def _on_readable(self, conn: wire.Connection) -> None:
        arrived = time.perf_counter()
        if self.intercept is not None and self.intercept(conn, arrived):
            return
        if conn.authenticated:
            conn.reader.max_bytes = self.frame_limit()
        try:
            frames = conn.receive()
        except codec.CodecError as e:
            self.refuse(conn, 0, f"bad frame: {e}")
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
            conn.link = link
            if link:
                self.links[link] = conn
            self.send(conn, FrameKind.WELCOME, frame.request_id, {"protocol": PROTOCOL_VERSION})

    def refuse(self, conn: wire.Connection, request_id: int, message: str) -> None:
        """Answer ``message`` and hang up."""
        logger.warning("data connection from %s: %s", conn.peer, message)
        self.send(conn, FrameKind.ERROR, request_id, {"code": "invalid_argument", "message": message})
        self.drop(conn)

    def drop(self, conn: wire.Connection) -> None:
        if conn.closed:
            return
        self.loop.unwatch(conn.sock)
        conn.close()
        self.open.discard(conn)
        head = self.links.get(conn.link) is conn
        if head:
            del self.links[conn.link]
        for address, peer in list(self.peers.items()):
            if peer is conn:
                del self.peers[address]
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

    def peer(self, address: str, token: str) -> wire.Connection:
        """The connection to the next server, made (and authenticated) on first use."""
        conn = self.peers.get(address)
        if conn is not None and not conn.closed and conn.error is None:
            return conn
        host, port = split_address(address)
        conn = wire.Connection(wire.connect(host, port, self.connect_timeout, self.tls_client), address, HELLO_LIMIT)
        conn.send(FrameKind.HELLO, 0, {"token": token, "link": 0, "protocol": PROTOCOL_VERSION})
        reply = wire.wait_frame(conn, self.connect_timeout)
        if reply.kind != FrameKind.WELCOME:
            conn.close()
            raise ConnectionError(str(reply.meta.get("message", f"answered {reply.kind.name}")))
        conn.authenticated = True
        self.peers[address] = conn
        self.open.add(conn)
        self.loop.watch(conn.sock, lambda: self._on_readable(conn))
        return conn

    def close(self) -> None:
        def shut() -> None:
            for conn in list(self.open):
                self.drop(conn)
            self.loop.unwatch(self._listener)
            self._listener.close()

        self.loop.call(shut)
