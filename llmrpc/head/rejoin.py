"""Servers that come back: a farm that failed a server over runs on the servers left; when that
server answers again (restarted at its address, or resumed), the farm plans it back in on its
own, between generations.

:class:`SessionGate` is what "between generations" means: sessions hold it shared, a re-plan
holds it alone. A re-plan that is waiting keeps new sessions waiting (they would otherwise keep
it out for good under steady load), so a request may wait for one re-plan, and none fails.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

REJOIN_EVERY = 2.0  # seconds between looks at the servers a farm lost


class SessionGate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = 0  # sessions open
        self._waiting = 0  # re-plans waiting to run
        self._alone = False  # a re-plan runs

    def enter(self) -> None:
        """A session opens (waits while a re-plan runs or waits to)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and not self._waiting)
            self._open += 1

    def leave(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        """Run with no session open: waits for the open ones to close; new ones wait."""
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._open and not self._alone)
            self._waiting -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


class Rejoiner:
    """Every ``every`` seconds, asks whether the servers ``lost()`` names answer again (a
    Hello, ``answers(address)``), and hands those that do to ``rejoin(addresses)``."""

    def __init__(
        self, lost: Callable[[], list[str]], answers: Callable[[str], bool], rejoin: Callable[[list[str]], None],
        every: float = REJOIN_EVERY,
    ) -> None:  # fmt: skip
        self.lost, self.answers, self.rejoin, self.every = lost, answers, rejoin, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="farm-rejoin")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            back = [a for a in self.lost() if not self._stop.is_set() and self.answers(a)]
            if back and not self._stop.is_set():
                try:
                    self.rejoin(back)
                except Exception:  # the farm goes on with the servers it has; looked at again later
                    logger.exception("planning %s back in failed", ", ".join(back))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
