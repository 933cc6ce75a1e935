"""The data plane: activations pushed server to server over TCP, answers straight to the head."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmrpc import codec
from llmrpc.codec import FrameKind
from llmrpc.farm import Farm
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.datalink import Hop
from llmrpc.head.local import LocalServers
from llmrpc.types import split_address
from tests.threads import pinned_threads

from .conftest import own_caches


def test_frames_round_trip_and_refuse_damage() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.array([[7], [8], [9]], dtype=np.int32)
    wire = b"".join(bytes(p) for p in codec.encode_frame(FrameKind.RESULT, 42, {"a": 1}, [x, ids.astype(np.float16)]))
    reader = codec.FrameReader(max_bytes=1 << 20)
    assert reader.feed(wire[:10]) == []  # a frame split anywhere is put back together
    (frame,) = reader.feed(wire[10:])
    assert frame.kind == FrameKind.RESULT and frame.request_id == 42 and frame.meta == {"a": 1}
    assert np.array_equal(frame.arrays[0], x) and frame.arrays[1].dtype == np.float16
    assert np.array_equal(frame.arrays[1], ids)

    with pytest.raises(codec.CodecError, match="magic"):
        codec.FrameReader(1 << 20).feed(b"XXXX" + wire[4:])
    with pytest.raises(codec.CodecError, match="limit"):
        codec.FrameReader(16).feed(wire)
    header = codec.DATA_HEADER.pack(codec.DATA_MAGIC, FrameKind.FORWARD, 1, 2, 8)
    with pytest.raises(codec.CodecError, match="JSON"):
        codec.FrameReader(1 << 20).feed(header + b"{x" + bytes(8))
    meta = b'{"arrays":[["f32",[3]]]}'
    header = codec.DATA_HEADER.pack(codec.DATA_MAGIC, FrameKind.FORWARD, 1, len(meta), 8)
    with pytest.raises(codec.CodecError, match="more than"):
        codec.FrameReader(1 << 20).feed(header + meta + bytes(8))
    meta = b'{"arrays":[["f64",[1]]]}'
    header = codec.DATA_HEADER.pack(codec.DATA_MAGIC, FrameKind.FORWARD, 1, len(meta), 8)
    with pytest.raises(codec.CodecError, match="bad array"):
        codec.FrameReader(1 << 20).feed(header + meta + bytes(8))
    with pytest.raises(codec.CodecError, match="cannot be sent"):
        codec.encode_frame(FrameKind.RESULT, 1, {}, [np.zeros(2, dtype=np.float64)])
    # big-endian and strided arrays arrive as the same numbers
    odd = [x.astype(">f4"), x[:, ::2], ids.astype(">i4")[::-1]]
    (frame,) = codec.FrameReader(1 << 20).feed(
        b"".join(bytes(p) for p in codec.encode_frame(FrameKind.RESULT, 1, {}, odd))
    )
    assert all(
        np.array_equal(got, sent) and got.dtype.byteorder in "<=|" for got, sent in zip(frame.arrays, odd, strict=True)
    )


def test_data_plane_and_grpc_paths_agree(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    path = tiny_models["Q8_0"]
    with Farm(path, servers, ctx_size=512, data_plane=False) as farm:
        assert farm.pipeline is not None and farm.pipeline.links is None
        by_grpc = farm.logits(prompt_tokens)
        with farm.session() as s:
            s.forward(prompt_tokens[:-1])
            grpc_top = s.forward_top_k(prompt_tokens[-1:], 5)
    with Farm(path, servers, ctx_size=512) as farm:
        assert farm.pipeline is not None and farm.pipeline.links is not None
        by_data = farm.logits(prompt_tokens)
        with farm.session() as s:
            s.forward(prompt_tokens[:-1])
            data_top = s.forward_top_k(prompt_tokens[-1:], 5)
            # decoding a token at a time through the push chain gives the batch's rows
            rows = [s.forward([t], start_pos=i)[-1] for i, t in enumerate(prompt_tokens)]
    assert np.array_equal(by_grpc, by_data)
    assert np.array_equal(grpc_top[0], data_top[0]) and np.array_equal(grpc_top[1], data_top[1])
    assert list(data_top[0]) == list(np.argsort(-by_data[-1], kind="stable")[:5])
    assert np.abs(np.stack(rows) - by_data).max() <= 1e-4 * np.abs(by_data).max()


def test_pipelined_prefill_matches_one_batch(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    """Micro-batches in flight through three servers at once give the one-batch logits."""
    path = tiny_models["F32"]
    with Farm(path, servers, ctx_size=512, micro_batch=len(prompt_tokens)) as farm:
        whole = farm.logits(prompt_tokens)
    with Farm(path, servers, ctx_size=512, micro_batch=5) as farm:
        piped = farm.logits(prompt_tokens)
        with farm.session() as s:
            last = farm.prefill(s, prompt_tokens)
            assert len(s.tokens) == len(prompt_tokens)
    assert piped.shape == whole.shape
    assert np.abs(piped - whole).max() <= 1e-4 * np.abs(whole).max()
    assert np.abs(last[-1] - whole[-1]).max() <= 1e-4 * np.abs(whole).max()


def test_errors_come_back_from_the_server_that_refused(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    with Farm(tiny_models["F32"], servers, ctx_size=64) as farm:
        assert farm.pipeline is not None and farm.pipeline.links is not None
        with farm.session() as s:
            s.forward(prompt_tokens[:4])
            middle = s.route[1]
            s.route[1] = Hop(middle.address, middle.layers, middle.data_address, middle.token, "no-such-session")
            with pytest.raises(StageError) as info:
                s.forward(prompt_tokens[4:6])
            err = info.value
            assert err.code == grpc.StatusCode.NOT_FOUND and err.address == middle.address
            assert "no-such-session" in str(err) and middle.layers in str(err)
            with socket.socket() as closed:  # a next server the head did not declare to the first
                closed.bind(("127.0.0.1", 0))
                nowhere = f"127.0.0.1:{closed.getsockname()[1]}"
            s.route[1] = Hop(middle.address, middle.layers, nowhere, middle.token, middle.session_id)
            with pytest.raises(StageError) as info:
                s.forward(prompt_tokens[4:6])
            err = info.value  # refused by the first server, which sends on to declared servers only
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.address == s.route[0].address
            assert nowhere in str(err) and "declared" in str(err)
            s.route[1] = middle
            with pytest.raises(StageError) as info:
                s.forward([1, 999])
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.address == s.route[0].address
            assert "999" in str(info.value)
            # nothing was lost: the session goes on where it was
            s.forward(prompt_tokens[4:6], start_pos=4)
            assert len(s.tokens) == 6


def test_step_frames_round_trip_and_refuse_damage() -> None:
    """A generation's next step crosses each server as a STEP: a fixed binary description."""
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    for arr in (x, x.astype(np.float16), np.array([42], dtype=np.int32), x.astype(">f4"), x.reshape(2, 3)[:, ::2]):
        wire = b"".join(bytes(p) for p in codec.encode_step(9, 3, 2, 120, 7, 50, arr))
        (frame,) = codec.FrameReader(1 << 20).feed(wire)
        assert frame.kind == FrameKind.STEP and frame.request_id == 9
        assert frame.meta == {"link": 3, "hop": 2, "pos": 120, "step": 7, "n": 50}
        assert np.array_equal(frame.arrays[0], arr) and frame.arrays[0].shape == arr.shape
    with pytest.raises(codec.CodecError, match="STEP carries"):
        codec.encode_step(1, 1, 0, 0, 0, 1, np.zeros(2, dtype=np.float64))
    meta = codec.STEP_META.pack(3, 1, 5, 1, 1, 0, 2, 1, 6)
    for bad_meta, data, message in (
        (meta[:-1], bytes(24), "description"),
        (meta, bytes(20), "not its 20 bytes"),
        (codec.STEP_META.pack(3, 1, 5, 1, 1, 7, 2, 1, 6), bytes(24), "bad STEP array"),
        (codec.STEP_META.pack(3, 1, 5, 1, 1, 0, 1, 1, 6), bytes(24), "bad STEP array"),
    ):
        header = codec.DATA_HEADER.pack(codec.DATA_MAGIC, FrameKind.STEP, 1, len(bad_meta), len(data))
        with pytest.raises(codec.CodecError, match=message):
            codec.FrameReader(1 << 20).feed(header + bad_meta + data)


