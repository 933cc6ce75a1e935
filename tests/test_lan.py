"""Servers in network namespaces of their own, joined by the bench's simulated LAN (0.5 ms
each way): the data plane works across real (non-loopback) links and gives loopback's logits."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmrpc.bench.lan import SWITCH_ENV, Lan, lan_unavailable, server_cmd
from llmrpc.farm import Farm
from llmrpc.head.local import read_ready


@pytest.mark.skipif(lan_unavailable() is not None, reason=f"no simulated LAN: {lan_unavailable()}")
def test_servers_on_a_simulated_lan_match_loopback(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int], tmp_path: Path
) -> None:
    path = tiny_models["Q8_0"]
    with Farm(path, servers[:2], ctx_size=128) as farm:
        want = farm.logits(prompt_tokens)
    lock = str(tmp_path / "lock")
    with Lan(3) as lan:
        procs = [lan.run(i, server_cmd(lan.address(i), 1, lock), stdout=subprocess.PIPE) for i in (1, 2)]
        try:
            addresses = [read_ready(p, 60) for p in procs]
            head = lan.run(
                0,
                [sys.executable, "-c", _HEAD, path, ",".join(addresses), ",".join(map(str, prompt_tokens))],
                stdout=subprocess.PIPE,
            )
            out, _ = head.communicate(timeout=120)
            assert head.returncode == 0
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=10)
    got = np.frombuffer(bytes.fromhex(out.strip()), dtype=np.float32).reshape(want.shape)
    assert np.array_equal(got, want)


@pytest.mark.skipif(lan_unavailable() is not None, reason=f"no simulated LAN: {lan_unavailable()}")
@pytest.mark.parametrize("loop", ["c", "python"])
def test_the_switch_holds_each_packet_for_the_delay(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TCP round trip between two nodes takes the two one-way delays, and not much more: the
    switch stands in for the kernel's netem (its C loop, and the Python one it falls back to).
    The bound above leaves a busy machine half a delay of scheduling slack each way, and still
    tells a packet held once from one held twice (at each port)."""
    monkeypatch.setenv(SWITCH_ENV, loop)
    delay = 0.01
    rtts = json.loads(_between_two_nodes(Lan(2, delay=delay), _ECHO, _PING))
    assert min(rtts) >= 2 * delay  # every packet held, each way
    assert statistics.median(rtts) < 3 * delay


@pytest.mark.skipif(lan_unavailable() is not None, reason=f"no simulated LAN: {lan_unavailable()}")
@pytest.mark.parametrize("loop", ["c", "python"])
def test_the_switch_holds_each_link_to_its_rate(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """4 MB from one node to another over 100 Mbit/s links take their 0.34 s on the wire
    (with TCP/IP headers), and not twice that."""
    monkeypatch.setenv(SWITCH_ENV, loop)
    seconds = float(_between_two_nodes(Lan(2, delay=0.0005, rate=100e6), _SINK, _SEND))
    assert 4e6 * 8 / 100e6 <= seconds < 2 * 4e6 * 8 / 100e6, seconds


def _between_two_nodes(lan: Lan, server: str, client: str) -> str:
    """Run ``server`` on node 1 (it prints "ready" once it listens), then ``client`` on node 0,
    both given node 1's address; returns what the client printed."""
    with lan:
        listening = lan.run(1, [sys.executable, "-c", server, lan.address(1)], stdout=subprocess.PIPE)
        try:
            assert listening.stdout is not None and listening.stdout.readline().strip() == "ready"
            talking = lan.run(0, [sys.executable, "-c", client, lan.address(1)], stdout=subprocess.PIPE)
            out, _ = talking.communicate(timeout=60)
            assert talking.returncode == 0
        finally:
            listening.terminate()
            listening.wait(timeout=10)
    return str(out)


_SINK = """
import socket, sys
server = socket.create_server((sys.argv[1], 50061))
print("ready", flush=True)
conn, _ = server.accept()
got = 0
while data := conn.recv(1 << 16):
    got += len(data)
    if got >= 4_000_000:
        conn.sendall(b"k")
"""

_SEND = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], 50061))
t0 = time.perf_counter()
conn.sendall(bytes(4_000_000))
conn.recv(1)
print(time.perf_counter() - t0)
"""

_ECHO = """
import socket, sys
server = socket.create_server((sys.argv[1], 50060))
print("ready", flush=True)
conn, _ = server.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := conn.recv(64):
    conn.sendall(data)
"""

_PING = """
import json, socket, sys, time
conn = socket.create_connection((sys.argv[1], 50060))
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(30):
    t0 = time.perf_counter()
    conn.sendall(b"x")
    conn.recv(64)
    rtts.append(time.perf_counter() - t0)
print(json.dumps(rtts))
"""

_HEAD = """
import sys
import numpy as np
from llmrpc.farm import Farm
path, servers, tokens = sys.argv[1], sys.argv[2].split(","), [int(t) for t in sys.argv[3].split(",")]
with Farm(path, servers, ctx_size=128, micro_batch=7) as farm:
    assert farm.pipeline.links is not None and all(a.address.startswith("10.77.") for a in farm.plan)
    print(farm.logits(tokens).astype(np.float32).tobytes().hex())
"""
