"""Everything that crosses the wire, converted in one place: arrays, devices, ranges."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from llmrpc.model.slicefile import IncomingSlice, SliceLayout, SliceTensor
from llmrpc.types import CachedSlice, DeviceInfo, LoadedRange, ServerInfo
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
    )


def range_from_proto(r: pb.LoadedRange) -> LoadedRange:
    return LoadedRange(
        r.model_path, r.architecture, r.layer_start, r.layer_end, r.n_layer, r.n_embd, r.n_vocab, r.weight_bytes,
        r.model_hash, r.source,
    )  # fmt: skip


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
    )


def cached_to_proto(c: CachedSlice) -> pb.CachedSlice:
    return pb.CachedSlice(model_hash=c.model_hash, layer_start=c.layer_start, layer_end=c.layer_end, bytes=c.bytes)
