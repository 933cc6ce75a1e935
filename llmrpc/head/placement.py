"""From a GGUF and the servers' reports to a plan, a printed table, and shipped weights."""

from __future__ import annotations

import logging
import math
import os
import socket
import ssl
import zlib
from collections.abc import Callable, Iterator, Sequence

import grpc

from llmrpc import codec, wire
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.planner import ModelLayout, Plan, ServerReport
from llmrpc.model.arch import Role, is_expert_tensor, tensor_role
from llmrpc.model.gguf_model import ModelInfo, TensorInfo, tensor_view
from llmrpc.model.kv import SWA, CacheConfig, cell_bytes, layer_group
from llmrpc.model.slicefile import build_slice_layout
from llmrpc.types import ServerInfo, split_address
from llmrpc.v1 import llmrpc_pb2 as pb

logger = logging.getLogger(__name__)

CHUNK = 1 << 22  # bytes of tensor data per PushSlice message
BULK_CHUNK = 1 << 21  # bytes per frame on the bulk upload connection


def model_layout(info: ModelInfo, cache: CacheConfig | None = None) -> ModelLayout:
    hp = info.hparams
    cache = cache or CacheConfig()
    per_layer = [[info.tensors[n] for n in info.layer_tensor_names(i)] for i in range(hp.n_layer)]
    middle = set(info.range_tensor_names(1, 2)) if hp.n_layer > 2 else set()
    shared = {n for n in middle if tensor_role(n)[0] is Role.SHARED}  # every stage holds these (rope factors)
    first = [n for n in info.range_tensor_names(0, 1) if tensor_role(n)[0] is not Role.REPEATING and n not in shared]
    last = [
        n
        for n in info.range_tensor_names(hp.n_layer - 1, hp.n_layer)
        if tensor_role(n)[0] is not Role.REPEATING and n not in shared
    ]
    used = hp.n_expert_used / hp.n_expert if hp.n_expert else 1.0

    def work(t: TensorInfo) -> float:  # elements a token multiplies: the experts it uses, of all
        return math.prod(t.shape) * (used if is_expert_tensor(t.name) else 1.0)

    return ModelLayout(
        n_layer=hp.n_layer,
        layer_bytes=tuple(sum(t.n_bytes for t in ts) for ts in per_layer),
        input_bytes=sum(info.tensors[n].n_bytes for n in first),
        output_bytes=sum(info.tensors[n].n_bytes for n in last),  # a tied output counts token_embd again
        shared_bytes=sum(info.tensors[n].n_bytes for n in shared),
        layer_elements=tuple(round(sum(work(t) for t in ts)) for ts in per_layer),
        output_elements=sum(math.prod(info.tensors[n].shape) for n in last),
        layer_kv_cell_bytes=tuple(cell_bytes(hp, il, cache) for il in range(hp.n_layer)),
        layer_windows=tuple(hp.n_swa if layer_group(hp, il) == SWA else 0 for il in range(hp.n_layer)),
        n_embd=hp.n_embd,
        n_ff=max(max(hp.n_ff_arr), hp.n_expert_used * hp.n_ff_exp),
        n_head=max(hp.n_head_arr),
        n_vocab=hp.n_vocab,
    )


def server_reports(infos: Sequence[ServerInfo]) -> list[ServerReport]:
    """What the planner needs of each server. Servers of one machine and device are equal: they
    get the best of their speeds (measured side by side, as servers started together measure
    them, each figure is low and noisy, which would give equal servers unequal work)."""
    best: dict[tuple[str, str], float] = {}
    for i in infos:
        if i.machine_id:
            key = (i.machine_id, i.device.name)
            best[key] = max(best.get(key, 0.0), i.bandwidth)
    return [
        ServerReport(
            i.address, i.device.name, i.memory_budget or i.device.memory_free,
            best.get((i.machine_id, i.device.name), i.bandwidth) if i.machine_id else i.bandwidth,
        )
        for i in infos
    ]  # fmt: skip


