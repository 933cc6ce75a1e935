"""llama.cpp itself (through llama-cpp-python) as the reference for tests and benchmarks.

It runs as people run llama.cpp: with its extra weight buffer types (CPU_REPACK's
interleaved Q4_0/Q4_K/Q8_0/... blocks, AMX where the kernel grants it), which llmrpc's servers
use too, so both run the same kernels. ``LLMRPC_REF_EXTRA_BUFTS=0`` turns them off (with
``LLMRPC_EXTRA_BUFTS=0`` on the servers, to compare the plain kernels).

On a GPU machine, ``LLMRPC_REF_GPU_LAYERS=99`` offloads the reference's layers too, so that
servers computing on the GPU are compared with llama.cpp on the same GPU (same kernels).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def _model_params(extra_bufts: bool) -> Iterator[None]:
    import llama_cpp
    import llama_cpp.llama as llama_mod

    original = llama_cpp.llama_model_default_params

    def patched() -> Any:
        params = original()
        params.use_extra_bufts = extra_bufts
        return params

    llama_mod.llama_cpp.llama_model_default_params = patched  # type: ignore[attr-defined]
    try:
        yield
    finally:
        llama_mod.llama_cpp.llama_model_default_params = original  # type: ignore[attr-defined]


def extra_bufts_enabled() -> bool:
    return os.environ.get("LLMRPC_REF_EXTRA_BUFTS", "1") != "0"


def gpu_layers(default: int = 0) -> int:
    """Layers the reference offloads to a GPU (``LLMRPC_REF_GPU_LAYERS``; ``default`` when unset:
    0, the CPU)."""
    value = os.environ.get("LLMRPC_REF_GPU_LAYERS", str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"LLMRPC_REF_GPU_LAYERS={value!r}: expected a number of layers") from None


def reference_llama(model_path: str, **kwargs: Any) -> Any:
    """A fresh ``llama_cpp.Llama`` (fresh state: a reused one changes batch layout), run as
    llama.cpp's own tools run it (llama-server, llama-cli), where llama-cpp-python's defaults
    differ: flash attention on (their auto on the CPU) and sliding-window layers keeping only
    the window (llama-cpp-python's default is a full-size cache)."""
    import llama_cpp

    kwargs.setdefault("verbose", False)
    kwargs.setdefault("swa_full", False)
    kwargs.setdefault("flash_attn", True)  # llama.cpp's tools: auto, which is on for the CPU
    for key in ("yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow"):  # the model's, as llama.cpp's tools take
        kwargs.setdefault(key, -1.0)
    kwargs.setdefault("n_gpu_layers", gpu_layers())
    with _model_params(extra_bufts_enabled()):
        llm = llama_cpp.Llama(model_path, **kwargs)
    _attach_threadpool(llm, int(kwargs.get("n_threads") or llm.n_threads))
    return llm


def _attach_threadpool(llm: Any, n_threads: int) -> None:
    """Where ggml is built without OpenMP, give the reference a thread pool as llama.cpp's own
    tools do (llama-cli, llama-bench: ggml's defaults, workers polling before they sleep):
    without one, ggml starts and ends its threads for every graph. OpenMP keeps its own."""
    import ctypes

    import llama_cpp

    from llmrpc.ggml import lib as g

    ggml = g.ggml()
    if ggml.uses_openmp:
        return
    params = ggml.ggml_threadpool_params_default(n_threads)
    pool = ggml.ggml_threadpool_new(ctypes.byref(params))
    attach = llama_cpp.llama_cpp._lib.llama_attach_threadpool
    attach.restype, attach.argtypes = None, [ctypes.c_void_p] * 3
    detach = llama_cpp.llama_cpp._lib.llama_detach_threadpool
    detach.restype, detach.argtypes = None, [ctypes.c_void_p]
    ctx = llm._ctx
    attach(ctx.ctx, pool, pool)

    def free() -> None:
        if ctx.ctx:
            detach(ctx.ctx)
        ggml.ggml_threadpool_free(pool)

    weakref.finalize(llm, free)
