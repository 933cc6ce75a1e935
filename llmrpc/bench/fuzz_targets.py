"""Live targets for the fuzz cases of :mod:`llmrpc.bench.fuzz_cases`: real servers and an API
head on 127.0.0.1, each case sent as bytes and its outcome classified.

Every case ends in one of :class:`Outcome`. After each, the target is checked: its process is
alive and it still answers (a data-plane probe on a connection of its own, a health call); a
case that gets no answer and no close within :data:`CASE_TIMEOUT`, or after which the server
answers nothing, is ``hung``; one after which its process is gone is ``crashed``.
"""

from __future__ import annotations

import enum
import itertools
import json
import secrets
import select
import socket
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from llmrpc import codec
from llmrpc.bench import fuzz_calls as fk
from llmrpc.bench import fuzz_cases as fc
from llmrpc.bench.fuzz_live import CASE_TIMEOUT, Probe, Process, Server, start, start_server
from llmrpc.bench.fuzz_wire import Values, change_header, encode_piece
from llmrpc.codec import FrameKind
from llmrpc.model.gguf_model import content_hash, read_model
from llmrpc.model.slicefile import build_slice_layout
from llmrpc.types import split_address
from llmrpc.v1 import llmrpc_pb2 as pb
from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc

SETTLE = 0.01  # seconds to wait for a case's last answers once the server has answered the probe
UPLOAD_HASH = "f" * 64  # the made-up model hash fuzzed uploads claim (never the fuzzed model's)


class Outcome(enum.Enum):
    ANSWERED = "answered"  # a reply (an HTTP 2xx, a gRPC OK, a data frame that is not an error)
    REFUSED = "refused"  # an error naming what was wrong (HTTP 4xx, a gRPC status, an ERROR frame)
    FAILED = "failed"  # an HTTP 5xx
    CLOSED = "closed"  # the connection closed with no answer
    SILENT = "silent"  # no answer and the connection kept, the server answering others meanwhile
    CRASHED = "crashed"  # the process is gone
    HUNG = "hung"  # no answer within CASE_TIMEOUT, or the server answers nothing after the case
    LOST = "lost"  # refused, and what the server held is gone (a Load refused after unloading)
    FAULT = "fault"  # an exception no check caught (a traceback logged, a gRPC INTERNAL status)


BAD = (Outcome.CRASHED, Outcome.HUNG, Outcome.LOST, Outcome.FAULT)


