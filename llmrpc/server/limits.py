"""What gRPC calls may cost a server: the size of each method's messages, and the calls and
streams open at once.

The gRPC server takes at most MAX_CALLS calls at once, each with a thread of its own (more are
refused at once with RESOURCE_EXHAUSTED, never queued), and messages up to MAX_MESSAGE bytes
(a Forward of a large model's full batch is hundreds of MiB). Per method, a message over that
method's own limit is refused before it is parsed: Forward's follows the loaded layers' width,
a slice header may carry a model's whole vocabulary, every other message is small. A stream
(ForwardStream, PushSlice) holds its thread while it is open, so at most MAX_STREAMS are:
however many streams sit idle, the other threads answer Hello, Health, Load and the rest. The
token (auth.TokenChecker) is checked before all of this, before any message is read. A message
that does not parse is refused as INVALID_ARGUMENT, one line in the log at debug level (grpc
itself would answer INTERNAL and log a whole traceback for each: a stranger's flood of them would
fill the log).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

logger = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 30  # bytes of any one message (grpc.max_receive_message_length)
MAX_CALLS = 64  # calls open at once (the server's threads, grpc's maximum_concurrent_rpcs)
MAX_STREAMS = 16  # of those, streams (ForwardStream, PushSlice)
SMALL_MESSAGE = 1 << 16  # bytes of a message of any method not named below
SLICE_HEADER = 64 << 20  # bytes of a slice's header (its GGUF metadata: a vocabulary of any size)
FORWARD_EXTRA = 1 << 20  # bytes of a Forward besides its input's data

GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


@dataclass(frozen=True)
class _Refused:
    """What a message over its method's limit, or one that does not parse, is handed on as."""

    code: grpc.StatusCode
    message: str


class CallLimits(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, forward_bytes: Callable[[], int], max_streams: int = MAX_STREAMS) -> None:
        """``forward_bytes()``: the most input bytes a Forward may carry now (the loaded layers')."""
        forward = lambda: forward_bytes() + FORWARD_EXTRA  # noqa: E731
        header = lambda: SLICE_HEADER  # noqa: E731
        self._limits: dict[str, Callable[[], int]] = {
            "Forward": forward, "ForwardStream": forward, "OpenUpload": header, "PushSlice": header,
        }  # fmt: skip
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        name = str(details.method).rsplit("/", 1)[-1]
        deserialize = _sized(handler.request_deserializer, name, self._limits.get(name, lambda: SMALL_MESSAGE))
        if handler.request_streaming:
            behavior = handler.stream_stream or handler.stream_unary
            make = (
                grpc.stream_stream_rpc_method_handler
                if handler.response_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            return make(self._stream(behavior), deserialize, handler.response_serializer)
        unary = handler.unary_stream or handler.unary_unary

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Refused):
                context.abort(request.code, request.message)
            return unary(request, context)

        make = (
            grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        )
        return make(checked, deserialize, handler.response_serializer)

    def _stream(self, behavior: Callable[[Iterator[Any], grpc.ServicerContext], Any]) -> Callable[..., Any]:
        """``behavior`` holding one of the stream slots while its call is open."""

        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            if not self._streams.acquire(blocking=False):
                message = f"{self.max_streams} streams are open here, the most allowed; try again later"
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
            once = threading.Lock()

            def release() -> None:
                if once.acquire(blocking=False):
                    self._streams.release()

            if not context.add_callback(release):  # (the call is over already)
                release()
            return behavior(_checked(requests, context), context)

        return run


def _sized(deserialize: Callable[[bytes], Any] | None, name: str, limit: Callable[[], int]) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        most = limit()
        if len(data) > most:
            message = f"a {name} message of {len(data)} bytes exceeds this server's limit of {most}"
            return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception as e:  # (protobuf's DecodeError, or anything a parser raises)
            logger.debug("a %s message of %d bytes does not parse: %s", name, len(data), e)
            return _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the {name} message does not parse: {e}")

    return run


def _checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Refused):
            context.abort(request.code, request.message)
        yield request
