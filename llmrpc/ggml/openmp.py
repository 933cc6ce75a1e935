"""Keeping a thread's OpenMP workers asleep between graphs, without ending them.

ggml's CPU backend computes a graph in one OpenMP parallel region, and its barriers between
ops are OpenMP barriers: they need the workers to spin. Between two graphs the same spin takes
a core from whatever else runs on the machine, which matters where servers share cores (each
computes a pipeline stage in turn). Ending the workers after each graph (OpenMP 5.0's
``omp_pause_resource_all``) frees the cores, but every graph then starts a new thread, and the
kernel cleans up the last one (~0.1 ms of each stage's turn).

A :class:`ParkedTeam` instead opens a parallel region of its own after a graph, in which each
worker waits on a semaphore (asleep in the kernel, its core free) while the calling thread goes
on: libgomp's ``GOMP_parallel_start`` returns to the caller before the region's end, and
``GOMP_parallel_end`` closes it. :meth:`wake` posts the semaphore as soon as work arrives, so
the workers wake while the caller reads its input; :meth:`claim` closes the region before the
next graph, whose region then finds the same workers awake. Between :meth:`park` and
:meth:`claim` the calling thread is inside that region: any OpenMP work it started would run
on one thread (correct, but slow), so every graph must be preceded by :meth:`claim`.

Linux and libgomp only (the GCC OpenMP runtime llama-cpp-python's Linux builds use); elsewhere
:func:`parked_team` gives None and the caller ends its workers instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

_SEM_BYTES = 64  # sizeof(sem_t) is 32 on 64-bit Linux; room to spare


class ParkedTeam:
    def __init__(self, gomp: ctypes.CDLL, libc: ctypes.CDLL, n_threads: int) -> None:
        self._start = gomp.GOMP_parallel_start
        self._start.restype = None
        self._start.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        self._end = gomp.GOMP_parallel_end
        self._end.restype = None
        self._end.argtypes = []
        self._post = libc.sem_post
        self._trywait = libc.sem_trywait
        for fn in (self._post, self._trywait):
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p]
        self._sem = ctypes.create_string_buffer(_SEM_BYTES)
        self._sem_address = ctypes.addressof(self._sem)
        libc.sem_init.restype = ctypes.c_int
        libc.sem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
        if libc.sem_init(self._sem_address, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init failed")
        # the region's body, run by each worker: sem_wait(&sem) (its int result is dropped)
        self._body = ctypes.cast(libc.sem_wait, ctypes.c_void_p).value
        self.n_threads = n_threads
        # [parked, woken]: a region of ours is open and its workers wait (or were woken). In
        # memory C can reach: the native hop (server/hop.c) claims and parks this team too.
        self._state = (ctypes.c_int64 * 2)()

    @property
    def parked(self) -> bool:
        return bool(self._state[0])

    def native_fields(self) -> tuple[int, int, int, int, int, int]:
        """For C code that claims and parks this team as :meth:`claim` and :meth:`park` do:
        addresses of the state and the semaphore, the threads, the region's body, and
        GOMP_parallel_start and GOMP_parallel_end."""
        start, end = (int(ctypes.cast(fn, ctypes.c_void_p).value or 0) for fn in (self._start, self._end))
        return ctypes.addressof(self._state), self._sem_address, self.n_threads, int(self._body or 0), start, end

    def park(self) -> None:
        """Right after a graph: the workers go to sleep (the caller returns at once)."""
        if not self._state[0]:
            self._start(self._body, self._sem_address, self.n_threads)
            self._state[0], self._state[1] = 1, 0

    def wake(self) -> None:
        """Work has arrived: let the workers wake while the caller prepares it."""
        if self._state[0] and not self._state[1]:
            for _ in range(self.n_threads - 1):
                self._post(self._sem_address)
            self._state[1] = 1

    def claim(self) -> None:
        """Before a graph (or before the thread ends): close the region, workers awake."""
        if not self._state[0]:
            return
        self.wake()
        self._end()
        self._state[0] = 0
        # a worker whose wait a signal cut short left a post unused: drop it, so the next
        # park's workers sleep
        while self._trywait(self._sem_address) == 0:
            pass


def parked_team(gomp_path: str | None, n_threads: int) -> ParkedTeam | None:
    """A :class:`ParkedTeam` for this thread's OpenMP workers, or None where the runtime is
    not libgomp on Linux (or there are no workers to park)."""
    if n_threads < 2 or gomp_path is None or not sys.platform.startswith("linux"):
        return None
    try:
        return ParkedTeam(ctypes.CDLL(gomp_path), ctypes.CDLL(None, use_errno=True), n_threads)
    except (OSError, AttributeError) as e:
        logger.debug("OpenMP workers cannot be parked here (%s): they end after each graph instead", e)
        return None


_REGION_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def core_places() -> list[set[int]]:
    """The cores this process may use, each as the set of its hardware threads, in order
    (OpenMP's ``OMP_PLACES=cores``)."""
    places: list[set[int]] = []
    allowed = os.sched_getaffinity(0)
    for cpu in sorted(allowed):
        if any(cpu in p for p in places):
            continue
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            place = _cpu_list(siblings.read_text()) & allowed
        except (OSError, ValueError):
            place = set()
        places.append(place or {cpu})
    return places


def _cpu_list(text: str) -> set[int]:
    """'0-1,4' -> {0, 1, 4}"""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def pin_team(gomp_path: str | None, n_threads: int) -> bool:
    """Bind this thread and its OpenMP workers to a core each, thread i to the i-th core (what
    ``OMP_PROC_BIND=true`` with ``OMP_PLACES=cores`` does from a process's start), for servers
    told to take turns on a machine's cores after they started: each then finds its threads
    where it left them (three such servers on two cores decode ~1.3x faster, paired). Runs one
    parallel region of the team's size, whose workers are those of the thread's later graphs.
    Call from the compute thread, outside any region (before its team is parked). False where
    the runtime is not libgomp on Linux, or OpenMP's binding is the environment's to set."""
    if n_threads < 1 or gomp_path is None or not sys.platform.startswith("linux") or "OMP_PROC_BIND" in os.environ:
        return False
    try:
        gomp = ctypes.CDLL(gomp_path)
        parallel, thread_num = gomp.GOMP_parallel, gomp.omp_get_thread_num
    except (OSError, AttributeError) as e:
        logger.debug("OpenMP threads cannot be pinned here: %s", e)
        return False
    parallel.restype, parallel.argtypes = None, [_REGION_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    thread_num.restype, thread_num.argtypes = ctypes.c_int, []
    places, failed = core_places(), []

    def pin(_: int | None) -> None:
        try:
            os.sched_setaffinity(0, places[thread_num() % len(places)])
        except OSError as e:
            failed.append(e)

    parallel(_REGION_BODY(pin), None, n_threads, 0)
    if failed:
        logger.warning("could not pin the compute threads to cores: %s", failed[0])
        return False
    return True
