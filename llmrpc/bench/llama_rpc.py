"""llama.cpp's own RPC backend on the same split, the baseline llmrpc means to beat: one
ggml-rpc-server per stage on 127.0.0.1 and llama-bench --rpc in front of them.

llama-cpp-python ships neither program, so ``python -m llmrpc.bench.llama_rpc build`` compiles them once
from the llama.cpp source inside the pinned llama-cpp-python sdist (from PyPI; about 15 minutes
on 2 cores) into ~/.cache/llmrpc/bench/llama-rpc. ``LLMRPC_LLAMA_RPC_BIN`` may name another build's
bin folder. Without either, the bench says so and goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import click

from llmrpc.bench.models import cache_dir

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned version: its vendored llama.cpp is the one llmrpc runs on


def build_dir() -> Path:
    return cache_dir() / "llama-rpc"


def bin_dir() -> Path | None:
    """Where ggml-rpc-server and llama-bench are, or None when they are not built."""
    env = os.environ.get("LLMRPC_LLAMA_RPC_BIN")
    for d in [Path(env)] if env else [build_dir() / "src" / "build" / "bin"]:
        if (d / "ggml-rpc-server").exists() and (d / "llama-bench").exists():
            return d
    return None


def unpacked_source(root: Path, sdist: Path) -> Path:
    """llama.cpp's source from the sdist, at ``root/src`` (unpacked once; a ``src`` left as a
    link to a copy that is gone is replaced)."""
    src = root / "src"
    if src.is_symlink() and not src.exists():
        src.unlink()
    if not src.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(root / "unpacked", filter="data")
        shutil.move(str(root / "unpacked" / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"), src)
    return src


def build() -> Path:
    """Download the sdist, configure with GGML_RPC, build the two programs."""
    root = build_dir()
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
             "--no-binary", ":all:", "-d", str(root)],
            check=True,
        )  # fmt: skip
    src = unpacked_source(root, sdist)
    subprocess.run(
        ["cmake", "-B", "build", "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DCMAKE_BUILD_TYPE=Release"],
        cwd=src, check=True,
    )  # fmt: skip
    jobs = str(os.cpu_count() or 1)
    subprocess.run(["cmake", "--build", "build", "--target", "ggml-rpc-server", "llama-bench", "-j", jobs], cwd=src,
                   check=True)  # fmt: skip
    return src / "build" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaRpc:
    """``n`` ggml-rpc-servers on 127.0.0.1 (started here, stopped by PID) and llama-bench runs
    through them with every layer on them (-ngl 99), split as llama.cpp splits."""

    def __init__(self, bins: Path, model: str, n: int, threads: int) -> None:
        self.bins, self.model, self.n, self.threads = bins, model, n, threads
        self.ports = [_free_port() for _ in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for port in self.ports:
                cmd = [str(bins / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)]
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for port in self.ports:
                _wait_port(port)
        except BaseException:
            self.close()
            raise

    def rate(self, pp: int, tg: int) -> float:
        """tok/s of one llama-bench repetition of pp (tg 0) or tg (pp 0)."""
        cmd = [
            str(self.bins / "llama-bench"), "-m", self.model, "--rpc", ",".join(f"127.0.0.1:{p}" for p in self.ports),
            "-ngl", "99", "-p", str(pp), "-n", str(tg), "-r", "1", "-t", str(self.threads), "--repack", "0",
            "-o", "json",
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"llama-bench failed: {out.stderr[-800:]}")
        return float(json.loads(out.stdout)[0]["avg_ts"])

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"ggml-rpc-server on port {port} did not start")


@click.group()
def cli() -> None:
    pass


@cli.command("build")
def build_cmd() -> None:
    """Compile ggml-rpc-server and llama-bench from the pinned sdist's llama.cpp (once)."""
    print(build())


if __name__ == "__main__":
    cli()
