"""Everything that crosses the wire, converted in one place: arrays, devices, ranges."""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from llmrpc.model.kv import CacheConfig
from llmrpc.model.slicefile import IncomingSlice, SliceLayout, SliceTensor
from llmrpc.sampling import SamplingParams
from llmrpc.types import CachedSlice, DeviceInfo, LoadedRange, MemoryParts, ServerHealth, ServerInfo
from llmrpc.v1 import llmrpc_pb2 as pb

_DTYPES: dict[Any, np.dtype] = {
    pb.DTYPE_F32: np.dtype("<f4"),
    pb.DTYPE_F16: np.dtype("<f2"),
    pb.DTYPE_I32: np.dtype("<i4"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}

MAX_DIMS = 4


# The bulk upload connection (OpenUpload): a token, then frames, then the server's status.
UPLOAD_TOKEN_BYTES = 32
UPLOAD_FRAME = struct.Struct("<IQQI")  # tensor index, offset in tensor, length, crc32 of the bytes
UPLOAD_END = 0xFFFFFFFF  # tensor index of the closing frame
UPLOAD_STATUS = struct.Struct("<BQI")  # ok, tensor bytes kept, length of the message that follows


class CodecError(ValueError):
    """A message that does not describe a valid array; the text says what is wrong."""


def tensor_to_proto(arr: np.ndarray, dtype: int | None = None) -> pb.Tensor:
    if dtype is not None:
        arr = arr.astype(_DTYPES[dtype], copy=False)
    arr = np.ascontiguousarray(arr)
    code = _CODES.get(arr.dtype.newbyteorder("<"))
    if code is None:
        raise CodecError(f"dtype {arr.dtype} cannot be sent (f32, f16, i32 can)")
    return pb.Tensor(dtype=code, shape=list(arr.shape), data=arr.tobytes())


def tensor_from_proto(t: pb.Tensor, max_elements: int) -> np.ndarray:
    """Decode and validate: known dtype, sane shape, byte count that matches the shape."""
    dt = _DTYPES.get(t.dtype)
    if dt is None:
        raise CodecError(f"unknown tensor dtype {t.dtype}")
    shape = tuple(int(s) for s in t.shape)
    if not 1 <= len(shape) <= MAX_DIMS or any(s <= 0 for s in shape):
        raise CodecError(f"bad tensor shape {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    if count > max_elements:
        raise CodecError(f"tensor of {count} elements exceeds the limit of {max_elements}")
    if len(t.data) != count * dt.itemsize:
        raise CodecError(f"tensor data is {len(t.data)} bytes, shape {list(shape)} of {dt} needs {count * dt.itemsize}")
    return np.frombuffer(t.data, dtype=dt).reshape(shape)


def dtype_name(code: int) -> str:
    return pb.DType.Name(code) if code in pb.DType.values() else str(code)


def device_to_proto(d: DeviceInfo) -> pb.Device:
    return pb.Device(
        name=d.name, description=d.description, kind=d.kind, memory_total=d.memory_total, memory_free=d.memory_free
    )


def device_from_proto(d: pb.Device) -> DeviceInfo:
    return DeviceInfo(d.name, d.description, d.kind, d.memory_free, d.memory_total)


def range_to_proto(r: LoadedRange) -> pb.LoadedRange:
    return pb.LoadedRange(
        model_path=r.model_path,
        architecture=r.architecture,
        layer_start=r.layer_start,
        layer_end=r.layer_end,
        n_layer=r.n_layer,
        n_embd=r.n_embd,
        n_vocab=r.n_vocab,
        weight_bytes=r.weight_bytes,
        model_hash=r.model_hash,
        source=r.source,
        flash_attn=r.flash_attn,
        cache_type_k=r.cache_type_k,
        cache_type_v=r.cache_type_v,
    )


def range_from_proto(r: pb.LoadedRange) -> LoadedRange:
    return LoadedRange(
        r.model_path, r.architecture, r.layer_start, r.layer_end, r.n_layer, r.n_embd, r.n_vocab, r.weight_bytes,
        r.model_hash, r.source, r.flash_attn, r.cache_type_k or "f16", r.cache_type_v or "f16",
    )  # fmt: skip


_FLASH = {None: pb.FLASH_ATTN_AUTO, False: pb.FLASH_ATTN_OFF, True: pb.FLASH_ATTN_ON}


def load_request(
    model_path: str, start: int, end: int, model_hash: str, cache: CacheConfig, share_host: str = "",
    slice_digest: str = "",
) -> pb.LoadRequest:  # fmt: skip
    return pb.LoadRequest(
        model_path=model_path, layer_start=start, layer_end=end, model_hash=model_hash,
        flash_attn=_FLASH[cache.flash_attn], cache_type_k=cache.type_k, cache_type_v=cache.type_v,
        share_host=share_host, slice_digest=slice_digest,
    )  # fmt: skip


def cache_from_request(r: pb.LoadRequest) -> CacheConfig:
    """The attention and cache a Load asks for (ValueError for a type or mix llama.cpp refuses)."""
    flash = {v: k for k, v in _FLASH.items()}.get(r.flash_attn)
    if r.flash_attn not in _FLASH.values():
        raise ValueError(f"flash_attn {r.flash_attn} is not one of auto (0), off (1), on (2)")
    return CacheConfig(flash, r.cache_type_k or "f16", r.cache_type_v or "f16")


def slice_header_to_proto(model_hash: str, start: int, end: int, layout: SliceLayout) -> pb.SliceHeader:
    return pb.SliceHeader(
        model_hash=model_hash, layer_start=start, layer_end=end, header=layout.header, data_size=layout.data_size,
        tensors=[pb.SliceTensorInfo(name=t.name, offset=t.offset, n_bytes=t.n_bytes, sha256=t.sha256)
                 for t in layout.tensors],
    )  # fmt: skip


def slice_header_from_proto(h: pb.SliceHeader) -> IncomingSlice:
    return IncomingSlice(
        h.model_hash, h.layer_start, h.layer_end, bytes(h.header), h.data_size,
        tuple(SliceTensor(t.name, t.offset, t.n_bytes, t.sha256) for t in h.tensors),
    )  # fmt: skip


def server_info_from_proto(address: str, reply: pb.HelloReply) -> ServerInfo:
    return ServerInfo(
        address=address,
        protocol_version=reply.protocol_version,
        server_version=reply.server_version,
        device=device_from_proto(reply.device),
        threads=reply.threads,
        loaded=range_from_proto(reply.loaded) if reply.HasField("loaded") else None,
        open_sessions=reply.open_sessions,
        memory_cap=reply.memory_cap,
        memory_budget=reply.memory_budget,
        bandwidth=reply.bandwidth,
        matmul_flops=reply.matmul_flops,
        cached=tuple(CachedSlice(c.model_hash, c.layer_start, c.layer_end, c.bytes) for c in reply.cached),
        bytes_received=reply.bytes_received,
        data_port=reply.data_port,
        data_token=reply.data_token,
        machine_id=reply.machine_id,
    )


def health_from_proto(reply: pb.HealthReply) -> ServerHealth:
    return ServerHealth(
        reply.serving, reply.open_sessions, reply.native_steps, reply.takes_turns, reply.prefix_entries,
        reply.prefix_bytes, reply.prefix_budget, reply.slice_cache_bytes, reply.slice_cache_budget,
        MemoryParts(reply.weight_bytes, reply.session_bytes, reply.spare_bytes, reply.prefix_bytes, reply.graph_bytes),
    )  # fmt: skip


def peers_request(link: int, peers: Sequence[tuple[str, str]]) -> pb.PeersRequest:
    """A head's next servers for one server: (data address, data token) each."""
    return pb.PeersRequest(link=link, peers=[pb.Peer(data_address=a, data_token=t) for a, t in peers])


def peers_from_request(r: pb.PeersRequest) -> list[tuple[str, str]]:
    return [(p.data_address, p.data_token) for p in r.peers]


def cached_to_proto(c: CachedSlice) -> pb.CachedSlice:
    return pb.CachedSlice(model_hash=c.model_hash, layer_start=c.layer_start, layer_end=c.layer_end, bytes=c.bytes)


# -- the data plane: activations on a plain TCP connection beside gRPC ------------------------
# A frame is a fixed header, a JSON description, then the raw bytes of its arrays in order.
# The head sends FORWARD frames to the first server of a route; each server runs its layers
# and sends the frame on to the next one (hop + 1); the last server, or any server that
# fails, answers the head directly on the head's own connection to it.
DATA_MAGIC = b"LRD1"
DATA_HEADER = struct.Struct("<4sB3xQIQ")  # magic, kind, request id, JSON bytes, array bytes
MAX_DATA_META = 1 << 20


class FrameKind(enum.IntEnum):
    HELLO = 1  # first frame on a connection: {"token", "link", "protocol"}
    WELCOME = 2  # the server's answer to HELLO
    FORWARD = 3  # {"route", "hop", "link", "pos", "all_logits", "top_k", "f16"} + the input array
    RESULT = 4  # the last hop's output arrays (logits, or top-k values then ids)
    ERROR = 5  # {"code", "message", "server", "layers"}
    # A FORWARD with "gen" generates on its own: the last server samples each token, reports
    # it to the head (TOKEN) and sends it straight back to the first server as the next step.
    TOKEN = 6  # {"token", "step", "end"}: end is None, or why the generation stopped after it (TOKEN_META)
    CANCEL = 7  # head -> the last server of a generation: stop after the step in flight
    ENDED = 8  # the last server -> the first: a generation ended, its steps come no more
    # A generation's next step on a connection that already carried a FORWARD of it (with no
    # batch tag): only what changes, in a fixed binary description (see STEP_META).
    STEP = 9


_DATA_DTYPES: dict[str, np.dtype] = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i32": np.dtype("<i4")}
_DATA_NAMES = {dt: name for name, dt in _DATA_DTYPES.items()}  # little-endian dtypes only
_JSON = json.JSONEncoder(separators=(",", ":"))
# A STEP's description: head link, hop, position, step, tokens left, then its one array's
# dtype (index in _STEP_DTYPES), number of dimensions and dimensions (the second 0 for one).
# A generation's step crosses every server and runs cold there (after the layers' compute
# has flushed the caches), where JSON costs ~100 us each way and a struct ~20.
STEP_META = struct.Struct("<qIiiiBB2xII")
_STEP_DTYPES = tuple(_DATA_DTYPES.values())
# A TOKEN report: token id, step, why the generation ended (an index in TOKEN_ENDS). The last
# server sends it before the token goes on, on the CPU (see the data plane): a struct, not JSON.
TOKEN_META = struct.Struct("<iiB3x")
TOKEN_ENDS: tuple[str | None, ...] = (None, "eog", "length", "context", "cancelled", "gone")


@dataclass(frozen=True)
class Generation:
    """A FORWARD's ``gen``: ``n`` tokens still to generate, this step's number, the positions
    the session may fill (``limit``), the tokens that end it, and how to sample."""

    n: int
    step: int
    limit: int
    eog: frozenset[int]
    sampling: SamplingParams

    def to_meta(self) -> dict[str, Any]:
        p = self.sampling
        return {
            "n": self.n, "step": self.step, "limit": self.limit, "eog": sorted(self.eog),
            "sampling": [p.temperature, p.top_k, p.top_p, p.seed] + ([p.drawn] if p.drawn else []),
        }  # fmt: skip

    def next_step(self) -> Generation:
        return replace(self, n=self.n - 1, step=self.step + 1)

    @staticmethod
    def parse(gen: Any) -> Generation:
        """Checked field by field: a bad ``gen`` raises ValueError naming the field."""
        if not isinstance(gen, dict):
            raise ValueError("gen must be an object")
        sampling, eog = gen.get("sampling"), gen.get("eog")
        if not isinstance(sampling, list) or not 4 <= len(sampling) <= 5:
            raise ValueError("gen.sampling must be [temperature, top_k, top_p, seed] or those and drawn")
        if not isinstance(eog, list) or len(eog) > MAX_EOG:
            raise ValueError(f"gen.eog must be a list of at most {MAX_EOG} token ids")
        temperature, top_k, top_p, seed, *drawn = sampling
        return Generation(
            _count(gen.get("n"), 1, "gen.n"), _count(gen.get("step"), 0, "gen.step"),
            _count(gen.get("limit"), 1, "gen.limit"), frozenset(_count(t, 0, "gen.eog") for t in eog),
            SamplingParams(temperature, top_k, top_p, seed, drawn[0] if drawn else 0),
        )  # fmt: skip


MAX_EOG = 1024  # tokens that end a generation
MAX_COUNT = (1 << 31) - 1  # steps, positions and token ids: a STEP carries them as int32


def _count(value: Any, low: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_COUNT:
        raise ValueError(f"{what} must be an integer within [{low}, {MAX_COUNT}], got {shown(value)}")
    return value


def shown(value: Any, limit: int = 40) -> str:
    """``value`` for an error message: its repr, cut short (messages are logged and sent back)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class DataFrame:
    kind: FrameKind
    request_id: int
    meta: dict[str, Any]
    arrays: list[np.ndarray] = field(default_factory=list)


def encode_frame(
    kind: FrameKind, request_id: int, meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()
) -> list[bytes | memoryview]:
    """The pieces of one frame, ready for ``socket.sendmsg`` (array bytes are not copied)."""
    specs, views = [], []
    for given in arrays:
        a = _sendable(given)
        if a is None:
            raise CodecError(f"dtype {given.dtype} cannot be sent (f32, f16, i32 can)")
        specs.append([_DATA_NAMES[a.dtype], list(a.shape)])
        views.append(a.data)
    # (a generation's steps cross every server: its hop runs cold, after the layers' compute
    # has flushed the caches, where each numpy or json call costs ~10x its warm time; one
    # encoder made once and no dtype or view objects made per array measured 260 -> 200 us)
    body = _JSON.encode({**meta, "arrays": specs}).encode()
    size = sum(v.nbytes for v in views)
    return [DATA_HEADER.pack(DATA_MAGIC, kind, request_id, len(body), size), body, *views]


def _sendable(a: np.ndarray) -> np.ndarray | None:
    """``a`` as the wire carries it: little-endian (a big-endian array converted) and
    contiguous; None for a dtype the wire does not carry."""
    if a.dtype not in _DATA_NAMES:
        if a.dtype.newbyteorder("<") not in _DATA_NAMES:
            return None
        a = a.astype(a.dtype.newbyteorder("<"))
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def encode_step(
    request_id: int, link: int, hop: int, pos: int, step: int, n: int, x: np.ndarray
) -> list[bytes | memoryview]:
    """The pieces of a STEP frame: a generation's step ``step`` (``n`` tokens still to come) at
    position ``pos`` for ``hop``, its rows ``x`` ([rows] or [rows, cols] of f32, f16 or i32)."""
    a = _sendable(x)
    if a is None or a.ndim not in (1, 2):
        raise CodecError(f"a STEP carries [rows] or [rows, cols] of f32, f16 or i32, not {x.dtype} {list(x.shape)}")
    x = a
    dims = (x.shape[0], x.shape[1] if x.ndim == 2 else 0)
    meta = STEP_META.pack(link, hop, pos, step, n, _STEP_DTYPES.index(x.dtype), x.ndim, *dims)
    return [DATA_HEADER.pack(DATA_MAGIC, FrameKind.STEP, request_id, len(meta), x.nbytes), meta, x.data]


def decode_step_body(request_id: int, meta: bytes | memoryview, data: bytes | memoryview) -> DataFrame:
    """A STEP frame's fields (``link``, ``hop``, ``pos``, ``step``, ``n``) and its array."""
    if len(meta) != STEP_META.size:
        raise CodecError(f"a STEP description is {STEP_META.size} bytes, not {len(meta)}")
    link, hop, pos, step, n, code, ndim, rows, cols = STEP_META.unpack(meta)
    if code >= len(_STEP_DTYPES) or ndim not in (1, 2) or rows < 1 or (ndim == 2) != (cols > 0):
        raise CodecError(f"bad STEP array: dtype {code}, {ndim} dimensions {rows} x {cols}")
    dt = _STEP_DTYPES[code]
    shape = (rows, cols) if ndim == 2 else (rows,)
    if len(data) != math.prod(shape) * dt.itemsize:
        raise CodecError(f"a STEP's array {list(shape)} of {dt} is not its {len(data)} bytes")
    fields = {"link": link, "hop": hop, "pos": pos, "step": step, "n": n}
    return DataFrame(FrameKind.STEP, request_id, fields, [np.frombuffer(data, dtype=dt).reshape(shape)])


def encode_token(request_id: int, token: int, step: int, end: str | None) -> list[bytes]:
    """The pieces of a TOKEN frame (``end``: None or one of TOKEN_ENDS)."""
    meta = TOKEN_META.pack(token, step, TOKEN_ENDS.index(end))
    return [DATA_HEADER.pack(DATA_MAGIC, FrameKind.TOKEN, request_id, len(meta), 0), meta]


def decode_token_body(request_id: int, meta: bytes | memoryview, data: bytes | memoryview) -> DataFrame:
    if len(meta) != TOKEN_META.size or len(data):
        raise CodecError(f"a TOKEN frame is {TOKEN_META.size} bytes of description, not {len(meta)} and {len(data)}")
    token, step, end = TOKEN_META.unpack(meta)
    if end >= len(TOKEN_ENDS):
        raise CodecError(f"a TOKEN frame's end {end} is none of {len(TOKEN_ENDS)}")
    return DataFrame(FrameKind.TOKEN, request_id, {"token": token, "step": step, "end": TOKEN_ENDS[end]})


def decode_frame_header(
    header: bytes | bytearray | memoryview, max_bytes: int, max_meta: int = MAX_DATA_META
) -> tuple[FrameKind, int, int, int]:
    """(kind, request id, JSON bytes, array bytes) of a frame header, checked against limits:
    ``max_meta`` bytes of description, ``max_bytes`` of arrays."""
    magic, kind, request_id, meta_len, data_len = DATA_HEADER.unpack(header)
    if magic != DATA_MAGIC:
        raise CodecError("not an llmrpc data-plane frame (bad magic)")
    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise CodecError(f"unknown frame kind {kind}") from None
    if meta_len > max_meta:
        raise CodecError(f"frame description of {meta_len} bytes exceeds the limit of {max_meta}")
    if data_len > max_bytes:
        raise CodecError(f"frame of {data_len} array bytes exceeds the limit of {max_bytes}")
    return frame_kind, request_id, meta_len, data_len


def decode_frame_body(
    kind: FrameKind, request_id: int, meta: bytes | memoryview, data: bytes | memoryview
) -> DataFrame:
    """The description and arrays of a frame whose header :func:`decode_frame_header` read."""
    try:
        desc = json.loads(bytes(meta))
    except (ValueError, RecursionError) as e:  # (RecursionError: nested too deep)
        raise CodecError(f"frame description is not JSON: {e}") from None
    if not isinstance(desc, dict) or not isinstance(desc.get("arrays", []), list):
        raise CodecError("frame description must be an object with an 'arrays' list")
    arrays, at = [], 0
    for spec in desc.pop("arrays", []):
        if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in _DATA_DTYPES and isinstance(spec[1], list)):
            raise CodecError(f"bad array description {spec!r}")
        dt, shape = _DATA_DTYPES[spec[0]], spec[1]
        if not 1 <= len(shape) <= MAX_DIMS or not all(isinstance(s, int) and s > 0 for s in shape):
            raise CodecError(f"bad array shape {shape}")
        n = math.prod(shape) * dt.itemsize
        if at + n > len(data):
            raise CodecError(f"frame arrays need more than its {len(data)} bytes")
        arrays.append(np.frombuffer(data, dtype=dt, count=n // dt.itemsize, offset=at).reshape(shape))
        at += n
    if at != len(data):
        raise CodecError(f"frame carries {len(data) - at} bytes beyond its arrays")
    return DataFrame(kind, request_id, desc, arrays)


class FrameReader:
    """Cuts a byte stream into frames; feed it what the socket gives, take whole frames out.

    A frame's header is checked against the limits as soon as it arrives (``max_meta`` bytes of
    description, ``max_bytes`` of arrays), so no more than one frame's worth is ever held. The
    part of a frame that has come is kept until the rest has: each byte is copied in once, and
    the frame parsed once it is whole."""

    def __init__(self, max_bytes: int, max_meta: int = MAX_DATA_META) -> None:
        self.max_bytes = max_bytes
        self.max_meta = max_meta
        self._buf = bytearray()
        self._need = 0  # the bytes _buf must hold before the frame it starts is whole

    @property
    def holds_part(self) -> bool:
        """Part of a frame has come, the rest has not."""
        return bool(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[DataFrame]:
        """Frames completed by ``data`` (which may be reused once this returns: the frames
        hold copies)."""
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return []
            data, self._buf = self._buf, bytearray()
        view = memoryview(data)
        frames, at, size, need = [], 0, len(view), DATA_HEADER.size
        while size - at >= DATA_HEADER.size:
            head = view[at : at + DATA_HEADER.size]
            kind, rid, meta_len, data_len = decode_frame_header(head, self.max_bytes, self.max_meta)
            need = DATA_HEADER.size + meta_len + data_len
            end = at + need
            if end > size:
                break
            body = bytes(view[at + DATA_HEADER.size : end])
            if kind == FrameKind.STEP:
                frames.append(decode_step_body(rid, body[:meta_len], memoryview(body)[meta_len:]))
            elif kind == FrameKind.TOKEN:
                frames.append(decode_token_body(rid, body[:meta_len], memoryview(body)[meta_len:]))
            else:
                frames.append(decode_frame_body(kind, rid, body[:meta_len], memoryview(body)[meta_len:]))
            at, need = end, DATA_HEADER.size
        if at < size:
            self._buf += view[at:]
            self._need = need
        return frames