@pytest.mark.parametrize("end", codec.TOKEN_ENDS)
def test_token_frames_round_trip_and_refuse_damage(end: str | None) -> None:
    """The last server reports each token to the head in a fixed binary description."""
    wire = b"".join(codec.encode_token(11, 49151, 300, end))
    (frame,) = codec.FrameReader(1 << 20).feed(wire)
    assert (frame.kind, frame.request_id, frame.meta) == (
        FrameKind.TOKEN,
        11,
        {"token": 49151, "step": 300, "end": end},
    )
    with pytest.raises(ValueError):
        codec.encode_token(11, 1, 1, "bored")
    for bad_meta, data, message in (
        (codec.TOKEN_META.pack(1, 2, 0)[:-1], b"", "description"),
        (codec.TOKEN_META.pack(1, 2, 0), bytes(4), "description"),
        (codec.TOKEN_META.pack(1, 2, len(codec.TOKEN_ENDS)), b"", "end"),
    ):
        header = codec.DATA_HEADER.pack(codec.DATA_MAGIC, FrameKind.TOKEN, 1, len(bad_meta), len(data))
        with pytest.raises(codec.CodecError, match=message):
            codec.FrameReader(1 << 20).feed(header + bad_meta + data)


def test_a_step_for_a_generation_never_introduced_is_refused(servers: list[str]) -> None:
    info = StageClient(servers[0]).hello()
    with _raw_connection(servers[0]) as sock:
        sock.sendall(b"".join(codec.encode_frame(FrameKind.HELLO, 1, {"token": info.data_token, "link": 77})))
        welcome = _read_frame(sock)
        assert welcome is not None and welcome.kind == FrameKind.WELCOME
        sock.sendall(b"".join(codec.encode_step(5, 77, 0, 10, 3, 20, np.array([7], dtype=np.int32))))
        reply = _read_frame(sock)
        assert reply is not None and reply.kind == FrameKind.ERROR and reply.request_id == 5
        assert reply.meta["code"] == "invalid_argument" and "carried no FORWARD" in reply.meta["message"]
    assert StageClient(servers[0]).hello().data_port == info.data_port  # still serving


