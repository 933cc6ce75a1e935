"""Bad input gets a clear gRPC status and the server keeps serving."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from gguf.constants import MODEL_TENSOR as T

from llmrpc.codec import tensor_to_proto
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.local import LocalServers
from llmrpc.model.gguf_model import TensorInfo, check_counts, content_hash, read_model
from llmrpc.model.synthetic import FAMILIES, SyntheticFamily, SyntheticSpec, family_spec, write_gguf
from llmrpc.types import PROTOCOL_VERSION
from llmrpc.v1 import llmrpc_pb2 as pb
from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc


@pytest.fixture()
def fresh_server(tiny_models: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A server that may load the tiny models, and a folder holding a .gguf that is not one."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.gguf").write_text("not a model")
    (junk / "escape.gguf").symlink_to(__file__)
    args = ["--cache-dir", str(tmp_path / "cache"), "--model-dir", os.path.dirname(tiny_models["F32"]),
            "--model-dir", str(junk)]  # fmt: skip
    with LocalServers(1, threads=1, extra_args=args) as local:
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
    assert_serving(fresh_server)


def test_load_reveals_nothing_outside_the_model_directories(fresh_server: str, tmp_path: Path) -> None:
    """Finding 8: Load(model_path=...) opened any path on the server, and its errors told which
    files exist. A path outside --model-dir, missing, or a link leading out get one answer."""
    answers = set()
    for path in ("/nonexistent.gguf", __file__, "/etc/passwd", str(tmp_path / "junk" / "escape.gguf"),
                 str(tmp_path / "junk" / ".." / ".." / "x.gguf")):  # fmt: skip
        code, msg = status_of(fresh_server, "Load", pb.LoadRequest(model_path=path, layer_end=1))
        assert code == grpc.StatusCode.NOT_FOUND and "not available" in msg and path not in msg
        answers.add(msg)
    assert len(answers) == 1
    code, msg = status_of(fresh_server, "Load", pb.LoadRequest(model_path=str(tmp_path / "junk" / "notes.gguf"),
                                                               layer_end=1))  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "GGUF" in msg  # inside: its own error
    # with a hash: a path outside is never read (no content oracle), whatever it holds
    reply = call(fresh_server, "Load", pb.LoadRequest(model_path=__file__, model_hash=content_hash(__file__),
                                                      layer_end=1))  # fmt: skip
    assert reply.needs_weights  # type: ignore[attr-defined]
    assert_serving(fresh_server)


def _mangled(family: str, kind: T, shape: Callable[[tuple[int, ...]], tuple[int, ...]]) -> SyntheticFamily:
    """A family whose layer 1 writes ``kind`` in another shape (numpy order, outermost first)."""
    plain = FAMILIES[family]

    def layer(spec: SyntheticSpec, il: int) -> list[tuple[T, str, tuple[int, ...]]]:
        tensors = plain.layer(spec, il)
        return [(k, suf, shape(sh) if (il == 1 and k == kind and suf == "weight") else sh) for k, suf, sh in tensors]

    return replace(plain, layer=layer)


CONTRADICTIONS = [  # family, tensor of layer 1, its shape in the file, what the refusal names
    ("llama", T.ATTN_Q, lambda s: (s[0] + 16, s[1]), "reshape_3d"),  # a fifth head's rows
    ("llama", T.FFN_DOWN, lambda s: (s[0], s[1] + 16), "blk.1.ffn_down.weight"),
    ("llama", T.ATTN_NORM, lambda s: (s[0] * 2,), "blk.1.attn_norm.weight"),
    ("llama", T.ATTN_K, lambda s: (s[0] // 2, s[1]), "reshape_3d"),  # one key head where the file says two
    ("qwen3moe", T.FFN_UP_EXP, lambda s: (s[0] - 2, *s[1:]), "blk.1.ffn_up_exps.weight"),  # 6 experts of 8
    ("gpt-oss", T.ATTN_SINKS, lambda s: (s[0] + 2,), "sinks"),
]


def test_a_model_whose_tensors_contradict_its_hyperparameters_is_refused(
    fresh_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GGUF whose tensors do not fit its own hyper-parameters (damaged or hand-edited) reached
    a ggml assertion while the stage was built, and the server aborted. Now its Load is refused
    with the op and tensors that do not fit, and the server goes on serving."""
    for i, (family, kind, shape, names) in enumerate(CONTRADICTIONS):
        monkeypatch.setitem(FAMILIES, family, _mangled(family, kind, shape))
        path = write_gguf(tmp_path / "junk" / f"bad-{i}.gguf", family_spec(family, n_layer=2))
        monkeypatch.undo()
        code, msg = status_of(fresh_server, "Load", pb.LoadRequest(model_path=path, layer_end=2))
        assert code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT), msg
        assert names in msg, msg
        assert_serving(fresh_server)
    path = write_gguf(tmp_path / "junk" / "rope.gguf", family_spec("llama", n_layer=2, n_rot=32))  # heads of 16
    code, msg = status_of(fresh_server, "Load", pb.LoadRequest(model_path=path, layer_end=2))
    assert "rotating 32 dimensions of rows of 16" in msg, msg
    good = write_gguf(tmp_path / "junk" / "good.gguf", family_spec("gpt-oss", n_layer=2))
    reply = call(fresh_server, "Load", pb.LoadRequest(model_path=good, layer_end=2))
    assert reply.loaded.layer_end == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("tensor", "shape", "words"),
    [
        ("token_embd.weight", (64, 300), "320 rows"),
        ("output.weight", (64, 321), "320 rows"),
        ("output.weight", (64, 320, 1), "320 rows"),
        ("blk.0.ffn_gate_exps.weight", (64, 32, 6), "8 experts"),
        ("blk.0.ffn_down_exps.bias", (64, 9), "8 experts"),
        ("blk.3.ffn_gate_inp.weight", (64, 7), "8 experts"),
    ],
)
def test_token_tables_and_experts_are_counted_against_the_hyperparameters(
    tensor: str, shape: tuple[int, ...], words: str, tiny_models: dict[str, str]
) -> None:
    """What a graph indexes by token id or chosen expert must be as long as the vocabulary and
    the experts the hyper-parameters give: past its end a step would read outside the tensor."""
    hp = replace(read_model(tiny_models["F32"]).hparams, n_vocab=320, n_expert=8, n_expert_used=2)
    good = {n: TensorInfo(n, 0, sh, 0, 0) for n, sh in [("token_embd.weight", (64, 320)), ("output.weight", (64, 320)),
            ("blk.0.ffn_gate_exps.weight", (64, 32, 8)), ("blk.3.ffn_gate_inp.weight", (64, 8)),
            ("blk.3.ffn_gate_inp_shexp.weight", (64,))]}  # fmt: skip
    check_counts(hp, good, "m.gguf")
    with pytest.raises(ValueError, match=words):
        check_counts(hp, {**good, tensor: TensorInfo(tensor, 0, shape, 0, 0)}, "m.gguf")


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
