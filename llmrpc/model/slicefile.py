"""Slice GGUF files: the tensors of one layer range plus the whole model's metadata.

The head builds a slice's header (metadata copied byte for byte from the model, tensor infos
for the range, three ``llmrpc.slice.*`` keys) and streams exactly the range's tensor bytes;
the server writes them at their offsets and ends up with an ordinary GGUF it can load.

A slice is identified by its digest (:func:`slice_digest`): the sha256 of its header and of
each tensor's bytes, which the head knows from its own file and the server computes from what
it received. A server keeps slices under their digest and a head asks for one by it, so a slice
is only ever given to a head whose own file has exactly those bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from llmrpc.model.gguf_model import ModelInfo, tensor_digests

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
KEY_HASH = "llmrpc.slice.model_hash"
KEY_START = "llmrpc.slice.layer_start"
KEY_END = "llmrpc.slice.layer_end"
_UINT32, _STRING = 4, 8  # GGUFValueType


@dataclass(frozen=True)
class SliceTensor:
    name: str
    offset: int  # from the start of the data section
    n_bytes: int
    sha256: str


@dataclass(frozen=True)
class SliceLayout:
    header: bytes  # everything before the data section, padded to the alignment
    tensors: tuple[SliceTensor, ...]
    data_size: int

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def digest(self) -> str:
        return slice_digest(hashlib.sha256(self.header).hexdigest(), self.tensors)


def slice_digest(header_sha256: str, tensors: Sequence[SliceTensor]) -> str:
    """What identifies a slice: its header's sha256 and its tensors' sizes and sha256, in order."""
    h = hashlib.sha256(b"llmrpc slice 1\n" + header_sha256.encode() + b"\n")
    for t in tensors:
        h.update(f"{t.n_bytes} {t.sha256}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class IncomingSlice:
    """A slice as a server receives it: where it belongs and how its data section is laid out."""

    model_hash: str
    layer_start: int
    layer_end: int
    header: bytes
    data_size: int
    tensors: tuple[SliceTensor, ...]


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def build_slice_layout(info: ModelInfo, start: int, end: int, model_hash: str) -> SliceLayout:
    """The slice's header and data layout, with each tensor's sha256 (read from the model once,
    then remembered: gguf_model.tensor_digests)."""
    from llmrpc.model.gguf_reader import read_header

    header_info = read_header(info.path)
    align = header_info.alignment
    kv = bytearray()
    n_kv = 0
    with open(info.path, "rb") as f:
        for key, (a, b) in header_info.kv_spans.items():
            if key.startswith("llmrpc.slice."):
                continue
            f.seek(a)
            kv += f.read(b - a)
            n_kv += 1
    for key, vtype, value in (
        (KEY_HASH, _STRING, _string(model_hash)),
        (KEY_START, _UINT32, struct.pack("<I", start)),
        (KEY_END, _UINT32, struct.pack("<I", end)),
    ):
        kv += _string(key) + struct.pack("<I", vtype) + value
        n_kv += 1
    names = info.range_tensor_names(start, end)
    digests = tensor_digests(info, names)
    ti = bytearray()
    tensors = []
    offset = 0
    for name in names:
        t = info.tensors[name]
        ti += _string(name) + struct.pack("<I", len(t.shape))
        ti += b"".join(struct.pack("<Q", d) for d in t.shape)
        ti += struct.pack("<IQ", t.ggml_type, offset)
        tensors.append(SliceTensor(name, offset, t.n_bytes, digests[name]))
        offset = _pad(offset + t.n_bytes, align)
    head = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(names), n_kv) + bytes(kv) + bytes(ti)
    header = head + b"\0" * (_pad(len(head), align) - len(head))
    return SliceLayout(header, tuple(tensors), offset)
