"""A closed session's KV cache is kept for the next session of its size, and given back when a
new session needs the memory. Sessions belong to the head link whose steps use them: closed when
that head's connection goes, refused to other links; any session idle too long is closed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmrpc import codec
from llmrpc.farm import Farm
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.local import LocalServers
from llmrpc.model.gguf_model import content_hash, read_model
from llmrpc.model.kv import CacheConfig, kv_bytes
from llmrpc.reference import reference_llama
from llmrpc.v1 import llmrpc_pb2 as pb
from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc


def test_a_reused_cache_gives_a_new_session_the_right_logits(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    """The second session gets the first one's cache, full of its keys and values: a shorter
    prompt must still see none of them."""
    path = tiny_models["Q8_0"]
    short = prompt_tokens[:7]
    ref = reference_llama(path, n_ctx=512, logits_all=True, n_threads=2)
    ref.eval(short)
    want = np.array(ref.scores[: len(short)], dtype=np.float32)
    with Farm(path, servers[:1], ctx_size=512) as farm:
        with farm.session() as s:
            s.forward(prompt_tokens)
            for t in (5, 6, 7):
                s.forward_top_k([t], 1)
        with farm.session() as s:
            got = s.forward(short, all_logits=True)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_spare_caches_make_room_under_the_memory_cap(tiny_models: dict[str, str], tmp_path: Path) -> None:
    path = tiny_models["F32"]
    info = read_model(path)
    n = info.hparams.n_layer
    small = kv_bytes(info.hparams, 0, n, 512, CacheConfig())
    cap = info.range_bytes(0, n) + 2 * small + small // 2  # a 1024-cell cache fits only without the spare
    args = ["--no-calibrate", "--mem", str(cap), "--cache-dir", str(tmp_path), "--model-dir", os.path.dirname(path)]
    with LocalServers(1, threads=1, extra_args=args) as local:
        client = StageClient(local.addresses[0])
        client.hello()
        assert client.load(path, 0, n, content_hash(path)) is not None
        client.close_session(client.open_session(512))  # its cache stays as a spare
        big = client.open_session(1024)  # needs the spare's memory
        client.close_session(big)
        first = client.open_session(512)  # the spare 1024-cell cache is not this size: freed for it
        second = client.open_session(512)  # both 512-cell caches fit
        assert first != second
        client.close()


def test_a_session_refused_by_one_server_leaves_none_open_on_the_others(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    path = tiny_models["Q8_0"]
    caches = [["--cache-dir", str(tmp_path / f"c{i}")] for i in range(3)]
    caches[2] += ["--max-sessions", "1"]
    with LocalServers(3, threads=1, extra_args=["--no-calibrate"], per_server_args=caches) as local:
        with Farm(path, list(local.addresses), ctx_size=64) as farm, farm.session():
            with pytest.raises(StageError) as refused:
                farm.session()  # all three are asked at once; the third has no room
            assert refused.value.address == local.addresses[2]
            open_now = [StageClient(a).hello().open_sessions for a in local.addresses]
            assert open_now == [1, 1, 1]  # the first session only: the refused one's two were closed


HEAD = """
import sys
from llmrpc.farm import Farm
farm = Farm(sys.argv[1], sys.argv[2].split(","), ctx_size=64, rejoin_every=None)
session = farm.session()
session.forward([1, 2, 3])
print("ready", flush=True)
sys.stdin.read()
"""


def _open_sessions(addresses: list[str]) -> list[int]:
    counts = []
    for address in addresses:
        with grpc.insecure_channel(address) as channel:
            counts.append(pb_grpc.StageStub(channel).Health(pb.HealthRequest(), timeout=30).open_sessions)
    return counts


def _within(seconds: float, addresses: list[str], want: list[int]) -> list[int]:
    """The servers' open sessions once they are ``want``, or when ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while (now := _open_sessions(addresses)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def test_the_sessions_of_a_head_that_dies_are_closed(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """A head killed (SIGKILL) with a session open on every server: each server closes the
    session its data connection owned (finding 9: they were kept until the server stopped)."""
    caches = [["--cache-dir", str(tmp_path / f"c{i}")] for i in range(2)]
    with LocalServers(2, threads=1, extra_args=["--no-calibrate"], per_server_args=caches) as local:
        head = subprocess.Popen(
            [sys.executable, "-c", HEAD, tiny_models["F32"], ",".join(local.addresses)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert head.stdout is not None and head.stdout.readline() == "ready\n"
            assert _open_sessions(local.addresses) == [1, 1]
        finally:
            head.kill()
            head.wait()
        assert _within(30, local.addresses, [0, 0]) == [0, 0]


def test_an_idle_session_is_closed_after_its_time(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """With --session-ttl 1, a session nobody computes in is closed; one in use is kept."""
    path = tiny_models["F32"]
    args = ["--no-calibrate", "--session-ttl", "1", "--cache-dir", str(tmp_path), "--model-dir", os.path.dirname(path)]
    with LocalServers(1, threads=1, extra_args=args) as local:
        client = StageClient(local.addresses[0])
        client.hello()
        assert client.load(path, 0, read_model(path).hparams.n_layer, content_hash(path)) is not None
        idle, used = client.open_session(64), client.open_session(64)
        deadline = time.monotonic() + 30
        pos = 0
        while _open_sessions(local.addresses) == [2] and time.monotonic() < deadline:
            client.forward(used, pos, np.array([pos % 50 + 1], np.int32))  # in use: a step now and then
            pos += 1
            time.sleep(0.2)
        assert _open_sessions(local.addresses) == [1]
        client.forward(used, pos, np.array([7], np.int32))
        with pytest.raises(StageError, match="unknown session"):
            client.forward(idle, 0, np.array([7], np.int32))
        client.close()


def test_a_step_for_another_heads_session_is_refused(tiny_models: dict[str, str], servers: list[str]) -> None:
    from tests.test_validation import _Raw

    with Farm(tiny_models["F32"], servers[:1], ctx_size=64) as farm, farm.session() as s:
        s.forward([1, 2, 3])  # the farm's link owns the session now
        raw = _Raw(servers[0])
        try:
            raw.forward(5, [[raw.data_address, raw.token, [s.ids[0]]]], np.array([4], np.int32), pos=[3])
            reply = raw.read()
        finally:
            raw.close()
        assert (reply.kind, reply.meta["code"]) == (codec.FrameKind.ERROR, "permission_denied")
        assert "another head link" in reply.meta["message"]
        assert s.forward([4]).shape[0] == 1  # the farm's own steps go on


def test_a_server_accounts_for_its_memory_by_part(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """Health says what the memory holds: the weights, open sessions' caches, spare caches and
    graphs, each as the server allocated it; kept decode graphs stay bounded however many
    sessions have decoded."""
    path = tiny_models["F32"]
    info = read_model(path)
    n = info.hparams.n_layer
    cache = kv_bytes(info.hparams, 0, n, 512, CacheConfig())
    args = ["--no-calibrate", "--cache-dir", str(tmp_path), "--model-dir", os.path.dirname(path)]
    with LocalServers(1, threads=1, extra_args=args) as local:
        client = StageClient(local.addresses[0])
        client.hello()
        loaded = client.load(path, 0, n, content_hash(path))
        assert loaded is not None
        empty = client.health().memory
        assert (empty.weights, empty.sessions, empty.spare, empty.prefixes) == (loaded.weight_bytes, 0, 0, 0)

        def decoded(count: int) -> list[str]:
            ids = [client.open_session(512) for _ in range(count)]
            for sid in ids:
                client.forward(sid, 0, np.array([5], dtype=np.int32), all_logits=True)
            return ids

        first = decoded(1)
        one = client.health().memory
        assert one.sessions == cache and one.graphs > empty.graphs
        client.close_session(first[0])
        closed = client.health().memory
        assert (closed.sessions, closed.spare) == (0, cache)
        many = decoded(16)
        at_16 = client.health().memory
        assert at_16.sessions == 16 * cache
        more = decoded(8)  # 24 sessions' decode graphs built: the oldest 8 freed
        at_24 = client.health().memory
        assert at_24.sessions == 24 * cache
        assert at_24.graphs == at_16.graphs, "the kept decode graphs are bounded"
        for sid in many + more:
            client.close_session(sid)
        done = client.health().memory
        assert done.sessions == 0 and 0 < done.spare <= 4 * cache
        client.close()
