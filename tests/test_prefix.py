"""Prefix reuse: a session that starts from a held prefix computes the bits a new one computes,
through real servers; what the servers keep stays within their budgets."""

from __future__ import annotations

import numpy as np
import pytest

from llmrpc.farm import Farm
from llmrpc.head.client import StageClient
from llmrpc.head.local import LocalServers
from llmrpc.head.prefix import last_batch_start, reusable_rows
from llmrpc.model.gguf_model import read_model
from llmrpc.model.kv import CacheConfig, kv_bytes
from llmrpc.model.synthetic import SyntheticSpec
from llmrpc.sampling import SamplingParams

from .conftest import model_file

GREEDY = SamplingParams(temperature=0)
BATCH = 16


@pytest.mark.parametrize(
    ("held", "exact", "prompt", "ring", "rows"),
    [
        (list(range(40)), 32, list(range(70)), None, 32),  # whole batches only, not the 40 held
        (list(range(40)), 32, list(range(33)), None, 32),  # before the prompt's last batch (starts at 32)
        (list(range(40)), 32, list(range(32)), None, 16),  # ... which starts at 16
        (list(range(40)), 32, [0, 1, 2] + [9] * 60, None, 0),  # 3 tokens in common: no whole batch
        (list(range(40)), 32, list(range(20)) + [9] * 60, None, 16),
        (list(range(40)), 16, list(range(70)), None, 16),  # only 16 computed as a new session would
        (list(range(40)), 32, list(range(70)), 40, 32),  # a sliding window's ring held them all
        (list(range(41)), 32, list(range(70)), 40, 0),  # the ring may have reused a cell
    ],
)
def test_reusable_rows_are_whole_batches_of_the_same_tokens(
    held: list[int], exact: int, prompt: list[int], ring: int | None, rows: int
) -> None:
    assert reusable_rows(held, exact, prompt, BATCH, ring) == rows


def test_a_session_from_a_held_prefix_computes_the_bits_of_a_new_one(
    tiny_models: dict[str, str], servers: list[str]
) -> None:
    """A generation leaves its cache on three servers; a longer prompt that starts with it takes
    its whole batches and computes the rest: every logit of the rest is the bits of the same rows
    computed from an empty cache in the same batches. (Batches of 64 rows: ggml's CPU flash
    attention computes those otherwise than the 37-row last batch of the first prompt, whose rows
    would differ by ~0.05 in a logit if they were taken.)"""
    path = tiny_models["Q8_0"]
    batch = 64
    rng = np.random.default_rng(5)
    first = [1] + [int(t) for t in rng.integers(3, 320, size=100)]
    with Farm(path, servers, ctx_size=512, batch=batch) as farm:
        assert farm.prefix is not None and len(farm.plan) == 3
        reply = list(farm.generate_tokens(first, 8, GREEDY))
        assert len(farm.prefix.kept()) == 1  # its cache, kept on every server
        second = first + reply + [int(t) for t in rng.integers(3, 320, size=60)]
        cut = last_batch_start(len(second), batch)
        with farm.prefix.session(second) as s:
            taken = len(s.tokens)
            assert taken == last_batch_start(len(first), batch) == 64
            farm.prefill(s, second[taken:cut])
            got = s.forward(second[cut:], all_logits=True)
        with farm.prefix.session(second, reuse=False, keep=False) as s:
            assert not s.tokens
            farm.prefill(s, second[:cut])
            want = s.forward(second[cut:], all_logits=True)
        np.testing.assert_array_equal(got, want)
        assert farm.prefix_stats.hits == 64 and farm.prefix_stats.requests == 2
        # the greedy text too, through the servers generating on their own
        cached = list(farm.generate_tokens(second, 16, GREEDY))
        fresh = list(farm.generate_tokens(second, 16, GREEDY, cache_prompt=False))
        assert cached == fresh
