"""Network namespaces the tests make (root only): each has its own loopback (127.0.0.0/8) and its
own /etc/hosts (``ip netns exec`` mounts /etc/netns/NAME/hosts over /etc/hosts for the commands
it runs), so names resolve there, and only there, to the addresses a test chose."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmrpc.head.local import read_ready, stop_process


@functools.cache
def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can (tried once for real)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    probe = Namespace(f"llmrpc-probe{os.getpid()}")
    try:
        probe.start()
    except RuntimeError as e:
        return f"cannot make a network namespace: {e}"
    finally:
        probe.close()
    return None


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name
        self.etc = Path("/etc/netns") / name

    def start(self) -> Namespace:
        ip("netns", "add", self.name)
        ip("-n", self.name, "link", "set", "lo", "up")
        self.etc.mkdir(parents=True, exist_ok=True)
        self.hosts({})
        return self

    def hosts(self, names: dict[str, list[str]]) -> None:
        """Make ``names`` resolve to those addresses in this namespace (rewritten in place: the
        file mounted over /etc/hosts in running commands stays the same file)."""
        lines = ["127.0.0.1 localhost"] + [f"{a} {n}" for n, addresses in names.items() for a in addresses]
        with open(self.etc / "hosts", "w") as f:
            f.write("\n".join(lines) + "\n")

    def command(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.command(cmd), text=True, **kwargs)

    def run(self, cmd: list[str], timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(cmd), text=True, capture_output=True, timeout=timeout, check=False, **kwargs)

    def server(
        self, host: str, port: int, cache_dir: Path, *extra: str, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[str], str]:
        """An llmrpc-server in this namespace at host:port; (its process, its address)."""
        cmd = [sys.executable, "-m", "llmrpc.cli", "server", "--host", host, "--port", str(port), "--threads", "1",
               "--no-calibrate", "--cache-dir", str(cache_dir), *extra]  # fmt: skip
        proc = self.popen(cmd, stdout=subprocess.PIPE, env=os.environ | (env or {}))
        try:
            return proc, read_ready(proc, 60)
        except Exception:
            stop(proc)
            raise

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)

    def __enter__(self) -> Namespace:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class Lan:
    """Namespaces on one Ethernet segment: each node has a veth whose other end is on a bridge in a
    namespace of its own (the switch); node i is 10.79.0.(i+1)/24, and multicast goes to the LAN."""

    SUBNET = "10.79.0"

    def __init__(self, nodes: int) -> None:
        tag = f"l{os.getpid() % 100000}"
        self.tag = tag
        self.switch = Namespace(f"llmrpc-{tag}-sw")
        self.nodes = [Namespace(f"llmrpc-{tag}-{i}") for i in range(nodes)]

    def address(self, i: int) -> str:
        return f"{self.SUBNET}.{i + 1}"

    def start(self) -> Lan:
        sw = self.switch.start().name
        ip("-n", sw, "link", "add", "br0", "type", "bridge")
        ip("-n", sw, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes):
            node.start()
            end, port = f"{self.tag}n{i}", f"{self.tag}p{i}"  # at most 15 characters
            ip("link", "add", end, "type", "veth", "peer", "name", port)
            ip("link", "set", end, "netns", node.name)
            ip("link", "set", port, "netns", sw)
            ip("-n", sw, "link", "set", port, "master", "br0")
            ip("-n", sw, "link", "set", port, "up")
            ip("-n", node.name, "link", "set", end, "name", "eth0")
            ip("-n", node.name, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            ip("-n", node.name, "link", "set", "eth0", "up")
            ip("-n", node.name, "route", "add", "224.0.0.0/4", "dev", "eth0")
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.close()  # its veth goes with it, and the peer on the bridge too
        self.switch.close()

    def __enter__(self) -> Lan:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop(proc: subprocess.Popen[str]) -> None:
    """Stop a process the test started, by its PID."""
    stop_process(proc, 10)
