"""Thin typed ctypes binding over the libggml that llama-cpp-python ships.

Only the functions llmrpc calls are declared. Pointers to opaque ggml objects
(contexts, graphs, backends, buffers) are plain ``c_void_p``; ``ggml_tensor`` is
declared as a structure because the graph builders read ``ne``/``nb``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pathlib
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int, c_int64, c_size_t, c_void_p
from typing import Any

logger = logging.getLogger(__name__)

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64

# enum ggml_type (subset used by name; any value read from a GGUF is passed through)
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q4_1 = 3
GGML_TYPE_Q8_0 = 8
GGML_TYPE_I32 = 26
GGML_TYPE_I64 = 27

GGML_ROPE_TYPE_NORMAL = 0
GGML_ROPE_TYPE_NEOX = 2
GGML_PREC_F32 = 10

# enum ggml_backend_dev_type
DEV_TYPE_CPU = 0
DEV_TYPE_GPU = 1
DEV_TYPE_IGPU = 2
DEV_TYPE_ACCEL = 3
DEV_TYPE_META = 4


class ggml_tensor(ctypes.Structure):  # noqa: N801 - C name
    _fields_ = [
        ("type", c_int),
        ("buffer", c_void_p),
        ("ne", c_int64 * GGML_MAX_DIMS),
        ("nb", c_size_t * GGML_MAX_DIMS),
        ("op", c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", c_void_p * GGML_MAX_SRC),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


GGML_MAX_N_THREADS = 512


class ggml_threadpool_params(ctypes.Structure):  # noqa: N801 - C name
    _fields_ = [
        ("cpumask", c_bool * GGML_MAX_N_THREADS),
        ("n_threads", c_int),
        ("prio", c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", c_bool),
        ("paused", c_bool),
    ]


class ggml_init_params(ctypes.Structure):  # noqa: N801 - C name
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


Tensor = Any  # a POINTER(ggml_tensor); ctypes pointer types do not type-check well
T = POINTER(ggml_tensor)
P = c_void_p

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    # core
    "ggml_init": (P, [ggml_init_params]),
    "ggml_free": (None, [P]),
    "ggml_tensor_overhead": (c_size_t, []),
    "ggml_graph_overhead_custom": (c_size_t, [c_size_t, c_bool]),
    "ggml_type_size": (c_size_t, [c_int]),
    "ggml_blck_size": (c_int64, [c_int]),
    "ggml_row_size": (c_size_t, [c_int, c_int64]),
    "ggml_type_name": (c_char_p, [c_int]),
    "ggml_nbytes": (c_size_t, [T]),
    "ggml_status_to_string": (c_char_p, [c_int]),
    # predicates on tensors (the checks of llmrpc.ggml.checked)
    "ggml_nelements": (c_int64, [T]),
    "ggml_can_repeat": (c_bool, [T, T]),
    "ggml_are_same_shape": (c_bool, [T, T]),
    "ggml_is_contiguous": (c_bool, [T]),
    "ggml_is_contiguous_1": (c_bool, [T]),
    "ggml_is_contiguous_rows": (c_bool, [T]),
    "ggml_is_transposed": (c_bool, [T]),
    "ggml_is_vector": (c_bool, [T]),
    "ggml_is_empty": (c_bool, [T]),
    # tensors
    "ggml_new_tensor": (T, [P, c_int, c_int, POINTER(c_int64)]),
    "ggml_new_tensor_1d": (T, [P, c_int, c_int64]),
    "ggml_new_tensor_2d": (T, [P, c_int, c_int64, c_int64]),
    "ggml_new_tensor_3d": (T, [P, c_int, c_int64, c_int64, c_int64]),
    "ggml_new_tensor_4d": (T, [P, c_int, c_int64, c_int64, c_int64, c_int64]),
    "ggml_set_name": (T, [T, c_char_p]),
    "ggml_set_input": (None, [T]),
    "ggml_set_output": (None, [T]),
    # ops
    "ggml_get_rows": (T, [P, T, T]),
    "ggml_argmax": (T, [P, T]),
    "ggml_set_rows": (T, [P, T, T, T]),
    "ggml_rms_norm": (T, [P, T, c_float]),
    "ggml_mul": (T, [P, T, T]),
    "ggml_add": (T, [P, T, T]),
    "ggml_scale": (T, [P, T, c_float]),
    "ggml_mul_mat": (T, [P, T, T]),
    "ggml_prec_set_acc": (c_bool, [T, c_int]),
    "ggml_reshape_2d": (T, [P, T, c_int64, c_int64]),
    "ggml_reshape_3d": (T, [P, T, c_int64, c_int64, c_int64]),
    "ggml_view_1d": (T, [P, T, c_int64, c_size_t]),
    "ggml_view_2d": (T, [P, T, c_int64, c_int64, c_size_t, c_size_t]),
    "ggml_view_3d": (T, [P, T, c_int64, c_int64, c_int64, c_size_t, c_size_t, c_size_t]),
    "ggml_concat": (T, [P, T, T, c_int]),
    "ggml_permute": (T, [P, T, c_int, c_int, c_int, c_int]),
    "ggml_cont_2d": (T, [P, T, c_int64, c_int64]),
    "ggml_rope_ext": (
        T,
        [P, T, T, T, c_int, c_int, c_int, c_float, c_float, c_float, c_float, c_float, c_float],
    ),
    "ggml_soft_max_ext": (T, [P, T, T, c_float, c_float]),
    "ggml_swiglu_split": (T, [P, T, T]),
    "ggml_cast": (T, [P, T, c_int]),
    # ops of the other families' builders
    "ggml_norm": (T, [P, T, c_float]),
    "ggml_div": (T, [P, T, T]),
    "ggml_sqr": (T, [P, T]),
    "ggml_sqrt": (T, [P, T]),
    "ggml_tanh": (T, [P, T]),
    "ggml_relu": (T, [P, T]),
    "ggml_silu": (T, [P, T]),
    "ggml_gelu": (T, [P, T]),
    "ggml_sigmoid": (T, [P, T]),
    "ggml_softplus": (T, [P, T]),
    "ggml_clamp": (T, [P, T, c_float, c_float]),
    "ggml_geglu_split": (T, [P, T, T]),
    "ggml_reglu_split": (T, [P, T, T]),
    "ggml_swiglu": (T, [P, T]),
    "ggml_swiglu_oai": (T, [P, T, T, c_float, c_float]),
    "ggml_soft_max": (T, [P, T]),
    "ggml_soft_max_add_sinks": (None, [T, T]),
    "ggml_flash_attn_ext": (T, [P, T, T, T, T, c_float, c_float, c_float]),
    "ggml_flash_attn_ext_add_sinks": (None, [T, T]),
    "ggml_sum_rows": (T, [P, T]),
    "ggml_argsort_top_k": (T, [P, T, c_int]),
    "ggml_mul_mat_id": (T, [P, T, T, T]),
    "ggml_add_id": (T, [P, T, T, T]),
    "ggml_cont": (T, [P, T]),
    "ggml_transpose": (T, [P, T]),
    "ggml_reshape_1d": (T, [P, T, c_int64]),
    "ggml_reshape_4d": (T, [P, T, c_int64, c_int64, c_int64, c_int64]),
    "ggml_view_4d": (T, [P, T, c_int64, c_int64, c_int64, c_int64, c_size_t, c_size_t, c_size_t, c_size_t]),
    "ggml_repeat_4d": (T, [P, T, c_int64, c_int64, c_int64, c_int64]),
    "ggml_pad": (T, [P, T, c_int, c_int, c_int, c_int]),
    "ggml_fill": (T, [P, T, c_float]),
    "ggml_xielu": (T, [P, T, c_float, c_float, c_float, c_float]),
    # graphs
    "ggml_new_graph_custom": (P, [P, c_size_t, c_bool]),
    "ggml_build_forward_expand": (None, [P, T]),
    "ggml_graph_n_nodes": (c_int, [P]),
    "ggml_get_first_tensor": (T, [P]),
    "ggml_get_next_tensor": (T, [P, T]),
    "ggml_graph_node": (T, [P, c_int]),
    "ggml_op_name": (c_char_p, [c_int]),
    # backends and devices
    "ggml_backend_load_all": (None, []),
    "ggml_backend_dev_count": (c_size_t, []),
    "ggml_backend_dev_get": (P, [c_size_t]),
    "ggml_backend_dev_name": (c_char_p, [P]),
    "ggml_backend_dev_description": (c_char_p, [P]),
    "ggml_backend_dev_memory": (None, [P, POINTER(c_size_t), POINTER(c_size_t)]),
    "ggml_backend_dev_type": (c_int, [P]),
    "ggml_backend_dev_backend_reg": (P, [P]),
    "ggml_backend_dev_init": (P, [P, c_char_p]),
    "ggml_backend_dev_buffer_type": (P, [P]),
    "ggml_backend_reg_get_proc_address": (P, [P, c_char_p]),
    "ggml_backend_free": (None, [P]),
    "ggml_backend_name": (c_char_p, [P]),
    "ggml_backend_buft_name": (c_char_p, [P]),
    "ggml_backend_buft_alloc_buffer": (P, [P, c_size_t]),
    "ggml_backend_dev_supports_op": (c_bool, [P, T]),
    "ggml_backend_alloc_ctx_tensors_from_buft": (P, [P, P]),
    "ggml_backend_buffer_free": (None, [P]),
    "ggml_backend_buffer_get_size": (c_size_t, [P]),
    "ggml_backend_buffer_get_base": (P, [P]),
    "ggml_backend_buffer_is_host": (c_bool, [P]),
    "ggml_backend_buffer_clear": (None, [P, ctypes.c_uint8]),
    "ggml_backend_buffer_set_usage": (None, [P, c_int]),
    "ggml_backend_tensor_set": (None, [T, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_get": (None, [T, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_copy": (None, [T, T]),
    "ggml_backend_sched_new": (P, [POINTER(P), POINTER(P), c_int, c_size_t, c_bool, c_bool]),
    "ggml_backend_sched_free": (None, [P]),
    "ggml_backend_sched_reserve": (c_bool, [P, P]),
    "ggml_backend_sched_reset": (None, [P]),
    "ggml_backend_sched_alloc_graph": (c_bool, [P, P]),
    "ggml_backend_sched_graph_compute": (c_int, [P, P]),
    "ggml_backend_sched_graph_compute_async": (c_int, [P, P]),
    "ggml_backend_sched_synchronize": (None, [P]),
    "ggml_backend_sched_get_buffer_size": (c_size_t, [P, P]),
    "ggml_backend_sched_get_n_splits": (c_int, [P]),
    # CPU threadpool (used when libggml-cpu is built without OpenMP)
    "ggml_threadpool_params_default": (ggml_threadpool_params, [c_int]),
    "ggml_threadpool_new": (P, [POINTER(ggml_threadpool_params)]),
    "ggml_threadpool_free": (None, [P]),
    "ggml_backend_cpu_set_threadpool": (None, [P, P]),
}

GGML_BACKEND_BUFFER_USAGE_WEIGHTS = 1

SetNThreads = ctypes.CFUNCTYPE(None, c_void_p, c_int)


def library_dir() -> pathlib.Path:
    """The folder holding llama-cpp-python's shared libraries (libggml*, libllama)."""
    override = os.environ.get("LLMRPC_GGML_LIB_DIR")
    if override:
        return pathlib.Path(override)
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama-cpp-python is not installed: pip install llama-cpp-python")
    return pathlib.Path(spec.origin).parent / "lib"


