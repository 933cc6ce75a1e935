"""A server's network surfaces cost a stranger's connection or call little, and a data frame can
make a server connect nowhere: the data port's caps (connections, a HELLO's deadline and size,
descriptors), gRPC's (a token checked before a body is read, message sizes, streams open at once),
next servers only as the head declared them, the native hop's reports to a slow head, and the
warning of a server open to anyone. Real server processes on 127.0.0.1 (the native hop's test
excepted: see there)."""

from __future__ import annotations

import os
import resource
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from llmrpc import codec, wire
from llmrpc.auth import ENV_TOKEN
from llmrpc.codec import FrameKind
from llmrpc.farm import Farm
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.local import read_ready
from llmrpc.sampling import SamplingParams
from llmrpc.types import split_address
from llmrpc.v1 import llmrpc_pb2 as pb
from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc
from tests.servers import LogLines
from tests.test_validation import GEN, _Raw, _within, loaded  # noqa: F401 (a fixture)

GREEDY = SamplingParams(temperature=0)


class _Server:
    """One server process of the test's own (its own cache folder), its log kept."""

    def __init__(
        self, tmp: Path, *args: str, env: dict[str, str] | None = None, preexec: Callable[[], None] | None = None
    ) -> None:
        cmd = [sys.executable, "-m", "llmrpc.cli", "server", "--port", "0", "--threads", "1", "--no-calibrate",
               "--cache-dir", str(tmp / f"cache-{secrets.token_hex(4)}"), *args]  # fmt: skip
        if "--host" not in args:
            cmd += ["--host", "127.0.0.1"]
        environ = {k: v for k, v in os.environ.items() if k != ENV_TOKEN} | (env or {})
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, preexec_fn=preexec
        )
        self.log = LogLines()
        self._reader = threading.Thread(target=self.log.read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()
        try:
            self.address = read_ready(self.proc, 60)
        except BaseException:
            self.stop()
            raise

    @property
    def lines(self) -> list[str]:
        return self.log.lines

    def logged(self, text: str, timeout: float) -> bool:
        return self.log.wait_for(text, timeout)

    @property
    def data(self) -> tuple[str, int]:
        return split_address(self.address)[0], StageClient(self.address).hello().data_port

    def peak_rss(self) -> int:
        """The process's peak resident memory, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=30)


@pytest.fixture()
def server_factory(tmp_path: Path) -> Iterator[Callable[..., _Server]]:
    started: list[_Server] = []

    def start(*args: str, **kwargs: Any) -> _Server:
        started.append(_Server(tmp_path, *args, **kwargs))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def _generate(farm: Farm, n: int = 8) -> list[int]:
    return list(farm.generate_tokens([1, 5, 9, 14], n, GREEDY, stop_at_eog=False))


def _read_frame(sock: socket.socket) -> codec.DataFrame | None:
    """The next frame on ``sock`` (None: it closed)."""
    reader = codec.FrameReader(1 << 20)
    while True:
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            return None
        if not data:
            return None
        frames = reader.feed(data)
        if frames:
            return frames[0]


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (read up to its end, within the socket's timeout)."""
    try:
        while data := sock.recv(1 << 16):
            del data
    except ConnectionResetError:
        pass
    return True


# -- finding 1: the data port before authentication ---------------------------------------------------
def test_a_frame_is_parsed_once_when_it_is_whole() -> None:
    """A frame that comes in small pieces is kept, not re-copied and re-parsed on every read."""
    x = np.arange(1 << 20, dtype=np.float32)
    frame = b"".join(bytes(p) for p in codec.encode_frame(FrameKind.RESULT, 7, {"n": 1}, [x]))
    reader, calls, frames = codec.FrameReader(1 << 30), [0], []
    decode = codec.decode_frame_header

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return decode(*args)

    codec.decode_frame_header = counted  # type: ignore[assignment]
    try:
        for at in range(0, len(frame), 4096):
            frames += reader.feed(frame[at : at + 4096])
    finally:
        codec.decode_frame_header = decode  # type: ignore[assignment]
    assert len(frames) == 1 and np.array_equal(frames[0].arrays[0], x) and not reader.holds_part
    assert calls[0] <= 2  # the header when it came, and once when the frame was whole


def test_a_peer_that_does_not_read_is_cut_off_and_what_waits_for_it_is_bounded() -> None:
    """Frames for a peer that never reads were queued without end (a head that stops reading its
    answers grew a server's memory). What waits is at most ``max_queued`` bytes, or one frame of
    any size; past that sending fails, for good, and the connection is the caller's to drop."""
    small = np.zeros(16 << 10, dtype=np.float32)  # 64 KiB
    mine, theirs = _tcp_pair()
    conn = wire.Connection(mine, "a peer that does not read", 1 << 20, max_queued=1 << 20)
    sent = 0
    try:
        with pytest.raises(ConnectionError, match="does not read what is sent to it"):
            for rid in range(1000):
                conn.send(FrameKind.RESULT, rid, {}, [small])
                sent += 1
        kernel = mine.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + theirs.getsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF
        )
        assert 16 <= sent <= 16 + kernel // (64 << 10) + 2  # 1 MiB queued, and what the kernel took
        with pytest.raises(ConnectionError):
            conn.send(FrameKind.RESULT, 0, {}, [small])
    finally:
        conn.close()
        mine.close()
        theirs.close()

    mine, theirs = _tcp_pair()
    conn = wire.Connection(mine, "a slow peer", 1 << 20, max_queued=1 << 20)
    try:
        big = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
        conn.send(FrameKind.RESULT, 1, {}, [big])  # one frame past the cap: it waits, whole
        reader = codec.FrameReader(8 << 20)
        frames: list[codec.DataFrame] = []
        theirs.settimeout(30)
        while not frames:
            frames += reader.feed(theirs.recv(1 << 20))
        assert np.array_equal(frames[0].arrays[0], big)
    finally:
        conn.close()
        mine.close()
        theirs.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection, the first tuned as the data plane's."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        mine = socket.create_connection(listener.getsockname(), timeout=30)
        theirs, _ = listener.accept()
    wire.tune(mine)
    return mine, theirs


