"""Devices from ggml's backend registry: whatever the build has (CPU, CUDA, Metal, Vulkan)."""

from __future__ import annotations

import ctypes
import logging
import sys

from llmrpc.ggml import lib as g
from llmrpc.ggml.openmp import ParkedTeam, parked_team, pin_team
from llmrpc.types import DeviceInfo

logger = logging.getLogger(__name__)

_KINDS = {g.DEV_TYPE_CPU: "cpu", g.DEV_TYPE_GPU: "gpu", g.DEV_TYPE_IGPU: "igpu", g.DEV_TYPE_ACCEL: "accel"}
_PREFERENCE = {"gpu": 0, "igpu": 1, "cpu": 2}


def _info(dev: int) -> DeviceInfo:
    lib = g.ggml()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return DeviceInfo(
        name=lib.ggml_backend_dev_name(dev).decode(),
        description=lib.ggml_backend_dev_description(dev).decode(),
        kind=_KINDS.get(lib.ggml_backend_dev_type(dev), "other"),
        memory_free=free.value,
        memory_total=total.value,
    )


def _devices() -> list[tuple[int, DeviceInfo]]:
    lib = g.ggml()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        out.append((dev, _info(dev)))
    return out


def list_devices() -> list[DeviceInfo]:
    """Devices that can hold layers (accelerator add-ons such as BLAS are left out)."""
    return [info for _, info in _devices() if info.kind in _PREFERENCE]


def best_device() -> DeviceInfo:
    devices = sorted(list_devices(), key=lambda d: (_PREFERENCE[d.kind], -d.memory_free))
    if not devices:
        raise RuntimeError("ggml reports no usable device")
    return devices[0]


def find_device(name: str | None) -> DeviceInfo:
    if name is None:
        return best_device()
    for info in list_devices():
        if info.name.lower() == name.lower():
            return info
    known = ", ".join(d.name for d in list_devices())
    raise ValueError(f"no device named {name!r} (this build has: {known})")


OMP_PAUSE_SOFT = 1
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


def prefer_huge_pages(buffer: int) -> None:
    """Ask Linux to back a host buffer with 2 MiB pages (call before writing to it). Weights
    are read through once per token; with 4 KiB pages the TLB misses cost a SmolLM2 token
    ~1 ms (8%): measured paired against llama.cpp, 1.0 ms slower without, 0.05 ms with."""
    lib = g.ggml()
    if not sys.platform.startswith("linux") or not lib.ggml_backend_buffer_is_host(buffer):
        return
    base = lib.ggml_backend_buffer_get_base(buffer) or 0
    start = -(-base // HUGE_PAGE) * HUGE_PAGE
    end = (base + lib.ggml_backend_buffer_get_size(buffer)) // HUGE_PAGE * HUGE_PAGE
    if end - start < HUGE_PAGE:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(start, end - start, MADV_HUGEPAGE) != 0:  # THP off in this kernel: fine
        logger.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())


