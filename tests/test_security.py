"""Tokens and TLS on the links between head and servers: real server processes on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llmrpc import codec
from llmrpc.auth import ENV_TOKEN, ClientSecurity
from llmrpc.codec import FrameKind
from llmrpc.farm import Farm
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.local import LocalServers, read_ready
from llmrpc.sampling import SamplingParams
from llmrpc.v1 import llmrpc_pb2 as pb
from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc

GREEDY = SamplingParams(temperature=0)
TOKEN = "s3cret-token"


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_TOKEN, raising=False)


def _generate(farm: Farm) -> list[int]:
    return list(farm.generate_tokens([1, 5, 9, 14], 12, GREEDY, stop_at_eog=False))


@pytest.fixture(scope="module")
def guarded() -> Iterator[list[str]]:
    """Two servers that want a token."""
    with LocalServers(2, threads=1, extra_args=["--no-calibrate"], env={ENV_TOKEN: TOKEN}) as local:
        yield list(local.addresses)


def test_servers_with_a_token_refuse_calls_without_it(tiny_models: dict[str, str], guarded: list[str]) -> None:
    with pytest.raises(StageError) as info:
        Farm(tiny_models["F32"], guarded, ctx_size=64)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "a token is needed" in str(info.value) and guarded[0] in str(info.value)
    with pytest.raises(StageError, match="wrong token"):
        Farm(tiny_models["F32"], guarded, ctx_size=64, token="not-it")
    with pytest.raises(StageError, match="UNAUTHENTICATED"):  # Hello itself: no data-plane token for strangers
        StageClient(guarded[1]).hello()


def test_the_right_token_gets_the_same_tokens(
    tiny_models: dict[str, str], guarded: list[str], servers: list[str]
) -> None:
    with Farm(tiny_models["F32"], guarded, ctx_size=64, token=TOKEN) as farm:
        assert len(farm.plan) == 2
        got = _generate(farm)
    with Farm(tiny_models["F32"], servers[:2], ctx_size=64) as farm:
        assert _generate(farm) == got


def test_servers_a_farm_starts_get_its_token(tiny_models: dict[str, str]) -> None:
    with Farm(tiny_models["F32"], local=2, threads=1, ctx_size=64, token=TOKEN) as farm:
        assert len(_generate(farm)) == 12
        assert farm._local is not None
        with pytest.raises(StageError, match="a token is needed"):
            StageClient(farm._local.addresses[0]).hello()


def _certificate(tmp: Path, name: str) -> tuple[str, str]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=llmrpc-test",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def _server(*args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "llmrpc.cli", "server", "--host", "127.0.0.1", "--port", "0", "--threads", "1",
           "--no-calibrate", *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _native_steps(address: str, security: ClientSecurity) -> int:
    channel = security.channel(address, [])
    with channel:
        stub = pb_grpc.StageStub(security.intercept(channel))
        return int(stub.Health(pb.HealthRequest(), timeout=10).native_steps)


def test_tls_on_every_link(tiny_models: dict[str, str], servers: list[str], tmp_path: Path) -> None:
    """Two servers with one self-signed certificate: gRPC, the head's data links, the hop from
    one server to the next and the weights shipped to them all go over TLS, and the tokens are
    those of plain servers."""
    cert, key = _certificate(tmp_path, "server")
    other, _ = _certificate(tmp_path, "other")
    procs = [
        _server("--tls-cert", cert, "--tls-key", key, "--token", TOKEN, "--cache-dir", str(tmp_path / f"cache{i}"))
        for i in range(2)
    ]  # fmt: skip
    try:
        addresses = [read_ready(p, 60) for p in procs]
        security = ClientSecurity(TOKEN, cert)
        with Farm(tiny_models["F32"], addresses, ctx_size=64, token=TOKEN, tls_ca=cert) as farm:
            assert len(farm.plan) == 2
            assert all(n > 0 for n in farm.bytes_shipped.values())  # shipped over TLS: caches were empty
            got = [_generate(farm) for _ in range(2)]
            data = farm.pipeline.links._conns if farm.pipeline and farm.pipeline.links else {}
            assert data and all(c.tls for c in data.values())
        assert [_native_steps(a, security) for a in addresses] == [0, 0]  # the C hop is plain TCP only
        with Farm(tiny_models["F32"], servers[:2], ctx_size=64) as farm:
            assert _generate(farm) == got[0] == got[1]
        for bad in (ClientSecurity(TOKEN), ClientSecurity(TOKEN, tls_ca=other)):  # no TLS, another CA
            with pytest.raises(StageError, match="cannot reach it"):
                StageClient(addresses[0], connect_timeout=2, security=bad).hello()
        # the data port speaks TLS only: a plain HELLO gets no WELCOME
        host, port = addresses[0].rsplit(":", 1)
        client = StageClient(addresses[0], security=security)
        data_port = int(client.hello().data_port)
        client.close()
        with socket.create_connection((host, data_port), timeout=5) as plain:
            plain.sendall(b"".join(codec.encode_frame(FrameKind.HELLO, 0, {"token": "x", "link": 1})))
            plain.settimeout(5)
            try:
                answer = plain.recv(65536)
            except ConnectionResetError:
                answer = b""
            assert answer[:1] in (b"", b"\x15")  # closed, or a TLS alert: no WELCOME frame
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            assert p.wait(timeout=10) == 0


def test_bad_tls_settings_are_refused_at_start(tmp_path: Path) -> None:
    cert, _ = _certificate(tmp_path, "server")
    half = _server("--tls-cert", cert)
    _, err = half.communicate(timeout=60)
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in err
    missing = _server("--tls-cert", cert, "--tls-key", str(tmp_path / "nope.key"))
    _, err = missing.communicate(timeout=60)
    assert missing.returncode == 2 and "nope.key" in err