def test_a_description_over_the_limit_is_refused_at_its_header() -> None:
    header = codec.DATA_HEADER.pack(codec.DATA_MAGIC, FrameKind.HELLO, 1, 1 << 20, 0)
    with pytest.raises(codec.CodecError, match="description of 1048576 bytes exceeds the limit of 4096"):
        codec.FrameReader(0, max_meta=4096).feed(header)


def test_connections_beyond_the_cap_are_closed_and_a_head_works_on(
    tiny_models: dict[str, str], server_factory: Callable[..., _Server]
) -> None:
    """Finding 1: no cap on connections, each with a 1 MiB buffer."""
    server = server_factory("--max-connections", "4", "--hello-timeout", "600")
    with Farm(tiny_models["F32"], [server.address], ctx_size=64) as farm:  # its data connection: 1 of the 4
        want = _generate(farm)
        idle = [socket.create_connection(server.data, timeout=60) for _ in range(3)]
        extra = socket.create_connection(server.data, timeout=60)
        try:
            assert _closed(extra)  # at once (the others wait for a HELLO for 10 minutes)
            for sock in idle:  # accepted before it, and still open
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)
            assert _within(60, lambda: _generate(farm)) == want
            assert server.logged("the most allowed (--max-connections)", 30)
        finally:
            for sock in [*idle, extra]:
                sock.close()


def test_a_connection_that_says_no_hello_is_closed_after_the_deadline(
    server_factory: Callable[..., _Server],
) -> None:
    """Finding 1: a socket that never sent its HELLO was kept for ever."""
    server = server_factory("--hello-timeout", "1")
    with socket.create_connection(server.data, timeout=60) as sock:
        reply = _read_frame(sock)
        assert reply is not None and reply.kind == FrameKind.ERROR and "no HELLO within 1 s" in reply.meta["message"]
        assert _closed(sock)


def test_a_large_frame_before_hello_is_refused_and_the_server_serves_on(
    tiny_models: dict[str, str], server_factory: Callable[..., _Server]
) -> None:
    """Finding 1: 1 MiB of JSON was taken (and re-copied on every read) before any token was seen.
    Only a header is sent: the refusal must not wait for the body."""
    server = server_factory()
    with socket.create_connection(server.data, timeout=60) as sock:
        sock.sendall(codec.DATA_HEADER.pack(codec.DATA_MAGIC, FrameKind.HELLO, 1, 1 << 20, 0) + b"{" * 1000)
        reply = _read_frame(sock)
        assert reply is not None and reply.kind == FrameKind.ERROR
        assert "HELLO" in reply.meta["message"] and "exceeds the limit of 4096" in reply.meta["message"]
        assert _closed(sock)
    with Farm(tiny_models["F32"], [server.address], ctx_size=64) as farm:
        assert len(_generate(farm)) == 8


