"""Hostile inputs for every surface a farm exposes, as hypothesis strategies: the values they are
made of, and data-plane frames before and after authentication (gRPC requests, weight uploads
and API bodies: :mod:`llmrpc.bench.fuzz_calls`). Shared by ``tests/test_fuzz.py`` and
``llmrpc-bench fuzz``.

Cases are plain data: structured-but-wrong messages (the right frame kinds and fields, with
hostile values: wrong types, negative and huge numbers, unknown sessions, wrong shapes, lengths
that lie, truncated frames) mixed with raw bytes. What only a live server knows (its data token,
its address, a session opened for the case) appears as a placeholder string that
:mod:`llmrpc.bench.fuzz_targets` replaces before it sends the case.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hypothesis import strategies as st

from llmrpc.codec import FrameKind

# -- placeholders: replaced with live values when a case is sent ----------------------------------
TOKEN = "<token>"  # the target server's data token
SELF = "<self>"  # the target server's data address
PEER = "<peer>"  # the other server's data address
PEER_TOKEN = "<peer-token>"
SESSION = "<session>"  # a session opened on the target server for this case
PEER_SESSION = "<peer-session>"  # ... and on the other server
LINK = "<link>"  # the head link this case's connection said HELLO with
PROBE_LINK = "<probe-link>"  # the link of the connection that checks the server after each case
MODEL_PATH = "<model-path>"  # the model file both servers may load
MODEL_HASH = "<model-hash>"
PLACEHOLDERS = (TOKEN, SELF, PEER, PEER_TOKEN, SESSION, PEER_SESSION, LINK, PROBE_LINK, MODEL_PATH, MODEL_HASH)

N_EMBD = 64  # the hidden size of the fuzzed model (llmrpc.model.synthetic's default)
N_VOCAB = 320

# -- values ----------------------------------------------------------------------------------------
EDGE_INTS = (
    0, 1, -1, 2, 63, 64, 319, 320, 4096, 1 << 15, (1 << 31) - 1, 1 << 31, -(1 << 31), (1 << 32) - 1, 1 << 32,
    1 << 53, (1 << 63) - 1, 1 << 63, -(1 << 63), (1 << 64) - 1, 1 << 64, 10**30,
)  # fmt: skip
ints = st.sampled_from(EDGE_INTS) | st.integers(-(1 << 70), 1 << 70)
small_ints = st.integers(-3, 70)
texts = st.sampled_from(
    ["", "x", "nosuch", "../../etc/passwd", "\x00", "\ud800", "é" * 40, "a" * 300, *PLACEHOLDERS]
) | st.text(max_size=16)
scalars = st.none() | st.booleans() | ints | small_ints | st.floats() | texts
junk: st.SearchStrategy[Any] = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=3), max_leaves=8
)


def override(base: dict[str, Any], keys: tuple[str, ...], values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``base`` with a few of ``keys`` dropped or set to hostile values (sometimes none: well formed)."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out = dict(base)
        if draw(st.integers(0, 2)) == 0:  # a third stay well formed: the deeper paths get their turn
            return out
        for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
            if draw(st.integers(0, 4)) == 0:
                out.pop(key, None)
            else:
                out[key] = draw(values)
        return out

    return build()


# -- data plane ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArraySpec:
    """An array a frame carries: made at send time from ``fill`` and ``seed``."""

    dtype: str  # f32, f16, i32
    shape: tuple[int, ...]
    fill: str  # tokens, zeros, random, nan, inf, huge, negative
    seed: int = 0


@dataclass(frozen=True)
class Frame:
    """A JSON-described frame; ``arrays_meta`` replaces the array descriptions the arrays give,
    ``body`` the whole JSON description, ``extra`` is sent after the arrays, ``lengths`` replace
    the header's (description, array) byte counts, ``cut`` sends only the first bytes."""

    kind: int
    rid: int
    meta: Any
    arrays: tuple[ArraySpec, ...] = ()
    arrays_meta: Any = None
    body: bytes | None = None
    extra: bytes = b""
    lengths: tuple[int | None, int | None] = (None, None)
    cut: int | None = None


