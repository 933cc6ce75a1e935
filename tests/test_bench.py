"""llmrpc-bench end to end on a tiny model: a real run, its table and its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from llmrpc.bench.llama_rpc import unpacked_source
from llmrpc.bench.run import Result, paired_ratios
from llmrpc.model.synthetic import SyntheticSpec

from .conftest import model_file


@pytest.mark.slow
def test_bench_measures_llama_cpp_and_a_server(tmp_path: Path) -> None:
    model = model_file(tmp_path, "tiny.gguf", SyntheticSpec(weight_type="Q8_0", n_vocab=10240, seed=3))
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "llmrpc.bench.run", "--model", model, "--servers", "1", "--reps", "2",
           "--pp", "32", "--tg", "8", "--threads", "2", "--serving", "1", "--no-lan", "--no-llama-rpc",
           "--no-via-head", "--no-load", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "vs llama.cpp" in run.stdout and "paired" in run.stdout
    result = json.loads(out.read_text())
    rows = {(r["config"], r["test"]): r for r in result["results"]}
    configs = ("llama.cpp", "llmrpc x1", "x1 head-sampled")  # decode: the servers generating, or the head
    assert set(rows) == {(c, t) for c in configs for t in ("pp32", "tg8")}
    for r in rows.values():
        assert len(r["samples"]) == 2 and all(s > 0 for s in r["samples"])
        ref = rows[("llama.cpp", r["test"])]["samples"]
        assert r["paired_ratios"] == pytest.approx([x / b for x, b in zip(r["samples"], ref, strict=True)])
    (serving,) = result["serving"]["1"]
    assert serving["concurrency"] == 1 and serving["output_tokens_per_second"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_names_a_device_this_build_lacks(tmp_path: Path) -> None:
    model = model_file(tmp_path, "tiny.gguf", SyntheticSpec(weight_type="Q8_0", seed=3))
    run = subprocess.run(
        [sys.executable, "-m", "llmrpc.bench.run", "--model", model, "--device", "NoSuchGPU0", "--no-load"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "no device named 'NoSuchGPU0' (this build has: " in run.stderr


@pytest.mark.parametrize(
    ("llama", "ours", "paired"),
    [
        ([100.0, 50.0], [90.0, 45.0], [0.9, 0.9]),  # the machine slowed down: both alike
        ([100.0, 50.0], [50.0, 100.0], [0.5, 2.0]),  # a ratio of means would say 1.0x
        ([80.0], [88.0], [1.1]),
    ],
)
def test_paired_ratios_compare_within_a_repetition(llama: list[float], ours: list[float], paired: list[float]) -> None:
    results = [
        Result("llama.cpp", "tg8", 0.0, 0.0, llama),
        Result("llmrpc x1", "tg8", 0.0, 0.0, ours),
        Result("llmrpc x1", "pp8", 0.0, 0.0, ours),  # no llama.cpp figure for this test: no ratio
    ]
    got = paired_ratios(results)
    assert set(got) == {("llama.cpp", "tg8"), ("llmrpc x1", "tg8")}
    assert got[("llama.cpp", "tg8")] == [1.0] * len(llama)
    assert got[("llmrpc x1", "tg8")] == pytest.approx(paired)


def test_llama_rpc_source_is_unpacked_once_and_past_a_dangling_link(tmp_path: Path) -> None:
    """The llama.cpp RPC build's source comes out of the sdist once; a ``src`` that is a link to
    a copy gone since (a cleared /tmp) is replaced instead of failing the build."""
    tree = tmp_path / "tree" / "llama_cpp_python-9.9.9" / "vendor" / "llama.cpp"
    tree.mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text("project(llama.cpp)\n")
    sdist = tmp_path / "root" / "llama_cpp_python-9.9.9.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "tree" / "llama_cpp_python-9.9.9", arcname="llama_cpp_python-9.9.9")
    root = sdist.parent
    (root / "src").symlink_to(tmp_path / "gone" / "llama.cpp")
    src = unpacked_source(root, sdist)
    assert src == root / "src" and not src.is_symlink()
    assert (src / "CMakeLists.txt").read_text() == "project(llama.cpp)\n"
    (src / "built").write_text("kept")  # a second call leaves what is there
    assert (unpacked_source(root, sdist) / "built").read_text() == "kept"


def test_conformance_through_the_cli(tmp_path: Path) -> None:
    """`llmrpc-bench conformance` on one family in a K-quant mix made by llama.cpp's quantizer:
    its verdicts, its table and its JSON."""
    out = tmp_path / "conformance.json"
    cmd = [sys.executable, "-m", "llmrpc.bench.cli", "conformance", "--families", "qwen3", "--types", "Q4_K_M",
           "--servers", "2", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| `qwen3` | Q4_K_M | identical | identical |" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["servers"], r["stages"]) for r in rows] == [(1, 1), (2, 2)]
    assert all(r["max_rel_diff"] == 0 and r["greedy_equal"] for r in rows)
