"""A server that dies in the middle of a generation costs a replay, not the request: real server
processes on 127.0.0.1, killed by PID (SIGKILL) while the farm generates."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmrpc.farm import Farm
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.local import LocalServers, read_ready
from llmrpc.head.placement import model_layout
from llmrpc.head.planner import PlanError, ServerReport, plan
from llmrpc.model.gguf_model import read_model
from llmrpc.model.kv import CacheConfig
from llmrpc.model.synthetic import SyntheticSpec
from llmrpc.sampling import SamplingParams

from .conftest import model_file, own_caches

GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)
N = 60
KILL_AT = 20  # tokens into the generation
PROMPTS = ["Once upon a time", "def fibonacci(n):"]


def _generate_and_kill(
    farm: Farm, prompt: str, victim: subprocess.Popen[str], sampling: SamplingParams = GREEDY
) -> list[int]:
    tokens = []
    for i, token in enumerate(farm.generate_tokens(farm.tokenizer.encode(prompt), N, sampling, stop_at_eog=False)):
        tokens.append(token)
        if i + 1 == KILL_AT:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
    return tokens


def _local(tmp_path: Path, count: int, *args: str) -> LocalServers:
    """``count`` servers, each with an empty cache of its own: what a re-plan gives a server is
    shipped to it in every run."""
    return LocalServers(
        count, threads=1, extra_args=["--no-calibrate", *args], per_server_args=own_caches(tmp_path, count)
    )


def _process(local: LocalServers, address: str) -> subprocess.Popen[str]:
    return local.processes[local.addresses.index(address)]


def _replayed(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The tokens fed again by each replay, as the farm logs them (one line a generation)."""
    found = (re.search(r"replaying (\d+) tokens", r.getMessage()) for r in caplog.records if r.name == "llmrpc.farm")
    return sorted(int(m.group(1)) for m in found if m)


@pytest.mark.parametrize(
    ("victim", "server_generation", "sampling"),
    [(0, True, GREEDY), (1, True, GREEDY), (2, True, GREEDY), (1, False, GREEDY), (2, True, SAMPLED),
     (1, False, SAMPLED)],
)  # fmt: skip
def test_a_server_that_dies_costs_a_replay_not_the_request(
    smollm2: str, victim: int, server_generation: bool, sampling: SamplingParams, tmp_path: Path
) -> None:
    """The servers generating on their own, or the head sampling each token; greedy, or sampled
    with a seed (the replay goes on with the draws the rest would have had). The servers left
    receive the layers of their new ranges (their caches held only their old ones)."""
    with _local(tmp_path, 3) as local:
        with Farm(smollm2, local.addresses, ctx_size=256, server_generation=server_generation) as farm:
            prompt = farm.tokenizer.encode(PROMPTS[0])
            want = list(farm.generate_tokens(prompt, N, sampling, stop_at_eog=False))
            got = _generate_and_kill(farm, PROMPTS[0], local.processes[victim], sampling)
            assert got == want  # the same tokens, bit for bit: the replay fed them as before
            assert farm.replays == 1
            dead = local.addresses[victim]
            assert len(farm.plan) == 2 and dead not in [a.address for a in farm.plan]
            assert [(a.start, a.end) for a in farm.plan][-1][1] == farm.info.hparams.n_layer
            assert {a.address: farm.bytes_shipped[a.address] for a in farm.plan} == {
                a.address: farm.info.range_bytes(a.start, a.end) for a in farm.plan
            }  # shipped again
            # and the farm serves the next request on the servers left
            assert list(farm.generate_tokens(prompt, N, sampling, stop_at_eog=False)) == want


