"""The steps a server's data plane computes, and the FORWARD frames they come from, checked.

Every field of a FORWARD is checked here, before the data plane uses any of it: a malformed
frame is refused with a :class:`FrameError` that names the field, and never reaches the
batching, the engine or the sampler (where an exception would lose the other steps of a batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llmrpc import codec, wire
from llmrpc.codec import MAX_COUNT, Generation, shown
from llmrpc.types import split_address

MAX_GENERATIONS = 1024  # generations one server samples for at once (their samplers' states)
MAX_HOPS = 64  # servers on one route
MAX_SESSIONS = 1024  # sessions in one FORWARD (a batch of them)
MAX_TEXT = 256  # characters of an address, a token, a session id or a batch tag
MAX_LINK = (1 << 63) - 1  # a head's link id (a STEP carries it as int64)


class FrameError(ValueError):
    """A FORWARD the data plane refuses; the text names the field."""


@dataclass
class Step:
    """One FORWARD frame, checked: its rows per session, and where it goes next."""

    m: dict[str, Any]
    rid: int
    route: list[Any]
    hop: int
    items: list[tuple[str, int, np.ndarray]]  # (session, position, rows)
    gen: Generation | None
    arrived: float = 0.0
    stepped: wire.Connection | None = None  # the connection it came on as a STEP frame

    @property
    def link(self) -> int:
        return int(self.m["link"])

    @property
    def here(self) -> str:
        return str(self.route[self.hop][0])

    @property
    def step(self) -> int | None:
        return None if self.gen is None else self.gen.step

    @property
    def key(self) -> tuple[int, int]:
        """(head link, request): names a generation on every server."""
        return (self.link, self.rid)

    @property
    def last(self) -> bool:
        """This server is the route's last."""
        return self.hop + 1 == len(self.route)

    @property
    def sends_to(self) -> list[str]:
        """The data addresses this server sends the step on to: the next server's, and at the
        last server of a generation through more than one server, the first's."""
        if not self.last:
            return [str(self.route[self.hop + 1][0])]
        return [str(self.route[0][0])] if self.gen is not None and not self.alone else []

    @property
    def alone(self) -> bool:
        """This server is also the route's first: a generation goes round without a socket."""
        return str(self.route[0][0]) == self.here


def introduces(gen: Generation | None, meta: dict[str, Any]) -> bool:
    """Whether a FORWARD introduces its generation to the connection it crosses (both ends
    decide with this): a generation's step not tagged as part of a batch. Its next untagged
    steps on that connection go as STEP frames."""
    return gen is not None and "batch" not in meta


def parse_forward(frame: codec.DataFrame, link: int) -> Step:
    """A FORWARD frame as a step; ``link``: the head link of the connection it came on (0 for
    a server's connection, whose frames name the head they are for)."""
    m, rid = frame.meta, frame.request_id
    route = _route(m.get("route"))
    hop = _integer(m.get("hop"), 0, len(route) - 1, "hop")
    own = _integer(m.get("link"), 1, MAX_LINK, "link")
    if link and own != link:
        raise FrameError(f"link {own} is not the link {link} this connection said HELLO with")
    sessions = route[hop][2]
    positions = _integers(m.get("pos"), 0, MAX_COUNT, "pos")
    rows = _integers(m.get("rows"), 1, MAX_COUNT, "rows")
    if not len(sessions) == len(positions) == len(rows):
        raise FrameError(f"{len(sessions)} sessions at this hop, {len(positions)} pos and {len(rows)} rows")
    if len(frame.arrays) != 1 or sum(rows) != frame.arrays[0].shape[0]:
        raise FrameError(f"one array of all {sum(rows)} rows is needed, not {len(frame.arrays)} arrays")
    for key in ("all_logits", "f16"):
        if not isinstance(m.get(key, False), bool):
            raise FrameError(f"{key} must be true or false, not {shown(m[key])}")
    _integer(m.get("top_k", 0), 0, MAX_COUNT, "top_k")
    if "batch" in m:
        tag = m["batch"]
        if not (isinstance(tag, list) and len(tag) == 2 and isinstance(tag[0], str) and len(tag[0]) <= MAX_TEXT):
            raise FrameError(f"batch must be [tag, steps], not {shown(tag)}")
        _integer(tag[1], 1, MAX_GENERATIONS, "batch's steps")
    gen = None
    if "gen" in m:
        try:
            gen = Generation.parse(m["gen"])
        except ValueError as e:
            raise FrameError(str(e)) from None
        if len(sessions) != 1 or m.get("all_logits"):
            raise FrameError("a FORWARD that generates holds one session and no all_logits")
    x = frame.arrays[0]
    parts = np.split(x, np.cumsum(rows)[:-1]) if len(rows) > 1 else [x]
    return Step(m, rid, route, hop, list(zip(sessions, positions, parts, strict=True)), gen)


def _route(route: Any) -> list[Any]:
    """A route: [data address, data token, [session ids]] per server, each server naming as many
    sessions, each address a host and a port that can be connected to."""
    if not isinstance(route, list) or not 1 <= len(route) <= MAX_HOPS:
        raise FrameError(f"route must be a list of 1..{MAX_HOPS} hops, not {shown(route)}")
    width = None
    for i, hop in enumerate(route):
        if not (isinstance(hop, list) and len(hop) == 3 and _texts(hop[:2]) and isinstance(hop[2], list)):
            raise FrameError(f"route[{i}] must be [address, token, [session ids]], not {shown(hop)}")
        if width is None:
            width = len(hop[2])
        if not 1 <= len(hop[2]) <= MAX_SESSIONS or len(hop[2]) != width or not _texts(hop[2]):
            raise FrameError(f"route[{i}] must name the route's 1..{MAX_SESSIONS} sessions, not {shown(hop[2])}")
        try:
            _, port = split_address(hop[0])
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            raise FrameError(f"route[{i}]'s address must be host:port (port 1..65535), not {shown(hop[0])}")
    return route


def _texts(values: list[Any]) -> bool:
    return all(isinstance(v, str) and len(v) <= MAX_TEXT for v in values)


def _integer(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FrameError(f"{what} must be an integer within [{low}, {high}], not {shown(value)}")
    return value


def _integers(values: Any, low: int, high: int, what: str) -> list[int]:
    if not isinstance(values, list) or not 1 <= len(values) <= MAX_SESSIONS:
        raise FrameError(f"{what} must be a list of 1..{MAX_SESSIONS} integers, not {shown(values)}")
    return [_integer(v, low, high, what) for v in values]
