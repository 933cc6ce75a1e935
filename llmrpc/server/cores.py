"""Which cores a server's threads run on when its compute threads are pinned (``--pin-threads``).

OpenMP's binding (``OMP_PROC_BIND``) puts the thread that loads it on the first core, and every
thread started after inherits that core. Only the compute thread and its OpenMP workers should
keep their places (servers of one machine take turns computing and find their threads where they
left them); everything else, gRPC's threads, the checks of cached slices, a load's copying and
repacking of weights, runs on any core. Otherwise the servers of one machine queue on its first
core for all of it (three servers loading an 8B-class model from their caches on two cores:
10.6 s, 4.3-5.2 s on any core).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_cpus: frozenset[int] | None = None  # the cores this process may use, before OpenMP bound it


def remember() -> None:
    """Note the process's cores; call before OpenMP is loaded (it binds the loading thread)."""
    global _cpus
    if _cpus is None and hasattr(os, "sched_getaffinity"):
        _cpus = frozenset(os.sched_getaffinity(0))


def free_others(keep: int | None) -> None:
    """Give every thread of this process but ``keep`` (the compute thread's native id) all the
    process's cores back. Call before the compute thread starts its OpenMP workers: they are
    placed by OpenMP, and left where it placed them."""
    if _cpus is None or not os.path.isdir("/proc/self/task"):
        return
    for task in os.listdir("/proc/self/task"):
        tid = int(task)
        if tid != keep:
            try:
                os.sched_setaffinity(tid, _cpus)
            except OSError as e:  # a thread that ended meanwhile
                logger.debug("thread %d keeps its cores: %s", tid, e)


@contextmanager
def any_core() -> Iterator[None]:
    """Run the calling thread on any of the process's cores for a while (single-threaded work on
    the compute thread: loading weights), then put it back."""
    if _cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
