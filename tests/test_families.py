"""Every supported family, as tiny random models, through 1, 2 and 3 real servers against
llama.cpp: logits bit-identical (the same ggml kernels on the same batch layout), greedy text
identical, sliding-window caches past their wrap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmrpc.farm import Farm
from llmrpc.model.gguf_model import read_model
from llmrpc.model.synthetic import FAMILIES, family_spec, write_gguf
from llmrpc.reference import reference_llama
from llmrpc.sampling import SamplingParams
from llmrpc.server.native import hop_library

from .test_generation import native_steps

# llama has tests of its own (test_tiny_model, test_smollm2)
FAMILY_NAMES = sorted(set(FAMILIES) - {"llama"})
TYPES = ("F32", "Q8_0")
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    d = tmp_path_factory.mktemp("families")
    return {
        (name, t): write_gguf(d / f"{name}-{t}.gguf", family_spec(name, weight_type=t, seed=11))
        for name in FAMILY_NAMES
        for t in TYPES
    }


def llama_cpp_logits(path: str, tokens: list[int]) -> np.ndarray:
    llm = reference_llama(path, n_ctx=512, logits_all=True, n_threads=2)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_cpp_greedy(path: str, tokens: list[int], n: int, n_ctx: int = 512) -> list[int]:
    llm = reference_llama(path, n_ctx=n_ctx, n_threads=2)
    out: list[int] = []
    for t in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) == n:
            return out
    raise AssertionError("llama.cpp stopped early")


@pytest.mark.parametrize("weight_type", TYPES)
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_logits_equal_llama_cpp_through_1_2_3_servers(
    family_models: dict[tuple[str, str], str], servers: list[str], prompt_tokens: list[int], name: str, weight_type: str
) -> None:
    path = family_models[name, weight_type]
    ref = llama_cpp_logits(path, prompt_tokens)
    assert np.abs(ref).max() > 0.1  # not a degenerate model
    for n_servers in (1, 2, 3):
        with Farm(path, servers[:n_servers], ctx_size=512) as farm:
            assert len(farm.plan) == n_servers
            got = farm.logits(prompt_tokens)
        np.testing.assert_array_equal(got, ref, err_msg=f"{name} {weight_type} through {n_servers} servers")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_greedy_text_equals_llama_cpp(
    family_models: dict[tuple[str, str], str], servers: list[str], prompt_tokens: list[int], name: str
) -> None:
    path = family_models[name, "Q8_0"]
    want = llama_cpp_greedy(path, prompt_tokens, 32)
    assert len(set(want)) > 3  # a model that says something
    for n_servers in (1, 3):
        with Farm(path, servers[:n_servers], ctx_size=512) as farm:
            got = list(farm.generate_tokens(prompt_tokens, 32, GREEDY, stop_at_eog=False))
        assert got == want, f"{name} through {n_servers} servers"


@pytest.mark.parametrize("name", ["cohere2", "gemma2", "gemma3", "gpt-oss", "olmo2"])
def test_sliding_window_cache_past_its_wrap(tmp_path: Path, servers: list[str], name: str) -> None:
    """A window of 8 keeps 768 cells (window + one batch, padded); a prompt of 700 (two
    batches) and 100 tokens more go round it, placed as llama.cpp places them. The steps are
    the native hop's (server/hop.c places each row in the window's cells itself), but for the
    first ones and those where a decode graph is rebuilt."""
    path = write_gguf(tmp_path / "m.gguf", family_spec(name, weight_type="Q8_0", sliding_window=8, seed=5))
    rng = np.random.default_rng(9)
    prompt = [1] + [int(t) for t in rng.integers(3, 320, size=699)]
    want = llama_cpp_greedy(path, prompt, 100, n_ctx=1024)
    before = [native_steps(a) for a in servers[:2]]
    with Farm(path, servers[:2], ctx_size=1024) as farm:
        got = list(farm.generate_tokens(prompt, 100, GREEDY, stop_at_eog=False))
    assert got == want
    steps = [native_steps(a) - b for a, b in zip(servers[:2], before, strict=True)]
    if hop_library() is not None:  # (no C compiler: every step is Python's, as before)
        assert all(100 - 8 <= n <= 100 for n in steps), steps


def test_an_unsupported_family_names_itself_and_the_supported_ones(tmp_path: Path) -> None:
    data = Path(write_gguf(tmp_path / "m.gguf", family_spec("llama"))).read_bytes()
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4 + 8  # the value: type (u32), length (u64), then "llama"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:at] + b"xlama" + data[at + 5 :])
    with pytest.raises(ValueError, match=r"architecture 'xlama' is not supported \(supported: .*gemma3.*qwen3moe"):
        read_model(bad)
