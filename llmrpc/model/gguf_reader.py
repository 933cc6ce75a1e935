"""A fast GGUF header reader: metadata scalars, array lengths, tensor infos, byte spans.

gguf-py's GGUFReader builds a numpy view for every element of every array (a 49k-token
vocabulary costs seconds); llmrpc only needs scalars, array lengths and tensor layout, so
this reads the header with ``struct`` from a memory map and skips array contents.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
SMALL_ARRAY = 4096  # numeric arrays this short are read (per-layer hyper-parameters), longer ones skipped
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS: a tensor with more (or none) aborts ggml_new_tensor
MAX_DIM = 1 << 62  # a dimension, and a tensor's elements, at most (ggml's int64 sizes, with room for bytes)


class GGUFFormatError(ValueError):
    pass


@dataclass(frozen=True)
class ArrayInfo:
    """An array value: its element type and length (contents are not read)."""

    elem_type: int
    count: int
    values: tuple[Any, ...] | None = None  # numeric arrays of up to SMALL_ARRAY elements


@dataclass(frozen=True)
class RawTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] first
    ggml_type: int
    offset: int  # relative to the data section


@dataclass
class GGUFHeader:
    version: int
    fields: dict[str, Any]
    tensors: list[RawTensorInfo]
    kv_span: tuple[int, int]  # byte range of the key-value section
    data_offset: int  # absolute start of the data section
    alignment: int
    kv_spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # each key's raw bytes


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # empty file
            raise GGUFFormatError(f"{os.fspath(path)} is empty") from e
    try:
        return parse_header(mm, os.fspath(path))
    finally:
        mm.close()


def parse_header(buf: mmap.mmap | bytes, path: str) -> GGUFHeader:
    """The header of a GGUF held in ``buf`` (``path`` names it in errors). Every tensor info is
    checked as ggml needs it: 1 to 4 dimensions, each at least 1, a name used once."""
    try:
        return _parse(buf, path)
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise GGUFFormatError(f"{path}: truncated or malformed GGUF header ({e})") from e


def _parse(buf: mmap.mmap | bytes, path: str) -> GGUFHeader:
    if buf[:4] != GGUF_MAGIC:
        raise GGUFFormatError(f"{path} is not a GGUF file (bad magic)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported")
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, p)
        return bytes(buf[p + 8 : p + 8 + n]).decode("utf-8"), p + 8 + n

    def value(vtype: int, p: int) -> tuple[Any, int]:
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype]
            return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)
        if vtype == _STRING:
            return string(p)
        if vtype == _ARRAY:
            elem, count = struct.unpack_from("<IQ", buf, p)
            p += 12
            if elem in _SCALARS:
                size = struct.calcsize(_SCALARS[elem])
                values = None
                if count <= SMALL_ARRAY:
                    values = struct.unpack_from(f"<{count}{_SCALARS[elem][1]}", buf, p)
                p += size * count
                return ArrayInfo(elem, count, values), p
            elif elem == _STRING:
                for _ in range(count):
                    (n,) = struct.unpack_from("<Q", buf, p)
                    p += 8 + n
            else:
                for _ in range(count):
                    _, p = value(elem, p)
            return ArrayInfo(elem, count), p
        raise GGUFFormatError(f"{path}: unknown metadata value type {vtype}")

    fields: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    kv_start = pos
    for _ in range(n_kv):
        start = pos
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        fields[key], pos = value(vtype, pos + 4)
        spans[key] = (start, pos)
    kv_end = pos
    tensors = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFFormatError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        if not all(1 <= d <= MAX_DIM for d in dims) or math.prod(dims) > MAX_DIM:
            raise GGUFFormatError(f"{path}: tensor {name!r} has shape {list(dims)} (each dimension 1 to 2^62)")
        if name in names:
            raise GGUFFormatError(f"{path}: tensor {name!r} is listed twice")
        names.add(name)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors.append(RawTensorInfo(name, tuple(int(d) for d in dims), int(ggml_type), int(offset)))
    alignment = fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-pos // alignment) * alignment
    return GGUFHeader(version, fields, tensors, (kv_start, kv_end), data_offset, alignment, spans)
