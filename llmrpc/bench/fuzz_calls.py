"""Hostile calls for the request-shaped surfaces, as hypothesis strategies: gRPC requests of
every method (field by field from the service's descriptors, and raw protobuf wire bytes),
weight uploads (OpenUpload then its frames) and API request bodies. The values and placeholders
are :mod:`llmrpc.bench.fuzz_cases`'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from llmrpc.bench.fuzz_cases import (
    EDGE_INTS,
    MODEL_HASH,
    MODEL_PATH,
    N_EMBD,
    SESSION,
    count_of,
    ints,
    junk,
    override,
    texts,
)
from llmrpc.v1 import llmrpc_pb2 as pb

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
    return {"dtype": dtype, "shape": shape, "data": fill * (size * count_of(tuple(shape)))}


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
              override(COMPLETION, API_KEYS, api_values), st.none()),
    st.builds(ApiCase, st.just("POST"), st.sampled_from(["/v1/chat/completions"]),
              override(CHAT, API_KEYS, api_values), st.none()),
    st.builds(ApiCase, st.just("POST"), st.sampled_from(["/v1/completions", "/v1/chat/completions", "/x", "/v1/models"]),
              st.sampled_from(RAW_BODIES) | st.binary(max_size=64), st.none(), st.just(True)),
    st.builds(ApiCase, st.sampled_from(["POST", "GET", "PUT"]), st.sampled_from(["/v1/completions", "/", "/metrics",
              "/v1/models", "/dashboard.json", "//", "/%00"]), st.just(COMPLETION),
              st.sampled_from(["absent", -1, 0, 3, 1 << 40, "x", (16 << 20) + 1])),
)  # fmt: skip
