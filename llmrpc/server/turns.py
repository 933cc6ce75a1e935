"""Turns on a machine's cores: servers that compute on the same cores hold one lock file (flock)
while they compute, so that their thread teams do not fight over the cores.

A server stopped (SIGSTOP) or hung in the middle of its turn never gives the lock back, and a
server waiting for it would wait on its compute thread for ever: its loop could not even take
the new plan its head fails over to. So a wait for the turn can be called off (:meth:`call_off`,
from any thread; a server does when its head gives it another lock: a new plan); the step then
computes without its turn. The wait itself blocks in the kernel on a helper thread, so a turn
that comes costs no polling.
"""

from __future__ import annotations

import fcntl
import logging
import threading

logger = logging.getLogger(__name__)


class HostTurn:
    def __init__(self, path: str) -> None:
        self.path = path
        self.file = open(path, "a+b")  # noqa: SIM115 (held for the server's life, or until replaced)
        self._cond = threading.Condition()
        self._wanted = False  # the compute thread waits for the turn
        self._held = False
        self._called_off = False
        self._closed = False
        self._waiter: threading.Thread | None = None

    def fileno(self) -> int:
        return self.file.fileno()

    def acquire(self) -> bool:
        """Wait for the turn: True once held, False if the wait was called off."""
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._held = True
            return True
        except BlockingIOError:
            pass
        with self._cond:
            if self._called_off:
                return False
            self._wanted = True
            if self._waiter is None:
                self._waiter = threading.Thread(target=self._wait_turns, daemon=True, name="host-turn")
                self._waiter.start()
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._held or self._called_off)
            self._wanted = False
            if not self._held:
                logger.warning("computing without this machine's turn: the wait for %s was called off", self.path)
            return self._held

    def release(self) -> None:
        with self._cond:
            if self._held:
                fcntl.flock(self.file, fcntl.LOCK_UN)
                self._held = False

    def call_off(self) -> None:
        """Stop waiting for the turn, now and from now on (this lock is being replaced)."""
        with self._cond:
            self._called_off = True
            self._cond.notify_all()

    def close(self) -> None:
        """Give the lock up; a helper thread still blocked on it gives it back when it gets it."""
        with self._cond:
            self._closed = self._called_off = True
            self._cond.notify_all()
            if self._held:
                fcntl.flock(self.file, fcntl.LOCK_UN)
                self._held = False
            if self._waiter is None:
                self.file.close()

    def _wait_turns(self) -> None:
        """The helper: blocks in flock whenever the compute thread wants the turn."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted or self._closed)
                if self._closed:
                    self.file.close()
                    return
            fcntl.flock(self.file, fcntl.LOCK_EX)
            with self._cond:
                if self._wanted and not self._called_off:
                    self._held = True
                    self._cond.notify_all()
                else:  # nobody waits for it any more
                    fcntl.flock(self.file, fcntl.LOCK_UN)
