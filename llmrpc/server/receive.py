"""Receiving a pushed slice: its header checked before anything is written, its bytes written to a
file of its own, checked chunk by chunk (crc32) and hashed (sha256) as they arrive.

What the server keeps is identified by what it computed, never by what the sender claimed: the
slice's digest (:func:`llmrpc.model.slicefile.slice_digest`) from the header it received and the
sha256 of every tensor's bytes. The header is checked as ggml needs it (1 to 4 dimensions, sizes
that match each tensor's type and shape, tensors inside the data section, in order) and must say
what the push says (model hash, layer range, tensor table).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llmrpc.model.gguf_model import tensor_bytes
from llmrpc.model.gguf_reader import parse_header
from llmrpc.model.slicefile import KEY_END, KEY_HASH, KEY_START, IncomingSlice, SliceTensor, slice_digest

logger = logging.getLogger(__name__)

Chunk = tuple[int, int, bytes | memoryview, int]  # tensor index, offset in it, bytes, crc32


class TransferError(ValueError):
    """A pushed slice that is malformed, incomplete or corrupted; nothing was kept."""


@dataclass(frozen=True)
class Received:
    """A slice written and checked, under a temporary name until the store keeps it."""

    tmp: Path
    digest: str
    manifest: dict[str, object]
    tensor_bytes: int


def check_slice(head: IncomingSlice, max_bytes: int) -> None:
    """Refuse a slice whose header ggml could not take or that disagrees with the push."""
    if not head.header.startswith(b"GGUF"):
        raise TransferError("the slice header is not a GGUF header")
    if head.data_size > max_bytes:
        raise TransferError(f"the slice needs {head.data_size} bytes; this server may hold {max_bytes}")
    try:
        parsed = parse_header(head.header, "the slice header")
        claims = (parsed.fields.get(KEY_HASH), parsed.fields.get(KEY_START), parsed.fields.get(KEY_END))
        if claims != (head.model_hash, head.layer_start, head.layer_end):
            raise TransferError("the slice header names another model or layer range than the push")
        if parsed.data_offset != len(head.header):
            raise TransferError(
                f"the slice header is {len(head.header)} bytes; its data starts at {parsed.data_offset}"
            )
        if [t.name for t in parsed.tensors] != [t.name for t in head.tensors]:
            raise TransferError("the slice header lists other tensors than the push")
        end = 0
        for raw, t in zip(parsed.tensors, head.tensors, strict=True):
            n_bytes = tensor_bytes(raw.name, raw.ggml_type, raw.shape, "the slice header")
            if (raw.offset, n_bytes) != (t.offset, t.n_bytes):
                raise TransferError(f"tensor {t.name}: the header says {n_bytes} bytes at {raw.offset}")
            if t.offset < end or t.offset + t.n_bytes > head.data_size:
                raise TransferError(f"tensor {t.name} lies outside the slice's data section or overlaps another")
            end = t.offset + t.n_bytes
    except TransferError:
        raise
    except ValueError as e:  # GGUFFormatError included
        raise TransferError(str(e)) from e
    if head.data_size - end >= parsed.alignment:
        raise TransferError(f"the slice's data section is {head.data_size} bytes; its tensors end at {end}")


def receive(head: IncomingSlice, chunks: Iterable[Chunk], tmp: Path) -> Received:
    """Write a checked slice (:func:`check_slice`) to ``tmp``; removed again on any failure."""
    hashers = _Hashers(len(head.tensors))
    chunk_crcs: list[list[tuple[int, int, int]]] = [[] for _ in head.tensors]
    filled = [0] * len(head.tensors)
    base = len(head.header)
    received = 0
    try:
        with open(tmp, "xb") as f:
            f.write(head.header)
            f.truncate(base + head.data_size)
            for index, offset, data, crc in chunks:
                if not 0 <= index < len(head.tensors):
                    raise TransferError(f"chunk for tensor {index}; the slice has {len(head.tensors)}")
                t = head.tensors[index]
                if offset != filled[index]:
                    raise TransferError(f"{t.name}: chunk at {offset}, expected {filled[index]} (chunks come in order)")
                if offset + len(data) > t.n_bytes:
                    raise TransferError(f"{t.name}: chunk ends at {offset + len(data)}, past {t.n_bytes} bytes")
                if zlib.crc32(data) != crc:
                    raise TransferError(f"{t.name}: chunk at {offset} is corrupted (crc32 mismatch)")
                os.pwrite(f.fileno(), data, base + t.offset + offset)
                chunk_crcs[index].append((offset, len(data), crc))
                hashers.update(index, data)
                filled[index] += len(data)
                received += len(data)
        digests = hashers.finish()
        for t, n in zip(head.tensors, filled, strict=True):
            if n != t.n_bytes:
                raise TransferError(f"{t.name}: received {n} of {t.n_bytes} bytes (transfer interrupted)")
        kept = []
        for t, digest in zip(head.tensors, digests, strict=True):
            if t.sha256 and digest != t.sha256:
                raise TransferError(f"{t.name}: content does not match its sha256")
            kept.append(SliceTensor(t.name, t.offset, t.n_bytes, digest))
        header_sha256 = hashlib.sha256(head.header).hexdigest()
        manifest = {
            "model_hash": head.model_hash,
            "layer_start": head.layer_start,
            "layer_end": head.layer_end,
            "tensor_bytes": received,
            "header_size": base,
            "header_sha256": header_sha256,
            "tensors": [t.__dict__ | {"chunks": crcs} for t, crcs in zip(kept, chunk_crcs, strict=True)],
        }
    except BaseException:
        hashers.finish()
        tmp.unlink(missing_ok=True)
        raise
    return Received(tmp, slice_digest(header_sha256, kept), manifest, received)


class _Hashers:
    """sha256 of each tensor, computed on a thread of its own while the next chunk arrives
    (hashlib releases the GIL), so hashing does not slow the transfer."""

    def __init__(self, n: int) -> None:
        self._h = [hashlib.sha256() for _ in range(n)]
        self._q: queue.Queue[tuple[int, bytes | memoryview] | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, daemon=True, name="slice-sha256")
        self._thread.start()
        self._done = False

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            self._h[item[0]].update(item[1])

    def update(self, index: int, data: bytes | memoryview) -> None:
        self._q.put((index, data))

    def finish(self) -> list[str]:
        if not self._done:
            self._done = True
            self._q.put(None)
            self._thread.join()
        return [h.hexdigest() for h in self._h]
