"""Prefix reuse: a session that starts from a held prefix computes the bits a new one computes,
through real servers; what the servers keep stays within their budgets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmrpc.farm import Farm
from llmrpc.head.client import StageClient
from llmrpc.head.local import LocalServers
from llmrpc.head.placement import model_layout
from llmrpc.head.planner import PlanError, ServerReport, plan
from llmrpc.head.prefix import exact_in_batch, last_batch_start, reusable_rows, row_exact
from llmrpc.model.gguf_model import read_model
from llmrpc.model.kv import CacheConfig, kv_bytes
from llmrpc.model.synthetic import SyntheticSpec
from llmrpc.sampling import SamplingParams

from .conftest import model_file, own_caches

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


@pytest.mark.parametrize(
    ("held", "exact", "prompt", "rows"),
    [
        (list(range(300)), 300, list(range(400)), 300),  # 84 rows of its batch [256, 384) left to compute
        (list(range(340)), 340, list(range(400)), 320),  # at least 64 left
        (list(range(300)), 170, list(range(400)), 168),  # up to a group of four
        (list(range(300)), 300, list(range(300)), 256),  # before the prompt's last batch (starts at 256)
        (list(range(300)), 300, list(range(200)), 136),  # into the last batch [128, 200), leaving it 64 rows
        (list(range(300)), 134, list(range(200)), 132),  # a group of four into it
        (list(range(300)), 130, list(range(400)), 128),  # 2 rows: not a group
        (list(range(300)), 300, list(range(150)) + [7] * 200, 148),
    ],
)
def test_rows_are_reused_one_by_one_where_batches_are_large(
    held: list[int], exact: int, prompt: list[int], rows: int
) -> None:
    assert reusable_rows(held, exact, prompt, 128, None, fine=True) == rows


@pytest.mark.parametrize(
    ("batch", "micro_batch", "fine"),
    [(512, 512, True), (512, 128, True), (512, 32, False), (64, 64, True), (16, 16, False), (512, 96, False)],
)
def test_rows_are_reused_one_by_one_only_where_every_piece_is_large(batch: int, micro_batch: int, fine: bool) -> None:
    assert row_exact(batch, micro_batch) is fine


@pytest.mark.parametrize(
    ("start", "n", "fine", "end"), [(256, 100, True, 352), (256, 63, True, 256), (256, 100, False, 256)]
)
def test_a_last_batch_is_reusable_but_for_its_last_group(start: int, n: int, fine: bool, end: int) -> None:
    assert exact_in_batch(start, n, fine) == end


def test_a_session_from_rows_of_a_partly_held_batch_computes_the_bits_of_a_new_one(
    tiny_models: dict[str, str], servers: list[str]
) -> None:
    """Batches of 128 rows sent 64 at a time: rows are reused one by one. A generation leaves
    the 200 rows of its prompt (its last batch, [128, 200), computed in one piece); a longer
    prompt takes 192 of them, computes [192, 256) as one batch and goes on in batches of 128:
    its last batch's logits and its greedy text are those of a session computed from scratch;
    and a prompt whose last batch starts in what is held takes rows of that batch too."""
    path = tiny_models["Q8_0"]
    rng = np.random.default_rng(7)
    first = [1] + [int(t) for t in rng.integers(3, 320, size=199)]
    with Farm(path, servers, ctx_size=512, batch=128, micro_batch=64) as farm:
        assert farm.prefix is not None and farm.prefix.fine
        reply = list(farm.generate_tokens(first, 8, GREEDY))
        second = first + reply + [int(t) for t in rng.integers(3, 320, size=150)]
        with farm.prefix.session(second) as s:
            assert len(s.tokens) == 192
            cut = farm.prefill_prompt(s, second)
            got = s.forward(second[cut:], all_logits=True)
        with farm.prefix.session(second, reuse=False, keep=False) as s:
            cut = farm.prefill_prompt(s, second)
            want = s.forward(second[cut:], all_logits=True)
        assert cut == 256
        np.testing.assert_array_equal(got, want)
        cached = list(farm.generate_tokens(second, 16, GREEDY))
        fresh = list(farm.generate_tokens(second, 16, GREEDY, cache_prompt=False))
        assert cached == fresh
        # into a prompt's last batch: [256, 370) computed in one piece from scratch, [304, 370) here
        third = second[:340] + [int(t) for t in rng.integers(3, 320, size=30)]
        with farm.prefix.session(third) as s:
            assert len(s.tokens) == 304
            start = farm.prefill_prompt(s, third)
            got = s.forward(third[start:], all_logits=True)
        with farm.prefix.session(third, reuse=False, keep=False) as s:
            assert farm.prefill_prompt(s, third) == 256
            want = s.forward(third[256:], all_logits=True)
        assert start == 304
        np.testing.assert_array_equal(got, want[304 - 256 :])
        assert list(farm.generate_tokens(third, 16, GREEDY)) == list(
            farm.generate_tokens(third, 16, GREEDY, cache_prompt=False)
        )


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


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + [int(t) for t in rng.integers(3, 320, size=length - 1)] for _ in range(n)]


def _answers_match(farm: Farm, prompt: list[int], n: int = 8) -> int:
    """Generate after ``prompt`` with the prefix cache and without it: the same tokens. Returns
    the positions taken from a held prefix."""
    hits = farm.prefix_stats.hits
    want = list(farm.generate_tokens(prompt, n, GREEDY, cache_prompt=False))
    assert farm.prefix_stats.hits == hits  # (asked nothing of the cache)
    assert list(farm.generate_tokens(prompt, n, GREEDY)) == want
    return farm.prefix_stats.hits - hits


def test_kept_prefixes_stay_within_each_servers_budget(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """Two servers with budgets of a few caches (the second's smaller): after every request each
    keeps at most its budget's bytes; what the second frees, the head forgets and the first frees
    too. Follow-ups of the conversations still held take their prefixes, the others start empty,
    and every answer is the one computed without the cache."""
    path = tiny_models["Q8_0"]
    hp = read_model(path).hparams
    whole = kv_bytes(hp, 0, hp.n_layer, 256, CacheConfig().resolved())  # a whole model's cache
    budgets = [5 * whole // 2, 3 * whole // 2]
    args = [["--prefix-cache", str(b), *cache] for b, cache in zip(budgets, own_caches(tmp_path, 2), strict=True)]
    with (
        LocalServers(2, threads=1, extra_args=["--no-calibrate"], per_server_args=args) as local,
        Farm(path, list(local.addresses), ctx_size=256, batch=BATCH) as farm,
    ):
        assert farm.prefix is not None and len(farm.plan) == 2
        clients = [StageClient(a) for a in local.addresses]
        prompts = _prompts(6, 40, seed=11)
        rng = np.random.default_rng(12)
        follow_ups = []
        for p in prompts:
            follow_ups.append(p + list(farm.generate_tokens(p, 6, GREEDY)) + [int(t) for t in rng.integers(3, 320, 12)])
            health = [c.health() for c in clients]
            assert all(h.prefix_bytes <= h.prefix_budget == b for h, b in zip(health, budgets, strict=True))
            assert health[0].prefix_entries == health[1].prefix_entries == len(farm.prefix.kept())
        held = len(farm.prefix.kept())
        assert 1 <= held < len(prompts)  # the oldest were freed
        hits = [_answers_match(farm, f) for f in reversed(follow_ups)]  # the most recent first
        assert hits == [32] * held + [0] * (len(prompts) - held)
        for c in clients:
            c.close()


def test_new_sessions_free_kept_prefixes_under_the_memory_cap(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """A server capped (--mem) at its weights, a batch's compute and two and a half caches: a new
    session frees the least recently used kept prefix to get its memory, the head learns it from
    the answer, and every answer is still the one computed without the cache."""
    path = tiny_models["Q8_0"]
    info = read_model(path)
    hp = info.hparams
    cache = kv_bytes(hp, 0, hp.n_layer, 256, CacheConfig().resolved())
    cap = info.range_bytes(0, hp.n_layer) + 135168 + 5 * cache // 2  # (the planner's compute bytes: batch 16)
    args = ["--no-calibrate", "--mem", str(cap)]
    with (
        LocalServers(1, threads=1, extra_args=args, per_server_args=own_caches(tmp_path, 1)) as local,
        Farm(path, list(local.addresses), ctx_size=256, batch=BATCH) as farm,
    ):
        assert farm.prefix is not None
        client = StageClient(local.addresses[0])
        rng = np.random.default_rng(13)
        follow_ups = []
        for p in _prompts(5, 40, seed=14):
            follow_ups.append(p + list(farm.generate_tokens(p, 6, GREEDY)) + [int(t) for t in rng.integers(3, 320, 12)])
            health = client.health()
            assert health.prefix_entries == len(farm.prefix.kept()) <= 3
        assert len(farm.prefix.kept()) == 3  # the cap holds the weights and three caches
        hits = [_answers_match(farm, f) for f in reversed(follow_ups)]
        # the first follow-up's reference session needed a cache: the oldest of the three was freed
        # (then a closed session's spare cache serves the references)
        assert hits == [32, 32, 0, 0, 0]
        assert client.health().prefix_entries == len(farm.prefix.kept())
        client.close()


def test_a_farm_chat_starts_each_turn_from_the_last(smollm2: str, servers: list[str]) -> None:
    """``farm.chat()``: each turn's prompt is the whole conversation; turns 2 and 3 take the
    whole batches of the turn before, and answer as a farm computing from scratch does."""
    with Farm(smollm2, servers[:2], ctx_size=1024, batch=BATCH) as farm:
        chat = farm.chat(system="You are a helpful assistant who answers in one short sentence.")
        previous = 0
        for i, question in enumerate(["What is the capital of Italy?", "How old is it?", "Name a famous building."]):
            prompt = farm.tokenizer.encode_chat([*chat.messages, {"role": "user", "content": question}])
            want = farm.generate(prompt, 16, temperature=0, cache_prompt=False)
            hits = farm.prefix_stats.hits
            assert chat.send(question, 16, temperature=0) == want
            assert chat.messages[-1] == {"role": "assistant", "content": want}
            assert farm.prefix_stats.hits - hits == (last_batch_start(previous, BATCH) if i else 0)
            previous = len(prompt)
        assert previous > 4 * BATCH and len(chat.messages) == 7


def test_replicas_route_a_conversation_back_to_the_replica_that_holds_it(tmp_path: Path) -> None:
    """Six servers, each capped (--mem) to hold a third of a 6-layer model: the farm forms two
    replicas of three. Two conversations go to different replicas (the less loaded, then the one
    holding fewer prefixes); their follow-ups go back to the replica holding each, take its
    prefix there (counted for that replica) and answer as without the cache."""
    path = model_file(tmp_path, "six.gguf", SyntheticSpec(n_layer=6, weight_type="Q8_0", seed=3))
    layout = model_layout(read_model(path), CacheConfig())

    def fits(cap: int, n: int) -> bool:
        try:
            plan(layout, [ServerReport(f"s{i}", "CPU", cap) for i in range(n)], ctx_size=256, n_batch=BATCH)
        except PlanError:
            return False
        return True

    low, cap = 1, 1 << 30  # the least memory on which three servers hold the model
    while low < cap:
        mid = (low + cap) // 2
        low, cap = (low, mid) if fits(mid, 3) else (mid + 1, cap)
    assert not fits(cap, 2)
    args = ["--no-calibrate", "--mem", str(cap)]
    with (
        LocalServers(6, threads=1, extra_args=args, per_server_args=own_caches(tmp_path, 6)) as local,
        Farm(path, list(local.addresses), ctx_size=256, batch=BATCH, replicas=0) as farm,
    ):
        assert len(farm.replicas) == 2 and [len(p) for p in farm.plans] == [3, 3]
        assert {a.address for p in farm.plans for a in p} == set(local.addresses)
        rng = np.random.default_rng(22)
        follow_ups, homes = [], []
        for p in _prompts(2, 60, seed=21):
            follow_ups.append(p + list(farm.generate_tokens(p, 6, GREEDY)) + [int(t) for t in rng.integers(3, 320, 12)])
            homes.append(next(r.index for r in farm.replicas if any(h.tokens[:60] == p for h in r.prefix.kept())))
        assert homes == [0, 1]
        for follow_up, home in zip(follow_ups, homes, strict=True):
            before = [s.hits for s in farm.replica_stats]
            assert _answers_match(farm, follow_up) == 48
            assert [s.hits - b for s, b in zip(farm.replica_stats, before, strict=True)] == [
                48 if r == home else 0 for r in range(2)
            ]
