"""A new session's KV cache started from the first rows of another's, on one stage.

The cells of positions 0..rows-1 keep the bits they were computed with; what makes them the
bits a new computation would have is the head's part (it reuses only rows computed in the
layout a new session computes them in, :mod:`llmrpc.head.prefix`). Here: which caches can give
their rows (a sliding-window ring must hold them where a new sequence puts them), and the copy.
"""

from __future__ import annotations

import logging

from llmrpc.ggml import lib as g
from llmrpc.model.stage import SessionCache

logger = logging.getLogger(__name__)


def refusal(cache: SessionCache, rows: int, kv_size: int) -> str:
    """Why a session of ``kv_size`` cells cannot start from the first ``rows`` positions of
    ``cache`` ("" when it can)."""
    if cache.kv_size != kv_size:
        return f"the prefix's cache has {cache.kv_size} cells, the new session {kv_size}"
    for name, ring in cache.sliding.items():
        if not ring.holds_in_order(rows):
            return (
                f"the {name} layers' sliding-window cache ({ring.size} cells) no longer holds positions 0..{rows - 1} "
                "where a new session computes them"
            )
    return ""


def start_from(cache: SessionCache, rows: int) -> None:
    """Make ``cache`` (checked with :func:`refusal`) a session that holds positions 0..rows-1:
    its rings as a new sequence's after those rows. Cells past them keep what they held (finite
    values, masked until overwritten)."""
    for ring in cache.sliding.values():
        ring.start_at(rows)


def copy_cells(src: SessionCache, dst: SessionCache) -> None:
    """Every K and V cell of ``src`` into ``dst`` (caches of one stage and one size), on the
    device (a device-to-device copy on a GPU, a memcpy on the CPU)."""
    lib = g.ggml()
    for il, layer in src.layers.items():
        target = dst.layers[il]
        lib.ggml_backend_tensor_copy(layer.k, target.k)
        if layer.v is not None and target.v is not None:
            lib.ggml_backend_tensor_copy(layer.v, target.v)
