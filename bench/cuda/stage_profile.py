"""Per-token breakdown of one stage holding a whole model, in this process (no transport):
where a decode step's time goes, next to llama.cpp's own eval in the same process.
    python bench/cuda/stage_profile.py MODEL.gguf CUDA0
    python bench/cuda/stage_profile.py MODEL.gguf CUDA0 ours|llama   only that decode loop (under nsys)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import llama_cpp  # noqa: F401  (before grpc: see run.sh)
import numpy as np

from llmrpc.ggml import lib as g
from llmrpc.ggml.device import Backend, find_device
from llmrpc.model import stage as stage_mod
from llmrpc.model.gguf_model import read_model
from llmrpc.model.stage import LayerStage
from llmrpc.reference import reference_llama
from llmrpc.server.api import top_k_logits

N = int(os.environ.get("LLMRPC_PROFILE_N", "400"))  # decode steps per round (two rounds)


def timed(acc: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any) -> Any:
        t = time.perf_counter()
        result = fn(*args)
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
        return result

    return wrapper


def profile_stage(path: str, device: str, threads: int, host_argmax: bool = True) -> str:
    info = read_model(path)
    stage = LayerStage(info, 0, info.hparams.n_layer, Backend(find_device(device), threads))
    cache = stage.new_cache(N + 200)
    lib: Any = g.ggml()
    acc: dict[str, float] = {}
    stage_mod._set = timed(acc, "set", stage_mod._set)  # type: ignore[assignment]
    lib.ggml_backend_sched_graph_compute = timed(acc, "compute", lib.ggml_backend_sched_graph_compute)
    lib.ggml_backend_tensor_get = timed(acc, "get", lib.ggml_backend_tensor_get)
    lines = []
    variants = (("forward+argmax", False), ("forward, argmax on the device", True))
    for label, top1 in variants if host_argmax else variants[1:]:
        dt = 0.0
        for _ in range(2):  # the first round warms up
            acc.clear()
            t0 = time.perf_counter()
            for t in range(N):
                x = np.array([5 + t % 100], dtype=np.int32)
                if top1:
                    stage.forward_batch([(cache, x, t)], False, top1=True)
                else:
                    top_k_logits(stage.forward(cache, x, t, False), 1)
            dt = time.perf_counter() - t0
        parts = ", ".join(f"{k} {v / N * 1e3:.3f}" for k, v in acc.items())
        lines.append(f"stage {label}: {dt / N * 1e3:.3f} ms/token; {parts}")
    return "\n".join(lines)


def profile_prefill(path: str, device: str, threads: int, n: int = 512) -> str:
    """A prompt of n tokens: with a new cache each time (what a new session pays: cache, graph
    build, allocation), then on the same cache again and again (the graph reused: on CUDA its
    second run is captured as a CUDA graph, the later ones replay it); and how many splits the
    scheduler made of the graph (one per run of nodes on one backend: more than one on a GPU
    means some op runs on the CPU, its inputs copied both ways)."""
    info = read_model(path)
    stage = LayerStage(info, 0, info.hparams.n_layer, Backend(find_device(device), threads))
    x = np.arange(100, 100 + n, dtype=np.int32)
    fresh, alloc, again = [], [], []
    splits = 0
    for rep in range(3):
        t0 = time.perf_counter()
        cache = stage.new_cache(n + 16)
        t1 = time.perf_counter()
        stage.forward(cache, x, 0, False)
        t2 = time.perf_counter()
        splits = g.ggml().ggml_backend_sched_get_n_splits(stage._room.sched)
        for _ in range(6 if rep == 0 else 0):
            t = time.perf_counter()
            stage.forward(cache, x, 0, False)
            again.append(time.perf_counter() - t)
        stage.forget(cache)
        cache.free()
        alloc.append(t1 - t0)
        fresh.append(t2 - t1)
    runs = ", ".join(f"{t * 1e3:.2f}" for t in again)
    return (
        f"stage prefill {n}: new cache {min(alloc) * 1e3:.2f} ms, first forward {min(fresh) * 1e3:.2f} ms "
        f"({splits} scheduler splits); on the same cache, run by run: {runs} ms"
    )


def profile_llama_cpp_prefill(path: str, device: str, threads: int, n: int = 512) -> str:
    llm = reference_llama(
        path, n_ctx=n + 16, n_batch=n, n_ubatch=n, n_gpu_layers=0 if device == "CPU" else 99, n_threads=threads
    )
    times = []
    for _ in range(6):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(list(range(100, 100 + n)))
        times.append(time.perf_counter() - t0)
    return f"llama.cpp prefill {n}, run by run: {', '.join(f'{t * 1e3:.2f}' for t in times)} ms"


def profile_llama_cpp(path: str, device: str, threads: int) -> str:
    llm = reference_llama(path, n_ctx=N + 200, n_gpu_layers=0 if device == "CPU" else 99, n_threads=threads)
    dt = 0.0
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        for t in range(N):
            llm.eval([5 + t % 100])
        dt = time.perf_counter() - t0
    return f"llama.cpp eval: {dt / N * 1e3:.3f} ms/token"


if __name__ == "__main__":
    model, dev = sys.argv[1], sys.argv[2]
    n_threads = os.cpu_count() or 1
    only = sys.argv[3] if len(sys.argv) > 3 else ""
    if only == "ours":
        print(profile_stage(model, dev, n_threads, host_argmax=False))
        sys.exit(0)
    if only == "llama":
        print(profile_llama_cpp(model, dev, n_threads))
        sys.exit(0)
    print(profile_stage(model, dev, n_threads))
    print(profile_llama_cpp(model, dev, n_threads))
    print(profile_prefill(model, dev, n_threads))
    print(profile_llama_cpp_prefill(model, dev, n_threads))
