"""A server that dies in the middle of a generation costs a replay, not the request: real server
processes on 127.0.0.1, killed by PID (SIGKILL) while the farm generates."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmrpc.farm import Farm
from llmrpc.head.local import LocalServers, read_ready
from llmrpc.sampling import SamplingParams

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


@pytest.mark.parametrize(
    ("victim", "server_generation", "sampling"),
    [(0, True, GREEDY), (1, True, GREEDY), (2, True, GREEDY), (1, False, GREEDY), (2, True, SAMPLED),
     (1, False, SAMPLED)],
)  # fmt: skip
def test_a_server_that_dies_costs_a_replay_not_the_request(
    smollm2: str, victim: int, server_generation: bool, sampling: SamplingParams
) -> None:
    """The servers generating on their own, or the head sampling each token; greedy, or sampled
    with a seed (the replay goes on with the draws the rest would have had)."""
    with LocalServers(3, threads=1, extra_args=["--no-calibrate"]) as local:
        with Farm(smollm2, local.addresses, ctx_size=256, server_generation=server_generation) as farm:
            prompt = farm.tokenizer.encode(PROMPTS[0])
            want = list(farm.generate_tokens(prompt, N, sampling, stop_at_eog=False))
            got = _generate_and_kill(farm, PROMPTS[0], local.processes[victim], sampling)
            assert got == want  # the same tokens, bit for bit: the replay fed them as before
            assert farm.replays == 1
            dead = local.addresses[victim]
            assert len(farm.plan) == 2 and dead not in [a.address for a in farm.plan]
            assert [(a.start, a.end) for a in farm.plan][-1][1] == farm.info.hparams.n_layer
            # and the farm serves the next request on the servers left
            assert list(farm.generate_tokens(prompt, N, sampling, stop_at_eog=False)) == want


def test_generations_at_once_are_replayed_together(smollm2: str) -> None:
    """Two generations when a server dies: one re-plan, and each gets its own tokens."""
    with LocalServers(3, threads=1, extra_args=["--no-calibrate"]) as local:
        with Farm(smollm2, local.addresses, ctx_size=256, max_sessions=2) as farm:
            wants = [
                list(farm.generate_tokens(farm.tokenizer.encode(p), N, GREEDY, stop_at_eog=False)) for p in PROMPTS
            ]
            results: dict[int, list[int]] = {}
            started = threading.Barrier(3)

            def run(i: int) -> None:
                out = []
                tokens = farm.generate_tokens(farm.tokenizer.encode(PROMPTS[i]), N, GREEDY, stop_at_eog=False)
                for j, token in enumerate(tokens):
                    out.append(token)
                    if j + 1 == 10:
                        started.wait(timeout=60)
                results[i] = out

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            started.wait(timeout=60)  # both are 10 tokens in
            local.processes[1].send_signal(signal.SIGKILL)
            for t in threads:
                t.join(timeout=120)
            assert [results.get(0), results.get(1)] == wants
            assert farm.replays == 1


def test_when_no_server_is_left_the_error_says_so(smollm2: str) -> None:
    with LocalServers(1, threads=1, extra_args=["--no-calibrate"]) as local:
        with Farm(smollm2, local.addresses, ctx_size=256) as farm:
            start = time.monotonic()
            with pytest.raises(RuntimeError, match="no server of .* answers any more"):
                _generate_and_kill(farm, PROMPTS[0], local.processes[0])
            assert time.monotonic() - start < 30


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
