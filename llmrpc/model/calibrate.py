"""A short measurement of a device at server start: how fast it reads quantized weights
(decode is bandwidth-bound) and how fast it multiplies them by a batch (prefill)."""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass

from llmrpc.ggml import lib as g
from llmrpc.ggml.device import Backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    bandwidth: float  # bytes of Q4_0 weights read per second in a matrix-vector product
    matmul_flops: float  # FLOP/s of a Q4_0 matrix times a 64-column batch


def calibrate(backend: Backend, k: int = 4096, m: int = 8192, batch: int = 64) -> Calibration:
    lib = g.ggml()
    n_tensors = 8
    params = g.ggml_init_params(lib.ggml_tensor_overhead() * n_tensors, None, True)
    wctx = lib.ggml_init(params)
    w = lib.ggml_new_tensor_2d(wctx, g.GGML_TYPE_Q4_0, k, m)
    wbuf = lib.ggml_backend_alloc_ctx_tensors_from_buft(wctx, backend.buffer_type)
    lib.ggml_backend_buffer_clear(wbuf, 0)
    backends = backend.backends()
    arr = (ctypes.c_void_p * len(backends))(*backends)
    sched = lib.ggml_backend_sched_new(arr, None, len(backends), 64, False, True)
    mem = lib.ggml_tensor_overhead() * 64 + lib.ggml_graph_overhead_custom(64, False)
    try:

        def run(cols: int, reps: int) -> float:
            gp = g.ggml_init_params(mem, None, True)
            ctx = lib.ggml_init(gp)
            try:
                gf = lib.ggml_new_graph_custom(ctx, 64, False)
                x = lib.ggml_new_tensor_2d(ctx, g.GGML_TYPE_F32, k, cols)
                lib.ggml_set_input(x)
                out = lib.ggml_mul_mat(ctx, w, x)
                lib.ggml_build_forward_expand(gf, out)
                lib.ggml_backend_sched_reset(sched)
                lib.ggml_backend_sched_alloc_graph(sched, gf)
                zeros = (ctypes.c_float * (k * cols))()
                lib.ggml_backend_tensor_set(x, zeros, 0, ctypes.sizeof(zeros))
                lib.ggml_backend_sched_graph_compute(sched, gf)  # warm-up
                t0 = time.perf_counter()
                for _ in range(reps):
                    lib.ggml_backend_sched_graph_compute(sched, gf)
                return (time.perf_counter() - t0) / reps
            finally:
                lib.ggml_free(ctx)

        t_vec = run(1, 8)
        t_mat = run(batch, 2)
        nbytes = lib.ggml_nbytes(w)
        result = Calibration(bandwidth=nbytes / t_vec, matmul_flops=2.0 * k * m * batch / t_mat)
        logger.info(
            "calibration on %s: %.1f GB/s weight reads, %.1f GFLOP/s batched",
            backend.device.name, result.bandwidth / 1e9, result.matmul_flops / 1e9,
        )  # fmt: skip
        return result
    finally:
        lib.ggml_backend_sched_free(sched)
        lib.ggml_backend_buffer_free(wbuf)
        lib.ggml_free(wctx)
