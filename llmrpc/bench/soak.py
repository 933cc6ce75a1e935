"""A long run through the API: many clients on ``llmrpc-head serve`` over local servers, some of
them leaving mid-stream, while one server is killed (then started again at its address) and
another stopped with SIGSTOP (then resumed). Reported: well-formed requests that failed, their
latency, every process's resident memory over the run, and the sessions left open at the end.

``llmrpc-bench soak --duration 300 --out bench/out/soak.json``
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from llmrpc.bench.models import resolve_model
from llmrpc.head.client import StageClient
from llmrpc.head.local import SHARED_CORES_FLAGS, read_ready, stop_process

PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a lighthouse.",
    "List three uses of a paperclip:",
    "The capital of France is",
    "def fibonacci(n):",
    "A recipe for pancakes needs",
    "Translate to French: good morning, my friend.",
)
# what happens to the servers, at these fractions of the run
KILL_AT, RESTART_AT, STOP_AT, RESUME_AT = 0.25, 0.40, 0.55, 0.70
RSS_EVERY = 2.0  # seconds between samples of every process's resident memory
WARM_UP = 0.2  # the fraction of the run after which memory should stay flat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float | None:
    """VmRSS of process ``pid`` in MB, None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class _Server:
    """A local llmrpc-server at fixed ports, so that it can be started again at its address."""

    index: int
    work: Path
    lock: str
    port: int = field(default_factory=_free_port)
    data_port: int = field(default_factory=_free_port)
    popen: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.popen is not None:  # started again after it was killed: reap the old process
            self.popen.wait()
        cmd = [sys.executable, "-m", "llmrpc.cli", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-port", str(self.data_port), "--cache-dir", str(self.work / f"cache{self.index}"),
               "--host-lock", self.lock, "--no-calibrate", *SHARED_CORES_FLAGS]  # fmt: skip
        with open(self.work / f"server{self.index}.log", "a") as log:
            self.popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        read_ready(self.popen, 120)

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self) -> None:
        if self.popen is None:
            return
        self.signal(signal.SIGCONT)  # a stopped process would not end on SIGTERM
        stop_process(self.popen, 15)


@dataclass
class _Request:
    start: float
    seconds: float = 0.0
    ttft: float | None = None
    cancelled: bool = False
    error: str = ""


class _Client(threading.Thread):
    """Requests one after the other until the deadline; some streamed, some of those left early."""

    def __init__(self, index: int, api: tuple[str, int], until: float, max_tokens: int, cancel: float) -> None:
        super().__init__(daemon=True, name=f"soak-client-{index}")
        self.rng = random.Random(index)
        self.api, self.until, self.max_tokens, self.cancel = api, until, max_tokens, cancel
        self.done: list[_Request] = []

    def run(self) -> None:
        while time.monotonic() < self.until:
            self.done.append(self._one())

    def _one(self) -> _Request:
        rng = self.rng
        stream = rng.random() < 0.7
        leave_after = rng.randint(1, 6) if stream and rng.random() < self.cancel else 0
        greedy = rng.random() < 0.5
        body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, self.max_tokens), "stream": stream,
                "temperature": 0 if greedy else 0.8, "seed": rng.randint(0, 1 << 30)}  # fmt: skip
        req = _Request(time.monotonic())
        conn = http.client.HTTPConnection(*self.api, timeout=300)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                req.error = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            elif stream:
                self._stream(resp, req, leave_after)
            else:
                answer = json.loads(resp.read())
                if not answer.get("choices") or not answer["choices"][0].get("finish_reason"):
                    req.error = f"not a whole answer: {answer!r}"[:300]
                req.ttft = time.monotonic() - req.start
        except Exception as e:  # a failed request: counted, the client goes on
            req.error = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        req.seconds = time.monotonic() - req.start
        return req

    def _stream(self, resp: http.client.HTTPResponse, req: _Request, leave_after: int) -> None:
        chunks = 0
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                return
            json.loads(line[6:])
            chunks += 1
            if req.ttft is None:
                req.ttft = time.monotonic() - req.start
            if leave_after and chunks >= leave_after:
                req.cancelled = True
                return
        req.error = "the stream ended without [DONE]"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