class Ggml:
    """The loaded libggml with typed functions as attributes (``ggml.ggml_add(...)``)."""

    def __init__(self, lib_dir: pathlib.Path) -> None:
        mode = getattr(ctypes, "RTLD_GLOBAL", 0)
        # libggml-base holds the core; libggml the backend registry (which links the rest).
        self._base = ctypes.CDLL(str(_find(lib_dir, "ggml-base")), mode=mode)
        self._main = ctypes.CDLL(str(_find(lib_dir, "ggml")), mode=mode)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = _lookup(name, self._main, self._base)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        # Backends built as separate modules (GGML_BACKEND_DL) register here; built-in ones
        # are already registered, and a second call is harmless.
        self.ggml_backend_load_all()
        gomp_path = _mapped_path("libgomp")
        self.gomp_path = gomp_path  # libgomp (GCC's OpenMP runtime), where ggml's CPU code uses it
        self.omp_pause_resource_all: Any = None
        if gomp_path is not None:
            try:
                gomp = ctypes.CDLL(gomp_path, mode=mode)
                self.omp_pause_resource_all = gomp.omp_pause_resource_all
                self.omp_pause_resource_all.restype = ctypes.c_int
                self.omp_pause_resource_all.argtypes = [ctypes.c_int]
            except (OSError, AttributeError):  # an OpenMP runtime without OpenMP 5.0 pause
                pass

    @property
    def uses_openmp(self) -> bool:
        return self.gomp_path is not None

    def __getattr__(self, name: str) -> Any:  # only reached for undeclared names
        raise AttributeError(f"ggml function {name!r} is not declared in llmrpc.ggml.lib")


