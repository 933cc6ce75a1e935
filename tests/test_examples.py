"""The examples run as they are, on a tiny model (real servers, started by the examples)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_generate(tiny_models: dict[str, str]) -> None:
    out = run("generate.py", "--model", tiny_models["Q8_0"], "--servers", "2", "-n", "8")
    assert out.count("# 127.0.0.1:") == 2 and "layers [0, 2)" in out and "layers [2, 4)" in out


def test_remote_farm(tiny_models: dict[str, str], servers: list[str]) -> None:
    out = run("remote_farm.py", "--model", tiny_models["Q4_0"], "-n", "8", *servers)
    assert all(f"# {a}: layers" in out for a in servers)


def test_concurrent_streams(tiny_models: dict[str, str]) -> None:
    out = run("concurrent_streams.py", "--model", tiny_models["F32"], "--servers", "2", "--clients", "3", "-n", "6")
    assert [line[:3] for line in out.splitlines() if line.startswith("[")] == ["[0]", "[1]", "[2]"]
    assert "tokens from 3 streams in" in out


def test_openai_client(tiny_models: dict[str, str]) -> None:
    out = run("openai_client.py", "--model", tiny_models["Q8_0"], "-n", "6")
    assert out.startswith("# http://127.0.0.1:") and "# models: ['tiny-Q8_0']" in out
    assert "# finish_reason: length" in out
