"""Where a server finds weights: its cache of received slices and its model directories.

Received slices are kept under the digest the server computed while receiving them
(receive.py), and found by the digest a head asks for: a slice pushed under another model's
hash is never given to a head that loads that model. A cached slice is checked again (crc32 of
its chunks) before it is loaded, and one that fails is deleted so that the head ships it again.

The cache holds at most ``max_bytes`` on disk (``--cache-max``): room for a push is reserved
before anything is written, by removing the least recently used slices other than the loaded
one, and a push that cannot fit is refused. Model directories are matched by content hash, and
a path a head names is used only inside them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

from llmrpc import paths
from llmrpc.model.gguf_model import content_hash
from llmrpc.model.slicefile import IncomingSlice
from llmrpc.server.receive import Chunk, TransferError, check_slice, receive
from llmrpc.types import CachedSlice

logger = logging.getLogger(__name__)

STALE_PART = 24 * 3600  # seconds after which a partial upload left by a process that ended is removed


def default_cache_dir() -> Path:
    return paths.cache_dir("slices")


def default_cache_max(cache_dir: Path) -> int:
    """Half the size of the filesystem the cache is on."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(cache_dir).total // 2


class CacheFullError(TransferError):
    """A slice the cache has no room for (--cache-max); nothing was written."""