def test_generations_at_once_are_replayed_together(
    smollm2: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two generations 10 tokens in when a server dies (each held there until it is dead: the
    head samples every token, so neither can end first): one re-plan, both replayed on it, each
    with its own tokens."""
    caplog.set_level(logging.WARNING, logger="llmrpc.farm")
    with _local(tmp_path, 3) as local:
        with Farm(smollm2, local.addresses, ctx_size=256, max_sessions=2, server_generation=False) as farm:
            prompts = [farm.tokenizer.encode(p) for p in PROMPTS]
            wants = [list(farm.generate_tokens(p, N, GREEDY, stop_at_eog=False)) for p in prompts]
            results: dict[int, list[int]] = {}
            at_10 = threading.Barrier(3)
            dead = threading.Event()

            def run(i: int) -> None:
                out = []
                for j, token in enumerate(farm.generate_tokens(prompts[i], N, GREEDY, stop_at_eog=False)):
                    out.append(token)
                    if j + 1 == 10:
                        at_10.wait(timeout=120)
                        assert dead.wait(timeout=120)
                results[i] = out

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            at_10.wait(timeout=120)
            local.processes[1].send_signal(signal.SIGKILL)
            local.processes[1].wait()
            dead.set()
            for t in threads:
                t.join(timeout=300)
            assert [results.get(0), results.get(1)] == wants
            assert farm.replays == 1  # one re-plan ...
            assert _replayed(caplog) == sorted(len(p) + 10 for p in prompts)  # ... that both generations went on from


def test_when_no_server_is_left_the_error_says_so(smollm2: str, tmp_path: Path) -> None:
    with _local(tmp_path, 1) as local:
        with Farm(smollm2, local.addresses, ctx_size=256) as farm:
            start = time.monotonic()
            with pytest.raises(RuntimeError, match="no server of .* answers any more"):
                _generate_and_kill(farm, PROMPTS[0], local.processes[0])
            assert time.monotonic() - start < 60


def _generate_killing(
    farm: Farm, prompt: list[int], local: LocalServers, at: dict[int, int], killed: list[str] | None = None,
    sampling: SamplingParams = SAMPLED,
) -> list[int]:  # fmt: skip
    """Generate (the head sampling: each token needs every server), killing at the ``i``-th
    token the server of stage ``at[i]`` of the plan then (its address added to ``killed``)."""
    tokens = []
    for i, token in enumerate(farm.generate_tokens(prompt, N, sampling, stop_at_eog=False)):
        tokens.append(token)
        if i + 1 in at:
            address = farm.plan[at[i + 1]].address
            victim = _process(local, address)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            if killed is not None:
                killed.append(address)
    return tokens


@pytest.mark.parametrize("replays", [0, 1, 2])
def test_a_generation_is_replayed_at_most_replays_times(
    tiny_models: dict[str, str], prompt_tokens: list[int], tmp_path: Path, replays: int
) -> None:
    """Two of three servers killed one after the other in one generation: each failure costs a
    replay while ``replays`` allows one, and the next fails the request, naming the server."""
    with _local(tmp_path, 3) as local:
        with Farm(tiny_models["F32"], local.addresses, ctx_size=128, replays=replays, server_generation=False) as farm:
            assert len(farm.plan) == 3
            want = list(farm.generate_tokens(prompt_tokens, N, SAMPLED, stop_at_eog=False))
            assert len(set(want)) > 5  # sampled text, not one token again and again
            kills, killed = {10: 1, 20: 0}, []
            if replays >= 2:
                assert _generate_killing(farm, prompt_tokens, local, kills, killed) == want
            else:
                with pytest.raises(StageError) as info:
                    _generate_killing(farm, prompt_tokens, local, kills, killed)
                assert info.value.code == grpc.StatusCode.UNAVAILABLE and killed[-1] in str(info.value)
            assert len(killed) == min(replays + 1, 2) and farm.replays == replays


def _least_memory_for(path: str, count: int, ctx_size: int) -> int:
    """The least --mem on which ``count`` equal servers hold the model (the planner's budget)."""
    layout = model_layout(read_model(path), CacheConfig())

    def fits(cap: int, n: int) -> bool:
        try:
            plan(layout, [ServerReport(f"s{i}", "CPU", cap) for i in range(n)], ctx_size=ctx_size)
        except PlanError:
            return False
        return True

    low, high = 1, 1 << 32
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(mid, count) else (mid + 1, high)
    assert not fits(low, count - 1)
    return low


def test_when_the_servers_left_cannot_hold_the_model_the_error_says_so(
    prompt_tokens: list[int], tmp_path: Path
) -> None:
    """Three servers with just the memory to hold a 6-layer model together: one dies, and the
    request fails with the reason (the model does not fit the two left), not a hang or a stack
    of retries; nothing was re-planned."""
    path = model_file(tmp_path, "six.gguf", SyntheticSpec(n_layer=6, seed=7))
    cap = _least_memory_for(path, 3, 128)
    with _local(tmp_path, 3, "--mem", str(cap)) as local:
        with Farm(path, local.addresses, ctx_size=128, server_generation=False) as farm:
            assert len(farm.plan) == 3
            dead = farm.plan[1].address
            start = time.monotonic()
            with pytest.raises(RuntimeError) as info:
                _generate_killing(farm, prompt_tokens, local, {10: 1})
            assert time.monotonic() - start < 60
            message = str(info.value)
            assert "the servers left cannot take the model" in message and "does not fit" in message
            assert dead in message and f"{cap} bytes free" in message
            assert farm.replays == 0


def test_a_prompt_longer_than_a_batch_is_replayed_whole(
    tiny_models: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Batches of 8 rows, a prompt of 40 tokens: the replay feeds the prompt and the 10 tokens
    generated so far again, 50 rows in 7 batches, and the generation goes on as before."""
    caplog.set_level(logging.WARNING, logger="llmrpc.farm")
    prompt = [1] + [int(t) for t in np.random.default_rng(5).integers(3, 320, size=39)]
    with _local(tmp_path, 3) as local:
        with Farm(tiny_models["F32"], local.addresses, ctx_size=128, batch=8, server_generation=False) as farm:
            want = list(farm.generate_tokens(prompt, N, GREEDY, stop_at_eog=False))
            assert len(set(want)) > 5
            assert _generate_killing(farm, prompt, local, {10: 1}, sampling=GREEDY) == want
            assert farm.replays == 1 and len(farm.plan) == 2
            assert _replayed(caplog) == [len(prompt) + 10]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server(port: int, cache: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "llmrpc.cli", "server", "--host", "127.0.0.1", "--port", str(port),
           "--threads", "1", "--no-calibrate", "--cache-dir", str(cache)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    read_ready(proc, 60)
    return proc


def test_a_server_restarted_at_its_address_is_planned_in_again(smollm2: str, tmp_path: Path) -> None:
    ports = [_free_port() for _ in range(2)]
    procs = [_server(p, tmp_path / str(p)) for p in ports]
    try:
        with Farm(smollm2, [f"127.0.0.1:{p}" for p in ports], ctx_size=256) as farm:
            prompt = farm.tokenizer.encode(PROMPTS[1])
            want = list(farm.generate_tokens(prompt, N, GREEDY, stop_at_eog=False))
            got = []
            for i, token in enumerate(farm.generate_tokens(prompt, N, GREEDY, stop_at_eog=False)):
                got.append(token)
                if i + 1 == KILL_AT:  # it dies and is back before the farm notices
                    procs[0].send_signal(signal.SIGKILL)
                    procs[0].wait()
                    procs[0] = _server(ports[0], tmp_path / str(ports[0]))
            assert got == want
            assert farm.replays == 1
            assert [a.address for a in farm.plan] == [f"127.0.0.1:{p}" for p in ports]
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def test_a_server_back_at_its_address_is_planned_in_between_generations(smollm2: str, tmp_path: Path) -> None:
    """Killed mid-generation, the middle server is failed over; restarted at its address, the farm
    plans it back in on its own, between generations, within seconds: every request meanwhile
    gets the text it gets alone, and none fails."""
    ports = [_free_port() for _ in range(3)]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    procs = [_server(p, tmp_path / str(p)) for p in ports]
    try:
        with Farm(smollm2, addresses, ctx_size=256, rejoin_every=0.5) as farm:
            prompt = farm.tokenizer.encode(PROMPTS[0])
            want = list(farm.generate_tokens(prompt, N, GREEDY, stop_at_eog=False))
            assert _generate_and_kill(farm, PROMPTS[0], procs[1]) == want
            assert farm.replays == 1 and [a.address for a in farm.plan] == [addresses[0], addresses[2]]
            procs[1] = _server(ports[1], tmp_path / str(ports[1]))
            back, requests = time.monotonic(), 0
            while len(farm.plan) < 3:  # requests go on meanwhile
                assert list(farm.generate_tokens(prompt, N, GREEDY, stop_at_eog=False)) == want
                requests += 1
                assert time.monotonic() - back < 60, "not planned back in"
            assert [a.address for a in farm.plan] == addresses and farm.rejoins == 1
            assert list(farm.generate_tokens(prompt, N, GREEDY, stop_at_eog=False)) == want
            assert farm.replays == 1  # nothing failed on the way
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


@pytest.mark.parametrize("server_generation", [True, False])
def test_a_generation_closed_while_its_frame_is_held_ends_at_once(
    smollm2: str, tmp_path: Path, server_generation: bool
) -> None:
    """A generation closed by its caller ends then, its sessions closed and the farm's gate left,
    even when something still holds its frame, as an earlier replay's error does through its
    traceback. Left to the garbage collector, its inner generation stayed open: a server planned
    back in waited for it, and every new request behind that, for good."""
    with _local(tmp_path, 2) as local, Farm(smollm2, local.addresses, ctx_size=256) as farm:
        farm.server_generation = server_generation
        tokens = farm.generate_tokens(farm.tokenizer.encode(PROMPTS[0]), N, GREEDY, stop_at_eog=False)
        next(tokens)
        assert farm.gate.open == 1 and _open_sessions(local.addresses) == [1, 1]
        held = tokens.gi_frame  # what a traceback through this generation holds
        tokens.close()
        assert farm.gate.open == 0
        deadline = time.monotonic() + 30  # (the servers close them as their close calls come)
        while _open_sessions(local.addresses) != [0, 0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _open_sessions(local.addresses) == [0, 0]
        assert held is not None


def _open_sessions(addresses: list[str]) -> list[int]:
    counts = []
    for address in addresses:
        client = StageClient(address, timeout=10)
        try:
            counts.append(client.health().open_sessions)
        finally:
            client.close()
    return counts
