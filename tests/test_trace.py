"""Decode steps stamped across real processes (LLMRPC_TRACE) and read back as a timeline."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from llmrpc import trace
from llmrpc.bench.timeline import read_events, ring_order, ring_timelines, step_order, timelines
from llmrpc.farm import Farm
from llmrpc.head.local import LocalServers
from llmrpc.sampling import SamplingParams

from .conftest import own_caches

GREEDY = SamplingParams(temperature=0)


def test_a_decode_step_is_followed_through_every_server(
    tiny_models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "trace"
    monkeypatch.setenv(trace.ENV, str(folder))  # the servers started below stamp too
    trace.configure(folder)
    try:
        with LocalServers(
            2, threads=1, extra_args=["--no-calibrate"], per_server_args=own_caches(tmp_path, 2)
        ) as local:
            pids = [proc.pid for proc in local.processes]
            with Farm(tiny_models["Q8_0"], list(local.addresses), ctx_size=64) as farm, farm.session() as s:
                assert len(farm.plan) == 2
                s.forward([1, 5, 9])  # a prompt: stamped by the servers only
                for t in range(5):
                    s.forward_top_k([10 + t], 1)
                generated = list(s.generate([20], 6, SamplingParams(temperature=0)))  # the servers on their own
    finally:
        trace.configure(None)
    events = read_events(folder)
    written = sorted(int(f.stem) for f in folder.glob("*.trace"))
    assert written == sorted([os.getpid(), *pids])  # the head and both servers
    (timeline,) = timelines(events)
    assert (timeline.servers, timeline.steps) == (2, 5)
    assert [seg.label for seg in timeline.segments] == [
        "send to server 0 + wake-up", "server 0: reads the frame", "server 0: computes",
        "send to server 1 + wake-up", "server 1: reads the frame", "server 1: computes",
        "send to the head + wake-up", "head: reads the answer",
    ]  # fmt: skip
    steps = [ev for ev in events.values() if "head.send" in ev]
    assert len(steps) == 5
    for ev in steps:  # every event of a step, in the order the step makes them happen
        assert set(ev) == set(step_order(2))
        assert [ev[name] for name in step_order(2)] == sorted(ev.values())
    assert all(seg.median_ms >= 0 for seg in timeline.segments)
    assert timeline.total_ms > sum(seg.median_ms for seg in timeline.segments if "computes" in seg.label)

    # the generation: six steps, each followed from server 0 through server 1 and back
    assert len(generated) == 6
    gen_steps = sorted((name for name in events if name.count(".") == 2), key=lambda n: int(n.split(".")[2]))
    assert [int(name.split(".")[2]) for name in gen_steps] == list(range(6))
    for name, nxt in zip(gen_steps, gen_steps[1:], strict=False):  # each step starts after the last one ended
        assert events[name]["s1.end"] < events[nxt]["s0.arrive"] < events[nxt]["s0.start"]
    (ring,) = ring_timelines(events)
    assert (ring.servers, ring.steps) == (2, 5)  # the last step has no next one to end it
    assert [seg.label for seg in ring.segments] == [
        "server 0: computes", "send to server 1 + wake-up", "server 1: reads the frame", "server 1: computes",
        "back to server 0 + wake-up", "server 0: reads the frame", "(off the path) the head's token",
    ]  # fmt: skip
    assert len(ring.segments) == len(ring_order(2)) - 2 + 1
    assert ring.total_ms > sum(seg.median_ms for seg in ring.segments if "computes" in seg.label)


def test_stamps_stop_when_tracing_stops(tmp_path: Path) -> None:
    folder = tmp_path / "trace"
    trace.configure(folder)
    trace.stamp(1, 1, "head.send")
    trace.configure(None)  # writes what was stamped, then stamps nothing
    trace.stamp(1, 2, "head.send")
    trace.flush()
    lines = (folder / f"{os.getpid()}.trace").read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["1.1", "head.send"]]
    assert not trace.enabled()


def test_concurrent_generations_are_computed_together(
    smollm2: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prompt_tokens: list[int]
) -> None:
    """Three generations started apart through two servers: after a few steps the servers
    compute their steps in shared batches (stamped as one compute, microseconds apart). On a
    model whose steps take milliseconds: a tiny one's queue up together anyway."""
    folder = tmp_path / "trace"
    monkeypatch.setenv(trace.ENV, str(folder))
    trace.configure(folder)
    try:
        with LocalServers(
            2, threads=1, extra_args=["--no-calibrate"], per_server_args=own_caches(tmp_path, 2)
        ) as local:
            with Farm(smollm2, list(local.addresses), ctx_size=256, max_sessions=3) as farm:

                def run(i: int) -> None:
                    time.sleep(0.03 * i)  # apart on purpose
                    list(farm.generate_tokens(prompt_tokens[i : i + 6], 40, GREEDY, stop_at_eog=False))

                threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=120)
    finally:
        trace.configure(None)
    events = read_events(folder)
    for server in ("s0", "s1"):
        starts = sorted(
            (ev[f"{server}.start"], name.split(".")[1])
            for name, ev in events.items()
            if name.count(".") == 2 and int(name.split(".")[2]) >= 10 and f"{server}.start" in ev
        )
        assert len({rid for _, rid in starts}) == 3
        shared = sum(
            1
            for i, (t, rid) in enumerate(starts)
            if any(abs(t - t2) < 1e-3 and rid2 != rid for t2, rid2 in starts[max(0, i - 3) : i + 4])
        )
        assert shared >= 0.8 * len(starts), f"{server}: {shared} of {len(starts)} steps shared a batch"
