"""`llmrpc-server --announce` and `llmrpc-head --discover` on a LAN made of network namespaces on
one bridge: the head finds exactly the announcing servers that prove its token (not one with
another token, not one that does not announce), and runs a model over them with the text that
servers on loopback give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmrpc.discovery import Found, _answer, proof
from tests.namespaces import Lan, netns_unavailable, stop

TOKEN, OTHER = "farm-token-1", "another-farm"
pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=f"no namespaces: {netns_unavailable()}")


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    """Node 0 for the head; 1 and 2 announce with the farm's token, 3 with another, 4 has the
    farm's token and does not announce."""
    procs = []
    with Lan(5) as lan:
        try:
            for i, token, announce in ((1, TOKEN, True), (2, TOKEN, True), (3, OTHER, True), (4, TOKEN, False)):
                extra = ("--announce",) if announce else ()
                proc, _ = lan.nodes[i].server("0.0.0.0", 50052, tmp_path_factory.mktemp("cache"), *extra,
                                              env={"LLMRPC_TOKEN": token})  # fmt: skip
                procs.append(proc)
            yield lan
        finally:
            for p in procs:
                stop(p)


def _head(lan: Lan, args: list[str], token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LLMRPC_TOKEN"} | ({"LLMRPC_TOKEN": token} if token else {})
    return lan.nodes[0].run([sys.executable, "-m", "llmrpc.cli", *args], timeout=120, env=env)


def test_the_head_finds_the_servers_with_its_token(lan: Lan) -> None:
    r = _head(lan, ["status", "--discover", "--json"])
    assert r.returncode == 0, r.stderr
    assert [row["address"] for row in json.loads(r.stdout)] == [f"{lan.address(1)}:50052", f"{lan.address(2)}:50052"]
    assert f"did not prove the token, left out: {lan.address(3)}:50052" in r.stderr


def test_a_head_with_another_token_finds_only_its_own(lan: Lan) -> None:
    r = _head(lan, ["status", "--discover", "--json"], token=OTHER)
    assert r.returncode == 0, r.stderr
    assert [row["address"] for row in json.loads(r.stdout)] == [f"{lan.address(3)}:50052"]
    r = _head(lan, ["status", "--discover"], token=None)
    assert r.returncode == 1 and "--discover needs the farm's token" in r.stderr


def test_a_model_runs_over_the_servers_found(lan: Lan, tiny_models: dict[str, str], tmp_path: Path) -> None:
    args = ["run", "--model", tiny_models["Q8_0"], "--prompt", "Hello", "-n", "12", "--temp", "0", "--ctx-size", "64"]
    found = _head(lan, [*args, "--discover"])
    assert found.returncode == 0, found.stderr
    local = subprocess.run([sys.executable, "-m", "llmrpc.cli", *args, "--local", "2", "--threads", "1"],
                           capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert local.returncode == 0, local.stderr
    assert found.stdout == local.stdout and found.stdout.strip()


def test_an_answer_proves_the_token_for_one_query_only() -> None:
    """An answer is bound to its query's nonce and its port: replayed for another query, or with
    another port, it proves nothing."""
    answer = json.dumps({"llmrpc-discovery": 1, "port": 50052, "proof": proof(TOKEN, "a" * 32, 50052)}).encode()
    assert _answer(answer, TOKEN, "a" * 32, "10.0.0.2") == Found("10.0.0.2:50052", proven=True)
    assert _answer(answer, TOKEN, "b" * 32, "10.0.0.2") == Found("10.0.0.2:50052", proven=False)
    assert _answer(answer, OTHER, "a" * 32, "10.0.0.2") == Found("10.0.0.2:50052", proven=False)
    moved = answer.replace(b"50052,", b"50053,")
    assert _answer(moved, TOKEN, "a" * 32, "10.0.0.2") == Found("10.0.0.2:50053", proven=False)
    assert _answer(b"not json", TOKEN, "a" * 32, "10.0.0.2") is None
