"""Generation on the servers: the last server samples and sends each token straight back to the
first, the head only reads the reports."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmrpc import codec
from llmrpc.codec import FrameKind
from llmrpc.farm import Farm
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.local import LocalServers
from llmrpc.model.synthetic import SyntheticSpec
from llmrpc.sampling import SamplingParams
from llmrpc.types import split_address
from llmrpc.v1 import llmrpc_pb2 as pb
from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc
from tests.servers import metered_servers

from .conftest import model_file, own_caches

GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=5)


@pytest.mark.parametrize("n_servers", [1, 3])
def test_servers_generate_what_the_head_would(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int], n_servers: int
) -> None:
    """Greedy and seeded sampling give the same tokens whether the head samples every token or
    the last server does (the same sampler, the same seed)."""
    with Farm(tiny_models["Q8_0"], servers[:n_servers], ctx_size=128) as farm:
        for sampling in (GREEDY, SAMPLED):
            farm.server_generation = False
            by_head = list(farm.generate_tokens(prompt_tokens, 24, sampling, stop_at_eog=False))
            farm.server_generation = True
            by_servers = list(farm.generate_tokens(prompt_tokens, 24, sampling, stop_at_eog=False))
            assert len(by_head) == 24
            assert by_servers == by_head
        assert len(set(by_head)) > 3  # sampling, not a stuck token


def test_a_generation_stopped_early_leaves_a_usable_session(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    """Closing the iterator stops the servers (they may have run a step further); the session
    holds what the head took, and goes on as if it had never run ahead."""
    with Farm(tiny_models["Q8_0"], servers, ctx_size=128) as farm:
        want = list(farm.generate_tokens(prompt_tokens, 15, GREEDY, stop_at_eog=False))
        with farm.session() as s:
            tokens = s.generate(prompt_tokens, 40, GREEDY)
            first = [next(tokens) for _ in range(5)]
            tokens.close()
            assert s.tokens == prompt_tokens + first[:4]
            rest = list(s.generate([first[4]], 10, GREEDY))
            assert first + rest == want
            # and the last server has forgotten the cancelled generation: a new one runs to its end
            assert len(list(s.generate([rest[-1]], 3, GREEDY))) == 3


def test_generation_stops_at_the_context_and_at_an_end_token(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    prompt = prompt_tokens[:10]
    with Farm(tiny_models["F32"], servers[:2], ctx_size=24) as farm:
        farm.server_generation = False
        by_head = list(farm.generate_tokens(prompt, 100, GREEDY, stop_at_eog=False))
        with farm.session() as s:
            got = list(s.generate(prompt, 100, GREEDY))
            assert len(s.tokens) == 24  # every position filled, none beyond
        assert got == by_head and len(got) == 24 - 10 + 1
        with farm.session() as s:
            got = list(s.generate(prompt, 100, GREEDY, eog=[by_head[2]]))
        assert got == by_head[: by_head.index(by_head[2]) + 1]  # the end token is the last one


def test_concurrent_generations_get_their_own_tokens(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    """Several generations through the same servers at once (their steps computed in shared
    batches when they are ready together) each get the tokens they get alone."""
    prompts = [prompt_tokens[i : i + 8] for i in range(3)]
    with Farm(tiny_models["F32"], servers[:2], ctx_size=64, max_sessions=3) as farm:
        alone = [list(farm.generate_tokens(p, 16, GREEDY, stop_at_eog=False)) for p in prompts]
        assert generate_together(farm, prompts, 16) == alone


def generate_together(farm: Farm, prompts: list[list[int]], n: int) -> list[list[int] | None]:
    """Greedy generations of ``n`` tokens after each prompt, all started at once."""
    got: list[list[int] | None] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait()
        got[i] = list(farm.generate_tokens(prompts[i], n, GREEDY, stop_at_eog=False))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return got


def test_servers_that_work_while_the_device_computes_generate_the_same(
    tiny_models: dict[str, str], prompt_tokens: list[int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A GPU server starts each batch and goes on (reports the last token, reads its sockets)
    before it takes the outputs. The CPU computes as a batch starts, so the servers here are
    told to take that path anyway (LLMRPC_OVERLAP=1): through one server (the report sent while
    the next step computes) and two, alone and three at once, and cancelled early, the tokens
    are those the head picks."""
    monkeypatch.setenv("LLMRPC_OVERLAP", "1")
    prompts = [prompt_tokens[i : i + 8] for i in range(3)]
    with LocalServers(2, threads=1, extra_args=["--no-calibrate"], per_server_args=own_caches(tmp_path, 2)) as local:
        for n in (1, 2):
            with Farm(tiny_models["Q8_0"], local.addresses[:n], ctx_size=64, max_sessions=3) as farm:
                farm.server_generation = False
                want = [list(farm.generate_tokens(p, 12, sampling, stop_at_eog=False)) for p in prompts
                        for sampling in (GREEDY, SAMPLED)]  # fmt: skip
                farm.server_generation = True
                got = [list(farm.generate_tokens(p, 12, sampling, stop_at_eog=False)) for p in prompts
                       for sampling in (GREEDY, SAMPLED)]  # fmt: skip
                assert got == want
                assert generate_together(farm, prompts, 12) == want[::2]
                with farm.session() as s:
                    tokens = s.generate(prompts[0], 40, GREEDY)
                    first = [next(tokens) for _ in range(4)]
                    tokens.close()
                    rest = list(s.generate([first[3]], 8, GREEDY))
                assert first + rest == want[0]


