"""Prometheus metrics of ``llmrpc-head serve`` (``GET /metrics``), named as vLLM's where the meaning
is the same, under ``llmrpc:`` instead of ``vllm:``. One registry per API, so that two in a process
(tests) do not mix their figures."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llmrpc.farm import Farm

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format generate_latest writes

# vLLM's buckets for the same histograms
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_TOKEN_TIME = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
        960.0, 1920.0, 7680.0)  # fmt: skip
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _Replays(Collector):
    """The farm's re-plans after a server failed, read when scraped."""

    def __init__(self, farm: Farm, model_name: str) -> None:
        self.farm = farm
        self.model_name = model_name

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "llmrpc:replays",
            "Times the farm planned again over the servers left after one failed, replaying the generations in flight.",
            labels=["model_name"],
        )
        family.add_metric([self.model_name], float(self.farm.replays))
        yield family


class ServeMetrics:
    """What the API counts and times. Each request is tracked by a :class:`RequestTimer`."""

    def __init__(self, farm: Farm, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = m = model_name
        labels = ["model_name"]
        self.running = Gauge("llmrpc:num_requests_running", "Requests generating now.", labels, registry=r).labels(m)
        self.waiting = Gauge("llmrpc:num_requests_waiting", "Requests waiting for a slot.", labels, registry=r).labels(
            m
        )
        self.prompt_tokens = Counter("llmrpc:prompt_tokens", "Prompt tokens of the requests generated.", labels,
                                     registry=r).labels(m)  # fmt: skip
        self.generation_tokens = Counter("llmrpc:generation_tokens", "Tokens generated.", labels, registry=r).labels(m)
        self._success = Counter(
            "llmrpc:request_success", "Requests finished, by reason: stop, length, or abort (client gone, error).",
            labels + ["finished_reason"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram("llmrpc:time_to_first_token_seconds", "From a request's arrival to its first token.",
                              labels, buckets=_LATENCY, registry=r).labels(m)  # fmt: skip
        self.tpot = Histogram("llmrpc:time_per_output_token_seconds", "Between two tokens of one request.",
                              labels, buckets=_TOKEN_TIME, registry=r).labels(m)  # fmt: skip
        self.e2e = Histogram("llmrpc:e2e_request_latency_seconds", "From a request's arrival to its end.",
                             labels, buckets=_E2E, registry=r).labels(m)  # fmt: skip
        self.queue = Histogram("llmrpc:request_queue_time_seconds", "Time a request waited for a slot.",
                               labels, buckets=_E2E, registry=r).labels(m)  # fmt: skip
        self.request_prompt = Histogram("llmrpc:request_prompt_tokens", "Prompt tokens of a request.",
                                        labels, buckets=_TOKENS, registry=r).labels(m)  # fmt: skip
        self.request_generation = Histogram("llmrpc:request_generation_tokens", "Tokens generated for a request.",
                                            labels, buckets=_TOKENS, registry=r).labels(m)  # fmt: skip
        r.register(_Replays(farm, m))

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def request(self, prompt_tokens: int) -> RequestTimer:
        return RequestTimer(self, prompt_tokens)

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)


class RequestTimer:
    """One request's way through the API: waiting, generating (a token at a time), finished."""

    def __init__(self, metrics: ServeMetrics, prompt_tokens: int) -> None:
        self.m = metrics
        self.prompt_tokens = prompt_tokens
        self.arrived = self.last = time.perf_counter()
        self.tokens = 0
        self.state = "waiting"
        self._lock = threading.Lock()
        metrics.waiting.inc()

    def start(self) -> None:
        """It got a slot: it generates from now on."""
        with self._lock:
            now = time.perf_counter()
            self.m.queue.observe(now - self.arrived)
            self.m.waiting.dec()
            self.m.running.inc()
            self.m.prompt_tokens.inc(self.prompt_tokens)
            self.m.request_prompt.observe(self.prompt_tokens)
            self.state = "running"

    def token(self) -> None:
        now = time.perf_counter()
        if self.tokens == 0:
            self.m.ttft.observe(now - self.arrived)
        else:
            self.m.tpot.observe(now - self.last)
        self.last = now
        self.tokens += 1
        self.m.generation_tokens.inc()

    def end(self, reason: str) -> None:
        """Finished: ``reason`` is stop, length or abort. A second call changes nothing."""
        with self._lock:
            if self.state == "done":
                return
            (self.m.waiting if self.state == "waiting" else self.m.running).dec()
            self.state = "done"
        self.m.e2e.observe(time.perf_counter() - self.arrived)
        self.m.request_generation.observe(self.tokens)
        self.m.finished(reason)
