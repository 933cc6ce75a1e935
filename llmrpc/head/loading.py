"""A plan's ranges loaded onto its servers: read from the model's path where a server may read
it, from a slice it received before (matched by digest), or shipped to it now."""

from __future__ import annotations

import logging
import ssl
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from llmrpc.head.client import StageClient
from llmrpc.head.placement import ship_slice
from llmrpc.model.gguf_model import ModelInfo
from llmrpc.model.kv import CacheConfig
from llmrpc.model.slicefile import build_slice_layout
from llmrpc.types import LoadedRange

logger = logging.getLogger(__name__)


@dataclass
class Loader:
    """Loads ranges of ``info``'s model (``model_hash``) with KV caches of ``cache``;
    ``share_path``: servers may read the model at ``model_path``. Records what it shipped to
    each server and where each loaded its weights from."""

    info: ModelInfo
    model_path: str
    model_hash: str
    cache: CacheConfig
    share_path: bool
    tls: ssl.SSLContext | None
    bytes_shipped: dict[str, int] = field(default_factory=dict)  # address -> bytes shipped to it
    load_sources: dict[str, str] = field(default_factory=dict)  # address -> cache, model-dir or path

    def load_all(self, ranges: list[tuple[StageClient, int, int]], shared: dict[str, str], progress: bool) -> None:
        """Every (server, start, end) at once; ``shared``: the lock each server that takes
        turns on its machine's cores takes them under."""
        bar = progress_bar(len(ranges), "loading layers", progress, unit="server")
        with ThreadPoolExecutor(max_workers=max(1, len(ranges))) as pool:
            futures = [pool.submit(self.load, c, start, end, shared.get(c.address, ""), progress)
                       for c, start, end in ranges]  # fmt: skip
            for f in futures:
                f.result()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

    def load(self, client: StageClient, start: int, end: int, share: str, progress: bool) -> LoadedRange:
        """Load a range; ship its tensors first when the server has no copy of them."""
        hint = self.model_path if self.share_path else ""

        def load(digest: str) -> LoadedRange | None:
            return client.load(hint, start, end, self.model_hash, self.cache, share, digest)

        # A server that may read the model at its path needs nothing more; one loads a slice it
        # received only by its digest (the head reads the model once for it, then remembers it).
        loaded = load("") if hint else None
        if loaded is None:
            digest = build_slice_layout(self.info, start, end, self.model_hash).digest
            loaded = load(digest)
        shipped = 0
        if loaded is None:
            n = self.info.range_bytes(start, end)
            bar = progress_bar(n, f"shipping layers [{start}, {end}) to {client.address}", progress, unit="B")
            shipped = ship_slice(
                client, self.info, self.model_hash, start, end, bar.update if bar else None, tls=self.tls
            )
            if bar is not None:
                bar.close()
            if shipped != n:
                raise RuntimeError(f"server {client.address} took {shipped} of {n} bytes of layers [{start}, {end})")
            loaded = load(digest)
            if loaded is None:
                raise RuntimeError(f"server {client.address} still lacks layers [{start}, {end}) after receiving them")
        self.bytes_shipped[client.address] = shipped
        self.load_sources[client.address] = loaded.source
        return loaded


def progress_bar(total: int, desc: str, enabled: bool, unit: str) -> Any:
    """A progress bar on stderr (tqdm), or None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm import tqdm

    scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, **scale)
