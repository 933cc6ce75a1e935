"""The gRPC handler: decodes requests, calls the engine, maps its errors onto status codes.

It never imports compute code; the engine arrives through :class:`StageEngine`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from llmrpc import __version__, codec
from llmrpc.machine import machine_id
from llmrpc.server.api import EngineError, ErrorCode, StageEngine, stage_outputs
from llmrpc.types import PROTOCOL_VERSION, PrefixStart
from llmrpc.v1 import llmrpc_pb2 as pb
from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

_STATUS = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorCode.DATA_LOSS: grpc.StatusCode.DATA_LOSS,
}

R = TypeVar("R")


def _guard(context: grpc.ServicerContext, fn: Callable[[], R]) -> R:
    """Run ``fn``; turn refusals and unexpected failures into a status, keep serving."""
    try:
        return fn()
    except EngineError as e:
        context.abort(_STATUS[e.code], e.message)
    except codec.CodecError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Exception as e:  # a bug or a device failure: report it, do not die
        if context.code() is not None:  # type: ignore[attr-defined]  # aborted already (server/limits.py)
            raise
        logger.exception("internal error")
        context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
    raise AssertionError("unreachable")  # context.abort raises


DeclarePeers = Callable[[int, list[tuple[str, str]]], None]


class StageService(pb_grpc.StageServicer):
    def __init__(
        self, engine: StageEngine, data_port: int = 0, data_token: str = "", declare_peers: DeclarePeers | None = None
    ) -> None:
        """``declare_peers(link, peers)``: the data plane's (server/peers.py's ``declare``)."""
        self.engine = engine
        self.data_port, self.data_token = data_port, data_token
        self.declare_peers = declare_peers

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:  # noqa: N802
        if request.protocol_version and request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} is not supported; this server speaks {PROTOCOL_VERSION}",
            )
        e = self.engine
        loaded = e.loaded()
        bandwidth, matmul_flops = e.calibration_figures()
        reply = pb.HelloReply(
            protocol_version=PROTOCOL_VERSION,
            server_version=__version__,
            device=codec.device_to_proto(e.device),
            threads=e.threads,
            open_sessions=e.open_sessions(),
            memory_cap=e.memory_cap,
            memory_budget=e.memory_budget(),
            bandwidth=bandwidth,
            matmul_flops=matmul_flops,
            cached=[codec.cached_to_proto(c) for c in e.cached()],
            bytes_received=e.bytes_received,
            data_port=self.data_port,
            data_token=self.data_token,
            machine_id=machine_id(),
        )
        if loaded is not None:
            reply.loaded.CopyFrom(codec.range_to_proto(loaded))
        return reply

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:  # noqa: N802
        e = self.engine
        entries, n_bytes, budget = e.prefix_figures()
        disk, disk_budget = e.slice_cache_figures()
        memory = e.memory_parts()
        return pb.HealthReply(
            serving=True, open_sessions=e.open_sessions(), native_steps=e.native_steps, takes_turns=e.takes_turns(),
            prefix_entries=entries, prefix_bytes=n_bytes, prefix_budget=budget, slice_cache_bytes=disk,
            slice_cache_budget=disk_budget, weight_bytes=memory.weights, session_bytes=memory.sessions,
            spare_bytes=memory.spare, graph_bytes=memory.graphs,
        )  # fmt: skip

    def Load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadReply:  # noqa: N802
        def run() -> pb.LoadReply:
            if not request.model_path and not request.model_hash:
                raise EngineError(ErrorCode.INVALID_ARGUMENT, "give a model_path or a model_hash")
            t0 = time.perf_counter()
            try:
                cache = codec.cache_from_request(request)
            except ValueError as e:
                raise EngineError(ErrorCode.INVALID_ARGUMENT, str(e)) from e
            if request.share_host:
                self.engine.share_host(request.share_host)
            loaded = self.engine.load(
                request.model_path, request.layer_start, request.layer_end, request.model_hash, cache,
                request.slice_digest,
            )  # fmt: skip
            if loaded is None:
                return pb.LoadReply(needs_weights=True)
            return pb.LoadReply(
                loaded=codec.range_to_proto(loaded), seconds=time.perf_counter() - t0, source=loaded.source
            )

        return _guard(context, run)

    def PushSlice(self, request_iterator: Iterator[pb.SliceChunk], context: grpc.ServicerContext) -> pb.PushSliceReply:  # noqa: N802
        def run() -> pb.PushSliceReply:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise EngineError(ErrorCode.INVALID_ARGUMENT, "a slice push starts with its header")
            t0 = time.perf_counter()
            n = self.engine.push_slice(codec.slice_header_from_proto(first.header), _chunks(request_iterator))
            return pb.PushSliceReply(tensor_bytes=n, seconds=time.perf_counter() - t0)

        return _guard(context, run)

    def OpenUpload(self, request: pb.SliceHeader, context: grpc.ServicerContext) -> pb.UploadTicket:  # noqa: N802
        def run() -> pb.UploadTicket:
            port, token = self.engine.open_upload(codec.slice_header_from_proto(request))
            return pb.UploadTicket(port=port, token=token)

        return _guard(context, run)

    def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.ServicerContext) -> pb.OpenSessionReply:  # noqa: N802
        def run() -> pb.OpenSessionReply:
            prefix = None
            if request.prefix_session:
                prefix = PrefixStart(request.prefix_session, request.prefix_rows, request.prefix_take)
            opened = self.engine.open_session(request.n_ctx, prefix)
            return pb.OpenSessionReply(
                session_id=opened.session_id, n_ctx=opened.n_ctx, cache_bytes=opened.cache_bytes,
                evicted=opened.evicted,
            )  # fmt: skip

        return _guard(context, run)

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardReply:  # noqa: N802
        return _guard(context, lambda: self._forward(request))

    def ForwardStream(  # noqa: N802
        self, request_iterator: Iterator[pb.ForwardRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ForwardReply]:
        for request in request_iterator:
            yield _guard(context, lambda request=request: self._forward(request))  # type: ignore[misc]

    def _forward(self, request: pb.ForwardRequest) -> pb.ForwardReply:
        if not request.HasField("input"):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "input tensor is missing")
        x = codec.tensor_from_proto(request.input, self.engine.max_input_elements())
        t0 = time.perf_counter()
        out = self.engine.forward(request.session_id, request.start_pos, x, request.all_logits)
        seconds = time.perf_counter() - t0
        dtype = request.output_dtype or pb.DTYPE_F32
        if dtype not in (pb.DTYPE_F32, pb.DTYPE_F16):
            raise EngineError(ErrorCode.INVALID_ARGUMENT, f"output dtype {codec.dtype_name(dtype)} is not F32/F16")
        outputs = stage_outputs(self.engine.loaded(), out, request.logits_top_k, dtype == pb.DTYPE_F16)
        reply = pb.ForwardReply(output=codec.tensor_to_proto(outputs[0]), compute_seconds=seconds)
        if len(outputs) > 1:
            reply.token_ids.CopyFrom(codec.tensor_to_proto(outputs[1]))
        return reply

    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionReply:  # noqa: N802
        def run() -> pb.CloseSessionReply:
            closed = self.engine.close_session(request.session_id, request.keep)
            return pb.CloseSessionReply(kept=closed.kept, evicted=closed.evicted)

        return _guard(context, run)

    def Peers(self, request: pb.PeersRequest, context: grpc.ServicerContext) -> pb.PeersReply:  # noqa: N802
        if self.declare_peers is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server has no data plane")
        try:
            self.declare_peers(request.link, codec.peers_from_request(request))  # type: ignore[misc]
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except LookupError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except OSError as e:  # (ConnectionError, TimeoutError): a peer this server cannot reach
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.PeersReply()


def _chunks(requests: Iterator[pb.SliceChunk]) -> Iterator[tuple[int, int, bytes, int]]:
    for r in requests:
        if r.WhichOneof("part") != "data":
            raise EngineError(ErrorCode.INVALID_ARGUMENT, "only one header per slice push")
        yield r.data.tensor, r.data.offset, r.data.data, r.data.crc32
