"""A server's own Prometheus metrics (``llmrpc-server --metrics-port``): its device and memory, the
layers it holds, its sessions, and every step it computes (count, rows, latency, bytes in and
out). ``GET /metrics`` gives them in Prometheus' text format, ``GET /health`` a JSON line for
probes. Names are under ``llmrpc:server_``; the head's are under ``llmrpc:`` (:mod:`llmrpc.metrics`).

A step is one batch through the server's layers: a prompt's rows, or one token of every
generation decoded together. Steps that the native hop takes (server/hop.c) are counted with
``path="native"``, the others with ``path="python"``."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from llmrpc import __version__

if TYPE_CHECKING:
    from llmrpc.server.engine import Engine

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# a decode step takes from ~0.1 ms (a few layers on a GPU) to seconds (a long prompt on a CPU)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)  # fmt: skip
PATHS = ("python", "native")


class StepMeter:
    """What the engine counts for every step it computes (on its compute loop)."""

    def __init__(self) -> None:
        self.steps = Counter("llmrpc:server_steps", "Steps computed (batches through this server's layers).",
                             ["path"], registry=None)  # fmt: skip
        self.rows = Counter("llmrpc:server_step_rows", "Rows (tokens) computed, over all steps.", registry=None)
        self.seconds = Histogram("llmrpc:server_step_seconds", "Time a step takes in this server, input to output.",
                                 buckets=STEP_BUCKETS, registry=None)  # fmt: skip
        self.bytes_in = Counter("llmrpc:server_step_input_bytes", "Bytes of the steps' inputs: token ids (first "
                                "server) or hidden states.", registry=None)  # fmt: skip
        self.bytes_out = Counter("llmrpc:server_step_output_bytes", "Bytes of the steps' outputs: hidden states, "
                                 "logits, or token ids (last server).", registry=None)  # fmt: skip
        for path in PATHS:
            self.steps.labels(path)

    def step(self, path: str, rows: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
        self.steps.labels(path).inc()
        self.rows.inc(rows)
        self.seconds.observe(seconds)
        self.bytes_in.inc(bytes_in)
        self.bytes_out.inc(bytes_out)

    def timed(self, collect: Callable[[], list[np.ndarray]], started: float, rows: int,
              bytes_in: int) -> Callable[[], list[np.ndarray]]:  # fmt: skip
        """``collect`` (a launched batch's outputs), counting the step once they are there."""

        def collected() -> list[np.ndarray]:
            outs = collect()
            self.step("python", rows, time.perf_counter() - started, bytes_in, sum(int(o.nbytes) for o in outs))
            return outs

        return collected

    def collect(self) -> Iterator[Metric]:
        for metric in (self.steps, self.rows, self.seconds, self.bytes_in, self.bytes_out):
            yield from metric.collect()


class _State(Collector):
    """The engine's state, read when scraped."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        d = e.device
        info = InfoMetricFamily("llmrpc:server", "The server's device and version.")
        info.add_metric([], {"device": d.name, "kind": d.kind, "description": d.description, "version": __version__})
        yield info
        loaded = e.loaded()
        _, prefix_bytes, prefix_budget = e.prefix_figures()
        disk, disk_budget = e.slice_cache_figures()
        memory = e.memory_parts()
        for name, doc, value in (
            ("device_memory_total_bytes", "The device's memory.", d.memory_total),
            ("device_memory_free_bytes", "The device's free memory now.", e.device_free()),
            ("memory_used_bytes", "Memory this server holds on its device: weights and KV caches.", e.memory_used()),
            ("memory_budget_bytes", "What a plan may use here (--mem, or free memory and what it holds).",
             e.memory_budget()),
            ("weight_bytes", "Memory its loaded layers' weights take.", loaded.weight_bytes if loaded else 0),
            ("layer_start", "First layer it holds (with layer_end: [start, end); 0 and 0 when none).",
             loaded.layer_start if loaded else 0),
            ("layer_end", "One past the last layer it holds.", loaded.layer_end if loaded else 0),
            ("model_layers", "Layers of the model it holds a range of (0: none loaded).", loaded.n_layer if loaded else 0),
            ("sessions", "Open sessions (each holds a KV cache for its layers).", e.open_sessions()),
            ("max_sessions", "Sessions it may hold at once.", e.max_sessions),
            ("takes_turns", "1 when it takes turns on its machine's cores with other servers.", int(e.takes_turns())),
            ("bandwidth_bytes_per_second", "Its measured weight-read bandwidth (0: not measured).",
             e.calibration_figures()[0]),
            ("weight_bytes_received", "Bytes of weights shipped to it since it started.", e.bytes_received),
            ("prefix_cache_bytes", "Memory of closed sessions' caches kept as prefixes.", prefix_bytes),
            ("session_cache_bytes", "Memory of open sessions' KV caches.", memory.sessions),
            ("spare_cache_bytes", "Memory of closed sessions' caches kept for new sessions of their size.",
             memory.spare),
            ("graph_bytes", "Memory of built graphs (compute buffers and metadata; at most 16 decode graphs kept).",
             memory.graphs),
            ("prefix_cache_budget_bytes", "The most they may take (--prefix-cache).", prefix_budget),
            ("slice_cache_bytes", "Disk taken by received slices and uploads under way.", disk),
            ("slice_cache_budget_bytes", "The most the slice cache may take (--cache-max).", disk_budget),
        ):  # fmt: skip
            yield GaugeMetricFamily(f"llmrpc:server_{name}", doc, value=float(value))
        yield from e.meter.collect()


class ServerMetrics:
    """``GET /metrics`` and ``GET /health`` of one server, on a thread of their own."""

    def __init__(self, engine: Engine, host: str, port: int) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.registry.register(_State(engine))
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def health(self) -> dict[str, object]:
        loaded = self.engine.loaded()
        return {"status": "ok", "sessions": self.engine.open_sessions(),
                "layers": [loaded.layer_start, loaded.layer_end] if loaded else None}  # fmt: skip

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(metrics: ServerMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
            logger.debug("%s %s", self.address_string(), format % args)

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path == "/metrics":
                self._send(HTTPStatus.OK, metrics.exposition(), CONTENT_TYPE)
            elif self.path in ("/health", "/healthz"):
                self._send(HTTPStatus.OK, json.dumps(metrics.health()).encode(), "application/json")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found: GET /metrics or /health\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
