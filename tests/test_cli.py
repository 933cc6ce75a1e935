"""The command lines as a user runs them: llmrpc-head's commands, and `llmrpc-head status`
against real servers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmrpc.farm import Farm
from llmrpc.head.local import LocalServers
from tests.servers import running

HEAD = [sys.executable, "-m", "llmrpc.cli", "head"]


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HEAD, *args], capture_output=True, text=True, timeout=timeout)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_head_help_lists_every_command() -> None:
    proc = _run(["--help"])
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("Commands:")[1].split()
    for command in ("run", "plan", "serve", "status", "verify"):
        assert command in listed, proc.stdout
    assert "llmrpc-head --prompt TEXT" in proc.stdout  # says where bare options go


def test_bare_options_go_to_run() -> None:
    """`llmrpc-head --prompt ...` parses as `llmrpc-head run --prompt ...`: its errors are run's."""
    bare, explicit = _run(["--prompt", "hi", "--top-p", "2"]), _run(["run", "--prompt", "hi", "--top-p", "2"])
    assert bare.returncode == explicit.returncode == 2
    assert "--top-p" in bare.stderr and bare.stderr.replace("head run", "head") == explicit.stderr.replace(
        "head run", "head"
    )


def test_status_of_live_servers(tiny_models: dict[str, str], tmp_path: Path) -> None:
    caches = [["--cache-dir", str(tmp_path / f"cache{i}")] for i in range(3)]
    with LocalServers(3, threads=1, extra_args=["--no-calibrate"], per_server_args=caches) as local:
        used, idle = local.addresses[:2], local.addresses[2]
        with Farm(tiny_models["Q8_0"], used, ctx_size=256) as farm, farm.session():
            table = _run(["status", "--rpc-servers", ",".join(local.addresses)])
            report = _run(["status", "--json", "--rpc-servers", ",".join(local.addresses)])
            ranges = {s.address: (s.start, s.end) for s in farm.plan}
        assert table.returncode == 0 and report.returncode == 0, table.stderr + report.stderr
        lines = table.stdout.strip().splitlines()
        assert lines[0].split()[:4] == ["server", "device", "layers", "sessions"]
        rows = {line.split()[0]: line for line in lines[1:]}
        assert set(rows) == set(local.addresses)
        for address, (start, end) in ranges.items():
            assert f"[{start}, {end}) of 4 llama" in rows[address]
        assert "not measured" in rows[idle]  # --no-calibrate: no speed figure

        by_address = {r["address"]: r for r in json.loads(report.stdout)}
        assert list(by_address) == local.addresses and all(r["ok"] for r in by_address.values())
        for address, (start, end) in ranges.items():
            r = by_address[address]
            loaded = r["info"]["loaded"]
            assert (loaded["layer_start"], loaded["layer_end"]) == (start, end)
            assert r["health"]["open_sessions"] == 1 and r["info"]["open_sessions"] == 1  # the session above
            assert r["weight_bytes"] == loaded["weight_bytes"] > 0
            memory = r["health"]["memory"]  # the open session's cache; the batch graphs' room
            assert memory["weights"] == loaded["weight_bytes"] and memory["sessions"] > 0 and memory["graphs"] > 0
            assert [(c["layer_start"], c["layer_end"]) for c in r["info"]["cached"]] == [(start, end)]  # shipped
            assert r["info"]["device"]["name"] == "CPU" and r["info"]["threads"] == 1
            assert "data_token" not in r["info"]  # a credential: not printed
        idle_report = by_address[idle]
        assert idle_report["info"]["loaded"] is None and idle_report["info"]["cached"] == []
        assert idle_report["health"]["open_sessions"] == 0

        after = json.loads(_run(["status", "--json", "--rpc-servers", ",".join(used)]).stdout)
        assert [r["health"]["open_sessions"] for r in after] == [0, 0]  # the session and the farm closed


def test_status_names_a_server_that_does_not_answer(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{_closed_port()}"
    with LocalServers(1, threads=1, extra_args=["--no-calibrate", "--cache-dir", str(tmp_path)]) as local:
        alive = local.addresses[0]
        proc = _run(["status", "--connect-timeout", "2", "--rpc-servers", f"{alive},{dead}"])
    assert proc.returncode == 1
    rows = proc.stdout.strip().splitlines()
    assert rows[1].startswith(alive) and rows[2].startswith(f"{dead}: server {dead}: cannot reach it"), proc.stdout


def test_status_needs_servers() -> None:
    proc = _run(["status"])
    assert proc.returncode == 2 and "--rpc-servers" in proc.stderr


_HEAD_WITH_SERVERS = """
import sys, time
from llmrpc.head.local import LocalServers
local = LocalServers(2, threads=1, extra_args=["--no-calibrate", "--cache-dir", sys.argv[1]])
local.start()
print(" ".join(str(p.pid) for p in local.processes), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_local_servers_end_with_a_head_killed_outright(tmp_path: Path) -> None:
    """A head that starts its own servers and is killed (SIGKILL: no clean-up of its own)
    leaves none of them running: they see their parent go and shut down."""
    head = subprocess.Popen(
        [sys.executable, "-c", _HEAD_WITH_SERVERS, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    pids: list[int] = []
    try:
        assert head.stdout is not None
        pids = [int(p) for p in head.stdout.readline().split()]
        assert len(pids) == 2 and all(running(p) for p in pids)
        head.kill()
        head.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(running(p) for p in pids):
            assert time.monotonic() < deadline, "the servers outlived their head"
            time.sleep(0.2)
    finally:
        if head.poll() is None:
            head.kill()
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
