"""Tokens and TLS on the links between head and servers: real server processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import signal
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
from llmrpc.head.placement import ship_slice
from llmrpc.model.gguf_model import content_hash, read_model
from llmrpc.sampling import SamplingParams
from llmrpc.server.native import hop_library
from llmrpc.v1 import llmrpc_pb2 as pb
from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc

from .conftest import own_caches

GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)
TOKEN = "s3cret-token"


@pytest.fixture(autouse=True)
def _no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_TOKEN, raising=False)


def _generate(farm: Farm) -> list[int]:
    return list(farm.generate_tokens([1, 5, 9, 14], 12, GREEDY, stop_at_eog=False))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two servers that want a token."""
    caches = own_caches(tmp_path_factory.mktemp("guarded"), 2)
    with LocalServers(
        2, threads=1, extra_args=["--no-calibrate"], env={ENV_TOKEN: TOKEN}, per_server_args=caches
    ) as local:
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


def _signed_certificates(tmp: Path, names: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """A CA, and a certificate and key for each name signed by it: (CA file, [(cert, key)])."""
    ca, ca_key = tmp / "ca.pem", tmp / "ca.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=llmrpc-test-ca",
         "-keyout", str(ca_key), "-out", str(ca)],
        check=True, capture_output=True,
    )  # fmt: skip
    extensions = tmp / "leaf.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    out = []
    for name in names:
        cert, key, request = tmp / f"{name}.pem", tmp / f"{name}.key", tmp / f"{name}.csr"
        subprocess.run(
            ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=llmrpc-{name}", "-keyout", str(key),
             "-out", str(request)],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            ["openssl", "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-days", "1", "-out", str(cert), "-extfile", str(extensions)],
            check=True, capture_output=True,
        )  # fmt: skip
        out.append((str(cert), str(key)))
    return str(ca), out


def _server(*args: str, threads: int = 1, stderr: int | None = None) -> subprocess.Popen[str]:
    """A server with ``args``; its log goes to the test's stderr unless ``stderr`` says where."""
    cmd = [sys.executable, "-m", "llmrpc.cli", "server", "--host", "127.0.0.1", "--port", "0", "--threads",
           str(threads), "--no-calibrate", *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)


