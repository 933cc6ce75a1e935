"""Certify a model on a farm: the farm's logits and greedy text for a few prompts against
llama.cpp (llama-cpp-python) running the same file on this machine.

Where the servers compute on the CPU with the kernels llama.cpp uses here, the logits are
identical; GPU servers use other kernels, so there the logits are close and the greedy text
is expected to agree for a while, not necessarily to the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from llmrpc.farm import Farm
from llmrpc.model.kv import CacheConfig
from llmrpc.reference import reference_llama
from llmrpc.sampling import SamplingParams

logger = logging.getLogger(__name__)

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
)
CLOSE = 1e-3  # largest logit difference, relative to the largest logit, still called close


@dataclass(frozen=True)
class PromptCheck:
    prompt: str
    n_tokens: int
    max_rel_diff: float  # max |Δlogit| / max |logit| over the prompt's positions
    greedy: int  # greedy tokens compared
    agree: int  # leading greedy tokens that agree


@dataclass(frozen=True)
class Verdict:
    checks: tuple[PromptCheck, ...]

    @property
    def identical(self) -> bool:
        return all(c.max_rel_diff == 0 and c.agree == c.greedy for c in self.checks)

    @property
    def close(self) -> bool:
        return all(c.max_rel_diff <= CLOSE and c.agree == c.greedy for c in self.checks)

    def line(self) -> str:
        worst = max(c.max_rel_diff for c in self.checks)
        agree = sum(c.agree for c in self.checks)
        total = sum(c.greedy for c in self.checks)
        what = (
            "IDENTICAL to llama.cpp"
            if self.identical
            else "CLOSE to llama.cpp"
            if self.close
            else "DIFFERS from llama.cpp"
        )
        return (
            f"{what}: {len(self.checks)} prompts, max |dlogit| {worst:.2e} of the largest logit, "
            f"{agree}/{total} greedy tokens agree"
        )


def reference(
    path: str, tokens: list[int], n_greedy: int, n_ctx: int, is_eog: Callable[[int], bool], cache: CacheConfig
) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for every position of ``tokens`` and its greedy continuation (up to an
    end token), each from a fresh state, with the farm's attention and KV cache types."""
    resolved = cache.resolved()
    args = {"flash_attn": bool(resolved.flash_attn), "type_k": resolved.ggml_k, "type_v": resolved.ggml_v}
    llm = reference_llama(path, n_ctx=n_ctx, logits_all=True, **args)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm = reference_llama(path, n_ctx=n_ctx, **args)
    greedy: list[int] = []
    if n_greedy:
        for t in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if is_eog(int(t)):
                break
            greedy.append(int(t))
            if len(greedy) == n_greedy:
                break
    return logits, greedy


def verify(farm: Farm, prompts: Sequence[str] = PROMPTS, n_greedy: int = 32) -> Verdict:
    checks = []
    for prompt in prompts:
        tokens = farm.tokenizer.encode(prompt)
        want_logits, want = reference(
            farm.model_path, tokens, n_greedy, farm.ctx_size, farm.tokenizer.is_eog, farm.cache
        )
        got_logits = farm.logits(tokens)
        got = list(farm.generate_tokens(tokens, len(want), SamplingParams(temperature=0))) if want else []
        diff = float(np.abs(got_logits - want_logits).max() / max(np.abs(want_logits).max(), 1e-30))
        agree = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        checks.append(PromptCheck(prompt, len(tokens), diff, len(want), agree))
        logger.info("%r: max rel diff %.2e, %d/%d greedy tokens agree", prompt, diff, agree, len(want))
    return Verdict(tuple(checks))
