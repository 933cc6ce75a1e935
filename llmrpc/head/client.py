"""The head's side of one server: typed calls, errors that name the server and its layers."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np

from llmrpc import codec
from llmrpc.auth import ClientSecurity
from llmrpc.model.kv import CacheConfig
from llmrpc.types import (
    HUNG_AFTER,
    PROTOCOL_VERSION,
    ClosedSession,
    LoadedRange,
    OpenedSession,
    PrefixStart,
    ServerHealth,
    ServerInfo,
    join_address,
    split_address,
)
from llmrpc.v1 import llmrpc_pb2 as pb
from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_OPTIONS = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.enable_http_proxy", 0),
]


class StageError(RuntimeError):
    """A server refused or failed a call; the message names the server, its layers, the cause."""

    def __init__(self, address: str, layers: str, code: grpc.StatusCode | None, detail: str) -> None:
        where = f"server {address}" + (f" (layers {layers})" if layers else "")
        super().__init__(f"{where}: {detail}" + (f" [{code.name}]" if code else ""))
        self.address = address
        self.code = code
        self.detail = detail

    def __copy__(self) -> StageError:
        """The same error, without a traceback (for each of the callers one failure fails)."""
        twin = type(self).__new__(type(self))
        twin.args = self.args
        twin.__dict__.update(self.__dict__)
        return twin


class HungError(StageError):
    """A server that answered nothing for ``hung_after`` seconds, not even a health check: it
    is stopped or hung, and is failed over as one that died (code UNAVAILABLE)."""

    def __init__(self, address: str, layers: str, hung_after: float) -> None:
        detail = f"no answer within {hung_after:g} s, nor to a health check: the server is stopped or hung"
        super().__init__(address, layers, grpc.StatusCode.UNAVAILABLE, detail)


class StageClient:
    def __init__(
        self, address: str, *, timeout: float = 600.0, connect_timeout: float = 10.0,
        security: ClientSecurity = ClientSecurity(),  # noqa: B008 (frozen)
        hung_after: float = HUNG_AFTER,
    ) -> None:  # fmt: skip
        """``timeout``: the most any call may take; ``hung_after``: a call that has no answer
        this long is given up when a health check has none either (see HUNG_AFTER)."""
        if not hung_after > 0:
            raise ValueError(f"hung_after must be a positive number of seconds, got {hung_after!r}")
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.hung_after = hung_after
        self.loaded: LoadedRange | None = None
        self.data_address = ""  # host:port of its data plane (from Hello; "" when it has none)
        self.data_token = ""
        self._channel = security.channel(address, _OPTIONS)
        self._stub = pb_grpc.StageStub(security.intercept(self._channel))
        self._stream: _ForwardStream | None = None
        self._stream_lock = threading.Lock()

    @property
    def layers(self) -> str:
        return f"[{self.loaded.layer_start}, {self.loaded.layer_end})" if self.loaded else ""

    def _error(self, e: grpc.RpcError, layers: str | None = None) -> StageError:
        code = e.code() if hasattr(e, "code") else None
        detail = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.UNAVAILABLE:
            detail = f"cannot reach it: {detail}"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            detail = f"no answer in time: {detail}"
        return StageError(self.address, self.layers if layers is None else layers, code, detail or "unknown error")

    def hello(self) -> ServerInfo:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            raise StageError(
                self.address, "", grpc.StatusCode.UNAVAILABLE,
                f"cannot reach it within {self.connect_timeout:.0f} s (is llmrpc-server running there?)",
            ) from None  # fmt: skip
        try:
            reply = self._stub.Hello(
                pb.HelloRequest(protocol_version=PROTOCOL_VERSION, client="llmrpc-head"), timeout=self.connect_timeout
            )
        except grpc.RpcError as e:
            raise self._error(e) from None
        info = codec.server_info_from_proto(self.address, reply)
        if info.protocol_version != PROTOCOL_VERSION:
            raise StageError(
                self.address, "", None,
                f"speaks protocol {info.protocol_version}, this head speaks {PROTOCOL_VERSION}",
            )  # fmt: skip
        self.loaded = info.loaded
        if info.data_port:
            self.data_address = join_address(split_address(self.address)[0], info.data_port)
            self.data_token = info.data_token
        return info

    def health(self) -> ServerHealth:
        try:
            return codec.health_from_proto(self._stub.Health(pb.HealthRequest(), timeout=self.connect_timeout))
        except grpc.RpcError as e:
            raise self._error(e) from None

    def answers(self, timeout: float) -> bool:
        """Whether the server answers a health check within ``timeout`` (any answer, a refusal
        included: it is not hung). Its gRPC handlers answer while its layers compute."""
        try:
            self._stub.Health(pb.HealthRequest(), timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            return code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        return True

    def _reply(self, future: grpc.Future, layers: str | None = None) -> Any:
        """A call's reply, waited for up to ``timeout``; a server that has not answered within
        ``hung_after`` and does not answer a health check either is given up (UNAVAILABLE)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return future.result(timeout=max(0.0, min(self.hung_after, deadline - time.monotonic())))
            except grpc.FutureTimeoutError:
                if time.monotonic() < deadline and self.answers(self.hung_after):
                    continue
                future.cancel()
                layers = self.layers if layers is None else layers
                if time.monotonic() < deadline:
                    raise HungError(self.address, layers, self.hung_after) from None
                code, detail = grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer in {self.timeout:g} s"
                raise StageError(self.address, layers, code, detail) from None
            except grpc.RpcError as e:
                raise self._error(e, layers) from None

    def load(
        self, model_path: str, start: int, end: int, model_hash: str = "", cache: CacheConfig | None = None,
        share_host: str = "", slice_digest: str = "",
    ) -> LoadedRange | None:  # fmt: skip
        """Load layers [start, end) (their attention and KV cache as ``cache`` says, by default
        llama.cpp's; ``share_host``: take turns with the servers given the same name); None when
        the server has no copy (push the slice). ``slice_digest``: the slice's digest
        (slicefile.py), without which a server loads no slice it received."""
        request = codec.load_request(
            model_path, start, end, model_hash, cache or CacheConfig(), share_host, slice_digest
        )
        try:
            reply = self._reply(self._stub.Load.future(request, timeout=self.timeout), f"[{start}, {end})")
        except StageError:
            self.loaded = None
            raise
        if reply.needs_weights:
            return None
        self.loaded = codec.range_from_proto(reply.loaded)
        return self.loaded

    def open_upload(self, header: pb.SliceHeader, start: int, end: int) -> tuple[int, bytes]:
        try:
            ticket = self._stub.OpenUpload(header, timeout=self.connect_timeout)
        except grpc.RpcError as e:
            raise self._error(e, f"[{start}, {end})") from None
        return int(ticket.port), bytes(ticket.token)

    def push_slice(self, messages: Iterator[pb.SliceChunk], start: int, end: int) -> int:
        """Stream a slice's messages; returns the tensor bytes the server took."""
        try:
            return int(self._stub.PushSlice(messages, timeout=self.timeout).tensor_bytes)
        except grpc.RpcError as e:
            raise self._error(e, f"[{start}, {end})") from None

    def declare_peers(self, link: int, peers: list[tuple[str, str]]) -> None:
        """Tell the server the next servers (data address, data token) it sends head link
        ``link``'s activations on to; it connects to them now (see server/peers.py)."""
        self._reply(self._stub.Peers.future(codec.peers_request(link, peers), timeout=self.timeout))

    def open_session(self, n_ctx: int) -> str:
        return self.start_open_session(n_ctx)()

    def start_open_session(self, n_ctx: int) -> Callable[[], str]:
        """Ask for a session without waiting; the returned function waits for its id (and
        raises :class:`StageError` if the server refused). A pipeline asks all its servers at once."""
        wait = self.start_open(n_ctx)
        return lambda: wait().session_id

    def start_open(self, n_ctx: int, prefix: PrefixStart | None = None) -> Callable[[], OpenedSession]:
        """:meth:`start_open_session`, the session started from ``prefix`` if given, and the
        whole answer (the kept prefixes the server freed too)."""
        request = pb.OpenSessionRequest(n_ctx=n_ctx)
        if prefix is not None:
            request.prefix_session, request.prefix_rows, request.prefix_take = (
                prefix.session_id,
                prefix.rows,
                prefix.take,
            )
        future = self._stub.OpenSession.future(request, timeout=self.timeout)

        def opened() -> OpenedSession:
            r = self._reply(future)
            return OpenedSession(str(r.session_id), int(r.n_ctx), int(r.cache_bytes), tuple(r.evicted))

        return opened

    def forward(
        self,
        session_id: str,
        start_pos: int,
        x: np.ndarray,
        *,
        all_logits: bool = False,
        f16: bool = False,
        top_k: int = 0,
    ) -> np.ndarray:
        """Hidden states or logits; with ``top_k`` (last stage) see :meth:`forward_top_k`."""
        return self._forward(session_id, start_pos, x, all_logits, f16, top_k)[0]

    def forward_top_k(self, session_id: str, start_pos: int, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Last stage only: (token ids [rows, k], logits [rows, k]) of the k largest logits."""
        values, ids = self._forward(session_id, start_pos, x, False, False, k)
        if ids is None:  # the server sent every logit (k >= n_vocab)
            ids = np.broadcast_to(np.arange(values.shape[1], dtype=np.int32), values.shape)
        return ids, values

    def _forward(
        self, session_id: str, start_pos: int, x: np.ndarray, all_logits: bool, f16: bool, top_k: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        request = pb.ForwardRequest(
            session_id=session_id,
            start_pos=start_pos,
            input=codec.tensor_to_proto(x),
            all_logits=all_logits,
            output_dtype=pb.DTYPE_F16 if f16 else pb.DTYPE_F32,
            logits_top_k=top_k,
        )
        with self._stream_lock:
            try:
                if self._stream is None:
                    self._stream = _ForwardStream(self._stub, self.answers, self.hung_after)
                reply = self._stream.call(request, self.timeout)
            except grpc.RpcError as e:
                hung = self._stream is not None and self._stream.hung
                if self._stream is not None:
                    self._stream.close()
                self._stream = None
                if hung:
                    raise HungError(self.address, self.layers, self.hung_after) from None
                raise self._error(e) from None
        out = codec.tensor_from_proto(reply.output, max_elements=1 << 31)
        ids = codec.tensor_from_proto(reply.token_ids, max_elements=1 << 31) if reply.HasField("token_ids") else None
        return out, ids

    def close_session(self, session_id: str) -> None:
        self.start_close_session(session_id)()

    def start_close_session(self, session_id: str) -> Callable[[], None]:
        """Close a session without waiting; the returned function waits for the server's answer."""
        wait = self.start_close(session_id)

        def done() -> None:
            wait()

        return done

    def start_close(self, session_id: str, keep: bool = False) -> Callable[[], ClosedSession]:
        """:meth:`start_close_session`; ``keep``: the server keeps the cache as a prefix (if its
        budget allows: the answer says), or frees a kept prefix given its id."""
        request = pb.CloseSessionRequest(session_id=session_id, keep=keep)
        future = self._stub.CloseSession.future(request, timeout=self.timeout)

        def closed() -> ClosedSession:
            r = self._reply(future)
            return ClosedSession(bool(r.kept), tuple(r.evicted))

        return closed

    def close(self) -> None:
        with self._stream_lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        self._channel.close()


class _ForwardStream:
    """One long-lived ForwardStream call: requests go in through a queue, replies come back
    in order. A stream message costs far less than a unary call (no per-call HTTP/2 setup)."""

    _END = object()

    def __init__(self, stub: pb_grpc.StageStub, answers: Callable[[float], bool], hung_after: float) -> None:
        self._requests: queue.Queue[object] = queue.Queue()
        self._call = stub.ForwardStream(iter(self._requests.get, self._END))
        self._replies = iter(self._call)
        self._deadline: float | None = None
        self._checked = 0.0  # when the call in flight last had a sign of life
        self._answers, self._hung_after = answers, hung_after
        self.hung = False  # cancelled because the server answered nothing, a health check included
        self._closed = threading.Event()
        threading.Thread(target=self._watchdog, daemon=True, name="forward-stream-watchdog").start()

    def _watchdog(self) -> None:
        """Cancel the stream when a reply is overdue, or when the server has been silent for
        ``hung_after`` and answers no health check (a per-call timer thread costs too much)."""
        while not self._closed.wait(min(0.5, self._hung_after / 4)):
            deadline = self._deadline
            if deadline is None:
                continue
            if time.monotonic() > deadline:
                self._call.cancel()
                return
            if time.monotonic() - self._checked > self._hung_after:
                if not self._answers(self._hung_after) and self._deadline is not None:
                    self.hung = True
                    self._call.cancel()
                    return
                self._checked = time.monotonic()

    def call(self, request: pb.ForwardRequest, timeout: float) -> pb.ForwardReply:
        self._requests.put(request)
        self._checked = time.monotonic()
        self._deadline = self._checked + timeout
        try:
            return next(self._replies)  # type: ignore[no-any-return]
        except StopIteration:
            raise _EndedStream(self._call) from None
        finally:
            self._deadline = None

    def close(self) -> None:
        self._closed.set()
        self._requests.put(self._END)
        self._call.cancel()


class _EndedStream(grpc.RpcError):
    """The server ended the stream without a reply; carries the stream's final status."""

    def __init__(self, call: grpc.Call) -> None:
        super().__init__()
        self._c = call

    def code(self) -> grpc.StatusCode:
        return self._c.code()  # type: ignore[no-any-return]

    def details(self) -> str:
        return str(self._c.details())
