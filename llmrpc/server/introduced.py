"""Which generations each data connection has carried a FORWARD of, so that their next steps
on it go as STEP frames (only what changes, see codec.STEP_META).

A generation's FORWARD without a batch tag introduces it to the connection it crosses
(steps.introduces); its next untagged steps on that connection are STEPs. Both ends touch a
generation's key per frame, in the frames' order, so the receiver, keeping twice as many, has
every key the sender has.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from llmrpc import wire
from llmrpc.server.steps import MAX_GENERATIONS, Step

Key = tuple[int, int]  # a generation: (head link, request)


class Introduced:
    def __init__(self) -> None:
        self._sent: dict[wire.Connection, OrderedDict[Key, None]] = {}
        self._known: dict[wire.Connection, OrderedDict[Key, Step]] = {}

    def came(self, conn: wire.Connection, step: Step) -> None:
        """A FORWARD that introduces its generation came on ``conn``: kept as the base of its
        STEPs there, without its rows (a prompt's, the first time) or its ``gen`` (a step's
        Generation is the one truth: a FORWARD sent on describes it anew)."""
        known = self._known.setdefault(conn, OrderedDict())
        m = {k: v for k, v in step.m.items() if k != "gen"}
        known[step.key] = replace(step, m=m, items=[])
        known.move_to_end(step.key)
        while len(known) > 2 * MAX_GENERATIONS:
            known.popitem(last=False)

    def base(self, conn: wire.Connection, key: Key) -> Step | None:
        """The FORWARD a STEP on ``conn`` continues (None: none came)."""
        known = self._known.get(conn)
        return known.get(key) if known is not None else None

    def came_step(self, conn: wire.Connection, key: Key) -> None:
        """A STEP of ``key`` came on ``conn``."""
        known = self._known.get(conn)
        if known is not None and key in known:
            known.move_to_end(key)

    def carried(self, peer: wire.Connection, key: Key) -> bool:
        """Whether ``peer`` carried a FORWARD of ``key`` from here: its next step goes as a STEP."""
        sent = self._sent.get(peer)
        return sent is not None and key in sent

    def went(self, peer: wire.Connection, key: Key) -> None:
        """A frame of ``key`` that introduces it (or a STEP of it) went out on ``peer``."""
        sent = self._sent.setdefault(peer, OrderedDict())
        sent[key] = None
        sent.move_to_end(key)
        while len(sent) > MAX_GENERATIONS:
            sent.popitem(last=False)

    def passed(self, conn: wire.Connection, peer: wire.Connection, key: Key) -> None:
        """A STEP of ``key`` came on ``conn`` and went on on ``peer`` (the native hop's step)."""
        self.came_step(conn, key)
        sent = self._sent.get(peer)
        if sent is not None and key in sent:
            sent.move_to_end(key)

    def forget(self, conn: wire.Connection) -> None:
        self._sent.pop(conn, None)
        self._known.pop(conn, None)