def test_running_out_of_descriptors_in_accept_is_survived(
    tiny_models: dict[str, str], server_factory: Callable[..., _Server]
) -> None:
    """Finding 1: EMFILE in accept was not caught. The server gets few descriptors; strangers'
    connections use them up; it warns, pauses accepting, and serves again once they go."""
    limit = 160

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    server = server_factory("--max-connections", "100000", "--hello-timeout", "600", preexec=few_descriptors)
    data = server.data
    idle: list[socket.socket] = []
    try:
        for _ in range(limit + 40):  # more than it can take (a full backlog then refuses or stalls connects)
            try:
                idle.append(socket.create_connection(data, timeout=5))
            except OSError:
                break
            if server.logged("cannot accept a connection", 0):
                break
        assert server.logged("cannot accept a connection", 60)
    finally:
        for sock in idle:
            sock.close()
    with Farm(tiny_models["F32"], [server.address], ctx_size=64, connect_timeout=30) as farm:
        assert len(_within(120, lambda: _generate(farm))) == 8
    assert server.proc.poll() is None
    assert not any("callback failed" in line for line in server.lines)  # (no loop spinning on a failed accept)


# -- finding 5: gRPC ---------------------------------------------------------------------------------
def _stub(address: str, token: str | None = None) -> tuple[grpc.Channel, pb_grpc.StageStub]:
    options = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    channel = grpc.insecure_channel(address, options=options)
    return channel, pb_grpc.StageStub(channel)


