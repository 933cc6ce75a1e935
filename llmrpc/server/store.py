"""Where a server finds weights: its cache of received slices and its model directories.

Models are matched by the sha256 of the whole GGUF, never by file name. A received slice is
written to a temporary file, checked chunk by chunk (crc32) and tensor by tensor (sha256),
and only then renamed into the cache; a cached slice is checked again before it is loaded,
and one that fails is deleted so that the head ships it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path

from llmrpc import paths
from llmrpc.model.gguf_model import content_hash
from llmrpc.model.slicefile import IncomingSlice, SliceTensor
from llmrpc.types import CachedSlice

logger = logging.getLogger(__name__)


class TransferError(ValueError):
    """A pushed slice that is malformed, incomplete or corrupted; nothing was kept."""


def default_cache_dir() -> Path:
    return paths.cache_dir("slices")


class WeightStore:
    def __init__(self, cache_dir: Path, model_dirs: Iterable[Path] = ()) -> None:
        self.cache_dir = cache_dir
        self.model_dirs = [Path(d) for d in model_dirs]
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    # -- lookup -------------------------------------------------------------------------
    def _slice_path(self, model_hash: str, start: int, end: int) -> Path:
        if not all(c in "0123456789abcdef" for c in model_hash) or len(model_hash) != 64:
            raise ValueError(f"model hash {model_hash!r} is not a sha256 hex digest")
        return self.cache_dir / model_hash / f"{start}-{end}.gguf"

    def cached(self) -> list[CachedSlice]:
        out = []
        for manifest in sorted(self.cache_dir.glob("*/*.json")):
            try:
                m = json.loads(manifest.read_text())
                out.append(CachedSlice(m["model_hash"], m["layer_start"], m["layer_end"], m["tensor_bytes"]))
            except (OSError, ValueError, KeyError):
                continue
        return out

    def verified_slice(self, model_hash: str, start: int, end: int) -> str | None:
        """The cached slice's path if it is intact; a damaged one is removed."""
        path = self._slice_path(model_hash, start, end)
        manifest = path.with_suffix(".json")
        if not path.exists() or not manifest.exists():
            return None
        try:
            m = json.loads(manifest.read_text())
            header_size = int(m["header_size"])
            with open(path, "rb") as f:
                if hashlib.sha256(f.read(header_size)).hexdigest() != m["header_sha256"]:
                    raise TransferError("header checksum mismatch")
                for t in m["tensors"]:
                    # each chunk's crc32 as received (cheap to recheck), or the tensor's sha256
                    for off, n, crc in t.get("chunks") or []:
                        f.seek(header_size + t["offset"] + off)
                        if zlib.crc32(f.read(n)) != crc:
                            raise TransferError(f"tensor {t['name']} checksum mismatch at {off}")
                    if not t.get("chunks"):
                        f.seek(header_size + t["offset"])
                        if hashlib.sha256(f.read(t["n_bytes"])).hexdigest() != t["sha256"]:
                            raise TransferError(f"tensor {t['name']} checksum mismatch")
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("cached slice %s is damaged (%s); removing it", path, e)
            path.unlink(missing_ok=True)
            manifest.unlink(missing_ok=True)
            return None
        return str(path)

    def model_file(self, model_hash: str) -> str | None:
        for d in self.model_dirs:
            for path in sorted(d.glob("*.gguf")):
                try:
                    if content_hash(path) == model_hash:
                        return str(path)
                except OSError:
                    continue
        return None

    # -- receiving ----------------------------------------------------------------------
    def receive(
        self, head: IncomingSlice, chunks: Iterable[tuple[int, int, bytes | memoryview, int]], max_bytes: int
    ) -> tuple[str, int]:
        """Write a pushed slice; returns (path, tensor bytes received)."""
        _check_layout(head, max_bytes)
        path = self._slice_path(head.model_hash, head.layer_start, head.layer_end)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".part{os.getpid()}")
        # sha256 only when the sender gave digests to compare with (PushSlice); otherwise the
        # chunks' crc32, checked on arrival, are what the cache is verified against later.
        hashers = _Hashers(len(head.tensors)) if any(t.sha256 for t in head.tensors) else None
        chunk_crcs: list[list[tuple[int, int, int]]] = [[] for _ in head.tensors]
        filled = [0] * len(head.tensors)
        base = len(head.header)
        received = 0
        try:
            with open(tmp, "wb") as f:
                f.write(head.header)
                f.truncate(base + head.data_size)
                for index, offset, data, crc in chunks:
                    if not 0 <= index < len(head.tensors):
                        raise TransferError(f"chunk for tensor {index}; the slice has {len(head.tensors)}")
                    t = head.tensors[index]
                    if offset != filled[index]:
                        raise TransferError(
                            f"{t.name}: chunk at {offset}, expected {filled[index]} (chunks come in order)"
                        )
                    if offset + len(data) > t.n_bytes:
                        raise TransferError(f"{t.name}: chunk ends at {offset + len(data)}, past {t.n_bytes} bytes")
                    if zlib.crc32(data) != crc:
                        raise TransferError(f"{t.name}: chunk at {offset} is corrupted (crc32 mismatch)")
                    os.pwrite(f.fileno(), data, base + t.offset + offset)
                    chunk_crcs[index].append((offset, len(data), crc))
                    if hashers is not None:
                        hashers.update(index, data)
                    filled[index] += len(data)
                    received += len(data)
            digests = hashers.finish() if hashers is not None else [""] * len(head.tensors)
            for t, n in zip(head.tensors, filled, strict=True):
                if n != t.n_bytes:
                    raise TransferError(f"{t.name}: received {n} of {t.n_bytes} bytes (transfer interrupted)")
            tensors = []
            for t, digest, crcs in zip(head.tensors, digests, chunk_crcs, strict=True):
                if t.sha256 and digest != t.sha256:
                    raise TransferError(f"{t.name}: content does not match its sha256")
                tensors.append(SliceTensor(t.name, t.offset, t.n_bytes, digest).__dict__ | {"chunks": crcs})
            manifest = {
                "model_hash": head.model_hash,
                "layer_start": head.layer_start,
                "layer_end": head.layer_end,
                "tensor_bytes": received,
                "header_size": base,
                "header_sha256": hashlib.sha256(head.header).hexdigest(),
                "tensors": tensors,
            }
            os.replace(tmp, path)
            path.with_suffix(".json").write_text(json.dumps(manifest))
        except BaseException:
            if hashers is not None:
                hashers.finish()
            tmp.unlink(missing_ok=True)
            raise
        logger.info(
            "received slice [%d, %d) of %s: %d bytes", head.layer_start, head.layer_end, head.model_hash[:12], received
        )
        return str(path), received


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


def _check_layout(head: IncomingSlice, max_bytes: int) -> None:
    if not head.header.startswith(b"GGUF"):
        raise TransferError("the slice header is not a GGUF header")
    if head.data_size > max_bytes:
        raise TransferError(f"the slice needs {head.data_size} bytes; this server may hold {max_bytes}")
    end = 0
    for t in head.tensors:
        if t.offset < end or t.offset + t.n_bytes > head.data_size:
            raise TransferError(f"tensor {t.name} lies outside the slice's data section or overlaps another")
        end = t.offset + t.n_bytes
