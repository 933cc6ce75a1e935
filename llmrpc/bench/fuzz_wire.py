"""Fuzz cases as bytes: placeholders replaced with live values, arrays made, frames encoded
(lengths that lie, descriptions that are not JSON, frames cut short, as the case says)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from llmrpc.bench import fuzz_cases as fc
from llmrpc.codec import DATA_HEADER, DATA_MAGIC, STEP_META, FrameKind
from llmrpc.head.client import StageClient
from llmrpc.v1 import llmrpc_pb2 as pb

if TYPE_CHECKING:
    from llmrpc.bench.fuzz_targets import FuzzTargets

_NUMPY = {"f32": "<f4", "f16": "<f2", "i32": "<i4"}


class Values:
    """Live values for a case's placeholders; sessions opened on first use, closed after."""

    def __init__(self, targets: FuzzTargets, link: int, text: bool = False) -> None:
        self.t, self.link, self.text = targets, link, text
        self.opened: list[tuple[StageClient, str]] = []
        self._sessions: dict[str, str] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, str) and value in fc.PLACEHOLDERS:
            live = self._value(value)
            return str(live) if self.text else live
        if isinstance(value, str) and self.text:  # protobuf's strings are UTF-8 (raw bytes cases send any)
            return value.encode(errors="replace").decode()
        return value

    def _value(self, name: str) -> Any:
        t = self.t
        fixed = {
            fc.TOKEN: t.target.token, fc.SELF: t.target.data_address, fc.PEER: t.peer.data_address,
            fc.PEER_TOKEN: t.peer.token, fc.LINK: self.link, fc.PROBE_LINK: t.probe.link,
            fc.MODEL_PATH: t.model_path, fc.MODEL_HASH: t.model_hash,
        }  # fmt: skip
        if name in fixed:
            return fixed[name]
        if name not in self._sessions:
            server = t.target if name == fc.SESSION else t.peer
            try:
                sid = server.client.open_session(64)
                self.opened.append((server.client, sid))
            except Exception:  # (no layers loaded: a Load case may have unloaded them)
                sid = "nosuch"
            self._sessions[name] = sid
        return self._sessions[name]

    def close(self) -> None:
        for client, sid in self.opened:
            try:
                client.close_session(sid)
            except Exception:
                pass  # closed already: its link went, or a case closed it


def make_array(spec: fc.ArraySpec) -> np.ndarray:
    n = fc.count_of(spec.shape)
    rng = np.random.default_rng(spec.seed)
    values = {
        "tokens": lambda: rng.integers(0, fc.N_VOCAB, n), "negative": lambda: -rng.integers(1, 1 << 30, n),
        "huge": lambda: np.full(n, 3e38 if spec.dtype != "i32" else (1 << 31) - 1), "nan": lambda: np.full(n, np.nan),
        "inf": lambda: np.full(n, -np.inf), "zeros": lambda: np.zeros(n), "random": lambda: rng.standard_normal(n),
    }[spec.fill]()  # fmt: skip
    with np.errstate(all="ignore"):
        return np.asarray(values).astype(_NUMPY[spec.dtype]).reshape(spec.shape)


def encode_piece(piece: fc.Frame | fc.StepFrame | bytes, values: Values) -> bytes:
    if isinstance(piece, bytes):
        return piece
    if isinstance(piece, fc.StepFrame):
        s = piece
        meta = STEP_META.pack(values(s.link), s.hop, s.pos, s.step, s.n, s.dtype, s.ndim, s.rows, s.cols)
        data = b"\0" * s.data
        out = DATA_HEADER.pack(DATA_MAGIC, FrameKind.STEP, s.rid, len(meta), len(data)) + meta + data
        return out if s.cut is None else out[: s.cut]
    f = piece
    arrays = [make_array(a) for a in f.arrays]
    if f.body is not None:
        body = f.body
    else:
        meta = values(f.meta)
        specs = values(f.arrays_meta) if f.arrays_meta is not None else [[a.dtype, list(a.shape)] for a in f.arrays]
        body = json.dumps({**meta, "arrays": specs} if isinstance(meta, dict) else meta).encode()
    data = b"".join(a.tobytes() for a in arrays) + f.extra
    meta_len = len(body) if f.lengths[0] is None else f.lengths[0]
    data_len = len(data) if f.lengths[1] is None else f.lengths[1]
    out = DATA_HEADER.pack(DATA_MAGIC, f.kind & 0xFF, f.rid, meta_len, data_len) + body + data
    return out if f.cut is None else out[: f.cut]


def change_header(header: pb.SliceHeader, name: str, value: Any) -> None:
    number = value if isinstance(value, int) else 7
    if name == "model_hash":
        header.model_hash = str(value)
    elif name == "header_cut":
        header.header = header.header[:number]
    elif name == "n_tensors":
        del header.tensors[number:]
    elif name in ("tensor_offset", "tensor_bytes") and header.tensors:
        setattr(header.tensors[0], "offset" if name == "tensor_offset" else "n_bytes", number)
    elif name in ("layer_start", "layer_end"):
        setattr(header, name, min(number, (1 << 32) - 1))
    elif name == "data_size":
        header.data_size = number
