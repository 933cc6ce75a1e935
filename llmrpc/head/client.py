"""The head's side of one server: typed calls, errors that name the server and its layers."""

from __future__ import annotations

import logging

import grpc
import numpy as np

from llmrpc import codec
from llmrpc.types import PROTOCOL_VERSION, LoadedRange, ServerInfo
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


class StageClient:
    def __init__(self, address: str, *, timeout: float = 600.0, connect_timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.loaded: LoadedRange | None = None
        self._channel = grpc.insecure_channel(address, options=_OPTIONS)
        self._stub = pb_grpc.StageStub(self._channel)

    @property
    def layers(self) -> str:
        return f"[{self.loaded.layer_start}, {self.loaded.layer_end})" if self.loaded else ""

    def _error(self, e: grpc.RpcError) -> StageError:
        code = e.code() if hasattr(e, "code") else None
        detail = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.UNAVAILABLE:
            detail = f"cannot reach it: {detail}"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            detail = f"no answer in time: {detail}"
        return StageError(self.address, self.layers, code, detail or "unknown error")

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
        return info

    def load(self, model_path: str, start: int, end: int) -> LoadedRange:
        try:
            reply = self._stub.Load(
                pb.LoadRequest(model_path=model_path, layer_start=start, layer_end=end), timeout=self.timeout
            )
        except grpc.RpcError as e:
            self.loaded = None
            err = self._error(e)
            raise StageError(self.address, f"[{start}, {end})", err.code, err.detail) from None
        self.loaded = codec.range_from_proto(reply.loaded)
        return self.loaded

    def open_session(self, n_ctx: int) -> str:
        try:
            return str(self._stub.OpenSession(pb.OpenSessionRequest(n_ctx=n_ctx), timeout=self.timeout).session_id)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def forward(
        self, session_id: str, start_pos: int, x: np.ndarray, *, all_logits: bool = False, f16: bool = False
    ) -> np.ndarray:
        request = pb.ForwardRequest(
            session_id=session_id,
            start_pos=start_pos,
            input=codec.tensor_to_proto(x),
            all_logits=all_logits,
            output_dtype=pb.DTYPE_F16 if f16 else pb.DTYPE_F32,
        )
        try:
            reply = self._stub.Forward(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None
        return codec.tensor_from_proto(reply.output, max_elements=1 << 31)

    def close_session(self, session_id: str) -> None:
        try:
            self._stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=30)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def close(self) -> None:
        self._channel.close()
