"""Logits of a tiny random llama model through 1, 2 and 3 real servers against llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmrpc.farm import Farm
from llmrpc.model.synthetic import SyntheticSpec, quantize_gguf, write_gguf
from llmrpc.reference import reference_llama
from llmrpc.sampling import SamplingParams

from .conftest import TINY_TYPES

GREEDY = SamplingParams(temperature=0)


def batch_vs_rows_tolerance(farm: Farm) -> float:
    """How far one batch's logits may be from the same rows computed one at a time. On a CPU
    both take the same matmul kernels, but flash attention (on by default, as in llama.cpp)
    splits the attended cells among its threads by how many rows there are (measured: 2e-4 of
    the largest logit); on CUDA a batch and a single row take different matmul kernels
    (measured on an H200: 1.5e-3)."""
    return 1e-3 if all(stage.device == "CPU" for stage in farm.plan) else 5e-3


def llama_cpp_logits(path: str, tokens: list[int]) -> np.ndarray:
    llm = reference_llama(path, n_ctx=512, logits_all=True, n_threads=2)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.fixture(scope="module")
def q4_k_m_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny model whose rows hold whole 256-value K-quant blocks, made Q4_K_M (Q4_K and Q6_K by
    tensor) by llama.cpp's own quantizer."""
    d = tmp_path_factory.mktemp("q4km")
    src = write_gguf(d / "f32.gguf", SyntheticSpec(n_embd=256, n_head=4, n_ff=512, seed=8))
    return quantize_gguf(src, d / "q4_k_m.gguf", "Q4_K_M")


@pytest.mark.parametrize("weight_type", [*TINY_TYPES, "Q4_K_M"])
@pytest.mark.parametrize("n_servers", [1, 2, 3])
def test_logits_match_llama_cpp(
    tiny_models: dict[str, str], q4_k_m_model: str, servers: list[str], prompt_tokens: list[int], weight_type: str,
    n_servers: int,
) -> None:  # fmt: skip
    """Every position's logits through 1, 2 and 3 servers are llama.cpp's (with its defaults:
    repacked weights, flash attention), bit for bit."""
    path = q4_k_m_model if weight_type == "Q4_K_M" else tiny_models[weight_type]
    ref = llama_cpp_logits(path, prompt_tokens)
    with Farm(path, servers[:n_servers], ctx_size=512) as farm:
        assert len(farm.plan) == n_servers
        assert [(a.start, a.end) for a in farm.plan][-1][1] == 4
        got = farm.logits(prompt_tokens)
    assert got.shape == ref.shape == (len(prompt_tokens), 320)
    assert np.abs(ref).max() > 0.1  # the model is not degenerate
    np.testing.assert_array_equal(got, ref)


def test_splits_agree(tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]) -> None:
    path = tiny_models["Q8_0"]
    with Farm(path, servers[:1], ctx_size=512) as farm:
        one = farm.logits(prompt_tokens)
    with Farm(path, servers, ctx_size=512) as farm:
        three = farm.logits(prompt_tokens)
    assert np.abs(one - three).max() <= 1e-4


def test_incremental_decode_matches_one_batch(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    """Feeding a prompt a token at a time through the KV cache gives the batch's logits."""
    path = tiny_models["F32"]
    with Farm(path, servers[:2], ctx_size=512) as farm:
        full = farm.logits(prompt_tokens)
        with farm.session() as s:
            rows = [s.forward([t])[-1] for t in prompt_tokens]
        tol = batch_vs_rows_tolerance(farm)
    assert np.abs(np.stack(rows) - full).max() <= tol * np.abs(full).max()


def test_rewind_replaces_the_tail(tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]) -> None:
    """Forwarding at an earlier position drops what followed: the cache is rewritten."""
    path = tiny_models["F32"]
    other = prompt_tokens[:10] + [5, 6, 7]
    with Farm(path, servers[:2], ctx_size=512) as farm:
        want = farm.logits(other)[-1]
        with farm.session() as s:
            s.forward(prompt_tokens)
            got = s.forward([5, 6, 7], start_pos=10)[-1]
        tol = batch_vs_rows_tolerance(farm)
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_f16_activations_stay_close(tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]) -> None:
    """Hidden states sent as f16 halve the bytes between stages and stay close to f32."""
    path = tiny_models["F32"]
    with Farm(path, servers, ctx_size=512) as farm:
        exact = farm.logits(prompt_tokens)
    with Farm(path, servers, ctx_size=512, f16_activations=True) as farm:
        assert farm.pipeline.f16_activations
        half = farm.logits(prompt_tokens)
    err = np.abs(half - exact).max()
    assert 0 < err <= 1e-2 * np.abs(exact).max()  # not bit-identical, but close


CACHES = {  # Farm's arguments, llama-cpp-python's: the same attention and KV cache on both sides
    "flash f16": ({}, {}),
    "no flash": ({"flash_attn": False}, {"flash_attn": False}),
    "flash q8_0": ({"cache_type_k": "q8_0", "cache_type_v": "q8_0"}, {"type_k": 8, "type_v": 8}),
    "flash q4_0 K, f16 V": ({"cache_type_k": "q4_0"}, {"type_k": 2}),
}


def test_a_cache_type_that_does_not_fit_the_heads_is_refused(tiny_models: dict[str, str], servers: list[str]) -> None:
    with pytest.raises(ValueError, match="q8_0 K cache does not fit heads of 16 values"):
        Farm(tiny_models["F32"], servers[:1], cache_type_k="q8_0")
    with pytest.raises(ValueError, match="needs flash attention"):
        Farm(tiny_models["F32"], servers[:1], flash_attn=False, cache_type_v="q8_0")


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("weight_type", ["Q4_0", "Q8_0"])
def test_logits_past_one_batch_and_position_1000_equal_llama_cpps(
    tmp_path: Path, servers: list[str], weight_type: str, cache: str
) -> None:
    """A 1100-token prompt (three batches of llama.cpp's 512) through three servers, repacked
    weights, with flash attention or not and quantized KV caches: every position's logits are
    llama.cpp's, bit for bit."""
    farm_args, llama_args = CACHES[cache]
    # heads of 32 values: whole blocks of the quantized cache types, not rotated by llama.cpp
    path = write_gguf(
        tmp_path / "m.gguf", SyntheticSpec(n_embd=128, n_head=4, n_ff=256, weight_type=weight_type, seed=4)
    )
    tokens = [1] + [int(t) for t in np.random.default_rng(5).integers(3, 320, size=1099)]
    llm = reference_llama(path, n_ctx=2048, logits_all=True, n_threads=2, **llama_args)
    llm.eval(tokens)
    want = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    with Farm(path, servers, ctx_size=2048, **farm_args) as farm:
        assert len(farm.plan) == 3
        got = farm.logits(tokens)
    np.testing.assert_array_equal(got, want)


def test_greedy_text_past_position_1000_equals_llama_cpps(tiny_models: dict[str, str], servers: list[str]) -> None:
    path = tiny_models["Q4_0"]
    prompt = [1] + [int(t) for t in np.random.default_rng(6).integers(3, 320, size=959)]
    llm = reference_llama(path, n_ctx=2048, n_threads=2)
    want = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        want.append(int(t))
        if len(want) == 80:
            break
    with Farm(path, servers, ctx_size=2048) as farm:
        got = list(farm.generate_tokens(prompt, 80, GREEDY, stop_at_eog=False))
    assert got == want
