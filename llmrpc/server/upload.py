"""The bulk path for weights: a one-shot TCP connection beside gRPC.

gRPC in Python moves bulk bytes at a few hundred MB/s; a slice travels instead over a
connection the server opens for it (OpenUpload), authenticated by a one-time token that only
the OpenUpload caller got, in frames of ``<tensor u32, offset u64, length u64, crc32 u32>``
followed by the bytes. The server checks every frame as PushSlice does (same store code), then
answers with a status.

Connecting first wins nothing: every connection has TOKEN_TIMEOUT seconds to present the token
(at most MAX_PENDING at once), one without it is answered "bad upload token" and closed, and
the port keeps waiting for the caller until ACCEPT_TIMEOUT. The room the slice takes in the
cache was reserved by OpenUpload, and is given back when the upload ends, however it ends.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

from llmrpc.codec import UPLOAD_END as END
from llmrpc.codec import UPLOAD_FRAME as FRAME
from llmrpc.codec import UPLOAD_STATUS as STATUS
from llmrpc.codec import UPLOAD_TOKEN_BYTES as TOKEN_BYTES
from llmrpc.server.receive import TransferError
from llmrpc.server.store import Reservation, WeightStore

logger = logging.getLogger(__name__)

MAX_FRAME = 1 << 23  # bytes of one frame (the head sends 2 MiB ones)
ACCEPT_TIMEOUT = 60.0  # seconds the port waits for the caller's connection
TOKEN_TIMEOUT = 10.0  # seconds a connection has to present the token
MAX_PENDING = 8  # connections presenting a token at once; more are closed at once


class UploadReceiver:
    def __init__(
        self, store: WeightStore, reservation: Reservation, host: str, on_bytes: Callable[[int], None],
        tls: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        self.store, self.reservation, self.on_bytes, self.tls = store, reservation, on_bytes, tls
        self.head = reservation.head
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self._listener = socket.create_server((host, 0))
        self.port = int(self._listener.getsockname()[1])
        self.result: int | None = None
        self.error: str | None = None
        self._claimed = threading.Event()  # the caller's connection came: no other is served
        self._claim = threading.Lock()
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._thread = threading.Thread(target=self._accept, daemon=True, name=f"upload-{self.port}")
        self._thread.start()

    def _accept(self) -> None:
        deadline = time.monotonic() + ACCEPT_TIMEOUT
        try:
            while not self._claimed.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    self.error = "no upload connection with the token in time"
                    return
                self._listener.settimeout(min(left, 0.5))
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError as e:  # out of file descriptors: refuse this one, keep waiting
                    logger.warning("upload port %d: %s", self.port, e)
                    time.sleep(0.05)
                    continue
                if not self._pending.acquire(blocking=False):
                    conn.close()
                    continue
                threading.Thread(target=self._serve, args=(conn,), daemon=True, name=f"upload-{self.port}-c").start()
        finally:
            self._listener.close()
            if not self._claimed.is_set():
                self.reservation.release()

    def _serve(self, conn: socket.socket) -> None:
        """One connection: the token, then (for the caller only) the slice."""
        claimed = False
        try:
            conn.settimeout(TOKEN_TIMEOUT)
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except OSError as e:  # ssl.SSLError included
                    logger.info("upload port %d: a connection without TLS or refused: %s", self.port, e)
                    conn.close()
                    return
            with conn:
                try:
                    token = _recv_exact(conn, TOKEN_BYTES)
                except TransferError:  # a token cut short: answered as a wrong one
                    _answer(conn, TransferError("bad upload token"))
                    return
                except OSError:
                    return
                with self._claim:
                    claimed = hmac.compare_digest(bytes(token), self.token) and not self._claimed.is_set()
                    if claimed:
                        self._claimed.set()
                if not claimed:
                    _answer(conn, TransferError("bad upload token"))
                    return
                self._pending.release()
                self._receive(conn)
        finally:
            if not claimed:
                self._pending.release()

    def _receive(self, conn: socket.socket) -> None:
        conn.settimeout(ACCEPT_TIMEOUT)
        try:
            with self.reservation:
                _, received = self.store.receive(self.reservation, self._frames(conn))
            self.result = received
            conn.sendall(STATUS.pack(1, received, 0))
        except (TransferError, ValueError, OSError) as e:
            self.error = str(e)
            logger.warning("upload of [%d, %d) refused: %s", self.head.layer_start, self.head.layer_end, e)
            _answer(conn, e)

    def _frames(self, conn: socket.socket) -> Iterator[tuple[int, int, memoryview, int]]:
        # A buffer per frame: the store hashes each on another thread while the next arrives.
        while True:
            index, offset, length, crc = FRAME.unpack(_recv_exact(conn, FRAME.size))
            if index == END:
                return
            if length > MAX_FRAME:
                raise TransferError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            data = _recv_exact(conn, length)
            self.on_bytes(length)
            yield index, offset, data, crc


def _answer(conn: socket.socket, e: Exception) -> None:
    msg = str(e).encode()[:4096]
    try:
        conn.sendall(STATUS.pack(0, 0, len(msg)) + msg)
    except OSError:
        pass


def _recv_exact(conn: socket.socket, n: int) -> memoryview:
    view = memoryview(bytearray(n))
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise TransferError(f"connection closed after {got} of {n} bytes (transfer interrupted)")
        got += k
    return view
