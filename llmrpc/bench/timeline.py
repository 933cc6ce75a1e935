"""Where a decode step's time goes, from the stamps of :mod:`llmrpc.trace`.

A step's events, in the order they must happen: the head starts sending (``head.send``), each
server i wakes with the frame (``s<i>.arrive``), starts computing (``s<i>.start``) and is done
(``s<i>.end``, then it sends on), the head wakes with the answer (``head.recv``) and hands it
back (``head.done``). Each gap holds one thing: a send and the receiver's wake-up, reading a
frame, computing. The timeline is the median of each gap over the steps, grouped by how many
servers the steps went through. (The end of a send is not stamped: the receiver often runs
before the sender's ``sendmsg`` returns.)
    python -m llmrpc.bench.timeline FOLDER        (LLMRPC_TRACE=FOLDER during the run)
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
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


def print_timelines(items: list[Timeline]) -> None:
    for t in items:
        print(f"\ndecode step through {t.servers} server(s): {t.total_ms:.3f} ms (median of {t.steps} steps)")
        for s in t.segments:
            print(f"  {s.label:<28} {s.median_ms:8.3f} ms")


if __name__ == "__main__":
    print_timelines(timelines(read_events(sys.argv[1])))