@dataclass
class FuzzTargets:
    """Two servers (the target, and the peer its routes may name) holding a model's two halves,
    and an API head over a third server."""

    target: Server
    peer: Server
    api: Process
    model_path: str
    model_hash: str
    n_layer: int
    probe: Probe = field(init=False)

    def __post_init__(self) -> None:
        self.probe = Probe(self.target)
        self._channel = grpc.insecure_channel(self.target.process.address)
        self.probe.connect()
        info = read_model(self.model_path)
        self._layout = build_slice_layout(info, 0, 1, UPLOAD_HASH)
        with open(self.model_path, "rb") as f:
            self._slice_bytes = []
            for t in self._layout.tensors:
                f.seek(info.tensors[t.name].offset)
                self._slice_bytes.append(f.read(t.n_bytes))
        self._links = itertools.count(secrets.randbits(40) << 20)
        self.statuses: Counter[str] = Counter()  # gRPC status codes and HTTP statuses the cases got

    def prepare(self) -> None:
        """Load the model's two halves on the target and its peer (fuzzed Loads move them)."""
        half = self.n_layer // 2
        self.target.client.load(self.model_path, 0, half, self.model_hash)
        self.peer.client.load(self.model_path, half, self.n_layer, self.model_hash)

    def _checked(self, server: Server | None, outcome: Outcome) -> Outcome:
        """``outcome``, unless the server died or stops answering after it."""
        process = server.process if server is not None else self.api
        if not process.alive():
            return Outcome.CRASHED
        if server is not None and not server.client.answers(CASE_TIMEOUT):
            return Outcome.HUNG
        return outcome

    def close(self) -> None:
        self.probe.close()
        self._channel.close()

    # -- the data plane ------------------------------------------------------------------------
    def data(self, case: fc.DataCase) -> Outcome:
        """Send the case on a new connection to the target; an authenticated case also holds the
        same link at the peer, as a head does (the last server of a route reports there)."""
        link = next(self._links)
        values = Values(self, link)
        logged = self.target.process.log.stat().st_size
        sock, peer = _connect(self.target.data_address), None
        try:
            if case.authenticate:  # as a head does: HELLO, then frames once welcomed
                peer = _connect(self.peer.data_address)
                for conn, server in ((sock, self.target), (peer, self.peer)):
                    hello = {"token": server.token, "link": link, "protocol": 1}
                    conn.sendall(b"".join(codec.encode_frame(FrameKind.HELLO, 0, hello)))
                    if not _read_all(conn, CASE_TIMEOUT, whole=True)[0]:
                        return self._checked(server, Outcome.HUNG)
            try:
                sock.sendall(b"".join(encode_piece(p, values) for p in case.pieces))
            except OSError:
                pass  # it hung up on an early piece: what it answered tells
            if not self.target.process.alive():
                return Outcome.CRASHED
            try:
                answered = self.probe.answers()
            except OSError:  # (its data port is gone)
                answered = False
            if not answered:
                return self._checked(self.target, Outcome.HUNG)
            data, closed, _ = _read_all(sock, SETTLE)
            outcome = _classify_frames(data, closed)
            if peer is not None and outcome in (Outcome.SILENT, Outcome.CLOSED):
                reported = _classify_frames(_read_all(peer, SETTLE)[0], False)
                outcome = outcome if reported == Outcome.SILENT else reported
            if _traceback_since(self.target.process.log, logged):
                outcome = Outcome.FAULT
            return self._checked(self.peer, self._checked(self.target, outcome))
        finally:
            sock.close()
            if peer is not None:
                peer.close()
            values.close()

    # -- gRPC ----------------------------------------------------------------------------------
    def grpc(self, case: fk.GrpcCase) -> Outcome:
        message, streamed, streams_back = fk.METHODS[case.method]
        values = Values(self, next(self._links), text=True)
        try:
            payloads = [r if isinstance(r, bytes) else message(**values(r)).SerializeToString() for r in case.requests]
            channel = self._channel
            path = f"/llmrpc.v1.Stage/{case.method}"
            held = self._held() if case.method == "Load" else None
            try:
                if not streamed:
                    reply = channel.unary_unary(path, None, None)(payloads[0], timeout=CASE_TIMEOUT)
                elif not streams_back:
                    reply = channel.stream_unary(path, None, None)(iter(payloads), timeout=CASE_TIMEOUT)
                else:
                    reply = b"".join(channel.stream_stream(path, None, None)(iter(payloads), timeout=CASE_TIMEOUT))
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                name = code.name if code else "?"
                if code == grpc.StatusCode.INTERNAL:  # (a fault, not a refusal: say which)
                    name += f" {(e.details() or '')[:70] if hasattr(e, 'details') else ''}"
                self.statuses[f"grpc {name}"] += 1
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return self._checked(self.target, Outcome.HUNG)
                if code == grpc.StatusCode.UNAVAILABLE:
                    return self._checked(self.target, Outcome.CLOSED)
                if held is not None and self.target.process.alive() and self._held() != held:
                    return Outcome.LOST
                if code == grpc.StatusCode.INTERNAL:  # (an unparsable message is INVALID_ARGUMENT)
                    return self._checked(self.target, Outcome.FAULT)  # an exception no check caught
                return self._checked(self.target, Outcome.REFUSED)
            self.statuses["grpc OK"] += 1
            self._release(case.method, reply)
            return self._checked(self.target, Outcome.ANSWERED)
        finally:
            values.close()

    def _held(self) -> tuple[str, int, int] | None:
        """The target's loaded range (Hello's)."""
        r = self.target.client.hello().loaded
        return None if r is None else (r.model_hash or r.model_path, r.layer_start, r.layer_end)

    def _release(self, method: str, reply: bytes) -> None:
        """Free what an answered call holds: an opened session, an upload port."""
        if method == "OpenSession":
            sid = pb.OpenSessionReply.FromString(reply).session_id
            try:
                self.target.client.close_session(sid)
            except Exception:
                pass
        elif method == "OpenUpload":
            ticket = pb.UploadTicket.FromString(reply)
            host = split_address(self.target.process.address)[0]
            try:
                socket.create_connection((host, ticket.port), timeout=CASE_TIMEOUT).close()
            except OSError:
                pass

    # -- weight uploads --------------------------------------------------------------------------
    def upload(self, case: fk.UploadCase) -> Outcome:
        header = codec.slice_header_to_proto(UPLOAD_HASH, 0, 1, self._layout)
        for name, value in case.header:
            change_header(header, name, value)
        try:
            ticket = pb_grpc.StageStub(self._channel).OpenUpload(header, timeout=CASE_TIMEOUT)
        except grpc.RpcError as e:
            hung = hasattr(e, "code") and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return self._checked(self.target, Outcome.HUNG if hung else Outcome.REFUSED)
        host = split_address(self.target.process.address)[0]
        logged = self.target.process.log.stat().st_size
        with socket.create_connection((host, ticket.port), timeout=CASE_TIMEOUT) as sock:
            try:
                sock.sendall(self._upload_bytes(case, bytes(ticket.token)))
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            data, closed, timed_out = _read_all(sock, CASE_TIMEOUT)
        if timed_out:
            return self._checked(self.target, Outcome.HUNG)
        if _traceback_since(self.target.process.log, logged):
            return self._checked(self.target, Outcome.FAULT)
        if len(data) >= codec.UPLOAD_STATUS.size:
            ok = codec.UPLOAD_STATUS.unpack_from(data)[0]
            return self._checked(self.target, Outcome.ANSWERED if ok == 1 else Outcome.REFUSED)
        return self._checked(self.target, Outcome.CLOSED)

    def _upload_bytes(self, case: fk.UploadCase, token: bytes) -> bytes:
        given = {"right": token, "wrong": secrets.token_bytes(len(token)), "short": token[:5], "none": b""}[case.token]
        out = [given]
        if case.whole:
            for i, tensor in enumerate(self._slice_bytes):
                step = case.chunk or len(tensor)
                for at in range(0, len(tensor), step):
                    data = tensor[at : at + step]
                    out.append(codec.UPLOAD_FRAME.pack(i, at, len(data), zlib.crc32(data)) + data)
        for f in case.frames:
            true = self._slice_bytes[f.tensor] if f.tensor < len(self._slice_bytes) else b""
            data = true[f.offset : f.offset + f.size] if f.fill < 0 else bytes([f.fill]) * f.size
            data = data.ljust(f.size, b"\0")
            length = len(data) if f.length < 0 else f.length
            crc = zlib.crc32(data) if f.crc is None else f.crc
            out.append(codec.UPLOAD_FRAME.pack(f.tensor, f.offset, length, crc) + data)
        if case.end:
            out.append(codec.UPLOAD_FRAME.pack(codec.UPLOAD_END, 0, 0, 0))
        return b"".join(out) + case.tail

    # -- the HTTP API ------------------------------------------------------------------------------
    def http(self, case: fk.ApiCase) -> Outcome:
        body = case.body if case.raw else json.dumps(case.body).encode()
        lines = [f"{case.method} {case.path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
                 "Connection: close"]  # fmt: skip
        if case.length != "absent":
            lines.append(f"Content-Length: {len(body) if case.length is None else case.length}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        host, port = _http_address(self.api.address)
        logged = self.api.log.stat().st_size
        with socket.create_connection((host, port), timeout=CASE_TIMEOUT) as sock:
            try:
                sock.sendall(request)
                if case.length is not None:  # a body shorter than it says: the server sees it end
                    sock.shutdown(socket.SHUT_WR)  # (a client that closes its end has left: not for the rest)
            except OSError:
                pass
            data, closed, timed_out = _read_all(sock, CASE_TIMEOUT)
        if timed_out:
            return self._checked(None, Outcome.HUNG)
        if not self._api_answers():
            return self._checked(None, Outcome.HUNG)
        self.statuses[f"http {data[9:12].decode(errors='replace') or 'none'}"] += 1
        if _traceback_since(self.api.log, logged):
            return self._checked(None, Outcome.FAULT)
        return self._checked(None, _classify_http(data))

    def _api_answers(self) -> bool:
        host, port = _http_address(self.api.address)
        try:
            with socket.create_connection((host, port), timeout=CASE_TIMEOUT) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                data, _, timed_out = _read_all(sock, CASE_TIMEOUT)
        except OSError:
            return False
        return not timed_out and data.startswith(b"HTTP/1.1 200")

    def complete(self, prompt: list[int], n: int) -> str:
        """The API's greedy completion of ``prompt`` (``n`` tokens, whatever ends them)."""
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
        host, port = _http_address(self.api.address)
        with socket.create_connection((host, port), timeout=CASE_TIMEOUT) as sock:
            data = json.dumps(body).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
            reply, _, _ = _read_all(sock, CASE_TIMEOUT)
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), reply[:300]
        return str(json.loads(payload)["choices"][0]["text"])


