"""A large model on a farm whose servers are each too small for it: the first start (weights
shipped from the head), a restart of every server from its slice cache, llama.cpp loading the
whole file in the same run, the head's peak memory while shipping, and a second head start
(whose model hash is remembered, not recomputed).

``llmrpc-bench restart --model synthetic-8b --servers 3 --mem 2GiB``
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import click

from llmrpc.bench.models import resolve_model
from llmrpc.farm import Farm
from llmrpc.head.local import LocalServers
from llmrpc.model import gguf_model
from llmrpc.reference import extra_bufts_enabled, reference_llama


def _servers(n: int, mem: str, caches: list[Path], threads: int) -> LocalServers:
    args = [["--cache-dir", str(c)] for c in caches]
    local = LocalServers(n, threads=threads, extra_args=["--mem", mem], per_server_args=args, calibrate=False)
    local.start()
    return local


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _llama_cpp_load(model: str, threads: int) -> float:
    t0 = time.perf_counter()
    llm = reference_llama(model, n_ctx=512, n_threads=threads)
    seconds = time.perf_counter() - t0
    del llm
    return seconds


@click.command()
@click.option("--model", default="synthetic-8b", show_default=True, help="A GGUF path or a bench model's name.")
@click.option("--servers", "n_servers", default=3, show_default=True, type=click.IntRange(1, 16))
@click.option("--mem", default="2GiB", show_default=True, help="Each server's --mem cap.")
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--reps", default=2, show_default=True, type=click.IntRange(1))
@click.option("--out", default="bench/out/restart.json", show_default=True, type=click.Path())
def restart(model: str, n_servers: int, mem: str, threads: int, reps: int, out: str) -> None:
    """Start, restart from the slice caches, and llama.cpp's load of the same file, in turn."""
    path = resolve_model(model)
    t0 = time.perf_counter()
    gguf_model.content_hash(path)
    first_hash_s = time.perf_counter() - t0
    gguf_model._HASHES.clear()  # as a new head process: only the record on disk is left
    t0 = time.perf_counter()
    gguf_model.content_hash(path)
    second_hash_s = time.perf_counter() - t0
    results: dict[str, object] = {
        "model": path, "servers": n_servers, "mem": mem, "first_hash_s": first_hash_s,
        "second_head_hash_s": second_hash_s, "reference_extra_buffer_types": extra_bufts_enabled(),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        caches = [Path(tmp) / f"cache{i}" for i in range(n_servers)]
        rss_before = _max_rss_mb()
        local = _servers(n_servers, mem, caches, threads)
        try:
            t0 = time.perf_counter()
            with Farm(path, local.addresses, ctx_size=512) as farm:
                results["first_start_s"] = time.perf_counter() - t0
                results["plan"] = [(s.address, s.start, s.end, s.weight_bytes) for s in farm.plan]
                results["shipped_bytes"] = sum(farm.bytes_shipped.values())
        finally:
            local.stop()
        results["head_max_rss_mb_while_shipping"] = _max_rss_mb()
        results["head_max_rss_mb_before"] = rss_before
        restarts, loads = [], []
        for _ in range(reps):
            local = _servers(n_servers, mem, caches, threads)
            try:
                t0 = time.perf_counter()
                with Farm(path, local.addresses, ctx_size=512) as farm:
                    restarts.append(time.perf_counter() - t0)
                    assert set(farm.load_sources.values()) == {"cache"}, farm.load_sources
            finally:
                local.stop()
            loads.append(_llama_cpp_load(path, threads))
        results["restart_from_cache_s"] = restarts
        results["llama_cpp_load_s"] = loads
        results["restart_vs_llama_cpp_load"] = sum(restarts) / sum(loads)
    click.echo(json.dumps(results, indent=1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1) + "\n")
