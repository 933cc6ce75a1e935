"""Bad values are refused where they enter (the library, a server's data port) with an error that
names them, and a step that fails fails its own request alone: the server's loop and the other
sessions' generations go on. Real servers on 127.0.0.1."""

from __future__ import annotations

import math
import secrets
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest

from llmrpc import codec
from llmrpc.codec import FrameKind
from llmrpc.farm import Farm
from llmrpc.head.client import StageClient
from llmrpc.sampling import Sampler, SamplingParams
from llmrpc.types import split_address

T = TypeVar("T")
GREEDY = SamplingParams(temperature=0)
GEN = {"n": 4, "step": 0, "limit": 64, "eog": [], "sampling": [1.0, 40, 0.95, 1]}


# -- the library ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 1e-300}, "temperature"),  # the scaled logits would overflow
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"drawn": -1}, "drawn"),
        ({"drawn": 1 << 63}, "drawn"),
    ],
)
def test_sampling_values_out_of_range_are_refused(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        SamplingParams(**fields)


def test_a_sampler_skips_its_draws_without_making_them() -> None:
    """A replay's sampler goes on after ``drawn`` draws: it skips them in the generator's
    state instead of drawing (and keeping) them all, which for 2^24 draws took 128 MiB."""
    rng = np.random.default_rng(2)
    rows = [rng.standard_normal(300).astype(np.float32) for _ in range(12)]
    params = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, seed=9)
    whole = Sampler(params)
    picks = [whole(r) for r in rows]
    later = Sampler(SamplingParams(0.8, 30, 0.9, 9, drawn=5))
    assert [later(r) for r in rows[5:]] == picks[5:]
    tracemalloc.start()
    try:
        Sampler(SamplingParams(0.8, 30, 0.9, 9, drawn=1 << 24))
        Sampler(SamplingParams(0.8, 30, 0.9, 9, drawn=(1 << 63) - 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "gen",
    [
        {**GEN, "n": True},
        {**GEN, "n": 2.5},
        {**GEN, "n": 1 << 31},
        {**GEN, "limit": "64"},
        {**GEN, "eog": [1.5]},
        {**GEN, "eog": list(range(2000))},
        {**GEN, "sampling": [1.0, 40, 0.95, -1]},
        {**GEN, "sampling": [math.nan, 40, 0.95, 1]},
        {**GEN, "sampling": [1.0, 40, 0.95, 1, 1 << 63]},
        {**GEN, "sampling": "greedy"},
    ],
)
def test_a_bad_generation_is_refused_with_what_is_wrong(gen: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        codec.Generation.parse(gen)
    assert str(info.value)


def test_the_farm_refuses_bad_values_before_any_server_sees_them(
    tiny_models: dict[str, str], servers: list[str]
) -> None:
    with Farm(tiny_models["F32"], servers[:1], ctx_size=64) as farm:
        with pytest.raises(ValueError, match="seed"):  # the last server's sampler raised: no answer
            _within(30, lambda: farm.generate("hello", 4, seed=-1))
        with pytest.raises(ValueError, match="temperature"):
            _within(30, lambda: farm.generate("hello", 4, temperature=math.nan))
        with pytest.raises(ValueError, match="max_tokens"):
            list(farm.generate_tokens([1, 2], -1, GREEDY))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            list(farm.generate_tokens([1, 1 << 20], 4, GREEDY))
        with pytest.raises(ValueError, match="empty"):
            list(farm.generate_tokens([], 4, GREEDY))
        assert len(list(farm.generate_tokens([1, 2], 4, GREEDY, stop_at_eog=False))) == 4


# -- a server's data port -------------------------------------------------------------------------
def _within(seconds: float, fn: Callable[[], T]) -> T:
    """``fn()``, failing the test when it takes longer than ``seconds`` (a wedged server)."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the test
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if errors:
        raise errors[0]
    assert out, f"no answer within {seconds:.0f} s"
    return out[0]


class _Raw:
    """A data connection of our own to a server, as any holder of its data token could open."""

    def __init__(self, address: str, link: int = 0) -> None:
        info = StageClient(address).hello()
        self.data_address = f"{split_address(address)[0]}:{info.data_port}"
        self.token = info.data_token
        self.link = link or secrets.randbits(62) + 1
        self.sock = socket.create_connection((split_address(address)[0], info.data_port), timeout=60)
        self.reader = codec.FrameReader(1 << 30)
        self.frames: list[codec.DataFrame] = []
        self.sock.sendall(b"".join(codec.encode_frame(FrameKind.HELLO, 0, {"token": self.token, "link": self.link})))
        assert self.read().kind == FrameKind.WELCOME

    def forward(self, rid: int, route: list[Any], x: np.ndarray, **meta: Any) -> None:
        meta = {"route": route, "hop": 0, "link": self.link, "pos": [0], "rows": [int(x.shape[0])], **meta}
        self.sock.sendall(b"".join(bytes(p) for p in codec.encode_frame(FrameKind.FORWARD, rid, meta, [x])))

    def read(self) -> codec.DataFrame:
        while not self.frames:
            data = self.sock.recv(1 << 16)
            assert data, "the server closed the connection"
            self.frames += self.reader.feed(data)
        return self.frames.pop(0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def loaded(tiny_models: dict[str, str], servers: list[str]) -> Iterator[tuple[Farm, _Raw]]:
    """The tiny model on the first two shared servers, and a raw data connection to the first."""
    with Farm(tiny_models["F32"], servers[:2], ctx_size=64, max_sessions=3) as farm:
        raw = _Raw(servers[0])
        try:
            yield farm, raw
        finally:
            raw.close()


def _bad_forwards(raw: _Raw, sid: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """(what the error names, route, meta) of FORWARDs each malformed in one field."""
    me = [raw.data_address, raw.token, [sid]]
    return [
        ("batch", [me], {"gen": GEN, "batch": ["a", "x"]}),  # wedged the server's generations
        ("route", [["x", "", ["nosuch"]]], {"gen": GEN, "batch": ["a", "x"]}),  # (the finding's frame)
        ("batch", [me], {"gen": GEN, "batch": [1, 2, 3]}),
        ("seed", [me], {"gen": {**GEN, "sampling": [1.0, 40, 0.95, -1]}}),  # the sampler raised
        ("temperature", [me], {"gen": {**GEN, "sampling": [math.nan, 40, 0.95, 1]}}),
        ("route", [me, ["127.0.0.1:99999", raw.token, ["y"]]], {}),  # OverflowError when connecting
        ("route", [me, ["127.0.0.1:80", raw.token, []]], {}),
        ("route", [me, [5, raw.token, ["y"]]], {}),
        ("route", "everywhere", {}),
        ("link", [me], {"link": "me"}),
        ("link", [me], {"link": raw.link + 1}),  # not the link this connection said HELLO with
        ("hop", [me], {"hop": True}),
        ("pos", [me], {"pos": [-1]}),
        ("top_k", [me], {"top_k": -3}),
        ("all_logits", [me], {"all_logits": "yes"}),
    ]


def test_malformed_forwards_are_refused_and_the_server_generates_on(loaded: tuple[Farm, _Raw]) -> None:
    """Each malformed field gets an ERROR naming it; afterwards the server still generates what
    it generated before (finding 2: a generating FORWARD with the batch tag ["a", "x"] stopped
    every generation on the server until it was restarted)."""
    farm, raw = loaded
    want = list(farm.generate_tokens([1, 5, 9], 12, GREEDY, stop_at_eog=False))
    with farm.session() as s:
        for rid, (words, route, meta) in enumerate(_bad_forwards(raw, s.ids[0]), start=100):
            raw.forward(rid, route, np.array([1, 2], np.int32), **meta)
            reply = _within(30, raw.read)
            assert (reply.kind, reply.request_id) == (FrameKind.ERROR, rid), (words, reply)
            assert reply.meta["code"] == "invalid_argument" and words in reply.meta["message"], (words, reply.meta)
    got = _within(60, lambda: list(farm.generate_tokens([1, 5, 9], 12, GREEDY, stop_at_eog=False)))
    assert got == want


def test_a_replay_of_two_to_the_32_draws_is_answered_at_once(loaded: tuple[Farm, _Raw], servers: list[str]) -> None:
    """Finding 6: ``drawn`` up to 2^32 made a 32 GiB array on the last server's compute thread."""
    farm, raw = loaded
    last = _Raw(servers[1], link=raw.link)  # the last server reports the tokens to our link
    try:
        for here, there in ((servers[0], last), (servers[1], raw)):  # each server's next one, for our link
            StageClient(here).declare_peers(raw.link, [(there.data_address, there.token)])
        with farm.session() as s:
            route = [[h.data_address, h.token, [h.session_id]] for h in s.route]
            gen = {**GEN, "n": 3, "sampling": [1.0, 40, 0.95, 1, 1 << 32]}
            raw.forward(7, route, np.array([1, 5, 9], np.int32), gen=gen)
            reports = [_within(30, last.read) for _ in range(3)]
    finally:
        last.close()
    assert [(f.kind, f.request_id, f.meta["step"]) for f in reports] == [(FrameKind.TOKEN, 7, i) for i in range(3)]
    assert reports[-1].meta["end"] == "length"


def test_a_failed_step_fails_its_own_generation_alone(loaded: tuple[Farm, _Raw]) -> None:
    """Two generations going round two servers; malformed steps come in the middle of them:
    both still give the tokens they give alone."""
    farm, raw = loaded
    prompts = [[1, 5, 9], [2, 7, 30, 4]]
    want = [list(farm.generate_tokens(p, 24, GREEDY, stop_at_eog=False)) for p in prompts]
    running = [farm.generate_tokens(p, 24, GREEDY, stop_at_eog=False) for p in prompts]
    got = [[next(g)] for g in running]  # both in flight: the servers generate on their own
    for rid, (_, route, meta) in enumerate(_bad_forwards(raw, "nosuch")[:4], start=200):
        raw.forward(rid, route, np.array([1, 2], np.int32), **meta)
        assert _within(30, raw.read).kind == FrameKind.ERROR
    for out, g in zip(got, running, strict=True):
        out += _within(60, lambda g=g: list(g))  # type: ignore[misc]
    assert got == want


def test_a_link_in_use_cannot_be_taken_over(loaded: tuple[Farm, _Raw]) -> None:
    """A HELLO naming a link that another open connection holds would take that head's results."""
    _, raw = loaded
    host, port = split_address(raw.data_address)
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(b"".join(codec.encode_frame(FrameKind.HELLO, 3, {"token": raw.token, "link": raw.link})))
        reader, frames = codec.FrameReader(1 << 20), []
        while not frames:
            data = sock.recv(1 << 16)
            assert data
            frames = reader.feed(data)
        assert frames[0].kind == FrameKind.ERROR and "another connection's" in frames[0].meta["message"]
    raw.forward(9, [[raw.data_address, raw.token, ["nosuch"]]], np.array([1], np.int32))
    reply = raw.read()  # the link's own connection still gets its answers
    assert (reply.kind, reply.request_id, reply.meta["code"]) == (FrameKind.ERROR, 9, "not_found")
