"""The prefix cache through the OpenAI API (`llmrpc-head serve`, a real process over two local
servers): a conversation's turns take the earlier turns' whole batches, users that share a system
prompt compute only their own part, and every answer is the one computed without the cache."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from llmrpc.head.prefix import common_length, last_batch_start
from llmrpc.head.tokenizer import Tokenizer

from .test_metrics import scrape

KEY = "metrics-key"  # (the key test_metrics.scrape sends)
PREFIX = "llmrpc-head serve listening on "
BATCH = 32
SYSTEM = (
    "You are a patient tutor of geography. You answer in one or two short sentences, you name the "
    "country, the river or the city the question is about, and you never make up a fact: when you do "
    "not know, you say so. You write plain text, without lists, and you avoid repeating the question."
)


@pytest.fixture(scope="module")
def api(smollm2: str) -> Iterator[str]:
    cmd = [sys.executable, "-m", "llmrpc.cli", "serve", "--model", smollm2, "--port", "0", "--local", "2",
           "--threads", "1", "--parallel", "2", "--ctx-size", "1024", "--batch-size", str(BATCH),
           "--api-key", KEY]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(PREFIX), f"no ready line: {line!r}"
        yield line[len(PREFIX) :].split()[0]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def client(api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api, api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tokenizer(smollm2: str) -> Tokenizer:
    return Tokenizer(smollm2)


def _counters(api: str) -> tuple[float, float]:
    """The prefix cache's queries and hits so far, in tokens (one replica)."""
    samples = scrape(api)[1]
    one = (("replica", "0"),)
    return samples[("llmrpc:prefix_cache_queries_total", one)], samples[("llmrpc:prefix_cache_hits_total", one)]


def _ask(client: openai.OpenAI, messages: list[dict[str, str]], cache_prompt: bool = True) -> Any:
    return client.chat.completions.create(
        model="any", messages=messages, max_tokens=24, temperature=0,  # type: ignore[arg-type]
        extra_body={"cache_prompt": cache_prompt},
    )  # fmt: skip


def _turn(client: openai.OpenAI, api: str, messages: list[dict[str, str]]) -> tuple[str, int, float, float]:
    """The answer with the cache (checked equal to the one without), its prompt's tokens, and the
    queries and hits it added."""
    before = _counters(api)
    want = _ask(client, messages, cache_prompt=False)
    assert _counters(api) == before  # an opted-out request asks nothing of the cache
    got = _ask(client, messages)
    after = _counters(api)
    assert got.choices[0].message.content == want.choices[0].message.content
    return got.choices[0].message.content, got.usage.prompt_tokens, after[0] - before[0], after[1] - before[1]


def test_a_four_turn_chat_reuses_its_earlier_turns(client: openai.OpenAI, api: str) -> None:
    questions = ["What is the capital of France?", "Which river flows through it?", "And through Berlin?",
                 "Which of the two rivers is longer?"]  # fmt: skip
    messages = [{"role": "system", "content": SYSTEM}]
    previous = 0
    for i, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        answer, prompt, queries, hits = _turn(client, api, messages)
        assert answer and queries == prompt
        # turns 2-4 take every whole batch of the turn before (its last batch was computed
        # otherwise than this prompt computes those rows: it is computed again)
        assert hits == (last_batch_start(previous, BATCH) if i else 0), f"turn {i + 1}"
        assert i == 0 or hits >= BATCH
        messages.append({"role": "assistant", "content": answer})
        previous = prompt


def test_users_sharing_a_system_prompt_compute_only_their_own_part(
    client: openai.OpenAI, api: str, tokenizer: Tokenizer
) -> None:
    system = {"role": "system", "content": SYSTEM + " " + SYSTEM.replace("geography", "history")}
    users = [[system, {"role": "user", "content": q}] for q in ("Who was Napoleon?", "When did Rome fall?")]
    prompts = [tokenizer.encode_chat(m) for m in users]
    shared = common_length(*prompts)
    assert shared > 4 * BATCH  # the system prompt
    _, first, _, _ = _turn(client, api, users[0])
    _, second, _, hits = _turn(client, api, users[1])
    assert (first, second) == (len(prompts[0]), len(prompts[1]))
    assert hits == shared // BATCH * BATCH  # the shared part's whole batches
    own = second - shared
    assert second - hits < own + BATCH  # computed: its own part, and the end of a batch before it
