"""A server that stops answering (SIGSTOP: its process alive, its connections open, nothing said)
costs a replay within a bound of seconds, as one that dies does; when it resumes, what it was
doing is refused everywhere. Real server processes on 127.0.0.1, stopped and resumed by PID."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmrpc.farm import Farm
from llmrpc.head.local import read_ready
from llmrpc.sampling import SamplingParams
from tests.servers import LogLines

GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)
HUNG_AFTER = 2.0  # seconds (the farm's option): a hung server is failed over within 2.25 times this
N = 60
STOP_AT = 20  # tokens into the generation
PROMPT = "Once upon a time"
STALE = "which is not connected here: refused"  # a server's log line for a superseded plan's frame


class _Servers:
    """Servers of the test's own, each with its own cache folder, logs read by ``log``."""

    def __init__(self, n: int, tmp: Path) -> None:
        self.log = LogLines()
        self.procs: list[subprocess.Popen[str]] = []
        self.addresses: list[str] = []
        for i in range(n):
            cmd = [sys.executable, "-m", "llmrpc.cli", "server", "--host", "127.0.0.1", "--port", "0", "--threads",
                   "1", "--no-calibrate", "--cache-dir", str(tmp / f"cache{i}")]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.procs.append(proc)
            self.addresses.append(read_ready(proc, 60))
            threading.Thread(target=self.log.read, args=(proc.stderr,), daemon=True).start()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process would not end on SIGTERM
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture()
def three(tmp_path: Path) -> Iterator[_Servers]:
    servers = _Servers(3, tmp_path)
    try:
        yield servers
    finally:
        servers.stop()


@pytest.mark.parametrize(
    ("sampling", "server_generation"), [(GREEDY, True), (SAMPLED, True), (GREEDY, False)], ids=["greedy", "seeded", "head-samples"]
)  # fmt: skip
def test_a_stopped_server_costs_a_replay_within_the_bound(
    smollm2: str, three: _Servers, caplog: pytest.LogCaptureFixture, sampling: SamplingParams, server_generation: bool
) -> None:
    """The middle of three servers stopped mid-generation: the farm notices within 2.25 times
    ``hung_after``, re-plans over the other two and the text is the uninterrupted one. Resumed,
    the stopped server goes on with the superseded plan's step, and that is refused."""
    victim = three.procs[1]
    with Farm(
        smollm2, three.addresses, ctx_size=256, hung_after=HUNG_AFTER, server_generation=server_generation
    ) as farm:
        prompt = farm.tokenizer.encode(PROMPT)
        want = list(farm.generate_tokens(prompt, N, sampling, stop_at_eog=False))
        assert farm.replays == 0
        got: list[int] = []
        stopped = 0.0
        with caplog.at_level(logging.WARNING, logger="llmrpc.farm"):
            for i, token in enumerate(farm.generate_tokens(prompt, N, sampling, stop_at_eog=False)):
                got.append(token)
                if i + 1 == STOP_AT:
                    os.kill(victim.pid, signal.SIGSTOP)
                    stopped = time.time()
        assert got == want  # the same tokens, bit for bit
        assert farm.replays == 1
        assert three.addresses[1] not in [a.address for a in farm.plan]
        noticed = [r.created for r in caplog.records if "replaying" in r.getMessage()]
        assert len(noticed) == 1 and noticed[0] - stopped < 2.25 * HUNG_AFTER + 3, noticed[0] - stopped
        assert "no answer within 2 s" in caplog.text  # why: named in the replay's warning

        os.kill(victim.pid, signal.SIGCONT)
        assert three.log.wait_for(STALE, 60)  # the resumed server's step went nowhere
        assert list(farm.generate_tokens(prompt, N, sampling, stop_at_eog=False)) == want
        assert farm.replays == 1


def test_a_slow_server_is_waited_for(smollm2: str, three: _Servers) -> None:
    """Servers answer health checks while they compute: with ``hung_after`` far below the time a
    long prompt takes, the farm checks them, waits, and fails nothing over."""
    with Farm(smollm2, three.addresses, ctx_size=2048, hung_after=1.0) as farm:
        prompt = farm.tokenizer.encode(" ".join(["Once upon a time"] * 300))[:1500]
        t0 = time.monotonic()
        assert len(list(farm.generate_tokens(prompt, 4, GREEDY, stop_at_eog=False))) == 4
        took = time.monotonic() - t0
        assert farm.pipeline is not None and farm.pipeline.links is not None
        assert farm.pipeline.links.liveness.checked > 0, took  # (it was slow enough to be checked)
        assert farm.replays == 0


def test_a_server_stopped_in_its_turn_does_not_stop_the_others(smollm2: str, three: _Servers) -> None:
    """Servers on one machine take turns on its cores under a lock: one stopped while it holds
    the lock (here the test holds it, as that server would) must not stop the servers it is
    failed over to. Each plan takes turns under a lock of its own."""
    victim = three.procs[1]
    with Farm(smollm2, three.addresses, ctx_size=256, hung_after=HUNG_AFTER) as farm:
        assert len(set(farm.turns.values())) == 1 and len(farm.turns) == 3  # one machine: they take turns
        prompt = farm.tokenizer.encode(PROMPT)
        want = list(farm.generate_tokens(prompt, N, GREEDY, stop_at_eog=False))
        lock = open(os.path.join(tempfile.gettempdir(), f"{next(iter(farm.turns.values()))}.lock"), "a+b")  # noqa: SIM115
        try:
            got: list[int] = []
            finished = threading.Event()

            def generate() -> None:
                for i, token in enumerate(farm.generate_tokens(prompt, N, GREEDY, stop_at_eog=False)):
                    got.append(token)
                    if i + 1 == STOP_AT:
                        fcntl.flock(lock, fcntl.LOCK_EX)  # the turn, never given back
                        os.kill(victim.pid, signal.SIGSTOP)
                finished.set()

            threading.Thread(target=generate, daemon=True).start()
            assert finished.wait(60), "the servers left wait for the stopped server's turn"
        finally:
            lock.close()
        assert got == want and farm.replays == 1
        assert three.addresses[1] not in farm.turns and len(farm.turns) == 2
