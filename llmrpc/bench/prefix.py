"""The prefix cache at work: a multi-turn chat with a long system prompt through local servers
(time to first token of each turn), then several users sharing that system prompt (prompt tokens
computed against one user's, hit rate), each next to the same without the cache.

``llmrpc-bench prefix --servers 3 --system-tokens 1500 --users 8``
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from llmrpc.bench.models import resolve_model
from llmrpc.farm import Farm
from llmrpc.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
QUESTIONS = ["What is a lighthouse?", "Who keeps it?", "Why at night?", "Name one famous one."]


def _system_prompt(farm: Farm, n_tokens: int, topic: str) -> str:
    """Plain text of about ``n_tokens`` tokens (a rule book, numbered so that no line repeats)."""
    lines: list[str] = []
    text = ""
    while len(farm.tokenizer.encode(text)) < n_tokens:
        lines.append(f"Rule {len(lines) + 1}: answer briefly, in plain words, and stay on the topic of {topic}.")
        text = " ".join(lines)
    return text


def _turn(farm: Farm, prompt: list[int], cache: bool) -> tuple[float, list[int]]:
    """Seconds to the first generated token, and the (short, greedy) answer."""
    t0 = time.perf_counter()
    tokens = farm.generate_tokens(prompt, 8, GREEDY, cache_prompt=cache)
    first = next(tokens)
    return time.perf_counter() - t0, [first, *tokens]


def _chat(farm: Farm, system: str, cache: bool) -> list[float]:
    messages = [{"role": "system", "content": system}]
    ttft = []
    for q in QUESTIONS:
        messages.append({"role": "user", "content": q})
        seconds, answer = _turn(farm, farm.tokenizer.encode_chat(messages), cache)
        ttft.append(seconds)
        messages.append({"role": "assistant", "content": farm.tokenizer.decode(answer)})
    return ttft


def _users(farm: Farm, system: str, users: int) -> dict[str, float]:
    before = farm.prefix_stats
    for i in range(users):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"User {i}: {QUESTIONS[0]}"}]
        _turn(farm, farm.tokenizer.encode_chat(messages), True)
    after = farm.prefix_stats
    queries, hits = after.queries - before.queries, after.hits - before.hits
    one = queries / users
    return {"users": users, "prompt_tokens": queries, "computed": queries - hits,
            "computed_vs_one_user": (queries - hits) / one, "hit_rate": hits / queries}  # fmt: skip


@click.command()
@click.option("--model", default=None, help="A GGUF path or a bench model's name (default: the packaged SmolLM2).")
@click.option("--servers", "n_servers", default=3, show_default=True, type=click.IntRange(1, 8))
@click.option("--system-tokens", default=1500, show_default=True, type=click.IntRange(16))
@click.option("--users", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option("--batch", default=512, show_default=True, type=click.IntRange(1, 8192),
              help="Prompt rows per batch (llama.cpp's n_batch).")  # fmt: skip
@click.option("--out", default="bench/out/prefix.json", show_default=True, type=click.Path())
def prefix(model: str | None, n_servers: int, system_tokens: int, users: int, batch: int, out: str) -> None:
    """Time to first token of a 4-turn chat with a long system prompt, with and without the
    prefix cache, and the prompt tokens several users sharing that prompt compute."""
    path = resolve_model(model)
    with Farm(path, local=n_servers, ctx_size=4096, batch=batch) as farm:
        system = _system_prompt(farm, system_tokens, "lighthouses")
        without = _chat(farm, system, cache=False)
        with_cache = _chat(farm, system, cache=True)
        # the users' system prompt is one the servers hold nothing of yet
        shared = _users(farm, "Rules for a team's assistant. " + system, users)
    results = {
        "model": path, "servers": n_servers, "system_tokens": system_tokens, "batch": batch,
        "ttft_without_cache_s": without, "ttft_with_cache_s": with_cache,
        "later_turns_vs_first": [t / with_cache[0] for t in with_cache[1:]], "shared_system_prompt": shared,
    }  # fmt: skip
    click.echo(json.dumps(results, indent=1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=1) + "\n")