def shared_hosts(infos: Sequence[ServerInfo], used: Sequence[str]) -> dict[str, str]:
    """The servers of a plan (``used`` addresses) that compute on one machine's CPU cores with
    another of the plan, each with the name of that machine's turn-taking lock."""
    by_machine: dict[str, list[str]] = {}
    for i in infos:
        if i.address in used and i.machine_id and i.device.kind == "cpu":
            by_machine.setdefault(i.machine_id, []).append(i.address)
    return {a: f"llmrpc-{m}" for m, addresses in by_machine.items() if len(addresses) > 1 for a in addresses}


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_plan(p: Plan) -> str:
    rows = [("server", "device", "layers", "weights", "KV", "compute", "free after", "ms/token")]
    for s in p.stages:
        rows.append((
            s.address, s.device, f"[{s.start}, {s.end})", format_size(s.weight_bytes), format_size(s.kv_bytes),
            format_size(s.compute_bytes), format_size(s.free_after), f"{s.seconds * 1e3:.2f}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for address, why in p.left_out_reasons.items():
        lines.append(f"{address}: left out ({why})")
    return "\n".join(lines)


def ship_slice(
    client: StageClient, info: ModelInfo, model_hash: str, start: int, end: int,
    progress: Callable[[int], None] | None = None, tls: ssl.SSLContext | None = None,
) -> int:  # fmt: skip
    """Send layers [start, end) over the bulk upload connection; returns the bytes the server
    kept. Frames are checksummed (crc32); the file is read a frame at a time into one buffer
    (the head holds 2 MiB of the model however large it is; with ``tls``, encrypted, the
    server's certificate checked)."""
    layout = build_slice_layout(info, start, end, model_hash)
    port, token = client.open_upload(codec.slice_header_to_proto(model_hash, start, end, layout), start, end)
    host = split_address(client.address)[0]
    buf = bytearray(BULK_CHUNK)
    with wire.open_tcp(host, port, 120, tls) as sock, open(info.path, "rb", buffering=0) as f:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(token)
        for index, t in enumerate(layout.tensors):
            base = info.tensors[t.name].offset
            for off in range(0, t.n_bytes, BULK_CHUNK):
                n = min(BULK_CHUNK, t.n_bytes - off)
                piece = memoryview(buf)[:n]
                if os.preadv(f.fileno(), [piece], base + off) != n:
                    raise ValueError(f"{info.path} ends inside tensor {t.name}")
                sock.sendall(codec.UPLOAD_FRAME.pack(index, off, n, zlib.crc32(piece)))
                sock.sendall(piece)
                if progress is not None:
                    progress(n)
        sock.sendall(codec.UPLOAD_FRAME.pack(codec.UPLOAD_END, 0, 0, 0))
        ok, kept, msg_len = codec.UPLOAD_STATUS.unpack(_recv_exact(sock, codec.UPLOAD_STATUS.size))
        message = _recv_exact(sock, msg_len).decode("utf-8", "replace") if msg_len else ""
    if not ok:
        raise StageError(client.address, f"[{start}, {end})", grpc.StatusCode.DATA_LOSS, f"upload refused: {message}")
    return int(kept)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = sock.recv(n - len(out))
        if not piece:
            raise ConnectionError(f"the server closed the upload connection after {len(out)} of {n} bytes")
        out += piece
    return bytes(out)


def slice_chunks(
    info: ModelInfo, model_hash: str, start: int, end: int, progress: Callable[[int], None] | None = None
) -> tuple[int, Iterator[pb.SliceChunk]]:
    """(tensor bytes, the messages of a PushSlice call) for layers [start, end)."""
    layout = build_slice_layout(info, start, end, model_hash)

    def messages() -> Iterator[pb.SliceChunk]:
        yield pb.SliceChunk(header=codec.slice_header_to_proto(model_hash, start, end, layout))
        for index, t in enumerate(layout.tensors):
            data = tensor_view(info.path, info.tensors[t.name])
            for off in range(0, t.n_bytes, CHUNK):
                piece = data[off : off + CHUNK].tobytes()
                yield pb.SliceChunk(data=pb.TensorData(tensor=index, offset=off, data=piece, crc32=zlib.crc32(piece)))
                if progress is not None:
                    progress(len(piece))

    return layout.tensor_bytes, messages()
