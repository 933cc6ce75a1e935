"""llama.cpp itself (through llama-cpp-python) as the reference for tests and benchmarks.

Extra weight buffer types (CPU repacking, AMX) are off by default: on machines whose CPU
advertises AMX but whose hypervisor does not enable it, llama.cpp dies with SIGILL in its
AMX kernels. With them off, llama.cpp runs the same ggml kernels that llmrpc's stages run.
Set ``LLMRPC_REF_EXTRA_BUFTS=1`` to turn them back on where they work.

On a GPU machine, ``LLMRPC_REF_GPU_LAYERS=99`` offloads the reference's layers too, so that
servers computing on the GPU are compared with llama.cpp on the same GPU (same kernels).
"""

from __future__ import annotations

import contextlib
import os
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
    return os.environ.get("LLMRPC_REF_EXTRA_BUFTS", "0") == "1"


def gpu_layers(default: int = 0) -> int:
    """Layers the reference offloads to a GPU (``LLMRPC_REF_GPU_LAYERS``; ``default`` when unset:
    0, the CPU)."""
    value = os.environ.get("LLMRPC_REF_GPU_LAYERS", str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"LLMRPC_REF_GPU_LAYERS={value!r}: expected a number of layers") from None


def reference_llama(model_path: str, **kwargs: Any) -> Any:
    """A fresh ``llama_cpp.Llama`` (fresh state: a reused one changes batch layout)."""
    import llama_cpp

    kwargs.setdefault("verbose", False)
    kwargs.setdefault("n_gpu_layers", gpu_layers())
    with _model_params(extra_bufts_enabled()):
        return llama_cpp.Llama(model_path, **kwargs)
