"""Hostile inputs for every surface a farm exposes, as hypothesis strategies: gRPC requests of
every method, data-plane frames before and after authentication, weight-upload frames and API
request bodies. Shared by ``tests/test_fuzz.py`` and ``llmrpc-bench fuzz``.

Cases are plain data: structured-but-wrong messages (the right frame kinds and fields, with
hostile values: wrong types, negative and huge numbers, unknown sessions, wrong shapes, lengths
that lie, truncated frames) mixed with raw bytes. What only a live server knows (its data token,
its address, a session opened for the case) appears as a placeholder string that
:mod:`llmrpc.bench.fuzz_targets` replaces before it sends the case.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from llmrpc.codec import FrameKind
from llmrpc.v1 import llmrpc_pb2 as pb

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


def _override(base: dict[str, Any], keys: tuple[str, ...], values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
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
        st.lists(st.integers(1, 70), min_size=1, max_size=4).map(tuple).filter(lambda s: _count(s) <= 1 << 16),
        st.sampled_from(["tokens", "zeros", "random", "nan", "inf", "huge", "negative"]), st.integers(0, 3),
    )  # fmt: skip
    return st.one_of(expected, expected, other)


def _count(shape: tuple[int, ...]) -> int:
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
    _override(GEN_BASE, ("n", "step", "limit", "eog"), junk | ints),
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
    meta = draw(_override(meta, FORWARD_KEYS, forward_values))
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
    _override({"token": TOKEN, "link": LINK, "protocol": 1}, ("token", "link", "protocol"),
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


# -- gRPC ------------------------------------------------------------------------------------------
METHODS: dict[
    str, tuple[Any, bool, bool]
] = {  # method -> (request message, the request is a stream, the reply is a stream)
    "Hello": (pb.HelloRequest, False, False),
    "Health": (pb.HealthRequest, False, False),
    "Load": (pb.LoadRequest, False, False),
    "PushSlice": (pb.SliceChunk, True, False),
    "OpenUpload": (pb.SliceHeader, False, False),
    "OpenSession": (pb.OpenSessionRequest, False, False),
    "Forward": (pb.ForwardRequest, False, False),
    "ForwardStream": (pb.ForwardRequest, True, True),
    "CloseSession": (pb.CloseSessionRequest, False, False),
}


@dataclass(frozen=True)
class GrpcCase:
    """One call of ``method``: each request a field dict (placeholders inside) or raw bytes."""

    method: str
    requests: tuple[dict[str, Any] | bytes, ...]


_FD = FieldDescriptor
_RANGES = {
    _FD.TYPE_UINT32: (0, (1 << 32) - 1), _FD.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    _FD.TYPE_UINT64: (0, (1 << 64) - 1), _FD.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    _FD.TYPE_ENUM: (-(1 << 31), (1 << 31) - 1),
}  # fmt: skip


def _field_values(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if f.type in _RANGES:
        low, high = _RANGES[f.type]
        edges = [v for v in EDGE_INTS if low <= v <= high]
        return st.sampled_from(edges) | st.integers(low, high) | st.integers(max(low, -2), 8)
    if f.type == _FD.TYPE_BOOL:
        return st.booleans()
    if f.type == _FD.TYPE_DOUBLE:
        return st.floats()
    if f.type == _FD.TYPE_STRING:
        return texts
    if f.type == _FD.TYPE_BYTES:
        return st.binary(max_size=64) | st.sampled_from([b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 16])
    if f.message_type is pb.Tensor.DESCRIPTOR:
        return tensors
    if depth >= 2 or f.message_type is None:
        return st.just({})
    return message_fields(f.message_type, depth + 1)


def message_fields(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Field dicts for any message of the service: a few fields set, each to an edge value."""
    fields = {}
    for f in desc.fields:
        values = _field_values(f, depth)
        fields[f.name] = st.lists(values, max_size=3) if f.is_repeated else values
    return st.fixed_dictionaries({}, optional=fields)


@st.composite
def _consistent_tensor(draw: st.DrawFn) -> dict[str, Any]:
    """A tensor whose bytes match its shape (the codec lets it through to the engine)."""
    dtype = draw(st.sampled_from([pb.DTYPE_I32, pb.DTYPE_F32, pb.DTYPE_F16]))
    shape = draw(st.sampled_from([[3], [2, N_EMBD], [1, N_EMBD], [4], [1, 1, 1, 3], [N_EMBD], [2, 7]]))
    size = 2 if dtype == pb.DTYPE_F16 else 4
    fill = draw(st.sampled_from([b"\x00", b"\x01", b"\xff", b"\x7f"]))
    return {"dtype": dtype, "shape": shape, "data": fill * (size * _count(tuple(shape)))}


