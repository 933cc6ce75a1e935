"""A GGUF file's metadata, read without loading tensor data: hparams and tensor layout."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmrpc.model.arch import Architecture, Role, TensorSpec, architecture

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters of a llama-family model, read from ``{arch}.*`` GGUF keys."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    head_dim: int  # n_embd_head_k == n_embd_head_v for this family
    n_rot: int
    rms_eps: float
    rope_freq_base: float
    rope_freq_scale: float
    attn_scale: float  # multiplier of Q.K before softmax

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # ggml order: ne[0] first
    offset: int  # absolute offset of the data in the file
    n_bytes: int


@dataclass
class ModelInfo:
    path: str
    arch: Architecture
    hparams: HParams
    tensors: dict[str, TensorInfo]
    metadata: dict[str, Any] = field(repr=False, default_factory=dict)
    # set for slice files (llmrpc.model.slicefile): the only layers the file holds
    slice_range: tuple[int, int] | None = None
    slice_model_hash: str = ""

    def layer_tensor_names(self, layer: int) -> list[str]:
        return self._names([s for s in self.arch.tensors if s.role is Role.REPEATING], layer)

    def range_tensor_names(self, start: int, end: int) -> list[str]:
        """Every tensor a stage holding layers [start, end) needs, in a stable order."""
        first, last = start == 0, end == self.hparams.n_layer
        names: list[str] = []
        for spec in self.arch.tensors:
            if spec.role is Role.INPUT and first:
                names += self._names([spec], None)
            elif spec.role is Role.SHARED:
                names += self._names([spec], None)
        for layer in range(start, end):
            names += self.layer_tensor_names(layer)
        if last:
            for spec in self.arch.tensors:
                if spec.role is Role.OUTPUT:
                    names += self._names([spec], None)
            if "output.weight" not in self.tensors and "token_embd.weight" not in names:
                names.append("token_embd.weight")  # tied output matrix
        return names

    def range_bytes(self, start: int, end: int) -> int:
        return sum(self.tensors[n].n_bytes for n in self.range_tensor_names(start, end))

    def _names(self, specs: list[TensorSpec], bid: int | None) -> list[str]:
        out = []
        for spec in specs:
            for suffix in ("weight", "bias"):
                name = spec.name(bid, suffix)
                if name in self.tensors:
                    out.append(name)
                elif suffix == "weight" and spec.required:
                    raise ValueError(f"{self.path}: required tensor {name} is missing")
        return out


def read_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Read a GGUF's metadata and tensor layout (header only; no tensor data is loaded)."""
    from gguf.constants import GGML_QUANT_SIZES

    from llmrpc.model.gguf_reader import ArrayInfo, GGUFFormatError, read_header

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        header = read_header(path)
    except GGUFFormatError as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    fields = header.fields
    arch_name = fields.get("general.architecture")
    if not isinstance(arch_name, str):
        raise ValueError(f"{path}: general.architecture is missing")
    arch = architecture(arch_name)

    def key(suffix: str, default: Any = None) -> Any:
        value = fields.get(f"{arch_name}.{suffix}")
        if value is None:
            if default is None:
                raise ValueError(f"{path}: GGUF key {arch_name}.{suffix} is missing")
            return default
        return value

    size = os.path.getsize(path)
    tensors: dict[str, TensorInfo] = {}
    for t in header.tensors:
        if t.ggml_type not in GGML_QUANT_SIZES:
            raise ValueError(f"{path}: tensor {t.name} has unknown type {t.ggml_type}")
        block, type_size = GGML_QUANT_SIZES[t.ggml_type]  # type: ignore[index]
        n_elements = math.prod(t.shape)
        if n_elements % block:
            raise ValueError(f"{path}: tensor {t.name} of {n_elements} elements is not whole blocks of {block}")
        n_bytes = n_elements // block * type_size
        offset = header.data_offset + t.offset
        if offset + n_bytes > size:
            raise ValueError(f"{path}: tensor {t.name} lies past the end of the file (truncated?)")
        tensors[t.name] = TensorInfo(t.name, t.ggml_type, t.shape, offset, n_bytes)

    n_embd = int(key("embedding_length"))
    n_head = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", n_embd // n_head))
    n_vocab = fields.get(f"{arch_name}.vocab_size")
    if n_vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        n_vocab = tokens.count if isinstance(tokens, ArrayInfo) else tensors["token_embd.weight"].shape[1]
    scaling = fields.get(f"{arch_name}.rope.scaling.factor")
    attn_scale = fields.get(f"{arch_name}.attention.scale")
    hp = HParams(
        arch=arch_name,
        n_layer=int(key("block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(key("attention.head_count_kv", n_head)),
        n_ff=int(key("feed_forward_length")),
        n_vocab=int(n_vocab),
        n_ctx_train=int(key("context_length")),
        head_dim=head_dim,
        n_rot=int(key("rope.dimension_count", head_dim)),
        rms_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_freq_base=float(key("rope.freq_base", 10000.0)),
        rope_freq_scale=1.0 / float(scaling) if scaling else 1.0,
        attn_scale=float(attn_scale) if attn_scale else 1.0 / math.sqrt(head_dim),
    )
    info = ModelInfo(path, arch, hp, tensors)
    if "llmrpc.slice.layer_start" in fields:
        info.slice_range = (int(fields["llmrpc.slice.layer_start"]), int(fields["llmrpc.slice.layer_end"]))
        info.slice_model_hash = str(fields.get("llmrpc.slice.model_hash", ""))
    info.range_tensor_names(*(info.slice_range or (0, hp.n_layer)))  # every required tensor is present
    logger.debug("read %s: %s, %d layers", path, arch_name, hp.n_layer)
    return info


def tensor_view(path: str, t: TensorInfo) -> np.ndarray:
    """The raw bytes of one tensor, memory-mapped read-only."""
    return np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))


def content_hash(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """sha256 of the whole file: identifies a model by content, not by name. Memoized per
    (path, size, mtime) in this process, so a file is read once."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_of(path, 0, st.st_size, chunk)
    return _HASHES[key]


def sha256_of(path: str | os.PathLike[str], offset: int, n_bytes: int, chunk: int = 1 << 22) -> str:
    """sha256 of ``n_bytes`` of a file from ``offset``, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = n_bytes
        while left:
            block = f.read(min(chunk, left))
            if not block:
                raise ValueError(f"{os.fspath(path)} ends before byte {offset + n_bytes}")
            h.update(block)
            left -= len(block)
    return h.hexdigest()


_HASHES: dict[tuple[str, int, int], str] = {}
