"""Timestamps of each data-plane request as it crosses the head and the servers: where a
token's time goes (``llmrpc-bench``'s timeline reads them).

Off unless ``LLMRPC_TRACE`` names a folder (or :func:`configure` is called): then every process
appends ``<request> <event> <seconds>`` lines to ``<folder>/<pid>.trace``. The clock is
``time.perf_counter`` (CLOCK_MONOTONIC on Linux), so the stamps of processes on one machine
line up. A stamp costs a list append; lines are written every few thousand stamps, when a
server's session ends, and at exit.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from pathlib import Path

ENV = "LLMRPC_TRACE"
_FLUSH_EVERY = 4096

_folder: Path | None = None
_lines: list[str] = []
_lock = threading.Lock()


def configure(folder: str | os.PathLike[str] | None) -> None:
    """Start stamping into ``folder`` (None: stop, after writing what was stamped)."""
    global _folder
    flush()
    _folder = Path(folder) if folder else None
    if _folder is not None:
        _folder.mkdir(parents=True, exist_ok=True)


def enabled() -> bool:
    return _folder is not None


def stamp(link: object, request_id: int, event: str, at: float | None = None, step: int | None = None) -> None:
    """Record that ``event`` happened now (or at ``at``, a perf_counter) to request
    ``request_id`` of the head whose link id is ``link``; named ``<link hex>.<id>`` in the traces
    (``<link hex>.<id>.<step>`` for a step of a generation). A request without a head link (not
    a positive number) is not recorded."""
    if _folder is None or not isinstance(link, int) or link <= 0:
        return
    name = f"{link:x}.{request_id}" if step is None else f"{link:x}.{request_id}.{step}"
    line = f"{name} {event} {time.perf_counter() if at is None else at:.7f}\n"
    with _lock:
        _lines.append(line)
        full = len(_lines) >= _FLUSH_EVERY
    if full:
        flush()


def flush() -> None:
    """Write what was stamped (servers also do at the end of each session, not only at exit)."""
    if not _lines:
        return
    with _lock:
        lines, _lines[:] = list(_lines), []
    if lines and _folder is not None:
        with open(_folder / f"{os.getpid()}.trace", "a") as f:
            f.writelines(lines)


atexit.register(flush)
if os.environ.get(ENV):
    configure(os.environ[ENV])
