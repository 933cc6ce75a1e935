"""The server's data plane: activations in, layers computed, activations on to the next server.

gRPC carries control (load, sessions) and stays the reference path for single forwards; per
token, its Python machinery costs about a millisecond per hop. Here a FORWARD frame arrives
on a plain TCP connection, is computed on the compute loop's own thread (the loop waits on
these sockets), and goes straight on to the next server of its route; only the last server
answers the head. A token through three servers is four messages instead of six, with no
thread hand-off on the way.

Connections authenticate with the server's data token (given by Hello over gRPC) in their
first frame. A head connection names its link id, so a server can answer that head (a
result, or an error of any hop) on the head's own connection.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmrpc import codec, trace, wire
from llmrpc.codec import FrameKind
from llmrpc.server.api import EngineError, StageEngine, stage_outputs
from llmrpc.server.loop import ComputeLoop
from llmrpc.types import PROTOCOL_VERSION, split_address

logger = logging.getLogger(__name__)

HELLO_LIMIT = 1 << 16  # bytes a connection may send before it has authenticated


class DataPlane:
    def __init__(
        self, engine: StageEngine, loop: ComputeLoop, host: str, port: int = 0, connect_timeout: float = 5.0
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.token = secrets.token_hex(16)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=64)
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._conns: set[wire.Connection] = set()
        self._links: dict[int, wire.Connection] = {}  # head link id -> that head's connection
        self._peers: dict[str, wire.Connection] = {}  # next server's data address -> connection
        loop.watch(self._listener, self._accept)

    # -- connections (all on the loop thread) ---------------------------------------------
    def _accept(self) -> None:
        try:
            sock, addr = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        wire.tune(sock)
        conn = wire.Connection(sock, f"{addr[0]}:{addr[1]}", HELLO_LIMIT)
        self._conns.add(conn)
        self.loop.watch(sock, lambda: self._on_readable(conn))

    def _on_readable(self, conn: wire.Connection) -> None:
        if conn.authenticated:
            conn.reader.max_bytes = self._frame_limit()
        arrived = time.perf_counter()
        try:
            frames = conn.receive()
        except codec.CodecError as e:
            self._refuse(conn, 0, f"bad frame: {e}")
            return
        if frames is None:
            self._drop(conn)
            return
        for frame in frames:
            if conn.closed:
                return
            self._handle(conn, frame, arrived)

    def _handle(self, conn: wire.Connection, frame: codec.DataFrame, arrived: float) -> None:
        if not conn.authenticated:
            token = frame.meta.get("token")
            if frame.kind != FrameKind.HELLO or not isinstance(token, str):
                self._refuse(conn, frame.request_id, "a data connection starts with HELLO and the server's token")
            elif not hmac.compare_digest(token.encode(), self.token.encode()):
                self._refuse(conn, frame.request_id, "wrong data token (ask the server's Hello for it)")
            else:
                conn.authenticated = True
                conn.link = int(frame.meta.get("link") or 0)
                if conn.link:
                    self._links[conn.link] = conn
                self._send(conn, FrameKind.WELCOME, frame.request_id, {"protocol": PROTOCOL_VERSION})
            return
        if frame.kind == FrameKind.FORWARD:
            self._forward(frame, arrived)
        elif frame.kind == FrameKind.ERROR:  # from a peer we push to: it could not take our frame
            logger.warning("%s: %s", conn.peer, frame.meta.get("message"))
        else:
            self._refuse(conn, frame.request_id, f"unexpected {frame.kind.name} frame")

    def _refuse(self, conn: wire.Connection, request_id: int, message: str) -> None:
        logger.warning("data connection from %s: %s", conn.peer, message)
        self._send(conn, FrameKind.ERROR, request_id, {"code": "invalid_argument", "message": message})
        self._drop(conn)

    def _drop(self, conn: wire.Connection) -> None:
        if conn.closed:
            return
        self.loop.unwatch(conn.sock)
        conn.close()
        self._conns.discard(conn)
        if self._links.get(conn.link) is conn:
            del self._links[conn.link]
        for address, peer in list(self._peers.items()):
            if peer is conn:
                del self._peers[address]

    def _send(
        self, conn: wire.Connection, kind: FrameKind, rid: int, meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()
    ) -> bool:
        try:
            conn.send(kind, rid, meta, arrays)
            return True
        except OSError as e:
            logger.warning("sending to %s: %s", conn.peer, e)
            self._drop(conn)
            return False

    def _frame_limit(self) -> int:
        return self.engine.max_input_elements() * 4 + 4096

    # -- forwarding -----------------------------------------------------------------------
    def _forward(self, frame: codec.DataFrame, arrived: float) -> None:
        m, rid = frame.meta, frame.request_id
        link = m.get("link")
        try:
            route, hop = m["route"], int(m["hop"])
            sessions = [str(sid) for sid in route[hop][2]]
            positions = [int(p) for p in m["pos"]]
            rows = [int(n) for n in m["rows"]]
            (x,) = frame.arrays
            if not (
                isinstance(route, list) and 0 <= hop < len(route)
                and len(sessions) == len(positions) == len(rows) > 0
                and min(rows) > 0 and sum(rows) == x.shape[0]
            ):  # fmt: skip
                raise ValueError
        except (KeyError, ValueError, TypeError, IndexError):
            message = "a FORWARD frame needs route, hop, pos and rows (one per session) and one array of all rows"
            self._fail(link, rid, "invalid_argument", message, "")
            return
        here = str(route[hop][0])
        trace.stamp(link, rid, f"s{hop}.arrive", arrived)
        trace.stamp(link, rid, f"s{hop}.start")
        parts = np.split(x, np.cumsum(rows)[:-1]) if len(rows) > 1 else [x]
        try:
            outs = self.engine.forward_batch(
                list(zip(sessions, positions, parts, strict=True)), bool(m.get("all_logits"))
            )
            more = hop + 1 < len(route)
            out = outs[0] if len(outs) == 1 else np.concatenate(outs)
            outputs = stage_outputs(
                self.engine.loaded(), out, 0 if more else int(m.get("top_k") or 0), bool(m.get("f16"))
            )
        except EngineError as e:
            self._fail(link, rid, e.code.value, e.message, here)
            return
        trace.stamp(link, rid, f"s{hop}.end")
        if not more:
            self._answer(link, FrameKind.RESULT, rid, {}, outputs)
            return
        address, token = str(route[hop + 1][0]), str(route[hop + 1][1])
        try:
            peer = self._peer(address, token)
        except (OSError, ValueError) as e:
            self._fail_next(link, rid, address, f"cannot reach it from {here}: {e}")
            return
        if not self._send(peer, FrameKind.FORWARD, rid, {**m, "hop": hop + 1}, outputs):
            self._fail_next(link, rid, address, f"the connection to it from {here} broke")

    def _fail(self, link: Any, rid: int, code: str, message: str, here: str) -> None:
        loaded = self.engine.loaded()
        layers = f"[{loaded.layer_start}, {loaded.layer_end})" if loaded else ""
        self._answer(link, FrameKind.ERROR, rid, {"code": code, "message": message, "server": here, "layers": layers})

    def _fail_next(self, link: Any, rid: int, address: str, message: str) -> None:
        """The next server could not be reached: the error names that server (the head knows its
        layers), as the head's own connection to it would when it closes."""
        self._answer(link, FrameKind.ERROR, rid, {"code": "unavailable", "message": message, "server": address})

    def _answer(
        self, link: Any, kind: FrameKind, rid: int, meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()
    ) -> None:
        conn = self._links.get(link) if isinstance(link, int) else None
        if conn is None:
            logger.warning(
                "no connection to head link %s for request %d (%s)", link, rid, meta.get("message", kind.name)
            )
            return
        self._send(conn, kind, rid, meta, arrays)

    def _peer(self, address: str, token: str) -> wire.Connection:
        """The connection to the next server, made (and authenticated) on first use."""
        conn = self._peers.get(address)
        if conn is not None and not conn.closed and conn.error is None:
            return conn
        host, port = split_address(address)
        conn = wire.Connection(wire.connect(host, port, self.connect_timeout), address, HELLO_LIMIT)
        conn.send(FrameKind.HELLO, 0, {"token": token, "link": 0, "protocol": PROTOCOL_VERSION})
        reply = wire.wait_frame(conn, self.connect_timeout)
        if reply.kind != FrameKind.WELCOME:
            conn.close()
            raise ConnectionError(str(reply.meta.get("message", f"answered {reply.kind.name}")))
        conn.authenticated = True
        self._peers[address] = conn
        self._conns.add(conn)
        self.loop.watch(conn.sock, lambda: self._on_readable(conn))
        return conn

    def close(self) -> None:
        def shut() -> None:
            for conn in list(self._conns):
                self._drop(conn)
            self.loop.unwatch(self._listener)
            self._listener.close()

        self.loop.call(shut)
