"""A layer range's weights on its device, each in the buffer type llama.cpp gives it.

Weights keep their GGUF quantization in the file and in the slice cache; at load, matrices
that the layers' graph multiplies by go to the first of the device's extra buffer types that
supports that multiplication (on the CPU, CPU_REPACK: Q4_0, Q4_K, Q8_0, ... rearranged into
interleaved blocks as the bytes are set), the rest to the device's own buffer type. A tied
output matrix is a second copy of the token embeddings, as in llama.cpp: the embeddings are
gathered by row (plain buffer), the output multiplies (repacked).
"""

from __future__ import annotations

import ctypes
import logging
from collections import Counter
from collections.abc import Callable

from llmrpc.ggml import bufts
from llmrpc.ggml import lib as g
from llmrpc.ggml.device import Backend, prefer_huge_pages
from llmrpc.model.gguf_model import ModelInfo, tensor_view

logger = logging.getLogger(__name__)

TOKEN_EMBD, OUTPUT = "token_embd.weight", "output.weight"
# which weights a graph multiplies by: {name: bufts.MUL_MAT or bufts.MUL_MAT_ID}
WeightOps = Callable[[dict[str, g.Tensor]], dict[str, str]]


def stage_sources(info: ModelInfo, start: int, end: int) -> dict[str, str]:
    """Each tensor a stage holds, by the name its graph uses, and the file tensor it is read
    from (a tied output: ``output.weight`` from the token embeddings)."""
    names = info.range_tensor_names(start, end)
    sources = {n: n for n in names}
    if end == info.hparams.n_layer and OUTPUT not in info.tensors:
        sources[OUTPUT] = TOKEN_EMBD
        if start != 0:
            del sources[TOKEN_EMBD]
    return sources


class StageWeights:
    def __init__(
        self, info: ModelInfo, start: int, end: int, backend: Backend, weight_ops: WeightOps,
        progress: Callable[[int], None] | None = None,
    ) -> None:  # fmt: skip
        self.info = info
        self.backend = backend
        self.sources = stage_sources(info, start, end)
        self.tensors: dict[str, g.Tensor] = {}
        self.n_bytes = 0
        self._ctxs: list[int] = []
        self._buffers: list[int] = []
        self.placement: dict[str, str] = {}  # tensor name -> buffer type name
        try:
            self._allocate(self._choose(weight_ops))
            self._upload(progress)
        except BaseException:
            self.close()
            raise
        logger.info(
            "loaded layers [%d, %d) of %s: %d tensors, %.1f MiB on %s (%s)", start, end, info.path,
            len(self.tensors), self.n_bytes / 2**20, backend.device.name,
            ", ".join(f"{n} {name}" for name, n in Counter(self.placement.values()).items()),
        )  # fmt: skip

    def _new(self, ctx: int, name: str) -> g.Tensor:
        lib = g.ggml()
        t = self.info.tensors[self.sources[name]]
        ne = (ctypes.c_int64 * len(t.shape))(*t.shape)
        tensor = lib.ggml_new_tensor(ctx, t.ggml_type, len(t.shape), ne)
        lib.ggml_set_name(tensor, name.encode())
        if lib.ggml_nbytes(tensor) != t.n_bytes:
            raise ValueError(f"{name}: size in file does not match its type and shape")
        return tensor

    def _choose(self, weight_ops: WeightOps) -> dict[str, int]:
        """The buffer type of every tensor: found with tensors without data, and a graph of
        the layers built over them that says which ones each multiplication reads."""
        lib = g.ggml()
        default = self.backend.buffer_type
        extra = bufts.extra_buffer_types(self.backend.dev) if self.backend.device.kind == "cpu" else []
        ctx = lib.ggml_init(g.ggml_init_params(lib.ggml_tensor_overhead() * (len(self.sources) + 1), None, True))
        try:
            meta = {name: self._new(ctx, name) for name in self.sources}
            ops = weight_ops(meta)
            n_used = self.info.hparams.n_expert_used
            return {
                name: (bufts.choose(self.backend.dev, extra, meta[name], ops[name], n_used) if name in ops else None)
                or default
                for name in self.sources
            }
        finally:
            lib.ggml_free(ctx)

    def _allocate(self, chosen: dict[str, int]) -> None:
        lib = g.ggml()
        for buft in dict.fromkeys(chosen.values()):
            names = [n for n, b in chosen.items() if b == buft]
            ctx = lib.ggml_init(g.ggml_init_params(lib.ggml_tensor_overhead() * (len(names) + 1), None, True))
            self._ctxs.append(ctx)
            for name in names:
                self.tensors[name] = self._new(ctx, name)
            buffer = lib.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
            if not buffer:
                size = sum(self.info.tensors[self.sources[n]].n_bytes for n in names)
                raise MemoryError(f"cannot allocate {size} bytes of weights on {self.backend.device.name}")
            self._buffers.append(buffer)
            lib.ggml_backend_buffer_set_usage(buffer, g.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
            prefer_huge_pages(buffer)
            kind = lib.ggml_backend_buft_name(buft).decode()
            self.placement.update(dict.fromkeys(names, kind))

    def _upload(self, progress: Callable[[int], None] | None) -> None:
        """Each tensor's bytes, set whole (an extra buffer type rearranges them as they come)."""
        lib = g.ggml()
        for name, tensor in self.tensors.items():
            data = tensor_view(self.info.path, self.info.tensors[self.sources[name]])
            lib.ggml_backend_tensor_set(tensor, data.ctypes.data, 0, data.nbytes)
            self.n_bytes += data.nbytes
            if progress is not None:
                progress(data.nbytes)
            del data

    def close(self) -> None:
        lib = g.ggml()
        for buffer in self._buffers:
            lib.ggml_backend_buffer_free(buffer)
        for ctx in self._ctxs:
            lib.ggml_free(ctx)
        self._buffers, self._ctxs = [], []
