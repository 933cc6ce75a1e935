"""Serving metrics with vLLM's names: C concurrent streams through one farm, each generating
N tokens after a short prompt. Reports time to first token, time per output token,
inter-token latency and aggregate throughput."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

from llmrpc.farm import Farm
from llmrpc.sampling import SamplingParams


@dataclass
class ServingResult:
    concurrency: int
    time_to_first_token_seconds: float  # mean over streams
    time_per_output_token_seconds: float  # mean over streams: (end - first token) / (n - 1)
    inter_token_latency_p50_seconds: float
    inter_token_latency_p99_seconds: float
    output_tokens_per_second: float  # all streams together


def bench_serving(farm: Farm, concurrency: int, n_tokens: int, prompt: str) -> ServingResult:
    tokens = farm.tokenizer.encode(prompt)
    ttft: list[float] = []
    tpot: list[float] = []
    itl: list[float] = []
    lock = threading.Lock()
    total = [0]

    def stream(seed: int) -> None:
        t0 = time.perf_counter()
        stamps = []
        params = SamplingParams(temperature=0.8, top_k=40, seed=seed)
        for _ in farm.generate_tokens(tokens, n_tokens, params, stop_at_eog=False):
            stamps.append(time.perf_counter())
        with lock:
            ttft.append(stamps[0] - t0)
            if len(stamps) > 1:
                tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
                itl.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))
            total[0] += len(stamps)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    itl.sort()
    return ServingResult(
        concurrency,
        statistics.mean(ttft),
        statistics.mean(tpot) if tpot else 0.0,
        itl[len(itl) // 2] if itl else 0.0,
        itl[min(len(itl) - 1, int(len(itl) * 0.99))] if itl else 0.0,
        total[0] / wall,
    )