def native_steps(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return int(pb_grpc.StageStub(channel).Health(pb.HealthRequest(), timeout=10).native_steps)


def test_the_native_hop_computes_the_steps_and_changes_no_token(
    tiny_models: dict[str, str],
    servers: list[str],
    prompt_tokens: list[int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Through three servers, each takes a generation's steps in C (server/hop.c), and leaves to
    Python the ones it does not handle: the first steps, those where the decode graph is
    rebuilt (every 64 positions on the CPU; 150 tokens cross two), and at the last server a
    sampled generation's (the sampler is Python's; a greedy token is the device's argmax). The
    tokens are those of servers that take every step in Python (LLMRPC_NATIVE_HOP=0)."""
    before = [native_steps(a) for a in servers]
    with Farm(tiny_models["Q8_0"], servers, ctx_size=256) as farm:
        native = [list(farm.generate_tokens(prompt_tokens, 150, p, stop_at_eog=False)) for p in (GREEDY, SAMPLED)]
    steps = [native_steps(a) - b for a, b in zip(servers, before, strict=True)]
    assert 2 * 150 - 12 <= steps[0] < 2 * 150 and 2 * 150 - 12 <= steps[1] < 2 * 150, steps
    assert 150 - 6 <= steps[2] <= 150, steps
    monkeypatch.setenv("LLMRPC_NATIVE_HOP", "0")
    with LocalServers(3, threads=2, extra_args=["--no-calibrate"], per_server_args=own_caches(tmp_path, 3)) as local:
        with Farm(tiny_models["Q8_0"], local.addresses, ctx_size=256) as farm:
            python = [list(farm.generate_tokens(prompt_tokens, 150, p, stop_at_eog=False)) for p in (GREEDY, SAMPLED)]
        assert [native_steps(a) for a in local.addresses] == [0, 0, 0]
    assert native == python
    assert len(set(native[1])) > 10


def test_servers_of_one_thread_taking_turns_take_the_native_hop(
    tiny_models: dict[str, str], prompt_tokens: list[int], tmp_path: Path
) -> None:
    """Servers of one compute thread that take turns on a machine's cores have no team of
    workers to park between steps; they decode in C all the same (they left every step to
    Python), with the tokens the head's own greedy picks give."""
    with LocalServers(2, threads=1, extra_args=["--no-calibrate"], per_server_args=own_caches(tmp_path, 2)) as local:
        with Farm(tiny_models["Q8_0"], local.addresses, ctx_size=128) as farm:
            farm.server_generation = False
            want = list(farm.generate_tokens(prompt_tokens, 40, GREEDY, stop_at_eog=False))
            farm.server_generation = True
            before = [native_steps(a) for a in local.addresses]
            assert list(farm.generate_tokens(prompt_tokens, 40, GREEDY, stop_at_eog=False)) == want
            steps = [native_steps(a) - b for a, b in zip(local.addresses, before, strict=True)]
    assert all(30 <= n <= 40 for n in steps), steps


def test_a_malformed_generation_is_refused(servers: list[str]) -> None:
    info = StageClient(servers[0]).hello()
    host, _ = split_address(servers[0])
    data = f"{host}:{info.data_port}"
    reader = codec.FrameReader(1 << 20)
    with socket.create_connection((host, info.data_port), timeout=10) as sock:

        def exchange(kind: FrameKind, meta: dict[str, object], arrays: list[np.ndarray]) -> codec.DataFrame:
            sock.sendall(b"".join(codec.encode_frame(kind, 9, meta, arrays)))
            while True:
                frames = reader.feed(sock.recv(1 << 16))
                if frames:
                    return frames[0]

        assert exchange(FrameKind.HELLO, {"token": info.data_token, "link": 77}, []).kind == FrameKind.WELCOME
        gen = {"n": 0, "step": 0, "limit": 64, "eog": [], "sampling": [0.0, 1, 1.0, None]}
        meta = {"route": [[data, info.data_token, ["s"]]], "hop": 0, "link": 77, "pos": [0], "rows": [1], "gen": gen}
        reply = exchange(FrameKind.FORWARD, meta, [np.zeros(1, np.int32)])
        assert reply.kind == FrameKind.ERROR and reply.meta["code"] == "invalid_argument"
        assert "gen" in reply.meta["message"]
    assert StageClient(servers[0]).hello().data_port == info.data_port  # still serving


@pytest.mark.parametrize("victim", [0, 1])
def test_a_server_lost_mid_generation_fails_it_fast(
    tiny_models: dict[str, str], prompt_tokens: list[int], victim: int, tmp_path: Path
) -> None:
    """The head hears of a lost server within seconds, named, whichever of the two it was."""
    with LocalServers(2, threads=1, extra_args=["--no-calibrate"], per_server_args=own_caches(tmp_path, 2)) as local:
        with Farm(tiny_models["F32"], local.addresses, ctx_size=2048) as farm, farm.session() as s:
            tokens = s.generate(prompt_tokens, 2000, GREEDY)
            for _ in range(3):
                next(tokens)
            address = s.route[victim].address
            proc = local.processes[local.addresses.index(address)]
            proc.kill()
            proc.wait()
            t0 = time.monotonic()
            with pytest.raises(StageError) as info:
                for _ in tokens:
                    pass
            assert time.monotonic() - t0 < 10
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and address in str(info.value)


HEAD_SCRIPT = """
import sys
from llmrpc.farm import Farm
from llmrpc.sampling import SamplingParams
model, servers, ctx = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
farm = Farm(model, servers, ctx_size=ctx, batch=64)
s = farm.session()
tokens = s.generate([1, 5, 9], ctx - 8, SamplingParams(temperature=0))
for _ in range(3):
    next(tokens)
print("generating", flush=True)
sys.stdin.read()  # until killed
"""


def _steps(ports: list[int]) -> float:
    """Generation steps the servers have taken, in Python and in C."""
    total = 0.0
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
        total += sum(
            s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "llmrpc:server_steps_total"
        )  # fmt: skip
    return total


def test_servers_stop_generating_for_a_head_that_died(tmp_path: Path) -> None:
    """A head killed in the middle of a long generation (16,000 tokens asked): the servers stop
    within steps (its connection is gone) instead of computing the rest for nobody."""
    ctx = 16384
    model = model_file(tmp_path, "long.gguf", SyntheticSpec(n_ctx_train=ctx, seed=7))
    with metered_servers(own_caches(tmp_path, 2), threads=1) as metered:
        addresses, ports = [a for a, _ in metered], [p for _, p in metered]
        head = subprocess.Popen(
            [sys.executable, "-c", HEAD_SCRIPT, model, ",".join(addresses), str(ctx)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert head.stdout is not None and head.stdout.readline().strip() == "generating"
            running = _steps(ports)
            _wait_for(lambda: _steps(ports) > running + 10, 60, "the generation is not running")
        finally:
            head.kill()
            head.wait()
        # the step counts stay put for a second, long before the generation could have ended
        deadline, last = time.monotonic() + 60, -1.0
        while (now := _steps(ports)) != last:
            assert time.monotonic() < deadline, "the servers go on generating"
            last = now
            time.sleep(1.0)  # the window the counts must stay put in
        assert now < ctx  # each of the two servers: one step a token
        # and they serve the next head
        with Farm(model, addresses, ctx_size=64) as farm:
            assert len(list(farm.generate_tokens([1, 5, 9], 4, GREEDY, stop_at_eog=False))) == 4


def _wait_for(what: Callable[[], bool], seconds: float, why: str) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)
