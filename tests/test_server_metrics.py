"""`llmrpc-server --metrics-port`: two real servers, a farm over them, and their `GET /metrics`
parsed with prometheus_client's own parser: the layers match the plan, the sessions the open
ones, and the steps, rows and bytes what went through them. The Grafana dashboard queries only
series that the servers and the head expose."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmrpc.farm import Farm
from llmrpc.head.client import StageClient
from llmrpc.metrics import ServeMetrics
from llmrpc.model.gguf_model import read_model
from llmrpc.sampling import SamplingParams
from tests.servers import metered_servers


@pytest.fixture()
def metered(tmp_path: Path) -> Iterator[list[tuple[str, int]]]:
    """Two servers: (gRPC address, metrics port) each. Two threads each: the farm has them take
    turns on this machine's cores, and the native hop then takes their generation steps."""
    with metered_servers([["--cache-dir", str(tmp_path / f"c{i}")] for i in range(2)], threads=2) as servers:
        yield servers


def scrape(port: int) -> dict[str, float]:
    """{sample name with its labels: value}, e.g. 'llmrpc:server_steps_total{path=native}'."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" in s.labels:
                labels += ("," if labels else "") + f"le={s.labels['le']}"
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def _steps(m: dict[str, float]) -> float:
    return m["llmrpc:server_steps_total{path=python}"] + m["llmrpc:server_steps_total{path=native}"]


def test_server_metrics_after_real_steps(metered: list[tuple[str, int]], tiny_models: dict[str, str]) -> None:
    path = tiny_models["Q8_0"]
    n_embd = read_model(path).hparams.n_embd
    idle = [scrape(port) for _, port in metered]
    assert all(m["llmrpc:server_model_layers"] == 0 and _steps(m) == 0 for m in idle)
    assert all(m["llmrpc:server_device_memory_total_bytes"] > 0 for m in idle)
    prompt, n = [1, 5, 9, 14, 20, 33, 40], 40
    with Farm(path, [a for a, _ in metered], ctx_size=128) as farm:
        assert len(farm.plan) == 2
        with farm.session() as s:
            s.forward(prompt)  # one step through each server (the head's gRPC path), session open
            during = [scrape(port) for _, port in metered]
        tokens = list(farm.generate_tokens(prompt, n, SamplingParams(temperature=0.0), stop_at_eog=False))
        assert len(tokens) == n
        after = [scrape(port) for _, port in metered]
        for stage, m, d in zip(farm.plan, after, during, strict=True):
            assert (m["llmrpc:server_layer_start"], m["llmrpc:server_layer_end"]) == (stage.start, stage.end)
            assert m["llmrpc:server_model_layers"] == 4
            assert d["llmrpc:server_sessions"] == 1 and m["llmrpc:server_sessions"] == 0
            assert m["llmrpc:server_weight_bytes"] > 0
            assert m["llmrpc:server_memory_used_bytes"] >= m["llmrpc:server_weight_bytes"]
            # the slice shipped to it, on disk within its budget, as Health says; closed sessions kept as prefixes
            health = StageClient(metered[farm.plan.index(stage)][0]).health()
            assert m["llmrpc:server_slice_cache_bytes"] == health.slice_cache_bytes
            assert 0 < m["llmrpc:server_slice_cache_bytes"] < m["llmrpc:server_slice_cache_budget_bytes"]
            assert m["llmrpc:server_prefix_cache_bytes"] == health.prefix_bytes <= health.prefix_budget
            assert m["llmrpc:server_prefix_cache_budget_bytes"] == health.prefix_budget > 0
            # the prompt twice (the session above, then the generation's), and each token but the last fed back
            assert m["llmrpc:server_step_rows_total"] == 2 * len(prompt) + n - 1
            assert _steps(m) >= 1 + n  # the prompt (in one or more micro-batches), then a step a token
            assert m["llmrpc:server_step_seconds_count"] == _steps(m)
            assert m["llmrpc:server_step_seconds_bucket{le=+Inf}"] == _steps(m)
            assert m["llmrpc:server_step_seconds_sum"] > 0
        # the generation's steps after its first ones went through the native hop, counted as its Health counts them
        for (address, _), m in zip(metered, after, strict=True):
            native = m["llmrpc:server_steps_total{path=native}"]
            assert native > n / 2
            assert native == StageClient(address).health().native_steps
        first, last = after
        rows = 2 * len(prompt) + n - 1
        assert first["llmrpc:server_step_input_bytes_total"] == 4 * rows  # I32 token ids
        assert first["llmrpc:server_step_output_bytes_total"] == 4 * n_embd * rows  # F32 hidden states
        assert last["llmrpc:server_step_input_bytes_total"] == 4 * n_embd * rows
        info = [k for k in first if k.startswith("llmrpc:server_info{")]
        assert len(info) == 1 and ",device=CPU,kind=cpu," in info[0] and first[info[0]] == 1
        _check_grafana_dashboard(after[0], ServeMetrics(farm, "m").exposition().decode())
    with urllib.request.urlopen(f"http://127.0.0.1:{metered[0][1]}/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok", "sessions": 0, "layers": [farm.plan[0].start, farm.plan[0].end]}


def _check_grafana_dashboard(server: dict[str, float], head_text: str) -> None:
    """Every series deploy/grafana/llmrpc.json queries is one a server or the head exposes."""
    dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" / "llmrpc.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {n for e in exprs for n in re.findall(r"llmrpc:[a-z0-9_]+", e)}
    families = list(text_string_to_metric_families(head_text))  # a labelled counter has no sample before its first
    head = {f.name + end for f in families for end in ("", "_total", "_bucket", "_sum", "_count")}
    exposed = head | {k.split("{")[0] for k in server}
    assert used and used <= exposed, used - exposed
    assert any(n.startswith("llmrpc:server_") for n in used) and any(n in head for n in used)
