"""A GGUF file's metadata, read without loading tensor data: hparams and tensor layout."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmrpc import paths
from llmrpc.model.arch import Role, is_expert_tensor, tensor_role
from llmrpc.model.families import family
from llmrpc.model.hparams import HParams, HParamsError, KeyReader, finish, read_base

logger = logging.getLogger(__name__)


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
    hparams: HParams
    tensors: dict[str, TensorInfo]
    metadata: dict[str, Any] = field(repr=False, default_factory=dict)
    # set for slice files (llmrpc.model.slicefile): the only layers the file holds
    slice_range: tuple[int, int] | None = None
    slice_model_hash: str = ""
    # tensor names by role: each layer's, and the input, shared and output ones
    _layers: dict[int, list[str]] = field(repr=False, default_factory=dict)
    _roles: dict[Role, list[str]] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.tensors:
            role, layer = tensor_role(name)
            if role is Role.REPEATING:
                assert layer is not None
                self._layers.setdefault(layer, []).append(name)
            else:
                self._roles.setdefault(role, []).append(name)

    @property
    def arch(self) -> str:
        return self.hparams.arch

    def layer_tensor_names(self, layer: int) -> list[str]:
        return list(self._layers.get(layer, []))

    def range_tensor_names(self, start: int, end: int) -> list[str]:
        """Every tensor a stage holding layers [start, end) needs, in a stable order."""
        first, last = start == 0, end == self.hparams.n_layer
        names: list[str] = []
        if first:
            names += self._roles.get(Role.INPUT, [])
        names += self._roles.get(Role.SHARED, [])
        for layer in range(start, end):
            names += self.layer_tensor_names(layer)
        if last:
            names += self._roles.get(Role.OUTPUT, [])
            if "output.weight" not in self.tensors and "token_embd.weight" not in names:
                names.append("token_embd.weight")  # tied output matrix
        return names

    def range_bytes(self, start: int, end: int) -> int:
        return sum(self.tensors[n].n_bytes for n in self.range_tensor_names(start, end))


def read_model(path: str | os.PathLike[str]) -> ModelInfo:
    """Read a GGUF's metadata and tensor layout (header only; no tensor data is loaded)."""
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
    fam = family(arch_name)

    size = os.path.getsize(path)
    tensors: dict[str, TensorInfo] = {}
    for t in header.tensors:
        n_bytes = tensor_bytes(t.name, t.ggml_type, t.shape, path)
        offset = header.data_offset + t.offset
        if offset + n_bytes > size:
            raise ValueError(f"{path}: tensor {t.name} lies past the end of the file (truncated?)")
        tensors[t.name] = TensorInfo(t.name, t.ggml_type, t.shape, offset, n_bytes)

    n_vocab = fields.get(f"{arch_name}.vocab_size")
    if n_vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        embd = tensors.get("token_embd.weight")
        n_vocab = tokens.count if isinstance(tokens, ArrayInfo) else embd.shape[1] if embd else 0
    reader = KeyReader(fields, arch_name, path)
    try:
        hp_fields = read_base(reader, int(n_vocab))
        hp_fields["rope_type"] = fam.rope_type
        fam.hparams(reader, hp_fields)
        hp = finish(hp_fields, mscale_is_log_mul=fam.mscale_is_log_mul)
    except HParamsError as e:
        raise ValueError(str(e)) from e
    check_counts(hp, tensors, path)
    info = ModelInfo(path, hp, tensors)
    if "llmrpc.slice.layer_start" in fields:
        info.slice_range = (int(fields["llmrpc.slice.layer_start"]), int(fields["llmrpc.slice.layer_end"]))
        info.slice_model_hash = str(fields.get("llmrpc.slice.model_hash", ""))
    logger.debug("read %s: %s, %d layers", path, arch_name, hp.n_layer)
    return info


_ROUTER = re.compile(r"blk\.\d+\.ffn_gate_inp\.(weight|bias)$")


