"""A simulated LAN for the bench: the head and every server in network namespaces of their own,
joined by a switch that delays each packet and limits each link's rate.

The switch needs no netem qdisc (many VM kernels lack it): it does in user space what
``tc qdisc add dev X root netem delay 0.5ms rate 1gbit`` would: every node has a TUN device
(10.77.0.x/24); the switch reads each IP packet, holds it for the one-way delay and for its
serialisation time on the receiving node's link, then writes it to that node's device.
Needs root (namespaces, TUN devices); everything is removed at the end.

    python -m llmrpc.bench.lan [--model M] [--reps 3] [--tg 128] [--pp 128]
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import heapq
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from llmrpc.head.local import SHARED_CORES_FLAGS, read_ready

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
PR_SET_TIMERSLACK = 29
SUBNET = "10.77.0"
SWITCH_ENV = "LLMRPC_LAN_SWITCH"  # "python": forward in the Python loop instead of lan_switch.c
SWITCH_SOURCE = Path(__file__).with_name("lan_switch.c")
DEVICE = "lan0"


@functools.cache
def lan_unavailable() -> str | None:
    """Why a simulated LAN cannot be made here, or None when it can (tried for real once)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and TUN devices)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    probe = f"llmrpc-probe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "tuntap", "add", "dev", DEVICE, "mode", "tun")
    except RuntimeError as e:
        return f"cannot make a namespace with a TUN device: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


