"""The server's one compute thread, run as an event loop.

Every ggml call and every change to the engine's state happens on this thread: OpenMP gives
each calling thread its own team of workers, and teams left behind by other threads keep
spinning (measured: 13 ms -> 19.5 ms per SmolLM2 token). The same thread also waits on the
data-plane sockets, so an activation that arrives is computed and sent on without a single
hand-off between threads; work from gRPC handlers arrives through :meth:`call`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ComputeLoop:
    def __init__(self, name: str = "ggml-compute") -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._jobs: deque[tuple[Callable[[], object], Future[object]]] = deque()
        self._soon: deque[Callable[[], None]] = deque()  # the loop's own follow-up work
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # (when, order, fn), a heap
        self._order = itertools.count()
        self._stopping = False
        # called on the loop thread whenever it wakes for work (sockets, calls), before it
        # handles any: an engine wakes its parked compute threads (ggml/openmp.py)
        self.on_wake: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def native_id(self) -> int | None:
        """The compute thread's id in the kernel."""
        return self._thread.native_id

    def on_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop thread and return its result (inline when already there)."""
        if self.on_loop():
            return fn()
        return self.submit(fn).result()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        if self._stopping:
            future.set_exception(RuntimeError("the compute loop has stopped"))
            return future
        self._jobs.append((fn, future))  # type: ignore[arg-type]
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:  # the wake pipe is full: the loop is awake anyway
            pass
        return future

    def soon(self, fn: Callable[[], None], delay: float = 0.0) -> None:
        """From the loop thread: run ``fn`` on its next turn, after what the sockets brought
        (a generation through one server steps this way, and other sessions get their turns),
        or ``delay`` seconds from now."""
        if delay > 0:
            heapq.heappush(self._timers, (time.perf_counter() + delay, next(self._order), fn))
        else:
            self._soon.append(fn)

    def watch(self, sock: socket.socket, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable`` on the loop thread whenever ``sock`` has data (or closes)."""
        self.call(lambda: self._selector.register(sock, selectors.EVENT_READ, on_readable))

    def unwatch(self, sock: socket.socket) -> None:
        def drop() -> None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass

        self.call(drop)

    def _run(self) -> None:
        while not self._stopping:
            timeout = None
            if self._soon:
                timeout = 0.0
            elif self._timers:
                timeout = max(0.0, self._timers[0][0] - time.perf_counter())
            events = self._selector.select(timeout)
            if events and self.on_wake is not None:
                self.on_wake()
            for key, _ in events:
                callback = key.data
                if callback is None:
                    self._drain_wake()
                    continue
                try:
                    callback()
                except Exception:  # a bad connection must not stop the loop
                    logger.exception("data-plane callback failed")
            while self._jobs:
                fn, future = self._jobs.popleft()
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed back to the caller
                    future.set_exception(e)
            now = time.perf_counter()
            while self._timers and self._timers[0][0] <= now:
                self._soon.append(heapq.heappop(self._timers)[2])
            for _ in range(len(self._soon)):
                try:
                    self._soon.popleft()()
                except Exception:
                    logger.exception("compute-loop step failed")
        while self._jobs:
            self._jobs.popleft()[1].set_exception(RuntimeError("the compute loop has stopped"))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def stop(self) -> None:
        def halt() -> None:
            self._stopping = True

        if self._thread.is_alive():
            self.submit(halt)
            self._thread.join(timeout=10)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
