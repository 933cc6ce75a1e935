"""Who may talk to a server, and how: a shared token on every gRPC call, and TLS on every link.

The server (``llmrpc-server --token T --tls-cert C --tls-key K``) refuses any call without
``authorization: Bearer T`` (UNAUTHENTICATED, before the call reaches the engine). The data plane's
token and a weight transfer's one-time token are handed out by calls (Hello, BeginUpload), so
they only reach a head that has the server's token. The head (``--token T --tls-ca CA``) adds the
token to every call and checks the server's certificate against CA. With TLS, the data plane
(head to server, server to server) and weight shipping run over TLS too (``ssl`` contexts below):
a server checks the next server's certificate against its own ``--tls-ca``.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

ENV_TOKEN = "LLMRPC_TOKEN"  # where servers and heads also read the token (kept off command lines)
_HEADER = "authorization"


@dataclass(frozen=True)
class ClientSecurity:
    """What a head presents to its servers."""

    token: str | None = None
    tls_ca: str | None = None  # PEM file of the CA (or the self-signed certificate) servers' certificates chain to

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        if self.tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=_read(self.tls_ca, "--tls-ca"))
            return grpc.secure_channel(address, creds, options=options)
        return grpc.insecure_channel(address, options=options)

    def ssl_context(self) -> ssl.SSLContext | None:
        """For the head's TCP links (data plane, weight shipping); None without TLS."""
        return client_context(self.tls_ca) if self.tls_ca else None

    def intercept(self, channel: grpc.Channel) -> grpc.Channel:
        """The channel with the token added to every call (the channel itself when there is none)."""
        if not self.token:
            return channel
        return grpc.intercept_channel(channel, _TokenAdder(self.token))


def server_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(_read(key, "--tls-key"), _read(cert, "--tls-cert"))])


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """What a server's TCP ports (data plane, uploads) accept connections with."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}: {e}") from e
    return ctx


def client_context(ca: str) -> ssl.SSLContext:
    """What connects to a server's TCP ports: the certificate must chain to ``ca`` and name the host."""
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--tls-ca {ca}: {e}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what} {path}: {e.strerror}") from e


class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, details: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _TokenAdder(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, token: str) -> None:
        self._entry = (_HEADER, f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, (*(details.metadata or ()), self._entry))

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class TokenChecker(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call that does not carry the server's token, from its metadata alone: the
    call's messages are never read, so a stranger's body of any size costs the server nothing."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        given = dict(details.invocation_metadata or ()).get(_HEADER, "")
        if hmac.compare_digest(str(given).encode(), self._want):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        why = "a token is needed (llmrpc-head --token, or LLMRPC_TOKEN)" if not given else "wrong token"
        logger.warning("refused %s: %s", details.method, why)

        def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        # As a handler that streams its requests, whatever the method: gRPC reads a streamed
        # request only when the handler asks for it, which this one never does.
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.stream_unary_rpc_method_handler(refuse)