@dataclass(frozen=True)
class StepFrame:
    """A STEP frame (codec.STEP_META), each field as drawn."""

    rid: int
    link: int | str
    hop: int
    pos: int
    step: int
    n: int
    dtype: int
    ndim: int
    rows: int
    cols: int
    data: int  # bytes of array data sent
    cut: int | None = None


@dataclass(frozen=True)
class DataCase:
    """Pieces sent on one new data connection: after a HELLO with the right token and a new
    link (``authenticate``), or from its first byte."""

    authenticate: bool
    pieces: tuple[Frame | StepFrame | bytes, ...]


rids = st.sampled_from([0, 1, 7, (1 << 63) - 1, (1 << 64) - 1]) | st.integers(0, (1 << 64) - 1)
ADDRESSES = (SELF, PEER, "127.0.0.1:1", "localhost:1", "127.0.0.1:0", "127.0.0.1:65536", "[::1]:1", "127.0.0.1",
             ":", "", "127.0.0.1:-5", "x:y", "127.0.0.1:99999999999999999999")  # fmt: skip


def well_shaped(first: bool) -> st.SearchStrategy[ArraySpec]:
    """The array a stage takes: token ids at the first, hidden rows elsewhere."""
    if first:
        return st.builds(ArraySpec, st.just("i32"), st.tuples(st.integers(1, 6)), st.just("tokens"), st.integers(0, 3))
    return st.builds(ArraySpec, st.just("f32"), st.tuples(st.integers(1, 6), st.just(N_EMBD)), st.just("random"))


def array_specs(first: bool) -> st.SearchStrategy[ArraySpec]:
    """Mostly the array a stage expects (token ids at the first, hidden rows elsewhere), else any."""
    rows = st.integers(1, 6) | st.sampled_from([0, 512, 4097])
    expected = st.builds(
        ArraySpec, st.just("i32" if first else "f32"),
        st.tuples(rows) if first else st.tuples(rows, st.just(N_EMBD)),
        st.sampled_from(["tokens", "negative", "huge"] if first else ["random", "zeros", "nan", "inf", "huge"]),
        st.integers(0, 3),
    )  # fmt: skip
    other = st.builds(
        ArraySpec, st.sampled_from(["f32", "f16", "i32"]),
        st.lists(st.integers(1, 70), min_size=1, max_size=4).map(tuple).filter(lambda s: count_of(s) <= 1 << 16),
        st.sampled_from(["tokens", "zeros", "random", "nan", "inf", "huge", "negative"]), st.integers(0, 3),
    )  # fmt: skip
    return st.one_of(expected, expected, other)


