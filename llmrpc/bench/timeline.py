"""Where a decode step's time goes, from the stamps of :mod:`llmrpc.trace`.

A step's events, in the order they must happen: the head starts sending (``head.send``), each
server i wakes with the frame (``s<i>.arrive``), starts computing (``s<i>.start``) and is done
(``s<i>.end``, then it sends on), the head wakes with the answer (``head.recv``) and hands it
back (``head.done``). Each gap holds one thing: a send and the receiver's wake-up, reading a
frame, computing. The timeline is the median of each gap over the steps, grouped by how many
servers the steps went through. (The end of a send is not stamped: the receiver often runs
before the sender's ``sendmsg`` returns.)

A step of a generation on the servers (named ``<request>.<step>``) has no head events on its
path: it runs from server 0's start to the next step's start there, through every server and
back from the last one to the first; the head's wake-up with the token is off that path.
    python -m llmrpc.bench.timeline FOLDER        (LLMRPC_TRACE=FOLDER during the run)
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LABELS = {"arrive": "reads the frame", "start": "computes"}


@dataclass(frozen=True)
class Segment:
    label: str
    median_ms: float


@dataclass(frozen=True)
class Timeline:
    servers: int
    steps: int
    total_ms: float  # median of head.send .. head.done
    segments: list[Segment]


def read_events(folder: str | Path) -> dict[str, dict[str, float]]:
    """Every request's events (name -> seconds) from the .trace files in ``folder``."""
    events: dict[str, dict[str, float]] = defaultdict(dict)
    for path in sorted(Path(folder).glob("*.trace")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                events[parts[0]][parts[1]] = float(parts[2])
    return events


def step_order(n_servers: int) -> list[str]:
    hops = [f"s{i}.{e}" for i in range(n_servers) for e in ("arrive", "start", "end")]
    return ["head.send", *hops, "head.recv", "head.done"]


def _label(a: str, b: str) -> str:
    if b == "head.recv":
        return "send to the head + wake-up"
    if a == "head.recv":
        return "head: reads the answer"
    if b.endswith(".arrive"):
        return f"send to server {b[1:].split('.')[0]} + wake-up"
    who, what = a.split(".")
    return f"server {who[1:]}: {LABELS[what]}"


def timelines(events: dict[str, dict[str, float]]) -> list[Timeline]:
    """Decode steps (those the head stamped) grouped by their number of servers."""
    groups: dict[int, list[dict[str, float]]] = defaultdict(list)
    for ev in events.values():
        if "head.send" in ev and "head.done" in ev:
            n = sum(1 for name in ev if name.endswith(".arrive"))
            if set(step_order(n)) <= set(ev):
                groups[n].append(ev)
    out = []
    for n, steps in sorted(groups.items()):
        order = step_order(n)
        segments = [
            Segment(_label(a, b), statistics.median(ev[b] - ev[a] for ev in steps) * 1e3)
            for a, b in zip(order, order[1:], strict=False)
        ]
        total = statistics.median(ev["head.done"] - ev["head.send"] for ev in steps) * 1e3
        out.append(Timeline(n, len(steps), total, segments))
    return out


def ring_order(n_servers: int) -> list[str]:
    """A generation step's events on its path, then the next step's first two."""
    hops = [f"s{i}.{e}" for i in range(n_servers) for e in ("arrive", "start", "end")]
    return [*hops, "next.s0.arrive", "next.s0.start"]


def ring_timelines(events: dict[str, dict[str, float]]) -> list[Timeline]:
    """Steps of generations on the servers (each with the next step of its generation), grouped
    by their number of servers; the head's wake-up with the token is the last segment."""
    groups: dict[int, list[dict[str, float]]] = defaultdict(list)
    for name, ev in events.items():
        request, _, step = name.rpartition(".")
        nxt = events.get(f"{request}.{int(step) + 1}") if step.isdigit() and request.count(".") == 1 else None
        if nxt is None or "head.recv" not in ev:
            continue
        n = sum(1 for e in ev if e.endswith(".arrive"))
        joined = {**ev, **{f"next.{e}": t for e, t in nxt.items()}}
        if set(ring_order(n)) <= set(joined):
            groups[n].append(joined)
    out = []
    for n, steps in sorted(groups.items()):
        order = ring_order(n)[1:]  # from server 0's start to the next step's start there
        labels = [_ring_label(a, b, n) for a, b in zip(order, order[1:], strict=False)]
        segments = [
            Segment(label, statistics.median(ev[b] - ev[a] for ev in steps) * 1e3)
            for label, a, b in zip(labels, order, order[1:], strict=False)
        ]
        last = f"s{n - 1}.end"
        segments.append(
            Segment(
                "(off the path) the head's token", statistics.median(ev["head.recv"] - ev[last] for ev in steps) * 1e3
            )
        )
        total = statistics.median(ev["next.s0.start"] - ev["s0.start"] for ev in steps) * 1e3
        out.append(Timeline(n, len(steps), total, segments))
    return out


def _ring_label(a: str, b: str, n: int) -> str:
    if b == "next.s0.arrive":
        return "back to server 0 + wake-up" if n > 1 else "server 0: queues the next step"
    return _label(a.removeprefix("next."), b.removeprefix("next."))


def print_timelines(items: list[Timeline], ring: Sequence[Timeline] = ()) -> None:
    titled = [("decode step through", t) for t in items] + [("generation step on", t) for t in ring]
    for title, t in titled:
        print(f"\n{title} {t.servers} server(s): {t.total_ms:.3f} ms (median of {t.steps} steps)")
        for s in t.segments:
            print(f"  {s.label:<32} {s.median_ms:8.3f} ms")


def print_folder(folder: str | Path) -> None:
    """The timelines of the traces in ``folder``: head-driven steps, then generation steps."""
    found = read_events(folder)
    print_timelines(timelines(found), ring_timelines(found))


if __name__ == "__main__":
    print_folder(sys.argv[1])