class _Memory(threading.Thread):
    """Samples every process's VmRSS every RSS_EVERY seconds, and each server's open sessions and
    the memory it accounts for (its Health: weights, KV caches, kept prefixes, graphs). A
    server's RSS less what it accounts for is the interpreter, libraries and allocator: flat once
    warm when nothing leaks."""

    def __init__(self, pids: dict[str, Any], servers: list[_Server], t0: float) -> None:
        super().__init__(daemon=True, name="soak-rss")
        self.pids, self.t0 = pids, t0  # name -> a function giving the process's current pid
        self.clients = {f"server{s.index}": StageClient(s.address, connect_timeout=1.0) for s in servers}
        self.samples: list[dict[str, Any]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            sample: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 1)}
            for name, pid in self.pids.items():
                p = pid()
                sample[name] = None if p is None else rss_mb(p)
            for name, client in self.clients.items():
                try:
                    h = client.health()
                    sample[f"{name}_sessions"] = h.open_sessions
                    sample[f"{name}_held_mb"] = round(h.memory.total / 2**20, 1)
                    rss = sample.get(name)
                    sample[f"{name}_rest_mb"] = None if rss is None else round(rss - h.memory.total / 2**20, 1)
                except Exception:  # stopped or dead: no figures this time
                    sample[f"{name}_sessions"] = sample[f"{name}_held_mb"] = sample[f"{name}_rest_mb"] = None
            self.samples.append(sample)
            self.halt.wait(RSS_EVERY)

    def at(self, t: float) -> dict[str, Any]:
        """The sample nearest ``t`` seconds into the run."""
        return min(self.samples, key=lambda s: abs(s["t"] - t))


def _sessions(servers: list[_Server]) -> dict[str, Any]:
    """Each server's open sessions and kept prefixes (its Health)."""
    out: dict[str, dict[str, Any]] = {}
    for s in servers:
        try:
            h = StageClient(s.address, timeout=10).health()
            out[s.address] = {"open_sessions": h.open_sessions, "prefix_entries": h.prefix_entries,
                              "held_mb": {k: round(v / 2**20, 1) for k, v in asdict(h.memory).items()}}  # fmt: skip
        except Exception as e:
            out[s.address] = {"error": str(e)[:200]}
    return out


def _settled(servers: list[_Server], within: float) -> dict[str, Any]:
    """The servers' sessions once none is open (or after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while True:
        seen = _sessions(servers)
        if all(v.get("open_sessions") == 0 for v in seen.values()) or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def _head(model: str, servers: list[_Server], parallel: int, ctx_size: int, work: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "llmrpc.cli", "serve", "--model", model, "--port", "0", "--parallel", str(parallel),
           "--ctx-size", str(ctx_size), "--rpc-servers", ",".join(s.address for s in servers)]  # fmt: skip
    with open(work / "head.log", "w") as log:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)


def _api_address(head: subprocess.Popen[str]) -> tuple[str, int]:
    assert head.stdout is not None
    line = head.stdout.readline()
    if not line.startswith("llmrpc-head serve listening on http://"):
        raise click.ClickException(f"llmrpc-head serve did not start: {line!r}")
    host, port = line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


def _events(servers: list[_Server], t0: float, duration: float, log: list[dict[str, Any]]) -> None:
    """Kill the middle server and start it again at its address; stop the last and resume it."""
    middle, last = servers[len(servers) // 2], servers[-1]
    plan = [
        (KILL_AT, f"SIGKILL {middle.address}", lambda: middle.signal(signal.SIGKILL)),
        (RESTART_AT, f"restart {middle.address}", middle.start),
        (STOP_AT, f"SIGSTOP {last.address}", lambda: last.signal(signal.SIGSTOP)),
        (RESUME_AT, f"SIGCONT {last.address}", lambda: last.signal(signal.SIGCONT)),
    ]
    for at, what, act in plan:
        wait = t0 + at * duration - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        try:
            act()
            log.append({"t": round(time.monotonic() - t0, 1), "event": what})
        except Exception as e:  # reported, the run goes on
            log.append({"t": round(time.monotonic() - t0, 1), "event": what, "error": str(e)[:300]})


def _memory_report(memory: _Memory, duration: float) -> dict[str, Any]:
    start, middle, end = memory.at(WARM_UP * duration), memory.at(duration / 2), memory.samples[-1]
    out = {}
    parts = [f"{n}_{part}_mb" for n in memory.clients for part in ("held", "rest")]
    for name in [*memory.pids, *parts]:
        out[name] = {"first": memory.samples[0].get(name), "after_warm_up": start.get(name),
                     "middle": middle.get(name), "end": end.get(name), "peak": max((s.get(name) or 0.0) for s in memory.samples)}  # fmt: skip
    return out


@click.command()
@click.option("--duration", default=300.0, show_default=True, type=click.FloatRange(min=10),
              help="Seconds the clients send requests.")  # fmt: skip
@click.option("--clients", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Clients, each sending one request after the other.")  # fmt: skip
@click.option("--servers", "n_servers", default=3, show_default=True, type=click.IntRange(2, 8),
              help="Local servers: the middle one is killed at 25% of the run and started again at 40%, the last "
              "is stopped (SIGSTOP) at 55% and resumed at 70%.")  # fmt: skip
@click.option("--model", default=None, help="A GGUF path or a bench model's name (default: SmolLM2).")
@click.option("--parallel", default=4, show_default=True, type=click.IntRange(1, 256), help="The head's --parallel.")
@click.option("--ctx-size", default=1024, show_default=True, type=click.IntRange(64), help="The head's --ctx-size.")
@click.option("--max-tokens", default=48, show_default=True, type=click.IntRange(8),
              help="Most tokens a request asks for (each asks for 8 up to this many).")  # fmt: skip
@click.option("--cancel", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="Share of the streamed requests whose client closes the connection after a few chunks.")  # fmt: skip
@click.option("--out", default="bench/out/soak.json", show_default=True, type=click.Path(),
              help="Where to write the figures as JSON.")  # fmt: skip
def soak(
    duration: float, clients: int, n_servers: int, model: str | None, parallel: int, ctx_size: int, max_tokens: int,
    cancel: float, out: str,
) -> None:  # fmt: skip
    """Clients through the API while servers are killed, restarted, stopped and resumed: failed
    requests, latency, every process's memory, and sessions left open."""
    path = resolve_model(model)
    work = Path(tempfile.mkdtemp(prefix="llmrpc-soak-"))
    lock = str(work / "host.lock")
    servers = [_Server(i, work, lock) for i in range(n_servers)]
    head: subprocess.Popen[str] | None = None
    try:
        for s in servers:
            s.start()
        head = _head(path, servers, parallel, ctx_size, work)
        api = _api_address(head)
        t0 = time.monotonic()
        pids: dict[str, Any] = {"head": lambda: head.pid if head and head.poll() is None else None}
        for s in servers:
            pids[f"server{s.index}"] = lambda s=s: s.popen.pid if s.popen and s.popen.poll() is None else None
        memory = _Memory(pids, servers, t0)
        memory.start()
        events: list[dict[str, Any]] = []
        threading.Thread(target=_events, args=(servers, t0, duration, events), daemon=True).start()
        runners = [_Client(i, api, t0 + duration, max_tokens, cancel) for i in range(clients)]
        for c in runners:
            c.start()
        for c in runners:
            c.join()
        elapsed = time.monotonic() - t0
        sessions = _settled(servers, 30.0)
        memory.halt.set()
        memory.join()
        result = _report(runners, memory, events, sessions, duration, elapsed, head.poll() is None)
    finally:
        if head is not None:
            stop_process(head, 30)  # (SIGKILL after 30 s: the figures are written either way)
        for s in servers:
            s.stop()
            shutil.rmtree(work / f"cache{s.index}", ignore_errors=True)  # (the logs stay)
    result["logs"] = str(work)
    _print(result)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    click.echo(f"wrote {out} (logs in {work})")