def _http_address(url: str) -> tuple[str, int]:
    """host, port of ``http://HOST:PORT/v1``."""
    return split_address(url.removeprefix("http://").split("/")[0])


def _traceback_since(log: Path, offset: int) -> bool:
    """Whether ``log`` gained a traceback past ``offset``."""
    with open(log, "rb") as f:
        f.seek(offset)
        return b"Traceback (most recent call last)" in f.read()


def _connect(address: str) -> socket.socket:
    return socket.create_connection(split_address(address), timeout=CASE_TIMEOUT)


def _read_all(sock: socket.socket, wait: float, whole: bool = False) -> tuple[bytes, bool, bool]:
    """What ``sock`` gives within ``wait`` seconds, or (``whole``) its first whole frame: (bytes,
    it closed, time ran out)."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False, True
        if not select.select([sock], [], [], left)[0]:
            continue
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            return b"".join(chunks), True, False
        chunks.append(data)
        if whole and codec.FrameReader(1 << 30).feed(b"".join(chunks)):
            return b"".join(chunks), False, False


def _classify_frames(data: bytes, closed: bool) -> Outcome:
    frames: list[codec.DataFrame] = []
    try:
        frames = codec.FrameReader(1 << 30).feed(data)
    except codec.CodecError:
        pass
    if any(f.kind == FrameKind.ERROR for f in frames):
        return Outcome.REFUSED
    if frames:
        return Outcome.ANSWERED
    return Outcome.CLOSED if closed else Outcome.SILENT


def _classify_http(data: bytes) -> Outcome:
    if not data.startswith(b"HTTP/1."):
        return Outcome.CLOSED
    status = int(data[9:12]) if data[9:12].isdigit() else 0
    if 200 <= status < 300:
        return Outcome.ANSWERED
    return Outcome.REFUSED if 400 <= status < 500 or status in (501, 505) else Outcome.FAILED  # (method, version)


@contextmanager
def live_targets(model_path: str, workdir: Path, ctx_size: int = 64) -> Iterator[FuzzTargets]:
    """Three servers and an API head over the third, started here and stopped by PID."""
    model_dir = str(Path(model_path).parent)
    started: list[Process] = []
    try:
        servers = []
        for name in ("target", "peer", "api-server"):
            servers.append(start_server(workdir, name, model_dir))
            started.append(servers[-1].process)
        cmd = [sys.executable, "-m", "llmrpc.cli", "serve", "--model", model_path, "--rpc-servers",
               servers[2].process.address, "--port", "0", "--parallel", "2", "--ctx-size", str(ctx_size)]  # fmt: skip
        api = start(cmd, workdir / "api.log", ready="llmrpc-head serve listening on ")
        started.append(api)
        info = read_model(model_path)
        targets = FuzzTargets(servers[0], servers[1], api, model_path, content_hash(model_path), info.hparams.n_layer)
        targets.prepare()
        try:
            yield targets
        finally:
            targets.close()
    finally:
        for process in reversed(started):
            process.stop()


PROMPT = [1, 5, 9, 42, 7, 300, 12]  # token ids of the fuzzed model's vocabulary


def reference_check(targets: FuzzTargets, prompt: list[int] = PROMPT) -> dict[str, Any]:
    """After fuzzing: the logits of ``prompt`` through the target and its peer against
    llama.cpp's, and the API's greedy completion against llama.cpp's."""
    from llmrpc.farm import Farm
    from llmrpc.reference import reference_llama

    llm = reference_llama(targets.model_path, n_ctx=512, logits_all=True, n_threads=2)
    llm.eval(prompt)
    want = np.array(llm.scores[: len(prompt)], dtype=np.float32)
    addresses = [targets.target.process.address, targets.peer.process.address]
    with Farm(targets.model_path, addresses, ctx_size=512) as farm:
        stages = len(farm.plan)
        got = farm.logits(prompt)
    llm.reset()
    text = llm.create_completion(prompt, max_tokens=8, temperature=0.0, top_k=1, repeat_penalty=1.0)
    api = targets.complete(prompt, 8)
    return {
        "stages": stages, "logits_equal": bool(np.array_equal(got, want)),
        "max_logit_difference": float(np.abs(got - want).max()), "api_text": api,
        "api_text_equal": api == text["choices"][0]["text"],
    }  # fmt: skip