tensors = st.one_of(
    _consistent_tensor(),
    _consistent_tensor(),
    st.fixed_dictionaries(
        {}, optional={"dtype": st.integers(-1, 5), "shape": st.lists(ints.filter(lambda v: -(1 << 63) <= v < 1 << 63),
                                                                     max_size=6), "data": st.binary(max_size=64)},
    ),
)  # fmt: skip
_STRUCTURED = {  # requests that name what the server holds, so that they get past the first checks
    "Load": st.fixed_dictionaries(
        {"model_path": st.sampled_from([MODEL_PATH, "", "/dev/null", "/etc/passwd", "/nonexistent/m.gguf"])},
        optional={"layer_start": st.integers(0, 5) | st.sampled_from([(1 << 32) - 1]),
                  "layer_end": st.integers(0, 5) | st.sampled_from([(1 << 32) - 1]),
                  "model_hash": st.sampled_from([MODEL_HASH, "0" * 64, "nosuch"]),
                  "flash_attn": st.integers(0, 3), "cache_type_k": st.sampled_from(["f16", "q8_0", "q4_0", "x"]),
                  "cache_type_v": st.sampled_from(["f16", "q8_0", "f32", ""]),
                  "share_host": st.sampled_from(["", "fuzz-a", "fuzz b", "../x", "a" * 65])},
    ),
    "OpenSession": st.fixed_dictionaries(
        {"n_ctx": st.sampled_from([0, 1, 16, 64, 1 << 20, (1 << 32) - 1])},
        optional={"prefix_session": st.sampled_from([SESSION, "nosuch", ""]),
                  "prefix_rows": st.sampled_from([0, 1, 3, 64, (1 << 32) - 1]), "prefix_take": st.booleans()},
    ),
    "Forward": st.fixed_dictionaries(
        {"session_id": st.sampled_from([SESSION, "nosuch", ""]), "input": tensors},
        optional={"start_pos": st.sampled_from([0, 1, 63, 64, (1 << 32) - 1]), "all_logits": st.booleans(),
                  "output_dtype": st.integers(-1, 4), "logits_top_k": st.sampled_from([0, 1, 320, 321, (1 << 32) - 1])},
    ),
    "CloseSession": st.fixed_dictionaries({"session_id": st.sampled_from([SESSION, "nosuch", ""])},
                                          optional={"keep": st.booleans()}),
}  # fmt: skip
_STRUCTURED["ForwardStream"] = _STRUCTURED["Forward"]
wire_fields = st.lists(
    st.tuples(st.integers(1, 20), st.sampled_from([0, 1, 2, 5, 3, 4, 6, 7]), st.binary(max_size=12)), max_size=5
)


def protobuf_wire(fields: list[tuple[int, int, bytes]]) -> bytes:
    """Bytes in protobuf's wire format with any field numbers and wire types (types that clash
    with the fields' own, lengths that lie)."""
    out = bytearray()
    for number, wire_type, payload in fields:
        out += _varint(number << 3 | wire_type)
        if wire_type == 2:
            out += _varint(len(payload) + (len(payload) % 3 == 2))  # sometimes one byte longer than given
        out += payload
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@st.composite
def grpc_cases(draw: st.DrawFn) -> GrpcCase:
    method = draw(st.sampled_from(sorted(METHODS)))
    message, streamed, _ = METHODS[method]
    one: st.SearchStrategy[Any] = st.one_of(
        message_fields(message.DESCRIPTOR),
        _STRUCTURED.get(method, message_fields(message.DESCRIPTOR)),
        _STRUCTURED.get(method, message_fields(message.DESCRIPTOR)),
        st.binary(max_size=64),
        wire_fields.map(protobuf_wire),
    )
    n = draw(st.integers(0, 4)) if streamed else 1
    return GrpcCase(method, tuple(draw(st.lists(one, min_size=n, max_size=n))))


# -- weight uploads --------------------------------------------------------------------------------
@dataclass(frozen=True)
class UploadFrame:
    """One upload frame: ``length`` is what the header says, ``size`` the bytes sent; ``crc``
    None for the bytes' true crc32."""

    tensor: int
    offset: int
    length: int
    size: int
    crc: int | None
    fill: int  # byte value of the data, or -1: the tensor's true bytes