def release_free_memory() -> None:
    """Give the pages of freed heap memory back to the system (glibc's ``malloc_trim``): what a
    server freed when its layers changed (weights, caches, graphs) otherwise stays in its
    resident memory, reused only for allocations that fit the holes. No-op without glibc."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


class Backend:
    """An initialised ggml backend on one device, plus the CPU backend the scheduler needs."""

    def __init__(self, device: DeviceInfo, n_threads: int, share_cores: bool = False) -> None:
        lib = g.ggml()
        self.device = device
        self.n_threads = n_threads
        handles = {info.name: dev for dev, info in _devices()}
        self.dev = handles[device.name]
        self.backend = lib.ggml_backend_dev_init(self.dev, None)
        if not self.backend:
            raise RuntimeError(f"cannot initialise ggml backend for {device.name}")
        self.buffer_type = lib.ggml_backend_dev_buffer_type(self.dev)
        self.cpu_backend: int | None = None
        self.threadpool = 0
        # servers that share cores park their OpenMP workers between graphs (see openmp.py)
        self._team = parked_team(lib.gomp_path, n_threads) if share_cores else None
        if device.kind != "cpu":
            cpu = next(dev for dev, info in _devices() if info.kind == "cpu")
            self.cpu_backend = lib.ggml_backend_dev_init(cpu, None)
            self._set_threads(cpu, self.cpu_backend, n_threads)
        self._set_threads(self.dev, self.backend, n_threads)
        if not lib.uses_openmp:
            # ggml's own threads: without a pool it starts new ones for every graph. A server
            # alone keeps ggml's default (workers poll a while for the next graph, as in
            # llama.cpp's tools); servers that share cores poll 0: workers sleep as soon as a
            # graph is done (an idle stage leaves the cores to the busy one) while the barriers
            # inside a graph still spin.
            params = lib.ggml_threadpool_params_default(n_threads)
            if share_cores:
                params.poll = 0
            self.threadpool = lib.ggml_threadpool_new(ctypes.byref(params))
            lib.ggml_backend_cpu_set_threadpool(self.cpu_backend or self.backend, self.threadpool)

    def share_cores(self) -> None:
        """From now on leave the cores to other servers between graphs (what ``share_cores``
        at construction does): a parked OpenMP team, or ggml's own threads sleeping at once; and
        keep the compute threads on a core each (what ``--pin-threads`` does at start)."""
        lib = g.ggml()
        if self._team is None:
            pin_team(lib.gomp_path, self.n_threads)  # before the team is parked
            self._team = parked_team(lib.gomp_path, self.n_threads)
        if self.threadpool:
            params = lib.ggml_threadpool_params_default(self.n_threads)
            params.poll = 0
            old, self.threadpool = self.threadpool, lib.ggml_threadpool_new(ctypes.byref(params))
            lib.ggml_backend_cpu_set_threadpool(self.cpu_backend or self.backend, self.threadpool)
            lib.ggml_threadpool_free(old)

    @staticmethod
    def _set_threads(dev: int, backend: int, n_threads: int) -> None:
        lib = g.ggml()
        reg = lib.ggml_backend_dev_backend_reg(dev)
        addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
        if addr:
            g.SetNThreads(addr)(backend, n_threads)

    def release_threads(self) -> None:
        """Let the CPU compute threads go until the next graph. OpenMP's idle workers spin
        for ~3 ms after a parallel region (and its barriers, which ggml uses between ops,
        need that spin). Where they can be parked (libgomp, a backend that shares cores) they
        sleep in a region of our own until :meth:`claim_threads`; elsewhere the pool ends
        (OpenMP 5.0 pause), for a new thread at the next graph. ggml's own pool already
        sleeps (poll 0)."""
        if self._team is not None:
            self._team.park()
            return
        lib = g.ggml()
        if lib.omp_pause_resource_all is not None:
            lib.omp_pause_resource_all(OMP_PAUSE_SOFT)

    def wake_threads(self) -> None:
        """Work has arrived: parked workers start waking while the caller reads it."""
        if self._team is not None:
            self._team.wake()

    def parked_team(self) -> ParkedTeam | None:
        """The team of workers this backend parks between graphs, if it parks them."""
        return self._team

    def claim_threads(self) -> None:
        """Before every graph on a backend that releases its threads: parked workers are
        back (without this, the graph would run on the calling thread alone)."""
        if self._team is not None:
            self._team.claim()

    def backends(self) -> list[int]:
        """The scheduler's backend list: the device first, the CPU last."""
        return [self.backend] if self.cpu_backend is None else [self.backend, self.cpu_backend]

    def close(self) -> None:
        self.claim_threads()  # the thread may end after this: no region of ours left open
        lib = g.ggml()
        for b in (self.cpu_backend, self.backend):
            if b:
                lib.ggml_backend_free(b)
        if self.threadpool:
            lib.ggml_threadpool_free(self.threadpool)
            self.threadpool = 0
        self.backend = 0
        self.cpu_backend = None
