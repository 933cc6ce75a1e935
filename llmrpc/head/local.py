"""Servers started by the head itself on 127.0.0.1, stopped (by PID) when it ends."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

READY_PREFIX = "llmrpc-server listening on "
# servers on one machine's cores: end their OpenMP threads after each batch (idle workers spin
# ~3 ms on the cores the next stage needs) and keep thread i on core i (they take turns)
SHARED_CORES_FLAGS = ("--release-threads", "--pin-threads")


@dataclass
class LocalServers:
    count: int
    threads: int | None = None
    device: str | None = None
    extra_args: list[str] = field(default_factory=list)
    per_server_args: list[list[str]] = field(default_factory=list)  # server i also gets per_server_args[i]
    calibrate: bool | None = None  # None: only a server alone on this machine measures its speed
    startup_timeout: float = 60.0
    env: dict[str, str] = field(default_factory=dict)  # added to the servers' environment (e.g. LLMRPC_TOKEN)
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    _lock_file: str = ""

    def start(self) -> list[str]:
        try:
            for i in range(self.count):
                self._start_one(self.per_server_args[i] if i < len(self.per_server_args) else [])
        except Exception:
            self.stop()
            raise
        return self.addresses

    def _start_one(self, own_args: list[str]) -> None:
        # --exit-with-parent: a head that is killed outright (or crashes) leaves no server behind
        cmd = [sys.executable, "-m", "llmrpc.cli", "server", "--host", "127.0.0.1", "--port", "0", "--exit-with-parent"]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        if self.device:
            cmd += ["--device", self.device]
        if self.count > 1 and "--host-lock" not in self.extra_args:
            cmd += ["--host-lock", self._lock_path()]
        if self.count > 1:  # they share this machine's cores and take turns on them
            cmd += [flag for flag in SHARED_CORES_FLAGS if flag not in self.extra_args]
        calibrate = self.count == 1 if self.calibrate is None else self.calibrate
        if not calibrate and "--no-calibrate" not in self.extra_args:
            # Same device, measured at the same moment: the figures would only differ by the
            # noise of measuring side by side, and skew the plan. Equal speeds split evenly.
            cmd += ["--no-calibrate"]
        cmd += self.extra_args + own_args
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=os.environ | self.env)
        self.processes.append(proc)
        address = read_ready(proc, self.startup_timeout)
        self.addresses.append(address)
        logger.info("started local server %s (pid %d)", address, proc.pid)

    def _lock_path(self) -> str:
        if not self._lock_file:
            fd, self._lock_file = tempfile.mkstemp(prefix="llmrpc-host-", suffix=".lock")
            os.close(fd)
        return self._lock_file

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        self.addresses.clear()
        if self._lock_file:
            os.unlink(self._lock_file)
            self._lock_file = ""

    def __enter__(self) -> LocalServers:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """Stop a process started here, by its PID: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def read_ready(proc: subprocess.Popen[str], timeout: float) -> str:
    """Wait for the server's ready line and return its address; keep draining stdout."""
    assert proc.stdout is not None
    result: list[str] = []
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not result and line.startswith(READY_PREFIX):
                result.append(line[len(READY_PREFIX) :].split()[0])
                done.set()
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    if not done.wait(timeout) or not result:
        code = proc.poll()
        raise RuntimeError(
            f"local llmrpc-server (pid {proc.pid}) did not start"
            + (f": it exited with code {code}" if code is not None else f" within {timeout:.0f} s")
        )
    return result[0]