@dataclass(frozen=True)
class UploadCase:
    """A slice upload of layers [0, 1) under a made-up model hash: its header (``header``: fields
    replaced), the token as given (right, wrong, short, none), the frames, END or not, then raw bytes."""

    header: tuple[tuple[str, Any], ...]
    token: str
    frames: tuple[UploadFrame, ...]
    end: bool
    tail: bytes = b""
    whole: bool = False  # send every tensor's true bytes first (a valid upload, then the frames)
    chunk: int = 0  # ... in frames of this many bytes (0: a frame a tensor)


u64 = st.sampled_from([0, 1, 64, 1 << 20, (1 << 26) + 1, (1 << 63), (1 << 64) - 1]) | st.integers(0, 4096)
upload_frames = st.builds(
    UploadFrame, st.integers(0, 12) | st.sampled_from([(1 << 32) - 2, 1 << 31]), u64,
    st.just(-1) | u64, st.integers(0, 300), st.none() | st.integers(0, (1 << 32) - 1),
    st.sampled_from([-1, -1, 0, 0xFF, 0x41]),
)  # fmt: skip
header_changes = st.lists(
    st.tuples(
        st.sampled_from(["layer_start", "layer_end", "data_size", "n_tensors", "tensor_offset", "tensor_bytes",
                         "header_cut", "model_hash"]),
        st.sampled_from([0, 1, 3, 1 << 20, (1 << 32) - 1, (1 << 63), "other"]),
    ), max_size=2,
).map(tuple)  # fmt: skip
upload_cases = st.one_of(
    st.builds(UploadCase, st.just(()), st.just("right"), st.just(()), st.just(True), st.just(b""), st.just(True),
              st.integers(0, 1 << 16)),  # fmt: skip
    st.builds(
        UploadCase, header_changes | st.just(()), st.sampled_from(["right", "right", "right", "wrong", "short", "none"]),
        st.lists(upload_frames, max_size=4).map(tuple), st.booleans(), st.binary(max_size=40) | st.just(b""),
        st.booleans(),
    ),
)  # fmt: skip


# -- the HTTP API ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiCase:
    """One HTTP request: ``body`` a JSON value or raw bytes; ``length`` the Content-Length
    header (None: the body's true length, "absent": none)."""

    method: str
    path: str
    body: Any
    length: int | str | None = None
    raw: bool = False


COMPLETION = {"prompt": "hello world", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
API_KEYS = ("prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "n",
            "stop", "stream", "stream_options", "cache_prompt", "logprobs", "presence_penalty", "best_of", "echo")  # fmt: skip
api_values = junk | st.sampled_from(
    [-1, 0, 1 << 64, 1e308, [1, 2, 3], [[1, 2]], [1 << 20], "x" * 3000, {"include_usage": True}, [{"role": "user"}],
     [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], ["a"] * 5, True]
)  # fmt: skip
RAW_BODIES = (
    b"",
    b"{",
    b"null",
    b"[" * 100_000,
    b'{"prompt": ' + b"9" * 5000 + b"}",
    b"\xff\xfe",
    b'{"prompt": "\\ud800"}',
    b'{"prompt": "hi", "max_tokens": 1e999}',
    b'{"prompt": NaN}',
)
api_cases = st.one_of(
    st.builds(ApiCase, st.just("POST"), st.sampled_from(["/v1/completions"]),
              _override(COMPLETION, API_KEYS, api_values), st.none()),
    st.builds(ApiCase, st.just("POST"), st.sampled_from(["/v1/chat/completions"]),
              _override(CHAT, API_KEYS, api_values), st.none()),
    st.builds(ApiCase, st.just("POST"), st.sampled_from(["/v1/completions", "/v1/chat/completions", "/x", "/v1/models"]),
              st.sampled_from(RAW_BODIES) | st.binary(max_size=64), st.none(), st.just(True)),
    st.builds(ApiCase, st.sampled_from(["POST", "GET", "PUT"]), st.sampled_from(["/v1/completions", "/", "/metrics",
              "/v1/models", "/dashboard.json", "//", "/%00"]), st.just(COMPLETION),
              st.sampled_from(["absent", -1, 0, 3, 1 << 40, "x", (16 << 20) + 1])),
)  # fmt: skip
