"""Decode steps stamped across real processes (LLMRPC_TRACE) and read back as a timeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmrpc import trace
from llmrpc.bench.timeline import read_events, step_order, timelines
from llmrpc.farm import Farm


def test_a_decode_step_is_followed_through_every_server(
    tiny_models: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "trace"
    monkeypatch.setenv(trace.ENV, str(folder))  # the servers started below stamp too
    trace.configure(folder)
    try:
        with Farm(tiny_models["Q8_0"], local=2, threads=1, ctx_size=64) as farm, farm.session() as s:
            s.forward([1, 5, 9])  # a prompt: stamped by the servers only
            for t in range(5):
                s.forward_top_k([10 + t], 1)
    finally:
        trace.configure(None)
    events = read_events(folder)
    assert len(list(folder.glob("*.trace"))) == 3  # the head and both servers
    (timeline,) = timelines(events)
    assert (timeline.servers, timeline.steps) == (2, 5)
    assert [seg.label for seg in timeline.segments][:4] == [
        "head: sends", "to server 0 (wake-up)", "server 0: reads the frame", "server 0: computes",
    ]  # fmt: skip
    steps = [ev for ev in events.values() if "head.send" in ev]
    for ev in steps:  # every event of the step, each server's in the order they happen
        assert list(sorted(ev, key=ev.__getitem__))[:3] == ["head.send", "head.sent", "s0.arrive"]
        assert set(ev) == set(step_order(2))
        assert ev["s0.sent"] <= ev["s1.arrive"] <= ev["s1.end"] <= ev["head.done"]
    assert timeline.total_ms > sum(seg.median_ms for seg in timeline.segments if "computes" in seg.label)


def test_stamps_stop_when_tracing_stops(tmp_path: Path) -> None:
    folder = tmp_path / "trace"
    trace.configure(folder)
    trace.stamp("1.1", "head.send")
    trace.configure(None)  # writes what was stamped, then stamps nothing
    trace.stamp("1.2", "head.send")
    trace.flush()
    lines = (folder / f"{os.getpid()}.trace").read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["1.1", "head.send"]]
    assert not trace.enabled()