def test_a_call_without_the_token_is_refused_before_its_body_is_read(server_factory: Callable[..., _Server]) -> None:
    """Finding 5: a body of up to 1 GiB was received and parsed before the token was checked."""
    server = server_factory(env={ENV_TOKEN: "s3cret"})
    channel, stub = _stub(server.address)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Health(pb.HealthRequest(), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        before = server.peak_rss()
        body = 256 << 20
        with pytest.raises(grpc.RpcError) as info:
            stub.Hello(pb.HelloRequest(client="x" * body), timeout=120)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
        assert server.peak_rss() - before < body // 8


def test_a_message_over_its_methods_limit_is_refused(server_factory: Callable[..., _Server]) -> None:
    server = server_factory()
    channel, stub = _stub(server.address)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Hello(pb.HelloRequest(client="x" * (1 << 20)), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "a Hello message of" in str(info.value.details())
        assert stub.Hello(pb.HelloRequest(client="me"), timeout=30).data_port


def test_unparsable_messages_are_refused_in_a_line_each_not_a_traceback(server_factory: Callable[..., _Server]) -> None:
    """grpc answered INTERNAL to a message that does not parse and logged a traceback for each: a
    stranger's flood of them filled the log. Now INVALID_ARGUMENT, and no traceback."""
    server = server_factory("-vv")  # (debug lines: the refusals are logged there)
    channel = grpc.insecure_channel(server.address)
    with channel:
        call = channel.unary_unary("/llmrpc.v1.Stage/Load", None, None)
        for _ in range(50):
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xff\xff", timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "the Load message does not parse" in str(info.value.details())
        assert pb_grpc.StageStub(channel).Hello(pb.HelloRequest(client="me"), timeout=30).data_port
    assert server.logged("a Load message of 3 bytes does not parse", 30)
    assert not any("Traceback" in line for line in server.lines)


def test_idle_streams_do_not_lock_out_hello(server_factory: Callable[..., _Server]) -> None:
    """Finding 5: 16 idle streams took every thread of the server's gRPC: Hello and Load waited."""
    server = server_factory()
    channel, stub = _stub(server.address)
    never = threading.Event()

    def nothing() -> Iterator[pb.ForwardRequest]:
        never.wait()
        yield from ()

    done = threading.Condition()
    ended: list[Any] = []

    def on_done(call: Any) -> None:
        with done:
            ended.append(call)
            done.notify_all()

    with channel:
        calls = [stub.ForwardStream(nothing()) for _ in range(24)]
        try:
            for c in calls:
                c.add_done_callback(on_done)
            assert stub.Hello(pb.HelloRequest(client="me"), timeout=30).data_port
            assert stub.Health(pb.HealthRequest(), timeout=30).serving
            with done:
                assert done.wait_for(lambda: len(ended) >= 8, 60)
            assert len(ended) == 8  # 16 streams open at most
            assert all(c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for c in ended)
        finally:
            for c in calls:
                c.cancel()
            never.set()


# -- finding 3: next servers as the head declared them -------------------------------------------------
def test_a_route_to_a_server_nobody_declared_is_refused_and_connects_nowhere(
    loaded: tuple[Farm, _Raw],  # noqa: F811 (the fixture)
) -> None:
    """Finding 3: a FORWARD's route could name any host:port, and the server connected there
    (from its compute thread). A listening socket named as the next server sees no connection;
    the head's generation goes on."""
    farm, raw = loaded
    want = list(farm.generate_tokens([1, 5, 9], 16, GREEDY, stop_at_eog=False))
    running = farm.generate_tokens([1, 5, 9], 16, GREEDY, stop_at_eog=False)
    got = [next(running)]
    with socket.create_server(("127.0.0.1", 0)) as trap, farm.session() as s:
        trap.setblocking(False)
        nowhere = f"127.0.0.1:{trap.getsockname()[1]}"
        for rid, gen in enumerate(({}, {"gen": GEN}), start=300):
            route = [[raw.data_address, raw.token, [s.ids[0]]], [nowhere, raw.token, ["x"]]]
            raw.forward(rid, route, np.array([1, 2], np.int32), **gen)
            reply = _within(30, raw.read)
            assert (reply.kind, reply.request_id, reply.meta["code"]) == (FrameKind.ERROR, rid, "invalid_argument")
            assert nowhere in reply.meta["message"] and "declared" in reply.meta["message"]
        with pytest.raises(BlockingIOError):
            trap.accept()
    got += _within(60, lambda: list(running))
    assert got == want


def test_peers_are_declared_for_a_connected_link_and_reachable_servers(
    loaded: tuple[Farm, _Raw],  # noqa: F811 (the fixture)
    servers: list[str],
) -> None:
    _, raw = loaded
    client = StageClient(servers[0])  # (raw's server)
    with pytest.raises(StageError) as info:  # a link with no data connection here
        client.declare_peers(raw.link + 1, [(raw.data_address, raw.token)])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(StageError) as info:
        client.declare_peers(raw.link, [("nowhere", raw.token)])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "host:port" in str(info.value)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = f"127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(StageError) as info:
        client.declare_peers(raw.link, [(unreachable, raw.token)])
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and unreachable in str(info.value)


# -- finding 13: a server open to anyone says so ----------------------------------------------------
def test_a_server_on_a_public_address_without_token_or_tls_warns(server_factory: Callable[..., _Server]) -> None:
    open_to_all = server_factory("--host", "0.0.0.0")
    assert open_to_all.logged("with neither --token nor TLS", 30)
    guarded = server_factory("--host", "0.0.0.0", env={ENV_TOKEN: "s3cret"})
    local = server_factory()
    for quiet in (guarded, local):
        quiet.stop()
        assert not any("neither --token nor TLS" in line for line in quiet.lines)


# -- finding 12: the native hop's reports to a head that reads slowly ---------------------------------
def _hello(sock: socket.socket, token: str, link: int) -> None:
    sock.sendall(b"".join(codec.encode_frame(FrameKind.HELLO, 0, {"token": token, "link": link})))
    reply = _read_frame(sock)
    assert reply is not None and reply.kind == FrameKind.WELCOME, reply


def test_a_token_report_the_heads_socket_takes_in_part_is_completed(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    """Finding 12: when the head's socket took only part of a TOKEN report (or none), the native
    hop lost the rest and the data plane dropped the next server's connection. Here the server
    runs in the test's process, the last of a greedy generation's two servers (the test plays
    the first), and its end of the head's connection gets a small send buffer: a server's own
    grows with the kernel's autotuning to ~3 MiB (70,000 reports of 40 bytes), more than a test
    generates. The head reads nothing until the end: then every report is there, whole, in
    order, naming the tokens the first server was sent."""
    from llmrpc.ggml.device import find_device
    from llmrpc.server.dataplane import DataPlane
    from llmrpc.server.engine import Engine
    from llmrpc.server.loop import ComputeLoop
    from llmrpc.server.native import hop_library
    from llmrpc.server.store import WeightStore

    assert hop_library() is not None, "the native hop could not be built (a C compiler is needed)"
    model = tiny_models["F32"]
    loop = ComputeLoop()
    engine = Engine(
        find_device("CPU"), 1, loop=loop, calibrate_device=False,
        store=WeightStore(tmp_path / "cache", [Path(model).parent]),
    )  # fmt: skip
    plane = DataPlane(engine, loop, "127.0.0.1")
    n, link, rid = 1500, 4242, 9
    rng = np.random.default_rng(5)
    try:
        engine.load(model, 2, 4)
        sid = engine.open_session(2048).session_id
        head = socket.socket()
        head.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        head.connect(("127.0.0.1", plane.port))
        head.settimeout(60)
        _hello(head, plane.token, link)
        into = socket.create_connection(("127.0.0.1", plane.port), timeout=60)  # the first server's, to it
        _hello(into, plane.token, 0)
        with socket.create_server(("127.0.0.1", 0)) as listener:  # the first server's port
            listener.settimeout(60)
            first = f"127.0.0.1:{listener.getsockname()[1]}"
            made: list[socket.socket] = []

            def welcome() -> None:
                sock, _ = listener.accept()
                sock.settimeout(60)
                assert (_read_frame(sock) or codec.DataFrame(FrameKind.ERROR, 0, {})).kind == FrameKind.HELLO
                sock.sendall(b"".join(codec.encode_frame(FrameKind.WELCOME, 0, {})))
                made.append(sock)

            waiter = threading.Thread(target=welcome)
            waiter.start()
            plane.declare_peers(link, [(first, "its-token")])
            waiter.join()
        back = made[0]  # where the generation's next steps come back to the first server
        loop.call(lambda: plane.conns.links[link].sock).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        def hidden() -> np.ndarray:
            return rng.standard_normal((1, 64)).astype(np.float32)

        route = [[first, "its-token", ["s0"]], [f"127.0.0.1:{plane.port}", plane.token, [sid]]]
        gen = {"n": n, "step": 0, "limit": 2048, "eog": [], "sampling": [0.0, 40, 0.95, 0]}
        meta = {"route": route, "hop": 1, "link": link, "pos": [0], "rows": [1], "gen": gen}
        into.sendall(b"".join(bytes(p) for p in codec.encode_frame(FrameKind.FORWARD, rid, meta, [hidden()])))
        sent_back: list[int] = []  # the tokens the last server sent on as the next steps
        reader = codec.FrameReader(1 << 20)
        pending: list[codec.DataFrame] = []
        while True:
            while not pending:
                data = back.recv(1 << 16)
                assert data, f"the last server dropped its connection to the first after {len(sent_back)} steps"
                pending += reader.feed(data)
            f = pending.pop(0)
            if f.kind == FrameKind.ENDED:
                break
            assert f.kind in (FrameKind.FORWARD, FrameKind.STEP), f
            sent_back.append(int(f.arrays[0][0]))
            if f.kind == FrameKind.FORWARD:
                pos, step, left = f.meta["pos"][0], f.meta["gen"]["step"], f.meta["gen"]["n"]
            else:
                pos, step, left = f.meta["pos"], f.meta["step"], f.meta["n"]
            into.sendall(b"".join(bytes(p) for p in codec.encode_step(rid, link, 1, pos, step, left, hidden())))
        reports: list[codec.DataFrame] = []
        head_reader = codec.FrameReader(1 << 20)
        while not reports or reports[-1].meta["end"] is None:
            data = head.recv(1 << 16)
            assert data, "the head's connection closed"
            reports += head_reader.feed(data)
            assert all(r.kind == FrameKind.TOKEN for r in reports), reports[-1]
        assert [r.meta["step"] for r in reports] == list(range(n))
        assert [r.meta["token"] for r in reports[:-1]] == sent_back and reports[-1].meta["end"] == "length"
        assert 0 < engine.native_steps < n - 100  # the native hop ran, and Python once the head's socket was full
        for sock in (head, into, back):
            sock.close()
    finally:
        plane.close()
        engine.close()
