"""From a GGUF and the servers' reports to a plan, a printed table, and shipped weights."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Sequence

from llmrpc import codec
from llmrpc.head.planner import ModelLayout, Plan, ServerReport
from llmrpc.model.gguf_model import ModelInfo, tensor_view
from llmrpc.model.slicefile import build_slice_layout
from llmrpc.types import ServerInfo
from llmrpc.v1 import llmrpc_pb2 as pb

logger = logging.getLogger(__name__)

CHUNK = 1 << 22  # bytes of tensor data per message


def model_layout(info: ModelInfo) -> ModelLayout:
    hp = info.hparams
    layers = tuple(sum(info.tensors[n].n_bytes for n in info.layer_tensor_names(i)) for i in range(hp.n_layer))
    middle = set(info.range_tensor_names(1, 2)) if hp.n_layer > 2 else set()
    shared = {n for n in middle if not n.startswith("blk.")}  # every stage holds these (rope factors)
    first = [n for n in info.range_tensor_names(0, 1) if not n.startswith("blk.") and n not in shared]
    last = [
        n for n in info.range_tensor_names(hp.n_layer - 1, hp.n_layer) if not n.startswith("blk.") and n not in shared
    ]
    return ModelLayout(
        n_layer=hp.n_layer,
        layer_bytes=layers,
        input_bytes=sum(info.tensors[n].n_bytes for n in first),
        output_bytes=sum(info.tensors[n].n_bytes for n in last),  # a tied output counts token_embd again
        shared_bytes=sum(info.tensors[n].n_bytes for n in shared),
        kv_bytes_per_cell=2 * hp.n_embd_kv * 2,  # K and V in f16
        n_embd=hp.n_embd,
        n_ff=hp.n_ff,
        n_head=hp.n_head,
        n_vocab=hp.n_vocab,
    )


def server_reports(infos: Sequence[ServerInfo]) -> list[ServerReport]:
    return [ServerReport(i.address, i.device.name, i.memory_budget or i.device.memory_free, i.bandwidth) for i in infos]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_plan(p: Plan) -> str:
    rows = [("server", "device", "layers", "weights", "KV", "compute", "free after", "ms/token")]
    for s in p.stages:
        rows.append((
            s.address, s.device, f"[{s.start}, {s.end})", _size(s.weight_bytes), _size(s.kv_bytes),
            _size(s.compute_bytes), _size(s.free_after), f"{s.seconds * 1e3:.2f}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for address in p.left_out:
        lines.append(f"{address}: left out (it would only slow the pipeline down)")
    return "\n".join(lines)


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
