"""Server processes a test starts by hand."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator

from llmrpc.head.local import READY_PREFIX
from tests.namespaces import stop


@contextlib.contextmanager
def metered_servers(caches: list[list[str]], threads: int) -> Iterator[list[tuple[str, int]]]:
    """A server with a metrics port for each of ``caches`` (its cache arguments): (gRPC address,
    metrics port) each, stopped at the end."""
    procs, out = [], []
    try:
        for cache in caches:
            cmd = [sys.executable, "-m", "llmrpc.cli", "server", "--host", "127.0.0.1", "--port", "0", "--threads",
                   str(threads), "--no-calibrate", "--metrics-port", "0", *cache]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith(READY_PREFIX), line
            words = dict(w.split("=", 1) for w in line.split() if "=" in w)
            out.append((line[len(READY_PREFIX) :].split()[0], int(words["metrics"])))
        yield out
    finally:
        for p in procs:
            stop(p)


class LogLines:
    """Processes' log lines as they come (:meth:`read` a stream on a thread of its own), to wait on."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def read(self, stream: Iterator[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> bool:
        """Whether a line holding ``text`` came (or comes within ``timeout`` seconds)."""
        with self._cond:
            return self._cond.wait_for(lambda: any(text in line for line in self.lines), timeout)


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (Linux: one that ended but is not yet reaped, a zombie, does not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (FileNotFoundError, StopIteration):
        return False
    return state.split()[1] != "Z"