def count_of(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


GEN_BASE = {"n": 3, "step": 0, "limit": 64, "eog": [], "sampling": [0.0, 40, 0.95, 1]}
sampling_lists = st.lists(st.floats() | ints | small_ints | st.none() | texts, min_size=0, max_size=6) | st.tuples(
    st.sampled_from([0.0, 0.8, 1.0, -1.0, float("nan"), float("inf"), 1e-300]),
    st.sampled_from([0, 1, 40, -1, 1 << 40]),
    st.sampled_from([0.95, 1.0, 0.0, -0.5, 2.0, float("nan")]),
    st.sampled_from([0, 1, -1, (1 << 64) - 1, 1 << 64]),
).map(list)
generations = st.one_of(
    st.just(GEN_BASE),
    override(GEN_BASE, ("n", "step", "limit", "eog"), junk | ints),
    st.fixed_dictionaries({**{k: st.just(v) for k, v in GEN_BASE.items()}, "sampling": sampling_lists}),
    st.fixed_dictionaries({**{k: st.just(v) for k, v in GEN_BASE.items()}, "eog": st.lists(ints, max_size=5)}),
    junk,
)
hops = st.tuples(st.sampled_from(ADDRESSES) | texts, st.sampled_from([TOKEN, PEER_TOKEN, "", "x"]) | texts,
                 st.lists(st.sampled_from([SESSION, PEER_SESSION, "nosuch"]) | texts, max_size=3)).map(list)  # fmt: skip
ROUTES = (
    [[SELF, TOKEN, [SESSION]]],
    [[SELF, TOKEN, [SESSION]], [PEER, PEER_TOKEN, [PEER_SESSION]]],
    [[SELF, TOKEN, [SESSION]], ["127.0.0.1:1", TOKEN, ["nosuch"]]],
)
routes = st.one_of(st.sampled_from(ROUTES[:2]), st.sampled_from(ROUTES[:2]), st.sampled_from(ROUTES),
                   st.lists(hops, max_size=3), junk)  # fmt: skip
FORWARD_KEYS = ("route", "hop", "link", "pos", "rows", "all_logits", "top_k", "f16", "gen", "batch")
forward_values = junk | st.sampled_from([[0], [-1], [1 << 40], [0, 0], [], True, "x", ["a", "x"], [1, 2, 3]])


@st.composite
def forwards(draw: st.DrawFn, rid: int | None = None, gen: bool | None = None) -> Frame:
    """A FORWARD: well formed, then a few fields made hostile (and sometimes its arrays)."""
    second = draw(st.integers(0, 5)) == 0  # this server as a route's second hop, hidden rows in
    route = [[PEER, PEER_TOKEN, [PEER_SESSION]], [SELF, TOKEN, [SESSION]]] if second else draw(routes)
    spec = draw(well_shaped(first=not second) if draw(st.integers(0, 2)) else array_specs(first=not second))
    rows = spec.shape[0] if spec.shape else 1
    meta: dict[str, Any] = {"route": route, "hop": 1 if second else 0, "link": LINK, "pos": [0], "rows": [rows]}
    for key, values in (("all_logits", st.booleans()), ("top_k", st.sampled_from([0, 1, 5]))):
        if draw(st.booleans()):
            meta[key] = draw(values)
    if gen if gen is not None else draw(st.booleans()):
        meta["gen"] = draw(generations)
        meta.pop("all_logits", None)
    meta = draw(override(meta, FORWARD_KEYS, forward_values))
    arrays = (spec,) if draw(st.integers(0, 5)) else tuple(draw(st.lists(array_specs(False), max_size=2)))
    return Frame(FrameKind.FORWARD, draw(rids) if rid is None else rid, meta, arrays)


@st.composite
def steps(draw: st.DrawFn, rid: int) -> StepFrame:
    """A STEP for generation ``rid``; its fields within their struct's ranges, often wrong."""
    u32, i32 = st.integers(0, (1 << 32) - 1), st.integers(-(1 << 31), (1 << 31) - 1)
    return StepFrame(
        rid, draw(st.just(LINK) | st.integers(-(1 << 63), (1 << 63) - 1)), draw(st.sampled_from([0, 1, 5]) | u32),
        draw(st.integers(0, 5) | i32), draw(st.integers(0, 4) | i32), draw(st.integers(1, 4) | i32),
        draw(st.integers(0, 2) | st.integers(0, 255)), draw(st.sampled_from([1, 2]) | st.integers(0, 255)),
        draw(st.integers(1, 3) | u32), draw(st.sampled_from([0, N_EMBD]) | u32), draw(st.sampled_from([4, 0, 3, 256])),
        draw(st.none() | st.integers(0, 40)),
    )  # fmt: skip


@st.composite
def generation_then_step(draw: st.DrawFn) -> tuple[Frame | StepFrame, ...]:
    rid = draw(rids)
    first = draw(forwards(rid=rid, gen=True))
    return (first, *draw(st.lists(steps(rid), min_size=1, max_size=2)))


plain_kinds = st.sampled_from([k for k in FrameKind if k not in (FrameKind.STEP,)]) | st.integers(0, 255)
simple_frames = st.builds(
    Frame, plain_kinds, rids, junk | st.just({"link": PROBE_LINK}) | st.just({"link": LINK}),
    st.lists(array_specs(False), max_size=2).map(tuple),
)  # fmt: skip


@st.composite
def damaged(draw: st.DrawFn) -> Frame:
    """A frame whose bytes lie: header lengths, array descriptions, a body that is not JSON, cut short."""
    frame = draw(forwards() | simple_frames)
    how = draw(st.sampled_from(["lengths", "arrays_meta", "body", "extra", "cut"]))
    if how == "lengths":
        sizes = st.none() | st.sampled_from([0, 1, 1 << 16, (1 << 20) + 1, (1 << 32) - 1]) | st.integers(0, 4096)
        sizes_64 = sizes | st.sampled_from([(1 << 64) - 1, 1 << 40])
        return replace(frame, lengths=(draw(sizes), draw(sizes_64)))
    if how == "arrays_meta":
        return replace(frame, arrays_meta=draw(junk))
    if how == "body":
        body = draw(st.binary(max_size=64) | st.sampled_from([b"[]", b"null", b"{", b'{"arrays": 5}', b"[" * 5000]))
        return replace(frame, body=body)
    if how == "extra":
        return replace(frame, extra=draw(st.binary(min_size=1, max_size=64)))
    return replace(frame, cut=draw(st.integers(0, 80)))


raw_bytes = st.binary(max_size=256) | st.sampled_from([b"LRD1", b"LRD1" + b"\xff" * 28, b"GET / HTTP/1.1\r\n\r\n"])


@st.composite
def well_formed(draw: st.DrawFn) -> Frame:
    """A FORWARD the server computes (sampling values at their edges): through this server
    alone or on to its peer, a prompt or a generation."""
    spec = draw(well_shaped(first=True))
    meta: dict[str, Any] = {"route": draw(st.sampled_from(ROUTES[:2])), "hop": 0, "link": LINK,
                            "pos": [draw(st.sampled_from([0, 0, 1, 60]))], "rows": [spec.shape[0]]}  # fmt: skip
    if draw(st.booleans()):
        sampling = draw(st.tuples(st.sampled_from([0.0, 1e-6, 0.8, 2.0]), st.sampled_from([0, 1, 40, 1 << 20]),
                                  st.sampled_from([1e-9, 0.5, 1.0]), st.sampled_from([0, (1 << 64) - 1])))  # fmt: skip
        n, limit = draw(st.sampled_from([1, 3, 8])), draw(st.sampled_from([1, 8, 64, (1 << 31) - 1]))
        meta["gen"] = {**GEN_BASE, "n": n, "limit": limit, "eog": draw(st.lists(st.integers(0, 319), max_size=3)),
                       "sampling": list(sampling) + draw(st.sampled_from([[], [0], [5], [1 << 62]]))}  # fmt: skip
    else:
        meta["all_logits"], meta["top_k"] = draw(st.booleans()), draw(st.sampled_from([0, 1, 320, 1000]))
        meta["f16"] = draw(st.booleans())
    return Frame(FrameKind.FORWARD, draw(rids), meta, (spec,))


after_auth_pieces = st.one_of(
    well_formed().map(lambda f: (f,)),
    st.lists(well_formed(), min_size=2, max_size=3).map(tuple),
    forwards().map(lambda f: (f,)),
    forwards().map(lambda f: (f,)),
    generation_then_step(),
    simple_frames.map(lambda f: (f,)),
    damaged().map(lambda f: (f,)),
    raw_bytes.map(lambda b: (b,)),
    st.lists(forwards() | simple_frames, min_size=2, max_size=3).map(tuple),
)
hellos = st.builds(
    Frame, st.just(int(FrameKind.HELLO)), rids,
    override({"token": TOKEN, "link": LINK, "protocol": 1}, ("token", "link", "protocol"),
              junk | st.sampled_from([PROBE_LINK, "wrong", 0, -1, 1 << 63])),
)  # fmt: skip


@st.composite
def before_auth(draw: st.DrawFn) -> DataCase:
    """What a stranger sends first: a HELLO with hostile fields (then frames), another kind
    first, a damaged frame, or raw bytes."""
    first = draw(st.one_of(hellos, hellos, simple_frames, damaged(), forwards(), raw_bytes))
    rest = draw(st.lists(forwards() | simple_frames | raw_bytes, max_size=2))
    return DataCase(False, (first, *rest))


after_auth = st.builds(DataCase, st.just(True), after_auth_pieces)
