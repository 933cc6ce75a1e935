"""The live processes fuzzing runs against: servers and an API head started on 127.0.0.1 (each
with folders of its own, stopped by PID), and a probe that shows a server's data plane still
answers."""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmrpc import codec
from llmrpc.codec import FrameKind
from llmrpc.head.client import StageClient
from llmrpc.head.local import read_ready, stop_process
from llmrpc.types import split_address

CASE_TIMEOUT = 30.0  # seconds a case (and the check after it) may take before it counts as hung


@dataclass
class Process:
    """A server or head started here, stopped by its PID."""

    popen: subprocess.Popen[str]
    address: str
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        stop_process(self.popen, 15)


@dataclass
class Server:
    process: Process
    client: StageClient
    data_address: str
    token: str


def start(cmd: list[str], log: Path, ready: str = "", env: dict[str, str] | None = None) -> Process:
    """Start ``cmd`` (its stderr to ``log``); its address from the ready line that starts with
    ``ready`` (a server's own ready line by default)."""
    with open(log, "w") as err:
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=os.environ | (env or {}))
    if not ready:
        return Process(popen, read_ready(popen, 120), log)
    assert popen.stdout is not None
    line = popen.stdout.readline()
    if not line.startswith(ready):
        popen.kill()
        raise RuntimeError(f"{cmd[3]} did not start: {line!r} (see {log})")
    threading.Thread(target=lambda: popen.stdout and popen.stdout.read(), daemon=True).start()
    return Process(popen, line[len(ready) :].split()[0], log)


def start_server(workdir: Path, name: str, model_dir: str) -> Server:
    """An llmrpc-server on 127.0.0.1 with a cache folder and temporary folder of its own."""
    cache, tmp = workdir / f"{name}-cache", workdir / f"{name}-tmp"
    cache.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "llmrpc.cli", "server", "--host", "127.0.0.1", "--port", "0", "--threads", "1",
           "--no-calibrate", "--cache-dir", str(cache), "--model-dir", model_dir]  # fmt: skip
    process = start(cmd, workdir / f"{name}.log", env={"TMPDIR": str(tmp)})  # (a fuzzed share_host's lock files)
    client = StageClient(process.address, timeout=CASE_TIMEOUT)
    info = client.hello()
    return Server(process, client, client.data_address, info.data_token)


@dataclass
class Probe:
    """A data connection of its own to a server: a FORWARD for no session gets an ERROR back
    at once, which shows the server's compute loop goes on."""

    server: Server
    link: int = 0
    sock: socket.socket | None = None
    reader: codec.FrameReader = field(default_factory=lambda: codec.FrameReader(1 << 30))
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1 << 62))

    def connect(self) -> None:
        self.link = secrets.randbits(60) + 1
        host, port = split_address(self.server.data_address)
        self.sock = socket.create_connection((host, port), timeout=CASE_TIMEOUT)
        self.reader = codec.FrameReader(1 << 30)
        hello = {"token": self.server.token, "link": self.link, "protocol": 1}
        self.sock.sendall(b"".join(codec.encode_frame(FrameKind.HELLO, 0, hello)))
        if self._wait(0) is None:
            raise RuntimeError(f"{self.server.data_address} did not welcome the probe")

    def answers(self) -> bool:
        """Whether the server answers a FORWARD within CASE_TIMEOUT."""
        rid = next(self.ids)
        meta = {"route": [[self.server.data_address, self.server.token, ["fuzz-probe"]]], "hop": 0,
                "link": self.link, "pos": [0], "rows": [1]}  # fmt: skip
        for attempt in range(2):  # a connection the server closed is made again once
            try:
                if self.sock is None:
                    self.connect()
                assert self.sock is not None
                self.sock.sendall(b"".join(codec.encode_frame(FrameKind.FORWARD, rid, meta, [np.ones(1, np.int32)])))
                return self._wait(rid) is not None
            except OSError:
                if self.sock is not None:
                    self.sock.close()
                self.sock = None
                if attempt:
                    raise
        return False

    def _wait(self, rid: int) -> codec.DataFrame | None:
        assert self.sock is not None
        deadline = time.monotonic() + CASE_TIMEOUT
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError("the probe's connection closed")
            for frame in self.reader.feed(data):
                if frame.request_id == rid:
                    return frame
        return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
