"""``--rpc-servers dns:NAME:PORT`` and ``lws:PORT``: servers found by name, as a Kubernetes headless
Service or a LeaderWorkerSet group gives them. The servers listen on 127.0.0.2, .3, .4 and .5 of a
network namespace whose own hosts file names them (as the cluster's DNS would); the head runs in
that namespace too. Every address a name has is a server; a farm resolves its names again when it
plans again after a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmrpc.head.resolve import check_spec, lws_workers
from tests.namespaces import Namespace, netns_unavailable, stop

PORT = 50052
SERVICE = "workers.llmrpc.test"
pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=f"no namespaces: {netns_unavailable()}")


@pytest.fixture(scope="module")
def ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Namespace]:
    with Namespace(f"llmrpc-dns{os.getpid()}") as n:
        yield n


@pytest.fixture(scope="module")
def three(ns: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen[str]]]:
    """Servers at 127.0.0.2, .3 and .4, each at port 50052, as pods behind one Service."""
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            procs[ip], address = ns.server(ip, PORT, tmp_path_factory.mktemp("cache"))
            assert address == f"{ip}:{PORT}"
        yield procs
    finally:
        for p in procs.values():
            stop(p)


def _status(ns: Namespace, servers: str, env: dict[str, str] | None = None) -> list[dict[str, object]]:
    r = ns.run([sys.executable, "-m", "llmrpc.cli", "status", "--json", "--rpc-servers", servers],
               env=os.environ | (env or {}))  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_dns_gives_every_address_of_the_name(ns: Namespace, three: dict[str, subprocess.Popen[str]]) -> None:
    ns.hosts({SERVICE: list(three)})
    rows = _status(ns, f"dns:{SERVICE}:{PORT}")
    assert [r["address"] for r in rows] == [f"{ip}:{PORT}" for ip in three]
    assert all(r["ok"] for r in rows)


def test_lws_gives_the_workers_of_the_group(ns: Namespace, three: dict[str, subprocess.Popen[str]]) -> None:
    """LeaderWorkerSet's pods: leader llm-0 (no server), workers llm-0-1 and llm-0-2."""
    domain = "llm.default.svc.cluster.local"
    ns.hosts({f"llm-0.{domain}": ["127.0.0.9"], f"llm-0-1.{domain}": ["127.0.0.3"], f"llm-0-2.{domain}": ["127.0.0.4"]})
    rows = _status(ns, f"lws:{PORT}", {"LWS_LEADER_ADDRESS": f"llm-0.{domain}", "LWS_GROUP_SIZE": "3"})
    assert [r["address"] for r in rows] == [f"127.0.0.3:{PORT}", f"127.0.0.4:{PORT}"]


def test_a_name_without_enough_addresses_is_an_error(ns: Namespace, three: dict[str, subprocess.Popen[str]]) -> None:
    ns.hosts({SERVICE: ["127.0.0.2"]})
    r = ns.run([sys.executable, "-m", "llmrpc.cli", "status", "--rpc-servers", f"dns:{SERVICE}:{PORT}",
                "--min-servers", "2", "--connect-timeout", "2"])  # fmt: skip
    assert r.returncode == 1
    assert f"dns:{SERVICE}:{PORT} gave 1 server(s), 2 wanted" in r.stderr
    r = ns.run([sys.executable, "-m", "llmrpc.cli", "status", "--rpc-servers", f"dns:nothing.llmrpc.test:{PORT}",
                "--connect-timeout", "1"])  # fmt: skip
    assert r.returncode == 1
    assert "no address for nothing.llmrpc.test" in r.stderr


_FARM = """
import json, sys
from llmrpc.farm import Farm
farm = Farm(sys.argv[1], [sys.argv[2]], ctx_size=64, replays=2)
def report():
    text = farm.generate("Hello there", 8, temperature=0)
    print(json.dumps({"text": text, "plan": [a.address for a in farm.plan], "replays": farm.replays}), flush=True)
report()
sys.stdin.readline()
report()
farm.close()
"""


def test_the_farm_resolves_again_when_it_plans_again(
    ns: Namespace, three: dict[str, subprocess.Popen[str]], tiny_models: dict[str, str], tmp_path: Path
) -> None:
    """A pod dies and its replacement comes back at another address: the farm's re-plan finds it
    by the name and the text is the same."""
    ips = list(three)
    ns.hosts({SERVICE: ips[:2]})
    head = ns.popen([sys.executable, "-c", _FARM, tiny_models["Q8_0"], f"dns:{SERVICE}:{PORT}"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    replacement = None
    try:
        assert head.stdout is not None and head.stdin is not None
        before = json.loads(head.stdout.readline())
        assert sorted(before["plan"]) == [f"{ip}:{PORT}" for ip in ips[:2]]
        stop(three[ips[0]])  # the pod at .2 is gone; another comes up at .5
        replacement, _ = ns.server("127.0.0.5", PORT, tmp_path)
        ns.hosts({SERVICE: [ips[1], "127.0.0.5"]})
        head.stdin.write("\n")
        head.stdin.flush()
        after = json.loads(head.stdout.readline())
        assert head.wait(timeout=60) == 0
    finally:
        stop(head)
        if replacement is not None:
            stop(replacement)
    assert sorted(after["plan"]) == [f"{ips[1]}:{PORT}", f"127.0.0.5:{PORT}"]
    assert after["replays"] == 1
    assert after["text"] == before["text"]


@pytest.mark.parametrize(
    ("spec", "ok"),
    [("a:1", True), ("dns:svc.ns:50052", True), ("dns:[::1]:50052", True), ("lws:50052", True),
     ("dns:svc", False), ("lws:", False), ("lws:x", False), ("lws:70000", False), ("svc", False)],
)  # fmt: skip
def test_server_specs_are_checked(spec: str, ok: bool) -> None:
    if ok:
        check_spec(spec)
    else:
        with pytest.raises(ValueError):
            check_spec(spec)


def test_lws_names_follow_the_leader() -> None:
    env = {"LWS_LEADER_ADDRESS": "llm-2.llm.ns", "LWS_GROUP_SIZE": "3"}
    assert lws_workers(50052, env) == ["llm-2-1.llm.ns:50052", "llm-2-2.llm.ns:50052"]
    with pytest.raises(ValueError, match="LWS_LEADER_ADDRESS"):
        lws_workers(50052, {})
