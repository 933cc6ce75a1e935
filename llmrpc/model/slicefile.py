"""Slice GGUF files: the tensors of one layer range plus the whole model's metadata.

The head builds a slice's header (metadata copied byte for byte from the model, tensor infos
for the range, three ``llmrpc.slice.*`` keys) and streams exactly the range's tensor bytes;
the server writes them at their offsets and ends up with an ordinary GGUF it can load.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from llmrpc.model.gguf_model import ModelInfo, sha256_of

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


def build_slice_layout(info: ModelInfo, start: int, end: int, model_hash: str, *, digests: bool = True) -> SliceLayout:
    """The slice's header and data layout; ``digests=False`` leaves the tensors' sha256 for the
    receiver to compute (the bulk path checks each frame with crc32 instead)."""
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
    ti = bytearray()
    tensors = []
    offset = 0
    for name in names:
        t = info.tensors[name]
        ti += _string(name) + struct.pack("<I", len(t.shape))
        ti += b"".join(struct.pack("<Q", d) for d in t.shape)
        ti += struct.pack("<IQ", t.ggml_type, offset)
        digest = sha256_of(info.path, t.offset, t.n_bytes) if digests else ""
        tensors.append(SliceTensor(name, offset, t.n_bytes, digest))
        offset = _pad(offset + t.n_bytes, align)
    head = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(names), n_kv) + bytes(kv) + bytes(ti)
    header = head + b"\0" * (_pad(len(head), align) - len(head))
    return SliceLayout(header, tuple(tensors), offset)
