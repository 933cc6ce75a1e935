"""The native hop (hop.c): built with the system's C compiler on first use, kept in the user's
cache, loaded with ctypes. Without a compiler (or with ``LLMRPC_NATIVE_HOP=0``) servers do the
same work in Python; :func:`hop_library` says why in the log, once."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llmrpc import paths

logger = logging.getLogger(__name__)

ENV = "LLMRPC_NATIVE_HOP"  # "0": never use the native hop
SOURCE = Path(__file__).with_name("hop.c")

HOP_DONE, HOP_NOT_MINE, HOP_NOTHING, HOP_ENDED = 0, 1, 2, 3
HOP_BROKEN, HOP_COMPUTE_FAILED = -1, -2

_p = ctypes.c_void_p
_i64 = ctypes.c_int64


class Hop(ctypes.Structure):
    """hop.c's ``Hop``, field for field."""

    _fields_ = [
        ("in_fd", _i64), ("out_fd", _i64), ("lock_fd", _i64),
        ("link", _i64), ("rid", _i64), ("hop", _i64),
        ("first", _i64), ("n_embd", _i64), ("n_vocab", _i64), ("n_embd_kv", _i64),
        ("length", _i64), ("limit", _i64), ("n_kv", _i64), ("allowed", _i64),
        ("pos_buf", _p), ("k_buf", _p), ("v_rows", _p), ("v_buf", _p), ("mask_buf", _p),
        ("sched", _p), ("gf", _p), ("out", _p), ("inp_x", _p), ("inp_pos", _p), ("inp_k", _p), ("inp_v", _p),
        ("inp_mask", _p),
        ("team_state", _p), ("sem", _p), ("n_threads", _i64), ("sem_wait_fn", _p),
        ("tensor_set", _p), ("tensor_get", _p), ("compute", _p), ("synchronize", _p),
        ("gomp_start", _p), ("gomp_end", _p),
        ("buf", _p),
        ("last", _i64), ("head_fd", _i64), ("n_eog", _i64), ("gen_limit", _i64), ("eog", _p),
        ("pos", _i64), ("step", _i64), ("n", _i64), ("sent", _i64), ("status", _i64), ("err", _i64),
        ("token", _i64), ("mask_f16", _i64), ("reported", _i64), ("head_err", _i64),
        ("has_full", _i64),
        ("swa_size", _i64), ("swa_window", _i64), ("swa_n_kv", _i64), ("swa_pad", _i64), ("swa_n_v", _i64),
        ("swa_pos", _p), ("swa_heads", _p), ("swa_scratch", _p), ("swa_k_buf", _p), ("swa_v_rows", _p),
        ("swa_v_buf", _p),
        ("swa_mask_buf", _p), ("swa_inp_k", _p), ("swa_inp_v", _p), ("swa_inp_mask", _p),
    ]  # fmt: skip


def cache_dir() -> Path:
    return paths.cache_dir("native")


@functools.cache
def hop_library() -> ctypes.CDLL | None:
    """The built hop, or None where it cannot be had (the reason is logged)."""
    if os.environ.get(ENV) == "0":
        logger.info("native hop off (%s=0): generation steps go through the Python data plane", ENV)
        return None
    try:
        path = _built()
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("no native hop (%s): generation steps go through the Python data plane", e)
        return None
    lib.llmrpc_hop.restype = ctypes.c_int
    lib.llmrpc_hop.argtypes = [ctypes.POINTER(Hop)]
    return lib


def _built() -> Path:
    """hop.c compiled."""
    path = build_c(SOURCE, ["-shared", "-fPIC", "-lm", "-lpthread"], ".so")
    logger.info("the native hop: %s", path)
    return path


def build_c(source: Path, flags: list[str], suffix: str) -> Path:
    """``source`` compiled with the system's C compiler into the cache, named by the source's
    hash (a changed source is built anew); raises RuntimeError without a compiler."""
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}{suffix}"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, "-O2", "-o", tmp, str(source), *flags]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:500]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: processes starting together each build, one file stays
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


FRAME_BYTES = 28 + 36  # a STEP's header and description (codec.DATA_HEADER, codec.STEP_META)


class NativeHop:
    """A session's next decode steps through the native hop: ``hop`` filled by the engine (the
    graph, its inputs, the lock and the team), the route by the data plane (:meth:`route`).
    ``valid`` says whether what ``hop`` points to still exists; ``done`` takes a step's results
    back into the engine's state (the session's length, the row's mask)."""

    def __init__(
        self, lib: ctypes.CDLL, hop: Hop, valid: Callable[[], bool], done: Callable[[Hop], None], keep: object
    ) -> None:
        self._call = lib.llmrpc_hop
        self.hop = hop
        self._ref = ctypes.byref(hop)
        self._buf = ctypes.create_string_buffer(FRAME_BYTES + 4 * int(hop.n_embd))
        hop.buf = ctypes.addressof(self._buf)
        self.valid = valid
        self._done = done
        self._keep = keep  # what the addresses in ``hop`` point into
        self.seconds = 0.0  # the last step's time

    def route(self, in_fd: int, out_fd: int, link: int, rid: int, hop: int) -> None:
        h = self.hop
        h.in_fd, h.out_fd, h.link, h.rid, h.hop = in_fd, out_fd, link, rid, hop

    def generate(self, head_fd: int, eog: frozenset[int], limit: int) -> None:
        """At the last server of a greedy generation: where its tokens are reported, which end
        it, the positions it may fill."""
        h = self.hop
        self._eog = (ctypes.c_int32 * max(1, len(eog)))(*sorted(eog))
        h.last, h.head_fd, h.n_eog, h.gen_limit = 1, head_fd, len(eog), limit
        h.eog = ctypes.addressof(self._eog)

    def run(self) -> int:
        """Take the next STEP on the connection and send it on, or leave it (HOP_NOT_MINE)."""
        started = time.perf_counter()
        result = int(self._call(self._ref))
        if result in (HOP_DONE, HOP_ENDED, HOP_COMPUTE_FAILED):  # a step computed
            self.seconds = time.perf_counter() - started  # the step's time here, frame in to frame out
            self._done(self.hop)
        return result

    def unsent(self) -> bytes:
        """What the last step's send left for later (the socket took only part of it)."""
        total = FRAME_BYTES + (4 if self.hop.last else 4 * int(self.hop.n_embd))
        sent = int(self.hop.sent)
        return b"" if sent >= total else self._buf.raw[sent:total]