def _mapped_path(stem: str) -> str | None:
    """The file of a shared library mapped into this process, if any (Linux; None elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if stem in pathlib.Path(path).name:
                    return path
    except (OSError, IndexError):
        pass
    return None


def _find(lib_dir: pathlib.Path, stem: str) -> pathlib.Path:
    for candidate in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        path = lib_dir / candidate
        if path.exists():
            return path
    raise RuntimeError(f"cannot find lib{stem} in {lib_dir}; is llama-cpp-python installed?")


def _lookup(name: str, *libs: ctypes.CDLL) -> Any:
    for lib in libs:
        try:
            return getattr(lib, name)
        except AttributeError:
            continue
    raise RuntimeError(f"libggml lacks {name}; llmrpc needs the pinned llama-cpp-python")


_GGML: Ggml | None = None


def ggml() -> Ggml:
    """The process-wide binding, loaded on first use."""
    global _GGML
    if _GGML is None:
        _GGML = Ggml(library_dir())
        logger.debug("loaded libggml from %s", library_dir())
    return _GGML


LogCallback = ctypes.CFUNCTYPE(None, c_int, c_char_p, c_void_p)
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_ggml_logger = logging.getLogger("ggml")
_last_level = logging.INFO


@LogCallback
def _log(level: int, text: bytes, _user: int) -> None:
    """ggml's log lines into Python's logging (logger ``ggml``): its debug notes (a tensor
    repacked, a buffer allocated) at debug, warnings at warning."""
    global _last_level
    if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line
        _last_level = _LEVELS.get(level, logging.INFO)
    message = text.decode("utf-8", "replace").rstrip("\n")
    if message:
        _ggml_logger.log(_last_level, "%s", message)


def route_logs() -> None:
    """Send ggml's logging through Python's (a server's log, filtered by its level) instead of
    straight to stderr."""
    lib = ggml()
    lib._base.ggml_log_set.restype = None
    lib._base.ggml_log_set.argtypes = [LogCallback, c_void_p]
    lib._base.ggml_log_set(_log, None)
