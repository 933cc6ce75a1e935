"""Load times of one server holding the whole model: from a local file, shipped over
loopback, and from its cache; and the shipping rate next to a disk-to-disk copy."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llmrpc.head.client import StageClient
from llmrpc.head.local import LocalServers
from llmrpc.head.placement import ship_slice
from llmrpc.model.gguf_model import content_hash, read_model
from llmrpc.model.slicefile import build_slice_layout


@dataclass
class LoadTimes:
    tensor_bytes: int
    local_file_s: float
    shipped_s: float  # push + load
    push_s: float
    cached_s: float
    copy_s: float  # copying the same bytes from disk to disk over a loopback TCP socket

    @property
    def ship_rate(self) -> float:
        return self.tensor_bytes / self.push_s

    @property
    def copy_rate(self) -> float:
        return self.tensor_bytes / self.copy_s


REPEATS = 3


def loopback_copy(src: Path, dst: Path, block: int = 1 << 22) -> float:
    """Seconds to copy a file to another file through a TCP connection on 127.0.0.1."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def receive() -> None:
        conn, _ = server.accept()
        with conn, open(dst, "wb") as out:
            buf = bytearray(block)
            view = memoryview(buf)
            while n := conn.recv_into(view):
                out.write(view[:n])

    t = threading.Thread(target=receive)
    t.start()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn, open(src, "rb") as f:
        while data := f.read(block):
            conn.sendall(data)
    t.join()
    server.close()
    return time.perf_counter() - t0


def _timed_load(address: str, path: str, n_layer: int, digest: str, slice_digest: str = "") -> tuple[float, bool]:
    client = StageClient(address)
    client.hello()
    t0 = time.perf_counter()
    loaded = client.load(path, 0, n_layer, digest, slice_digest=slice_digest)
    return time.perf_counter() - t0, loaded is not None


def bench_load(model: str) -> LoadTimes:
    info = read_model(model)
    n = info.hparams.n_layer
    digest = content_hash(model)
    whole = build_slice_layout(info, 0, n, digest).digest
    nbytes = info.range_bytes(0, n)
    with tempfile.TemporaryDirectory() as tmp:
        cache = ["--cache-dir", str(Path(tmp) / "cache"), "--no-calibrate"]
        with LocalServers(1, threads=2, extra_args=[*cache, "--model-dir", os.path.dirname(model)]) as local:
            local_s, ok = _timed_load(local.addresses[0], model, n, digest)
            assert ok
        pushes, totals = [], []
        for attempt in range(REPEATS):  # each into an empty cache; the best run counts
            attempt_cache = cache if attempt == 0 else ["--cache-dir", str(Path(tmp) / f"cache{attempt}"), cache[2]]
            with LocalServers(1, threads=2, extra_args=attempt_cache) as local:
                client = StageClient(local.addresses[0])
                client.hello()
                t0 = time.perf_counter()
                assert client.load("", 0, n, digest, slice_digest=whole) is None
                t1 = time.perf_counter()
                ship_slice(client, info, digest, 0, n)
                pushes.append(time.perf_counter() - t1)
                assert client.load("", 0, n, digest, slice_digest=whole) is not None
                totals.append(time.perf_counter() - t0)
        push_s, shipped_s = min(pushes), min(totals)
        with LocalServers(1, threads=2, extra_args=cache) as local:
            cached_s, ok = _timed_load(local.addresses[0], "", n, digest, whole)
            assert ok
        src = Path(tmp) / "src.bin"
        shutil.copyfile(model, src)
        copies = [loopback_copy(src, Path(tmp) / f"dst{i}.bin") for i in range(REPEATS)]
        copy_s = min(copies) * nbytes / src.stat().st_size
    return LoadTimes(nbytes, local_s, shipped_s, push_s, cached_s, copy_s)


if __name__ == "__main__":
    from llmrpc.model.catalog import default_model_path

    r = bench_load(default_model_path() or "")
    print(r, f"ship {r.ship_rate / 1e6:.0f} MB/s, copy {r.copy_rate / 1e6:.0f} MB/s")