@contextlib.contextmanager
def _servers(args: list[list[str]], threads: int = 1) -> Iterator[list[str]]:
    """Servers started with ``args`` each: their addresses; each must stop cleanly at the end."""
    procs = [_server(*a, threads=threads) for a in args]
    try:
        yield [read_ready(p, 60) for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            assert p.wait(timeout=30) == 0


def _tls_args(tmp: Path, count: int, cert: str, key: str, *extra: str) -> list[list[str]]:
    caches = own_caches(tmp, count)
    return [["--tls-cert", cert, "--tls-key", key, "--token", TOKEN, *extra, *caches[i]] for i in range(count)]


def _data_links_are_tls(farm: Farm) -> bool:
    conns = farm.pipeline.links._conns if farm.pipeline and farm.pipeline.links else {}
    return bool(conns) and all(c.tls for c in conns.values())


def _native_steps(address: str, security: ClientSecurity) -> int:
    channel = security.channel(address, [])
    with channel:
        stub = pb_grpc.StageStub(security.intercept(channel))
        return int(stub.Health(pb.HealthRequest(), timeout=30).native_steps)


def test_tls_on_every_link(tiny_models: dict[str, str], servers: list[str], tmp_path: Path) -> None:
    """Two servers with one self-signed certificate: gRPC, the head's data links, the hop from
    one server to the next and the weights shipped to them all go over TLS, and the tokens are
    those of plain servers. Their upload ports refuse a slice sent in the clear (nothing kept,
    the server goes on): what the farm shipped to them went over TLS."""
    cert, key = _certificate(tmp_path, "server")
    other, _ = _certificate(tmp_path, "other")
    path = tiny_models["F32"]
    security = ClientSecurity(TOKEN, cert)
    with _servers(_tls_args(tmp_path, 2, cert, key)) as addresses:
        client = StageClient(addresses[0], security=security)
        data_port = int(client.hello().data_port)
        info, digest = read_model(path), content_hash(path)
        with pytest.raises((OSError, StageError)):
            ship_slice(client, info, digest, 0, 2)  # in the clear
        assert client.hello().cached == ()  # nothing kept
        client.close()
        with Farm(path, addresses, ctx_size=64, token=TOKEN, tls_ca=cert) as farm:
            assert len(farm.plan) == 2
            assert {a.address: farm.bytes_shipped[a.address] for a in farm.plan} == {
                a.address: info.range_bytes(a.start, a.end) for a in farm.plan
            }
            got = [_generate(farm) for _ in range(2)]
            assert _data_links_are_tls(farm)
            for a in farm.plan:  # kept, from the uploads over TLS
                client = StageClient(a.address, security=security)
                assert [(c.model_hash, c.layer_start, c.layer_end) for c in client.hello().cached] == [
                    (digest, a.start, a.end)
                ]
                client.close()
        with Farm(path, servers[:2], ctx_size=64) as farm:
            assert _generate(farm) == got[0] == got[1]
        for bad in (ClientSecurity(TOKEN), ClientSecurity(TOKEN, tls_ca=other)):  # no TLS, another CA
            with pytest.raises(StageError, match="cannot reach it"):
                StageClient(addresses[0], connect_timeout=2, security=bad).hello()
        # the data port speaks TLS only: a plain HELLO gets no WELCOME
        host = addresses[0].rsplit(":", 1)[0]
        with socket.create_connection((host, data_port), timeout=30) as plain:
            plain.sendall(b"".join(codec.encode_frame(FrameKind.HELLO, 0, {"token": "x", "link": 1})))
            try:
                answer = plain.recv(65536)
            except ConnectionResetError:
                answer = b""
            assert answer[:1] in (b"", b"\x15")  # closed, or a TLS alert: no WELCOME frame


def test_the_native_hop_is_left_to_python_over_tls(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """The C hop reads and writes plain TCP: servers with TLS take every step in Python, while
    the same servers without TLS take most of the same generation's steps in C, and the tokens
    are the same. (Two threads each: the hop is armed for servers that compute with several.)"""
    if hop_library() is None:
        pytest.skip("no native hop on this machine (no C compiler, or LLMRPC_NATIVE_HOP=0): nothing to leave to Python")
    cert, key = _certificate(tmp_path, "server")
    plain_args = [["--token", TOKEN, *c] for c in own_caches(tmp_path / "plain", 2)]
    with _servers(_tls_args(tmp_path, 2, cert, key), threads=2) as tls, _servers(plain_args, threads=2) as plain:
        tokens, steps = [], []
        for addresses, ca in ((tls, cert), (plain, None)):
            with Farm(tiny_models["F32"], addresses, ctx_size=128, token=TOKEN, tls_ca=ca) as farm:
                assert len(farm.plan) == 2
                tokens.append(list(farm.generate_tokens([1, 5, 9, 14], 60, GREEDY, stop_at_eog=False)))
            steps.append([_native_steps(a, ClientSecurity(TOKEN, ca)) for a in addresses])
    assert tokens[0] == tokens[1]
    assert steps[0] == [0, 0]
    assert all(n > 30 for n in steps[1]), steps


def test_a_farm_with_a_token_and_tls_fails_over(
    tiny_models: dict[str, str], prompt_tokens: list[int], tmp_path: Path
) -> None:
    """Three servers with a token and TLS, the middle one killed mid-generation: the farm
    re-plans over the two left, ships them their new layers over TLS, and the generation goes
    on with the tokens it would have had."""
    cert, key = _certificate(tmp_path, "server")
    procs = [_server(*a) for a in _tls_args(tmp_path, 3, cert, key)]
    try:
        addresses = [read_ready(p, 60) for p in procs]
        path = tiny_models["F32"]
        with Farm(path, addresses, ctx_size=128, token=TOKEN, tls_ca=cert, server_generation=False) as farm:
            assert len(farm.plan) == 3
            want = list(farm.generate_tokens(prompt_tokens, 40, SAMPLED, stop_at_eog=False))
            victim = procs[addresses.index(farm.plan[1].address)]
            got = []
            for i, token in enumerate(farm.generate_tokens(prompt_tokens, 40, SAMPLED, stop_at_eog=False)):
                got.append(token)
                if i + 1 == 10:
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
            assert got == want and len(set(want)) > 5
            assert farm.replays == 1 and len(farm.plan) == 2
            assert {a.address: farm.bytes_shipped[a.address] for a in farm.plan} == {
                a.address: farm.info.range_bytes(a.start, a.end) for a in farm.plan
            }
            assert _data_links_are_tls(farm)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_servers_check_the_next_ones_certificate_against_their_tls_ca(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    """Two servers with certificates of their own, signed by one CA: told the CA (--tls-ca),
    each trusts the other, and the farm generates; without it a server trusts its own
    certificate only, and the hop to the next server is refused on its certificate."""
    ca, certs = _signed_certificates(tmp_path, ["a", "b"])
    caches = own_caches(tmp_path, 4)
    path = tiny_models["F32"]
    with_ca = [["--tls-cert", c, "--tls-key", k, "--tls-ca", ca, "--token", TOKEN, *caches[i]]
               for i, (c, k) in enumerate(certs)]  # fmt: skip
    with _servers(with_ca) as addresses:
        with Farm(path, addresses, ctx_size=64, token=TOKEN, tls_ca=ca) as farm:
            assert len(farm.plan) == 2
            assert len(_generate(farm)) == 12
            assert _data_links_are_tls(farm)
    without_ca = [["--tls-cert", c, "--tls-key", k, "--token", TOKEN, *caches[2 + i]]
                  for i, (c, k) in enumerate(certs)]  # fmt: skip
    with _servers(without_ca) as addresses:
        # the head trusts both (it was told the CA); the first server refuses the second's
        # certificate when the head declares it its next
        with (
            pytest.raises(StageError, match="cannot reach peer .*certificate"),
            Farm(path, addresses, ctx_size=64, token=TOKEN, tls_ca=ca, replays=0) as farm,
        ):
            _generate(farm)


def test_bad_tls_settings_are_refused_at_start(tmp_path: Path) -> None:
    cert, _ = _certificate(tmp_path, "server")
    half = _server("--tls-cert", cert, stderr=subprocess.PIPE)
    _, err = half.communicate(timeout=60)
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in err
    missing = _server("--tls-cert", cert, "--tls-key", str(tmp_path / "nope.key"), stderr=subprocess.PIPE)
    _, err = missing.communicate(timeout=60)
    assert missing.returncode == 2 and "nope.key" in err