def _report(
    runners: list[_Client], memory: _Memory, events: list[dict[str, Any]], sessions: dict[str, Any],
    duration: float, elapsed: float, head_alive: bool,
) -> dict[str, Any]:  # fmt: skip
    done = [r for c in runners for r in c.done]
    failed = [r for r in done if r.error]
    finished = [r for r in done if not r.error and not r.cancelled]
    return {
        "duration_s": duration, "elapsed_s": round(elapsed, 1), "clients": len(runners), "head_alive": head_alive,
        "requests": len(done), "completed": len(finished), "cancelled": sum(r.cancelled for r in done),
        "failed": len(failed), "failures": [f"t={r.start - memory.t0:.1f}s {r.error}" for r in failed[:20]],
        "latency_s": {"p50": _percentile([r.seconds for r in finished], 0.5),
                      "p99": _percentile([r.seconds for r in finished], 0.99)},
        "ttft_s": {"p50": _percentile([r.ttft for r in finished if r.ttft is not None], 0.5),
                   "p99": _percentile([r.ttft for r in finished if r.ttft is not None], 0.99)},
        "events": events, "rss_mb": _memory_report(memory, duration), "sessions_at_end": sessions,
        "rss_timeline": memory.samples,
    }  # fmt: skip


def _print(r: dict[str, Any]) -> None:
    click.echo(f"{r['requests']} requests from {r['clients']} clients in {r['elapsed_s']} s: {r['completed']} completed, "
               f"{r['cancelled']} cancelled by their client, {r['failed']} failed")  # fmt: skip
    for f in r["failures"][:5]:
        click.echo(f"  failed: {f[:200]}")
    click.echo(f"latency p50 {r['latency_s']['p50']} s, p99 {r['latency_s']['p99']} s; "
               f"time to first token p50 {r['ttft_s']['p50']} s, p99 {r['ttft_s']['p99']} s")  # fmt: skip
    for e in r["events"]:
        click.echo(f"  t={e['t']:6.1f} s  {e['event']}" + (f" ({e['error']})" if "error" in e else ""))
    click.echo("MB                first  warm middle    end   peak")
    for name, m in r["rss_mb"].items():
        cells = "".join(f"{v:7.0f}" if v is not None else "      -" for v in m.values())
        click.echo(f"  {name:16s}{cells}")
    for address, s in r["sessions_at_end"].items():
        click.echo(f"  {address}: {s}")
