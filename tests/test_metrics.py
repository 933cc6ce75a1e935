"""`GET /metrics` of `llmrpc-head serve`, a real process on 127.0.0.1: Prometheus text, parsed with
prometheus_client's own parser, whose counters match the requests sent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

KEY = "metrics-key"
PREFIX = "llmrpc-head serve listening on "


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.fixture()
def served(smollm2: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The API's base URL, over three local servers."""
    cmd = [sys.executable, "-m", "llmrpc.cli", "serve", "--model", smollm2, "--port", "0", "--local", "3",
           "--threads", "1", "--parallel", "2", "--ctx-size", "256", "--api-key", KEY]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(PREFIX), line
        yield line[len(PREFIX) :].split()[0], proc
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def scrape(base: str, key: str = KEY) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """(content type, {(sample name, labels without model_name): value})."""
    request = urllib.request.Request(base.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        kind, text = r.headers["Content-Type"], r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("model_name") == "SmolLM2-135M-Instruct.Q4_1", s
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            samples[(s.name, labels)] = s.value
    return kind, samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((f"llmrpc:{name}", tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_was_sent(served: tuple[str, subprocess.Popen[str]]) -> None:
    base, proc = served
    kind, before = scrape(base)
    assert kind.startswith("text/plain") and "version=0.0.4" in kind
    assert value(before, "prompt_tokens_total") == 0 and value(before, "num_requests_running") == 0

    client = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)
    usages, reasons = [], []
    for n in (5, 9):  # whole completions that run to their length
        r = client.completions.create(model="any", prompt="The capital of France is", max_tokens=n, temperature=0)
        usages.append(r.usage)
        reasons.append(r.choices[0].finish_reason)
    chat = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Count: 1, 2, 3"}], max_tokens=40, temperature=0,
        stop=[","], stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    parts = list(chat)
    usages.append(parts[-1].usage)
    reasons.append(next(p.choices[0].finish_reason for p in parts if p.choices and p.choices[0].finish_reason))
    assert reasons == ["length", "length", "stop"]

    _, after = scrape(base)
    prompt = sum(u.prompt_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages)
    assert value(after, "prompt_tokens_total") == prompt
    assert value(after, "generation_tokens_total") == generated
    assert value(after, "request_success_total", finished_reason="length") == 2
    assert value(after, "request_success_total", finished_reason="stop") == 1
    assert value(after, "time_to_first_token_seconds_count") == 3
    assert value(after, "time_per_output_token_seconds_count") == generated - 3  # between two tokens
    assert value(after, "e2e_request_latency_seconds_count") == 3
    assert value(after, "request_queue_time_seconds_count") == 3
    assert value(after, "request_prompt_tokens_sum") == prompt
    assert value(after, "request_generation_tokens_sum") == generated
    assert value(after, "time_to_first_token_seconds_sum") > 0
    assert value(after, "e2e_request_latency_seconds_sum") >= value(after, "time_to_first_token_seconds_sum")
    assert value(after, "num_requests_running") == value(after, "num_requests_waiting") == 0
    assert value(after, "replays_total") == 0

    # a client that goes away mid-stream: an abort; a server killed mid-stream: a replay
    stream = client.completions.create(model="any", prompt="Once upon a time", max_tokens=100, stream=True)
    next(iter(stream))
    stream.close()
    stream = client.completions.create(model="any", prompt="Once upon a time", max_tokens=40, temperature=0,
                                       stream=True)  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 5:
            os.kill(_children(proc.pid)[1], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while value(scrape(base)[1], "request_success_total", finished_reason="abort") < 1:
        assert time.monotonic() < deadline, "the abort was not counted"
        time.sleep(0.2)
    _, last = scrape(base)
    assert value(last, "replays_total") == 1
    assert value(last, "request_success_total", finished_reason="length") == 3
    assert value(last, "num_requests_running") == value(last, "num_requests_waiting") == 0

    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(base, key="wrong")
    assert refused.value.code == 401
