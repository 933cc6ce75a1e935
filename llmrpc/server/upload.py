"""The bulk path for weights: a one-shot TCP connection beside gRPC.

gRPC in Python moves bulk bytes at a few hundred MB/s; a slice travels instead over a
connection the server opens for it (OpenUpload), authenticated by a one-time token, in
frames of ``<tensor u32, offset u64, length u64, crc32 u32>`` followed by the bytes. The
server checks every frame as PushSlice does (same store code), then answers with a status.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import ssl
import threading
from collections.abc import Callable, Iterator

from llmrpc.codec import UPLOAD_END as END
from llmrpc.codec import UPLOAD_FRAME as FRAME
from llmrpc.codec import UPLOAD_STATUS as STATUS
from llmrpc.codec import UPLOAD_TOKEN_BYTES as TOKEN_BYTES
from llmrpc.model.slicefile import IncomingSlice
from llmrpc.server.store import TransferError, WeightStore, _check_layout

logger = logging.getLogger(__name__)

MAX_FRAME = 1 << 26
ACCEPT_TIMEOUT = 60.0


class UploadReceiver:
    def __init__(
        self, store: WeightStore, host: str, head: IncomingSlice, max_bytes: int, on_bytes: Callable[[int], None],
        tls: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        _check_layout(head, max_bytes)  # refuse a bad header before opening anything
        self.store, self.head, self.max_bytes, self.on_bytes = store, head, max_bytes, on_bytes
        self.tls = tls
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(ACCEPT_TIMEOUT)
        self.port = int(self._listener.getsockname()[1])
        self.result: int | None = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"upload-{self.port}")
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError as e:
            self.error = f"no upload connection: {e}"
            return
        finally:
            self._listener.close()
        conn.settimeout(ACCEPT_TIMEOUT)
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError as e:  # ssl.SSLError included
                conn.close()
                self.error = f"upload connection without TLS or with a certificate it refused: {e}"
                return
        with conn:
            try:
                token = _recv_exact(conn, TOKEN_BYTES)
                if not hmac.compare_digest(bytes(token), self.token):
                    raise TransferError("bad upload token")
                _, received = self.store.receive(self.head, self._frames(conn), self.max_bytes)
                self.result = received
                conn.sendall(STATUS.pack(1, received, 0))
            except (TransferError, ValueError, OSError) as e:
                self.error = str(e)
                logger.warning("upload of [%d, %d) refused: %s", self.head.layer_start, self.head.layer_end, e)
                msg = str(e).encode()[:4096]
                try:
                    conn.sendall(STATUS.pack(0, 0, len(msg)) + msg)
                except OSError:
                    pass

    def _frames(self, conn: socket.socket) -> Iterator[tuple[int, int, memoryview, int]]:
        # One buffer for every frame, unless the store hashes on another thread (it then
        # still reads earlier frames while this one arrives).
        reuse = not any(t.sha256 for t in self.head.tensors)
        buffer = bytearray()
        while True:
            index, offset, length, crc = FRAME.unpack(_recv_exact(conn, FRAME.size))
            if index == END:
                return
            if length > MAX_FRAME:
                raise TransferError(f"frame of {length} bytes exceeds {MAX_FRAME}")
            if reuse and len(buffer) < length:
                buffer = bytearray(length)
            data = _recv_exact(conn, length, buffer if reuse else None)
            self.on_bytes(length)
            yield index, offset, data, crc


def _recv_exact(conn: socket.socket, n: int, buffer: bytearray | None = None) -> memoryview:
    view = memoryview(buffer if buffer is not None else bytearray(n))[:n]
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise TransferError(f"connection closed after {got} of {n} bytes (transfer interrupted)")
        got += k
    return view
