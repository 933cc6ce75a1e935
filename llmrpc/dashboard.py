"""The live dashboard of ``llmrpc-head serve``: ``GET /dashboard`` is a self-contained page (no
external assets) that polls ``GET /dashboard.json`` every second and draws the servers (device,
memory bar, layers, sessions), the model's layers as a strip coloured by server, tokens per second,
requests, errors and replays.

The page itself holds no data and needs no API key; the JSON needs the key like every request (the
page asks for it once and keeps it for the browser tab)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from importlib import resources
from typing import TYPE_CHECKING, Any

from llmrpc.head.status import ServerStatus, farm_status

if TYPE_CHECKING:
    from llmrpc.farm import Farm
    from llmrpc.metrics import ServeMetrics

logger = logging.getLogger(__name__)

SERVERS_MAX_AGE = 1.0  # seconds a poll of the servers is reused for (several pages, one poll)
RATE_WINDOW = 5.0  # seconds over which tokens per second are measured


def page() -> bytes:
    """The dashboard's HTML (with its script and style inline)."""
    return resources.files("llmrpc").joinpath("dashboard.html").read_bytes()


class Dashboard:
    def __init__(self, farm: Farm, metrics: ServeMetrics) -> None:
        self.farm = farm
        self.metrics = metrics
        self._lock = threading.Lock()
        self._servers: tuple[float, list[ServerStatus]] = (0.0, [])
        self._tokens: deque[tuple[float, float]] = deque()  # (time, tokens generated so far)

    def snapshot(self) -> dict[str, Any]:
        """What the page draws, as JSON."""
        farm, now = self.farm, time.monotonic()
        generated = self._sample("llmrpc:generation_tokens_total")
        with self._lock:
            self._tokens.append((now, generated))
            while len(self._tokens) > 2 and now - self._tokens[1][0] >= RATE_WINDOW:
                self._tokens.popleft()
            (t0, n0), (t1, n1) = self._tokens[0], self._tokens[-1]
        plan = {s.address: (s.start, s.end) for s in (farm.plan if farm.pipeline is not None else [])}
        return {
            "model": self.metrics.model_name,
            "n_layer": farm.info.hparams.n_layer,
            "architecture": farm.info.hparams.arch,
            "tokens_per_second": (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0,
            "generated_tokens": generated,
            "prompt_tokens": self._sample("llmrpc:prompt_tokens_total"),
            "requests_running": self._sample("llmrpc:num_requests_running"),
            "requests_waiting": self._sample("llmrpc:num_requests_waiting"),
            "requests_finished": sum(self._sample("llmrpc:request_success_total", r) for r in ("stop", "length")),
            "errors": self._sample("llmrpc:request_success_total", "abort"),
            "replays": farm.replays,
            "servers": [_server(s, plan.get(s.address)) for s in self._poll(list(farm.addresses))],
        }

    def _sample(self, name: str, reason: str | None = None) -> float:
        labels = {"model_name": self.metrics.model_name} | ({"finished_reason": reason} if reason else {})
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def _poll(self, addresses: list[str]) -> list[ServerStatus]:
        with self._lock:
            at, servers = self._servers
            if time.monotonic() - at < SERVERS_MAX_AGE and [s.address for s in servers] == addresses:
                return servers
        servers = farm_status(addresses, self.farm.security, timeout=2.0)
        with self._lock:
            self._servers = (time.monotonic(), servers)
        return servers


def _server(s: ServerStatus, planned: tuple[int, int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"address": s.address, "ok": not s.error, "error": s.error, "planned": planned}
    if s.info is not None:
        d = s.info.device
        loaded = s.info.loaded
        out |= {
            "device": d.name, "kind": d.kind, "description": d.description,
            "memory_total": d.memory_total, "memory_free": d.memory_free, "weight_bytes": s.weight_bytes,
            "memory_budget": s.info.memory_budget,
            "layers": [loaded.layer_start, loaded.layer_end] if loaded else None,
        }  # fmt: skip
    if s.health is not None:
        out |= {"sessions": s.health.open_sessions, "takes_turns": s.health.takes_turns,
                "native_steps": s.health.native_steps}  # fmt: skip
    return out