class Reservation:
    """Room in the cache for one push, held until it is kept or refused."""

    def __init__(self, store: WeightStore, head: IncomingSlice, n_bytes: int) -> None:
        self.store, self.head, self.n_bytes = store, head, n_bytes

    def release(self) -> None:
        self.store._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class WeightStore:
    def __init__(self, cache_dir: Path, model_dirs: Iterable[Path] = (), max_bytes: int | None = None) -> None:
        self.cache_dir = cache_dir
        self.model_dirs = [Path(d).resolve() for d in model_dirs]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = default_cache_max(cache_dir) if max_bytes is None else max_bytes
        self._lock = threading.Lock()
        self._reservations: list[Reservation] = []
        self._in_use: str | None = None  # the slice the engine has loaded: never evicted
        self._remove_stale()

    # -- lookup -------------------------------------------------------------------------
    def _slice_path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"slice digest {digest!r} is not a sha256 hex digest")
        return self.cache_dir / f"{digest}.gguf"

    def cached(self) -> list[CachedSlice]:
        out = []
        for manifest in sorted(self.cache_dir.glob("*.json")):
            try:
                m = json.loads(manifest.read_text())
                out.append(CachedSlice(m["model_hash"], m["layer_start"], m["layer_end"], m["tensor_bytes"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    def verified_slice(self, digest: str, model_hash: str, start: int, end: int) -> str | None:
        """The cached slice of this digest if it is intact (and is layers [start, end) of
        ``model_hash``, as its header says); a damaged one is removed."""
        path = self._slice_path(digest)
        manifest = path.with_suffix(".json")
        if not path.exists() or not manifest.exists():
            return None
        try:
            m = json.loads(manifest.read_text())
            if (m["model_hash"], m["layer_start"], m["layer_end"]) != (model_hash, start, end):
                return None
            header_size = int(m["header_size"])
            with open(path, "rb") as f:
                if hashlib.sha256(f.read(header_size)).hexdigest() != m["header_sha256"]:
                    raise TransferError("header checksum mismatch")
                for t in m["tensors"]:
                    for off, n, crc in t["chunks"]:  # each chunk's crc32 as received: cheap to recheck
                        f.seek(header_size + t["offset"] + off)
                        if zlib.crc32(f.read(n)) != crc:
                            raise TransferError(f"tensor {t['name']} checksum mismatch at {off}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("cached slice %s is damaged (%s); removing it", path, e)
            path.unlink(missing_ok=True)
            manifest.unlink(missing_ok=True)
            return None
        _touch(manifest)  # most recently used: evicted last
        return str(path)

    def model_file(self, model_hash: str, hint: str = "") -> str | None:
        """A file of the model directories whose content hash is ``model_hash``: ``hint`` first
        if it names one of their files, else every GGUF in them."""
        named = self.model_path(hint) if hint else None
        if named is not None and content_hash(named) == model_hash:
            return named
        for d in self.model_dirs:
            for path in sorted(d.glob("*.gguf")):
                try:
                    if path.is_file() and self.model_path(str(path)) and content_hash(path) == model_hash:
                        return str(path)
                except OSError:
                    continue
        return None

    def model_path(self, path: str) -> str | None:
        """``path`` resolved, if it is a file inside one of the model directories (links
        followed: one that leads out of them does not count); None otherwise, whatever the reason."""
        try:
            real = Path(path).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            return None
        if not real.is_file() or not any(real.is_relative_to(d) for d in self.model_dirs):
            return None
        return str(real)

    # -- receiving ----------------------------------------------------------------------
    def reserve(self, head: IncomingSlice, max_bytes: int) -> Reservation:
        """Check a slice's header and make room for it (least recently used slices go first);
        TransferError when it is malformed or cannot fit."""
        check_slice(head, max_bytes)
        need = len(head.header) + head.data_size
        with self._lock:
            if need > self.max_bytes:
                raise CacheFullError(f"the slice takes {need} bytes; this server's slice cache holds {self.max_bytes}")
            entries = self._entries()
            evictable = sum(size for _, path, size in entries if path != self._in_use)
            if self._used() - evictable + need > self.max_bytes:  # refused as it is: nothing removed for it
                raise CacheFullError(
                    f"the slice takes {need} bytes and the slice cache is full ({self.max_bytes} bytes: "
                    "the loaded layers and uploads under way)"
                )
            for _, path, _ in entries:
                if self._used() + need <= self.max_bytes:
                    break
                if path != self._in_use:
                    logger.info("slice cache full: removing %s, the least recently used", path)
                    Path(path).unlink(missing_ok=True)
                    Path(path).with_suffix(".json").unlink(missing_ok=True)
            reservation = Reservation(self, head, need)
            self._reservations.append(reservation)
        return reservation

    def receive(self, reservation: Reservation, chunks: Iterable[Chunk]) -> tuple[str, int]:
        """Write a reserved slice and keep it under its digest; returns (path, tensor bytes)."""
        head = reservation.head
        tmp = self.cache_dir / f"{secrets.token_hex(8)}.part"
        got = receive(head, chunks, tmp)
        path = self._slice_path(got.digest)
        manifest = path.with_suffix(".json")
        manifest_tmp = tmp.with_suffix(".manifest")
        try:
            manifest_tmp.write_text(json.dumps(got.manifest))
            os.replace(manifest_tmp, manifest)  # (first: a slice file is never seen without its manifest)
            _touch(manifest)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            manifest_tmp.unlink(missing_ok=True)
            raise
        logger.info(
            "received slice [%d, %d) of %s: %d bytes, digest %s",
            head.layer_start, head.layer_end, head.model_hash[:12], got.tensor_bytes, got.digest[:12],
        )  # fmt: skip
        return str(path), got.tensor_bytes

    def use(self, path: str | None) -> None:
        """The slice the engine loaded now (None: none), kept whatever the cache needs."""
        with self._lock:
            self._in_use = path

    def disk_bytes(self) -> int:
        """Bytes the slice cache takes, uploads under way counted at their full size."""
        with self._lock:
            return self._used()

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation in self._reservations:
                self._reservations.remove(reservation)

    def _used(self) -> int:
        kept = 0
        for p in self.cache_dir.glob("*.gguf"):
            try:
                kept += p.stat().st_size
            except OSError:
                continue
        return kept + sum(r.n_bytes for r in self._reservations)

    def _entries(self) -> list[tuple[int, str, int]]:
        """Every kept slice as (last used, path, bytes), least recently used first; files
        without a manifest (never complete) first of all."""
        out = []
        for path in self.cache_dir.glob("*.gguf"):
            try:
                size = path.stat().st_size
                used = path.with_suffix(".json").stat().st_mtime_ns
            except FileNotFoundError:
                used = 0
            except OSError:
                continue
            out.append((used, str(path), size))
        return sorted(out)

    def _remove_stale(self) -> None:
        """Remove partial uploads a process left a day ago or more, and slices kept in folders
        named by a model hash: keyed by what an uploader claimed, nothing vouches for them."""
        now = time.time()
        for p in self.cache_dir.glob("*.part"):
            try:
                if now - p.stat().st_mtime > STALE_PART:
                    p.unlink()
            except OSError:
                continue
        for d in self.cache_dir.iterdir():
            if d.is_dir() and len(d.name) == 64 and all(c in "0123456789abcdef" for c in d.name):
                for p in d.glob("*-*.*"):
                    if p.suffix in (".gguf", ".json") or p.suffix.startswith(".part"):
                        p.unlink(missing_ok=True)
                try:
                    d.rmdir()
                except OSError:
                    pass


def _touch(manifest: Path) -> None:
    """Mark a slice used now (its manifest's mtime, to the nanosecond: the filesystem's own
    clock ticks coarsely, and slices used one after the other must stay in order)."""
    now = time.time_ns()
    os.utime(manifest, ns=(now, now))
