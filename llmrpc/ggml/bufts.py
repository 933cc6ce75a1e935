"""Which buffer type holds each weight, as llama.cpp chooses it (``make_cpu_buft_list``,
``select_weight_buft``): on the CPU the device's extra buffer types come first (CPU_REPACK
rearranges Q4_0/Q4_K/Q8_0/... matrices into interleaved blocks for faster kernels; AMX,
KleidiAI where built), and a weight goes to the first one that supports the operation that
uses it; everything else stays in the device's own buffer type.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

from llmrpc.ggml import lib as g

logger = logging.getLogger(__name__)

MUL_MAT = "MUL_MAT"
MUL_MAT_ID = "MUL_MAT_ID"
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86-64


def amx_usable() -> bool:
    """Whether the kernel lets this process use AMX tiles (what llama.cpp's AMX code asks
    before it runs AMX kernels; a CPU that advertises AMX to a VM that does not enable it
    faults with SIGILL instead)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            if "amx_tile" not in f.read():
                return False
    except OSError:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0


def extra_buffer_types(dev: int) -> list[int]:
    """The device's extra buffer types, best first (none for a GPU); AMX only where it is
    usable, and none at all with ``LLMRPC_EXTRA_BUFTS=0``."""
    if os.environ.get("LLMRPC_EXTRA_BUFTS", "1") == "0":
        return []
    lib = g.ggml()
    reg = lib.ggml_backend_dev_backend_reg(dev)
    addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return []
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
    array = get(dev)
    out: list[int] = []
    i = 0
    while array and array[i]:
        buft = int(array[i])
        name = lib.ggml_backend_buft_name(buft).decode()
        if "AMX" in name and not amx_usable():
            logger.info("leaving out %s: this process may not use AMX", name)
        else:
            out.append(buft)
        i += 1
    return out


def cpu_extra_names() -> list[str]:
    """The names of the CPU device's extra buffer types llmrpc uses (e.g. ``CPU_REPACK``)."""
    lib = g.ggml()
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) == 0:  # GGML_BACKEND_DEVICE_TYPE_CPU
            return [lib.ggml_backend_buft_name(b).decode() for b in extra_buffer_types(dev)]
    return []


def _probe(ctx: int, w: g.Tensor, op: str, n_used: int) -> g.Tensor:
    """The operation llama.cpp's ``weight_buft_supported`` asks about for a weight."""
    lib, c = g.ggml(), w.contents
    f32, i32 = g.GGML_TYPE_F32, g.GGML_TYPE_I32
    if op == MUL_MAT:
        b = lib.ggml_new_tensor_4d(ctx, f32, c.ne[0], 512, c.ne[2], c.ne[3])
        return lib.ggml_mul_mat(ctx, w, b)
    b = lib.ggml_new_tensor_3d(ctx, f32, c.ne[0], n_used, 512)
    ids = lib.ggml_new_tensor_2d(ctx, i32, n_used, 512)
    return lib.ggml_mul_mat_id(ctx, w, b, ids)


def choose(dev: int, candidates: list[int], w: g.Tensor, op: str, n_used: int) -> int | None:
    """The first of ``candidates`` (extra buffer types) that supports ``op`` on weight ``w``
    (a tensor without data), or None."""
    lib = g.ggml()
    ctx = lib.ggml_init(g.ggml_init_params(lib.ggml_tensor_overhead() * 8, None, True))
    try:
        probe = _probe(ctx, w, op, max(n_used, 1))
        for buft in candidates:
            dummy = lib.ggml_backend_buft_alloc_buffer(buft, 0)
            w.contents.buffer = dummy
            try:
                supported = bool(lib.ggml_backend_dev_supports_op(dev, probe))
            finally:
                w.contents.buffer = None
                lib.ggml_backend_buffer_free(dummy)
            if supported:
                return buft
        return None
    finally:
        lib.ggml_free(ctx)
