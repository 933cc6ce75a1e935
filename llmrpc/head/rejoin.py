"""Servers that come back: a farm that failed a server over runs on the servers left; when that
server answers again (restarted at its address, or resumed), the farm plans it back in on its
own, between generations.

:class:`SessionGate` is what "between generations" means: sessions hold it shared, a re-plan
holds it alone. A re-plan that is waiting keeps new sessions waiting (they would otherwise keep
it out for good under steady load), so a request may wait for one re-plan, and none fails. That
wait has a bound (REJOIN_WAIT): a re-plan whose open sessions do not all end within it gives up
for now, lets the waiting sessions in, and is tried again later, REJOIN_EVERY doubled each time
up to REJOIN_BACKOFF_MAX. (A session that never ended, a generation left unclosed say, would
otherwise hold every new request back for good.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

REJOIN_EVERY = 2.0  # seconds between looks at the servers a farm lost
REJOIN_WAIT = 15.0  # seconds a re-plan waits for the open sessions to end (new ones wait meanwhile)
REJOIN_BACKOFF_MAX = 120.0  # seconds between tries, at most, after re-plans that gave up waiting


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
    def alone(self, within: float | None = None) -> Iterator[bool]:
        """Run with no session open: waits for the open ones to close; new ones wait. Gives
        False without holding anything when they have not all closed within ``within``
        seconds (the sessions waiting go on), True when it holds the gate alone."""
        with self._cond:
            self._waiting += 1
            try:
                got = self._cond.wait_for(lambda: not self._open and not self._alone, within)
            finally:
                self._waiting -= 1
                if not self._waiting:
                    self._cond.notify_all()
            self._alone = got
        try:
            yield got
        finally:
            if got:
                with self._cond:
                    self._alone = False
                    self._cond.notify_all()

    @property
    def open(self) -> int:
        with self._cond:
            return self._open


class Rejoiner:
    """Every ``every`` seconds, asks whether the servers ``lost()`` names answer again (a
    Hello, ``answers(address)``), and hands those that do to ``rejoin(addresses)``, which says
    whether it planned them in (False: it gave up waiting for the gate; tried again after twice
    the last wait, up to REJOIN_BACKOFF_MAX)."""

    def __init__(
        self, lost: Callable[[], list[str]], answers: Callable[[str], bool], rejoin: Callable[[list[str]], bool],
        every: float = REJOIN_EVERY,
    ) -> None:  # fmt: skip
        self.lost, self.answers, self.rejoin, self.every = lost, answers, rejoin, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="farm-rejoin")
        self._thread.start()

    def _run(self) -> None:
        wait = self.every
        while not self._stop.wait(wait):
            planned = True
            back = [a for a in self.lost() if not self._stop.is_set() and self.answers(a)]
            if back and not self._stop.is_set():
                try:
                    planned = self.rejoin(back)
                except Exception:  # the farm goes on with the servers it has; looked at again later
                    logger.exception("planning %s back in failed", ", ".join(back))
            wait = self.every if planned else min(2 * wait, REJOIN_BACKOFF_MAX)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
