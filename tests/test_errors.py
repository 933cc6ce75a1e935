"""Bad input gets a clear gRPC status and the server keeps serving."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from llmrpc.codec import tensor_to_proto
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.local import LocalServers
from llmrpc.types import PROTOCOL_VERSION
from llmrpc.v1 import llmrpc_pb2 as pb
from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc


@pytest.fixture()
def fresh_server() -> Iterator[str]:
    with LocalServers(1, threads=1) as local:
        yield local.addresses[0]


def call(address: str, method: str, request: object) -> object:
    with grpc.insecure_channel(address) as ch:
        return getattr(pb_grpc.StageStub(ch), method)(request, timeout=30)


def status_of(address: str, method: str, request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(address, method, request)
    err = info.value
    return err.code(), err.details()  # type: ignore[attr-defined]


def assert_serving(address: str) -> None:
    reply = call(address, "Health", pb.HealthRequest())
    assert reply.serving  # type: ignore[attr-defined]


def test_forward_before_load(fresh_server: str) -> None:
    code, msg = status_of(fresh_server, "OpenSession", pb.OpenSessionRequest(n_ctx=64))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "Load" in msg
    x = tensor_to_proto(np.array([1, 2], dtype=np.int32))
    code, msg = status_of(fresh_server, "Forward", pb.ForwardRequest(session_id="x", input=x))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert_serving(fresh_server)


def test_load_errors(fresh_server: str, tiny_models: dict[str, str]) -> None:
    path = tiny_models["F32"]
    code, msg = status_of(fresh_server, "Load", pb.LoadRequest(model_path=path, layer_start=2, layer_end=9))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "[2, 9)" in msg and "4 layers" in msg
    code, msg = status_of(fresh_server, "Load", pb.LoadRequest(model_path=path, layer_start=3, layer_end=3))
    assert code == grpc.StatusCode.OUT_OF_RANGE
    code, msg = status_of(fresh_server, "Load", pb.LoadRequest(model_path="/nonexistent.gguf", layer_end=1))
    assert code == grpc.StatusCode.NOT_FOUND and "/nonexistent.gguf" in msg
    code, msg = status_of(fresh_server, "Load", pb.LoadRequest(model_path=__file__, layer_end=1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "GGUF" in msg
    assert_serving(fresh_server)


def test_forward_errors(fresh_server: str, tiny_models: dict[str, str]) -> None:
    path = tiny_models["F32"]
    first = pb.LoadRequest(model_path=path, layer_start=0, layer_end=2)
    call(fresh_server, "Load", first)
    sid = call(fresh_server, "OpenSession", pb.OpenSessionRequest(n_ctx=300)).session_id  # type: ignore[attr-defined]

    def forward(x: np.ndarray | pb.Tensor, start_pos: int = 0, session: str = sid) -> tuple[grpc.StatusCode, str]:
        t = x if isinstance(x, pb.Tensor) else tensor_to_proto(x)
        return status_of(fresh_server, "Forward", pb.ForwardRequest(session_id=session, start_pos=start_pos, input=t))

    code, msg = forward(np.array([1, 2], dtype=np.int32), session="no-such-session")
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-session" in msg
    code, msg = forward(np.zeros((2, 64), dtype=np.float32))  # hidden states to the first stage
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "token ids" in msg
    code, msg = forward(np.array([1, 999], dtype=np.int32))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "999" in msg and "vocabulary" in msg
    code, msg = forward(np.array([1, 2], dtype=np.int32), start_pos=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "gap" in msg
    code, msg = forward(np.ones(600, dtype=np.int32))
    assert code == grpc.StatusCode.OUT_OF_RANGE and "context" in msg
    bad = pb.Tensor(dtype=pb.DTYPE_I32, shape=[4], data=b"\x00" * 7)
    code, msg = forward(bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in msg
    code, msg = forward(pb.Tensor(dtype=99, shape=[1], data=b"\x00" * 4))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "dtype" in msg
    # still serving, and the session still works
    out = call(
        fresh_server,
        "Forward",
        pb.ForwardRequest(session_id=sid, input=tensor_to_proto(np.array([1, 5], dtype=np.int32))),
    )
    assert list(out.output.shape) == [2, 64]  # type: ignore[attr-defined]

    # a middle stage checks the hidden size and dtype
    call(fresh_server, "Load", pb.LoadRequest(model_path=path, layer_start=1, layer_end=3))
    sid = call(fresh_server, "OpenSession", pb.OpenSessionRequest(n_ctx=64)).session_id  # type: ignore[attr-defined]
    code, msg = forward(np.zeros((2, 63), dtype=np.float32), session=sid)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "[n, 64]" in msg
    code, msg = forward(np.array([1, 2], dtype=np.int32), session=sid)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "int32" in msg
    code, msg = forward(np.full((1, 64), np.nan, dtype=np.float32), session=sid)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in msg
    code, msg = status_of(fresh_server, "OpenSession", pb.OpenSessionRequest(n_ctx=10**7))
    assert code == grpc.StatusCode.OUT_OF_RANGE
    call(fresh_server, "CloseSession", pb.CloseSessionRequest(session_id=sid))
    code, msg = status_of(fresh_server, "CloseSession", pb.CloseSessionRequest(session_id=sid))
    assert code == grpc.StatusCode.NOT_FOUND
    assert_serving(fresh_server)


def test_protocol_version_is_checked(fresh_server: str) -> None:
    for old in (99, 1):  # 1: before STEP frames
        code, msg = status_of(fresh_server, "Hello", pb.HelloRequest(protocol_version=old))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and str(old) in msg
    info = StageClient(fresh_server).hello()
    assert info.protocol_version == PROTOCOL_VERSION == 3 and info.device.kind == "cpu" and info.device.memory_total > 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_client_error() -> None:
    address = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(StageError, match=address):
        StageClient(address, connect_timeout=1).hello()


def test_head_exits_nonzero_naming_unreachable_server(servers: list[str], tiny_models: dict[str, str]) -> None:
    dead = f"127.0.0.1:{_closed_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "llmrpc.cli", "head", "--model", tiny_models["F32"], "--rpc-servers",
         f"{servers[0]},{dead}", "--prompt", "hi", "-n", "2", "--connect-timeout", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert dead in proc.stderr and "cannot reach" in proc.stderr
