"""Logits of a tiny random llama model through 1, 2 and 3 real servers against llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

from llmrpc.farm import Farm
from llmrpc.reference import reference_llama

from .conftest import TINY_TYPES


def llama_cpp_logits(path: str, tokens: list[int]) -> np.ndarray:
    llm = reference_llama(path, n_ctx=512, logits_all=True, n_threads=2)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.mark.parametrize("weight_type", TINY_TYPES)
@pytest.mark.parametrize("n_servers", [1, 2, 3])
def test_logits_match_llama_cpp(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int], weight_type: str, n_servers: int
) -> None:
    path = tiny_models[weight_type]
    ref = llama_cpp_logits(path, prompt_tokens)
    with Farm(path, servers[:n_servers], ctx_size=512) as farm:
        assert len(farm.plan) == n_servers
        assert [(a.start, a.end) for a in farm.plan][-1][1] == 4
        got = farm.logits(prompt_tokens)
    assert got.shape == ref.shape == (len(prompt_tokens), 320)
    assert np.abs(ref).max() > 0.1  # the model is not degenerate
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


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
    assert np.abs(np.stack(rows) - full).max() <= 1e-4 * np.abs(full).max()


def test_rewind_replaces_the_tail(tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]) -> None:
    """Forwarding at an earlier position drops what followed: the cache is rewritten."""
    path = tiny_models["F32"]
    other = prompt_tokens[:10] + [5, 6, 7]
    with Farm(path, servers[:2], ctx_size=512) as farm:
        want = farm.logits(other)[-1]
        with farm.session() as s:
            s.forward(prompt_tokens)
            got = s.forward([5, 6, 7], start_pos=10)[-1]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


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