def test_a_negative_position_is_refused_not_fatal(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    """gRPC's start_pos is unsigned; a data-plane frame's is not (ggml aborted on it)."""
    with Farm(tiny_models["F32"], servers[:1], ctx_size=64) as farm:
        with farm.session() as s:
            s.forward(prompt_tokens[:3])
            with pytest.raises(StageError) as info:
                s.forward(prompt_tokens[3:4], start_pos=-1)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "pos must be an integer within [0, " in str(
                info.value
            )
            assert s.forward(prompt_tokens[3:4], start_pos=3).shape[0] == 1  # the server lives on


def _raw_connection(address: str) -> socket.socket:
    info = StageClient(address).hello()
    host, _ = split_address(address)
    return socket.create_connection((host, info.data_port), timeout=10)


def _read_frame(sock: socket.socket) -> codec.DataFrame | None:
    reader = codec.FrameReader(1 << 20)
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return None
        frames = reader.feed(data)
        if frames:
            return frames[0]


def test_data_port_refuses_strangers(servers: list[str]) -> None:
    address = servers[0]
    with _raw_connection(address) as sock:  # a wrong token
        sock.sendall(b"".join(codec.encode_frame(FrameKind.HELLO, 1, {"token": "0" * 32, "link": 5})))
        reply = _read_frame(sock)
        assert reply is not None and reply.kind == FrameKind.ERROR and "token" in reply.meta["message"]
        assert sock.recv(1) == b""  # and it hangs up
    with _raw_connection(address) as sock:  # no HELLO at all
        sock.sendall(b"".join(codec.encode_frame(FrameKind.FORWARD, 1, {"route": []}, [np.zeros(1, np.int32)])))
        reply = _read_frame(sock)
        assert reply is not None and reply.kind == FrameKind.ERROR and "HELLO" in reply.meta["message"]
    with _raw_connection(address) as sock:  # not our protocol
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
        reply = _read_frame(sock)
        assert reply is not None and reply.kind == FrameKind.ERROR and "magic" in reply.meta["message"]
    info = StageClient(address).hello()  # still serving
    assert info.data_port > 0


def test_concurrent_sessions_get_their_own_answers(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    path = tiny_models["Q4_0"]
    prompts = [prompt_tokens[i:] for i in range(4)]
    with Farm(path, servers, ctx_size=64, max_sessions=4) as farm:
        alone = [farm.logits(p) for p in prompts]
        got: list[np.ndarray | None] = [None] * 4
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                with farm.session() as s:
                    got[i] = np.stack([s.forward([t])[-1] for t in prompts[i]])
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors
    for want, have in zip(alone, got, strict=True):
        assert have is not None and np.abs(have - want).max() <= 1e-4 * np.abs(want).max()


def test_a_dead_server_fails_the_request_fast(
    tiny_models: dict[str, str], prompt_tokens: list[int], tmp_path: Path
) -> None:
    with LocalServers(3, threads=1, extra_args=["--no-calibrate"], per_server_args=own_caches(tmp_path, 3)) as local:
        with Farm(tiny_models["F32"], local.addresses, ctx_size=64) as farm:
            with farm.session() as s:
                s.forward(prompt_tokens[:3])
                middle = s.route[1].address
                proc = local.processes[local.addresses.index(middle)]
                proc.kill()
                proc.wait()
                t0 = time.monotonic()
                with pytest.raises(StageError) as info:
                    s.forward(prompt_tokens[3:5])
                assert time.monotonic() - t0 < 10
                assert info.value.code == grpc.StatusCode.UNAVAILABLE and middle in str(info.value)
                first = s.route[0].address
                proc = local.processes[local.addresses.index(first)]
                proc.kill()
                proc.wait()
                for _ in range(2):  # the first server is gone too: refused at once, every time
                    with pytest.raises(StageError) as info:
                        s.forward(prompt_tokens[3:5])
                    assert info.value.code == grpc.StatusCode.UNAVAILABLE and first in str(info.value)


def test_concurrent_decode_steps_travel_as_one_batch(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    """Four streams decoding at once through three servers: their steps are coalesced into
    shared batches, and each stream gets the top-k it would get alone."""
    path = tiny_models["Q8_0"]
    prompts = [prompt_tokens[i : i + 12] for i in range(4)]
    steps = 6
    with Farm(path, servers, ctx_size=64, max_sessions=4) as farm:
        assert farm.pipeline is not None and farm.pipeline.coalescer is not None
        coalescer = farm.pipeline.coalescer

        def decode(prompt: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
            with farm.session() as s:
                s.forward(prompt[:-1])
                return [s.forward_top_k([prompt[-1] + i], 5) for i in range(steps)]

        alone = [decode(p) for p in prompts]
        before = coalescer.batches
        got: list[list[tuple[np.ndarray, np.ndarray]] | None] = [None] * 4
        barrier = threading.Barrier(4)

        def run(i: int) -> None:
            barrier.wait()
            got[i] = decode(prompts[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        batches = coalescer.batches - before
    assert batches < 4 * steps  # some steps shared a batch
    for want, have in zip(alone, got, strict=True):
        assert have is not None
        for (w_ids, w_val), (h_ids, h_val) in zip(want, have, strict=True):
            assert np.abs(w_val - h_val).max() <= 1e-4 * np.abs(w_val).max()
            if w_val[0] - w_val[1] > 1e-3:  # a clear winner stays the winner
                assert w_ids[0] == h_ids[0]


def test_batches_stop_waiting_for_an_idle_session(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    with Farm(tiny_models["F32"], servers[:1], ctx_size=64, max_sessions=2) as farm:
        assert farm.pipeline is not None and farm.pipeline.coalescer is not None
        coalescer = farm.pipeline.coalescer
        with farm.session() as idle, farm.session() as busy:
            idle.forward_top_k(prompt_tokens[:3], 2)
            assert coalescer.decoding == 1
            busy.forward_top_k(prompt_tokens[:3], 2)  # waits for the idle one once...
            assert coalescer.decoding == 1  # ...then no more
            busy.forward_top_k(prompt_tokens[3:4], 2)
            assert coalescer.decoding == 1
            idle.forward_top_k(prompt_tokens[3:4], 2)  # it comes back when it decodes again
            assert coalescer.decoding == 1
        assert coalescer.decoding == 0  # closed sessions are forgotten


def test_a_refused_step_fails_only_its_own_session(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    """Steps that shared a refused batch are retried alone: the good session gets its answer."""
    with Farm(tiny_models["F32"], servers, ctx_size=64, max_sessions=2) as farm:
        assert farm.pipeline is not None and farm.pipeline.coalescer is not None
        with farm.session() as good, farm.session() as bad:
            good.forward(prompt_tokens[:3])
            bad.forward(prompt_tokens[:3])
            good.forward_top_k([prompt_tokens[3]], 3)  # both now decode: the next steps wait for each other
            bad.forward_top_k([prompt_tokens[3]], 3)
            want = farm.logits(prompt_tokens[:5])[-1]
            hop = bad.route[2]
            bad.route[2] = Hop(hop.address, hop.layers, hop.data_address, hop.token, "no-such-session")
            results: dict[str, object] = {}
            barrier = threading.Barrier(2)

            def step(name: str, s: object) -> None:
                barrier.wait()
                try:
                    results[name] = s.forward_top_k([prompt_tokens[4]], 3)  # type: ignore[attr-defined]
                except StageError as e:
                    results[name] = e

            threads = [threading.Thread(target=step, args=a) for a in (("good", good), ("bad", bad))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            bad.route[2] = hop
    assert isinstance(results["bad"], StageError) and results["bad"].code == grpc.StatusCode.NOT_FOUND
    ids, values = results["good"]  # type: ignore[misc]
    assert list(ids) == list(np.argsort(-want, kind="stable")[:3])
    assert np.abs(values - np.sort(want)[::-1][:3]).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.skipif(
    (os.cpu_count() or 1) < 2 or not Path("/proc/self/task").exists() or "OMP_PROC_BIND" in os.environ,
    reason="needs 2 CPUs, /proc, and OpenMP's binding left to the servers",
)
def test_servers_that_share_a_machine_keep_their_compute_threads_on_cores(
    tiny_models: dict[str, str], prompt_tokens: list[int], tmp_path: Path
) -> None:
    """Servers started together take turns on the machine's cores; each keeps its compute
    thread and its OpenMP workers on one core each (OpenMP places) and leaves its other threads
    (gRPC's, loads') on any core; a server started alone does not pin anything."""
    caches = own_caches(tmp_path, 3)
    with (
        LocalServers(2, threads=2, extra_args=["--no-calibrate"], per_server_args=caches[:2]) as together,
        LocalServers(1, threads=2, per_server_args=caches[2:]) as alone,
    ):
        for addresses in (together.addresses, alone.addresses):
            with Farm(tiny_models["F32"], addresses, ctx_size=64) as farm:
                farm.generate(" ".join(["w"] * 4), 4)
        for p in together.processes:
            pinned, threads = pinned_threads(p.pid), len(list(Path(f"/proc/{p.pid}/task").iterdir()))
            assert len(pinned) == 2, pinned  # the compute thread and its one worker (threads=2)
            assert threads > len(pinned)
        assert not pinned_threads(alone.processes[0].pid)