def check_counts(hp: HParams, tensors: dict[str, TensorInfo], path: str) -> None:
    """The token tables have a row per token of the vocabulary, and the expert tensors and
    routers one matrix or score per expert: what a graph indexes with token ids and chosen
    experts. A contradiction would read past a tensor while computing (a ggml abort); the
    other shapes are checked where the stage's first graph is built (:mod:`llmrpc.ggml.checked`)."""
    for t in tensors.values():
        if t.name in ("token_embd.weight", "output.weight") and (len(t.shape) != 2 or t.shape[1] != hp.n_vocab):
            raise ValueError(f"{path}: {t.name} of shape {list(t.shape)} has not {hp.n_vocab} rows (the vocabulary)")
        if (is_expert_tensor(t.name) or _ROUTER.match(t.name)) and t.shape[-1] != hp.n_expert:
            raise ValueError(f"{path}: {t.name} of shape {list(t.shape)} is not for {hp.n_expert} experts")


def tensor_bytes(name: str, ggml_type: int, shape: tuple[int, ...], path: str) -> int:
    """The bytes a tensor of this type and shape takes (ValueError for a type ggml does not
    know, or a row that is not whole blocks of its type)."""
    from gguf.constants import GGML_QUANT_SIZES

    if ggml_type not in GGML_QUANT_SIZES:
        raise ValueError(f"{path}: tensor {name} has unknown type {ggml_type}")
    block, type_size = GGML_QUANT_SIZES[ggml_type]  # type: ignore[index]
    n_elements = math.prod(shape)
    if n_elements % block or shape[0] % block:
        raise ValueError(f"{path}: tensor {name} of shape {list(shape)} is not whole blocks of {block}")
    return n_elements // block * type_size


def tensor_view(path: str, t: TensorInfo) -> np.ndarray:
    """The raw bytes of one tensor, memory-mapped read-only."""
    return np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))


def content_hash(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """sha256 of the whole file: identifies a model by content, not by name. Remembered per
    (path, size, mtime, inode) in this process and in llmrpc's cache folder, so a file is
    read once, not at every start (a 40 GB model takes ~25 s to hash)."""
    key = _file_key(path)
    with _LOCK:
        if key not in _HASHES:
            record = _record(key, "")
            try:
                digest = record.read_text().strip()
            except OSError:
                digest = ""
            if len(digest) != 64:
                digest = sha256_of(path, 0, key[1], chunk)
                _remember(record, digest + "\n", path)
            _HASHES[key] = digest
        return _HASHES[key]


def tensor_digests(info: ModelInfo, names: Iterable[str]) -> dict[str, str]:
    """sha256 of each named tensor's bytes (a slice is identified by them: slicefile.py).
    Remembered as :func:`content_hash` is; each tensor is read once, when first asked for."""
    names = list(names)
    key = _file_key(info.path)
    with _LOCK:
        known = _TENSOR_HASHES.get(key)
        record = _record(key, ".tensors")
        if known is None:
            try:
                known = {str(k): str(v) for k, v in json.loads(record.read_text()).items()}
            except (OSError, ValueError, AttributeError):
                known = {}
            _TENSOR_HASHES[key] = known
        missing = [n for n in names if n not in known]
        for name in missing:
            t = info.tensors[name]
            known[name] = sha256_of(info.path, t.offset, t.n_bytes)
        if missing:
            _remember(record, json.dumps(known), info.path)
        return {n: known[n] for n in names}


def _file_key(path: str | os.PathLike[str]) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _record(key: tuple[str, int, int, int], suffix: str) -> Path:
    return paths.cache_dir("hashes") / (hashlib.sha256(repr(key).encode()).hexdigest() + suffix)


def _remember(record: Path, text: str, path: str | os.PathLike[str]) -> None:
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f"{record.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(record)
    except OSError as e:
        logger.debug("cannot remember the hashes of %s: %s", path, e)


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


_HASHES: dict[tuple[str, int, int, int], str] = {}
_TENSOR_HASHES: dict[tuple[str, int, int, int], dict[str, str]] = {}
_LOCK = threading.Lock()  # (a farm loads its ranges from several threads)