@dataclass
class Lan:
    nodes: int  # node 0 is the head, 1.. the servers
    delay: float = 0.0005  # one way, seconds
    rate: float = 1e9  # bits/s of each node's link
    prefix: str = field(default_factory=lambda: f"llmrpc-lan{os.getpid()}")
    _switch: subprocess.Popen[bytes] | None = None

    def namespace(self, i: int) -> str:
        return f"{self.prefix}-{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def start(self) -> Lan:
        try:
            for i in range(self.nodes):
                ns = self.namespace(i)
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "tuntap", "add", "dev", DEVICE, "mode", "tun")
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", DEVICE)
                _ip("-n", ns, "link", "set", DEVICE, "up")
            cmd = [
                sys.executable,
                "-m",
                "llmrpc.bench.lan",
                "switch",
                "--delay",
                str(self.delay),
                "--rate",
                str(self.rate),
            ]
            cmd += [self.namespace(i) for i in range(self.nodes)]
            self._switch = subprocess.Popen(cmd, stdout=subprocess.PIPE)
            assert self._switch.stdout is not None
            if self._switch.stdout.readline().strip() != b"ready":
                raise RuntimeError("the LAN switch did not start")
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, i: int, cmd: list[str], **kwargs: object) -> subprocess.Popen[str]:
        """Start ``cmd`` inside node ``i``'s namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace(i), *cmd], text=True, **kwargs)  # type: ignore[call-overload,no-any-return]

    def stop(self) -> None:
        if self._switch is not None and self._switch.poll() is None:
            self._switch.terminate()
            self._switch.wait(timeout=10)
        self._switch = None
        for i in range(self.nodes):
            subprocess.run(["ip", "netns", "del", self.namespace(i)], capture_output=True, check=False)

    def __enter__(self) -> Lan:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


# -- the switch (its own process) ---------------------------------------------------------------
def _attach(namespaces: list[str]) -> dict[bytes, int]:
    """Open each namespace's TUN device: {its IPv4 address: fd}."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fds = {}
    for i, ns in enumerate(namespaces):
        nsfd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
        if libc.setns(nsfd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
        libc.setns(home, CLONE_NEWNET)
        os.close(nsfd)
        fds[bytes([10, 77, 0, i + 1])] = fd
    return fds


def switch(namespaces: list[str], delay: float, rate: float) -> None:
    fds = _attach(namespaces)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _run_like_the_kernel()
    if os.environ.get(SWITCH_ENV) != "python":
        _exec_native_switch(fds, delay, rate)  # returns only where it cannot be built
    readers = list(fds.values())
    free_at = dict.fromkeys(fds, 0.0)  # when each node's link is next free
    queue: list[tuple[float, int, bytes, bytes]] = []  # (due, order, destination, packet)
    order = 0
    print("ready", flush=True)
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        ready, _, _ = select.select(readers, [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                dst = packet[16:20]
                if len(packet) < 20 or packet[0] >> 4 != 4 or dst not in fds:
                    continue  # not IPv4 to a node (e.g. IPv6 router solicitations): dropped
                due = max(now + delay, free_at[dst]) + len(packet) * 8 / rate
                free_at[dst] = due
                heapq.heappush(queue, (due, order, dst, packet))
                order += 1
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, dst, packet = heapq.heappop(queue)
            with contextlib.suppress(OSError):
                os.write(fds[dst], packet)


def _exec_native_switch(fds: dict[bytes, int], delay: float, rate: float) -> None:
    """Become the C loop (lan_switch.c) on the same devices, priority and timer slack: a packet
    costs it a fraction of the CPU the Python loop takes on the cores the servers share."""
    from llmrpc.server.native import build_c

    try:
        path = build_c(SWITCH_SOURCE, [], "")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"the C switch cannot be built ({e}): the Python loop forwards", file=sys.stderr)
        return
    nodes = []
    for address, fd in fds.items():
        os.set_inheritable(fd, True)
        nodes.append(f"{fd}:{int.from_bytes(address, sys.byteorder)}")
    sys.stdout.flush()
    os.execv(path, [str(path), str(int(delay * 1e9)), repr(rate), *nodes])


def _run_like_the_kernel() -> None:
    """netem delays packets in the kernel, ahead of every process; this switch shares the cores
    with the servers it links. Real-time priority (it only ever blocks in select) and no timer
    slack let it forward a packet when it is due instead of after the compute threads' turn."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


# -- one head run (inside a namespace, or on loopback) ------------------------------------------
def head_run(model: str, servers: list[str], tg: int, pp: int, reps: int) -> dict[str, list[float]]:
    import numpy as np

    from llmrpc.farm import Farm
    from llmrpc.sampling import SamplingParams

    rng = np.random.default_rng(0)
    tokens = [1] + [int(t) for t in rng.integers(100, 10000, size=max(tg, pp))]
    out: dict[str, list[float]] = {"tg": [], "pp": []}
    with Farm(model, servers, ctx_size=max(tg, pp) + 16, share_path=True) as farm:
        for rep in range(reps + 1):  # the first is a warm-up
            with farm.session() as s:  # greedy generation, the servers on their own
                t0 = time.perf_counter()
                generated = sum(1 for _ in s.generate(tokens[:1], tg, SamplingParams(temperature=0)))
                tg_rate = generated / (time.perf_counter() - t0)
            with farm.session() as s:
                t0 = time.perf_counter()
                farm.prefill(s, tokens[:pp])
                pp_rate = pp / (time.perf_counter() - t0)
            if rep:
                out["tg"].append(tg_rate)
                out["pp"].append(pp_rate)
    return out


def server_cmd(host: str, threads: int, lock: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "llmrpc.cli", "server", "--host", host, "--port", "50052", "--threads", str(threads),
        "--no-calibrate", *SHARED_CORES_FLAGS, "--host-lock", lock, *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def _servers_on_lan(lan: Lan, n: int, threads: int, lock: str, model_dir: str) -> Iterator[list[str]]:
    procs = []
    try:
        for i in range(1, n + 1):
            cmd = server_cmd(lan.address(i), threads, lock, "--model-dir", model_dir)
            procs.append(lan.run(i, cmd, stdout=subprocess.PIPE))
            read_ready(procs[-1], 60)
        yield [f"{lan.address(i)}:50052" for i in range(1, n + 1)]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def _head_in(lan: Lan | None, model: str, servers: list[str], tg: int, pp: int, reps: int) -> dict[str, list[float]]:
    cmd = [sys.executable, "-m", "llmrpc.bench.lan", "head", "--model", model, "--tg", str(tg), "--pp", str(pp),
           "--reps", str(reps), *servers]  # fmt: skip
    proc = lan.run(0, cmd, stdout=subprocess.PIPE) if lan else subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout, _ = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the head run failed (exit {proc.returncode})")
    return json.loads(stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@dataclass
class LanResult:
    servers: int
    delay_ms: float
    rate_gbit: float
    lan: dict[str, list[float]]
    loopback: dict[str, list[float]]


def bench_lan(model: str, n: int = 3, threads: int = 2, tg: int = 128, pp: int = 128, reps: int = 3,
              delay: float = 0.0005, rate: float = 1e9) -> LanResult:  # fmt: skip
    """Decode and prefill through ``n`` servers on the simulated LAN and on plain loopback,
    alternating run by run (one head run per repetition, after one warm-up each)."""
    from llmrpc.head.local import LocalServers

    lan_rates: dict[str, list[float]] = {"tg": [], "pp": []}
    loop_rates: dict[str, list[float]] = {"tg": [], "pp": []}
    fd, lock = tempfile.mkstemp(prefix="llmrpc-lan-", suffix=".lock")
    os.close(fd)
    try:
        model_dir = os.path.dirname(os.path.abspath(model))  # (the servers read the model there)
        with Lan(n + 1, delay, rate) as lan, _servers_on_lan(lan, n, threads, lock, model_dir) as on_lan:
            with LocalServers(n, threads=threads, extra_args=["--no-calibrate", "--model-dir", model_dir]) as local:
                for _ in range(reps):
                    for k, v in _head_in(lan, model, on_lan, tg, pp, 1).items():
                        lan_rates[k] += v
                    for k, v in _head_in(None, model, local.addresses, tg, pp, 1).items():
                        loop_rates[k] += v
    finally:
        os.unlink(lock)
    return LanResult(n, delay * 1e3, rate / 1e9, lan_rates, loop_rates)


@click.group()
def cli() -> None:
    pass


@cli.command("switch")
@click.option("--delay", type=float, required=True)
@click.option("--rate", type=float, required=True)
@click.argument("namespaces", nargs=-1, required=True)
def switch_cmd(delay: float, rate: float, namespaces: tuple[str, ...]) -> None:
    switch(list(namespaces), delay, rate)


@cli.command("head")
@click.option("--model", required=True)
@click.option("--tg", type=int, default=128)
@click.option("--pp", type=int, default=128)
@click.option("--reps", type=int, default=1)
@click.argument("servers", nargs=-1, required=True)
def head_cmd(model: str, tg: int, pp: int, reps: int, servers: tuple[str, ...]) -> None:
    print(json.dumps(head_run(model, list(servers), tg, pp, reps)), flush=True)


@cli.command("run")
@click.option("--model", default=None, help="GGUF file, smollm2 (default) or synthetic-1b.")
@click.option("--servers", "n", default=3, show_default=True)
@click.option("--threads", default=os.cpu_count() or 1, show_default=True)
@click.option("--reps", default=3, show_default=True)
@click.option("--tg", default=128, show_default=True)
@click.option("--pp", default=128, show_default=True)
@click.option("--delay-ms", default=0.5, show_default=True, help="One-way delay of every link.")
@click.option("--rate-gbit", default=1.0, show_default=True, help="Rate of every node's link.")
def run_cmd(model: str | None, n: int, threads: int, reps: int, tg: int, pp: int, delay_ms: float,
            rate_gbit: float) -> None:  # fmt: skip
    """Decode and prefill through servers on a simulated LAN next to plain loopback."""
    from llmrpc.bench.models import resolve_model

    why = lan_unavailable()
    if why:
        raise click.ClickException(f"no simulated LAN here: {why}")
    r = bench_lan(resolve_model(model), n, threads, tg, pp, reps, delay_ms / 1e3, rate_gbit * 1e9)
    print_lan(r)


def print_lan(r: LanResult) -> None:
    import statistics

    print(f"\nsimulated LAN: {r.servers} servers and the head in their own network namespaces, "
          f"{r.delay_ms:g} ms each way, {r.rate_gbit:g} Gbit/s links (runs alternate with loopback)")  # fmt: skip
    for test in ("tg", "pp"):
        lan, loop = statistics.mean(r.lan[test]), statistics.mean(r.loopback[test])
        print(f"  {test}: LAN {lan:6.1f} tok/s   loopback {loop:6.1f} tok/s   LAN/loopback {lan / loop:.2f}x")


if __name__ == "__main__":
    cli()
