"""An OpenAI-compatible HTTP API over a farm: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions``, whole or streamed as server-sent events, as OpenAI's clients
expect them. The standard library's threading HTTP server: one thread a request, and at most
as many generations at once as the farm holds sessions (``max_sessions``); the rest wait their turn.

    llmrpc-head serve --rpc-servers 10.0.0.2:50052,10.0.0.3:50052 --port 8080
    openai.OpenAI(base_url="http://HOST:8080/v1", api_key=...).chat.completions.create(...)
"""

from __future__ import annotations

import contextlib
import hmac
import io
import ipaddress
import json
import logging
import select
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llmrpc.dashboard import Dashboard
from llmrpc.dashboard import page as dashboard_page
from llmrpc.farm import Farm
from llmrpc.head.tokenizer import TextStream, Tokenizer
from llmrpc.metrics import CONTENT_TYPE, RequestTimer, ServeMetrics
from llmrpc.sampling import MAX_SEED, MAX_TOP_K, MIN_TEMPERATURE, SamplingParams

logger = logging.getLogger(__name__)

MAX_BODY = 16 << 20  # bytes of a request body
READ_TIMEOUT = 30.0  # seconds a client has to send a request (line, headers, body); an idle connection's life
MAX_CONNECTIONS = 256  # client connections open at once (each has a thread); more are answered 503 and closed
MAX_STOPS = 4  # as OpenAI
PENALTIES = ("presence_penalty", "frequency_penalty")
# Fields this server does not implement, and the values that ask for nothing.
UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}),
}  # fmt: skip


class ApiError(Exception):
    """A request the API refuses, with OpenAI's error fields."""

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    """A completion or chat request, checked and tokenized."""

    chat: bool
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    cache_prompt: bool = True  # take a held prefix and leave this cache behind (llama.cpp's server's field)


# -- parsing (pure: a body and the model's tokenizer in, a request or an ApiError out) ------------
def parse_request(body: object, tokenizer: Tokenizer, ctx_size: int, *, chat: bool) -> GenerationRequest:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    if chat:
        messages = _messages(body.get("messages"))
        _check_length(sum(len(m["content"].encode()) for m in messages), tokenizer, ctx_size, "messages")
        try:
            prompt = tokenizer.encode_chat(messages)
        except ValueError as e:
            raise ApiError(str(e), param="messages") from e
    else:
        prompt = _prompt(body.get("prompt"), tokenizer, ctx_size)
    if not prompt:
        raise ApiError("the prompt is empty", param="prompt")
    _integer(body, "n", 1, 1, 1, "only n=1 is supported")
    for key, harmless in UNSUPPORTED.items():
        if body.get(key) not in harmless:
            raise ApiError(f"'{key}' is not supported by this server", param=key)
    room = ctx_size - len(prompt)
    if room < 1:
        raise ApiError(
            f"the prompt is {len(prompt)} tokens; this server's context holds {ctx_size}",
            param="messages" if chat else "prompt", code="context_length_exceeded",
        )  # fmt: skip
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default = room if chat else min(16, room)  # OpenAI's defaults: up to the context / 16
    max_tokens = _integer(body, key, default, 1, None)
    if max_tokens > room:
        raise ApiError(
            f"this server's context holds {ctx_size} tokens; the prompt takes {len(prompt)} and "
            f"{max_tokens} more were asked for ({key})",
            param=key, code="context_length_exceeded",
        )  # fmt: skip
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if 0 < temperature < MIN_TEMPERATURE:
        raise ApiError(f"'temperature' must be 0 or at least {MIN_TEMPERATURE:g}", param="temperature")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise ApiError("'top_p' must be greater than 0", param="top_p")
    top_k = _integer(body, "top_k", 0, 0, MAX_TOP_K)  # not OpenAI's, but llama.cpp's servers take it
    seed = _integer(body, "seed", -1, 0, MAX_SEED)  # (llama.cpp's -1, "random", is omitting it here)
    for key in PENALTIES:  # accepted as OpenAI does, not applied
        _number(body, key, 0.0, -2.0, 2.0)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("'stream' must be true or false", param="stream")
    cache_prompt = body.get("cache_prompt", True)
    if not isinstance(cache_prompt, bool):
        raise ApiError("'cache_prompt' must be true or false", param="cache_prompt")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError("'stream_options' must be an object whose include_usage is true or false",
                       param="stream_options")  # fmt: skip
    return GenerationRequest(
        chat=chat,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=None if seed < 0 else seed),
        stop=_stops(body.get("stop")),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        cache_prompt=cache_prompt,
    )


def _messages(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(f"messages[{i}]: only text content parts are supported", param=f"messages[{i}]")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string or text parts", param=f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    return out


def _check_length(n_bytes: int, tokenizer: Tokenizer, ctx_size: int, param: str) -> None:
    """Refuse, before tokenizing it, a text that cannot fit the context: it is at least
    n_bytes / (the longest token's bytes) tokens long."""
    if n_bytes > ctx_size * tokenizer.max_token_bytes:
        raise ApiError(
            f"the prompt is {n_bytes} bytes, more than {ctx_size} tokens; this server's context holds {ctx_size}",
            param=param, code="context_length_exceeded",
        )  # fmt: skip


def _prompt(value: object, tokenizer: Tokenizer, ctx_size: int) -> list[int]:
    if isinstance(value, list) and len(value) == 1:  # a batch of one prompt
        value = value[0]
    if isinstance(value, str):
        try:
            _check_length(len(value.encode()), tokenizer, ctx_size, "prompt")
            return tokenizer.encode(value)
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") is JSON, but not text
            raise ApiError(f"the prompt is not valid text: {e}", param="prompt") from e
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        bad = [t for t in value if not 0 <= t < tokenizer.n_vocab]
        if bad:
            raise ApiError(f"token {bad[0]} is outside the vocabulary (0..{tokenizer.n_vocab - 1})", param="prompt")
        return list(value)
    raise ApiError("'prompt' must be a string, a list of token ids, or a list of one of those", param="prompt")


def _stops(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(f"'stop' takes at most {MAX_STOPS} sequences", param="stop")
    return tuple(s for s in stops if s)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(f"'{key}' must be a number within [{low:g}, {high:g}], got {value!r}", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int, low: int, high: int | None, message: str = "") -> int:
    value = body.get(key)
    if value is None:
        return default
    if (
        not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high)
    ):  # fmt: skip
        bound = f"within [{low}, {high}]" if high is not None else f"at least {low}"
        raise ApiError(message or f"'{key}' must be an integer {bound}, got {value!r}", param=key)
    return value


# -- stop sequences (pure) ------------------------------------------------------------------------
@dataclass
class StopText:
    """Text as it streams out, cut before the first stop sequence. Holds back the end that could
    still become a stop sequence, so nothing after a stop is ever given out."""

    stops: tuple[str, ...]
    held: str = ""
    stopped: bool = False

    def push(self, piece: str) -> str:
        """Text that is safe to give out now (check ``stopped`` after)."""
        if self.stopped:
            return ""
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return text[:cut]
        keep = max((_overlap(text, s) for s in self.stops), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        rest, self.held = self.held, ""
        return "" if self.stopped else rest


def _overlap(text: str, stop: str) -> int:
    """The longest end of ``text`` that is a proper start of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


# -- generation -----------------------------------------------------------------------------------
@dataclass
class Outcome:
    finish_reason: str = "length"
    completion_tokens: int = 0


@dataclass
class Api:
    """What every request handler shares: the farm, the model's name, the slots, the key, and
    the limits on clients: ``read_timeout`` (seconds to send a request), ``max_connections``
    (open at once) and, without a key, the host names requests may use besides IP addresses and
    localhost (:meth:`host_allowed`)."""

    farm: Farm
    model_id: str
    api_key: str | None = None
    read_timeout: float = READ_TIMEOUT
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int = MAX_CONNECTIONS
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        # a session on every server of a replica each
        self.slots = threading.BoundedSemaphore(self.farm.max_sessions * max(1, len(self.farm.replicas)))
        self.metrics = ServeMetrics(self.farm, self.model_id)
        self.dashboard = Dashboard(self.farm, self.metrics)
        self.farm.tokenizer.max_token_bytes  # noqa: B018 (read once now, not by the first request)

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request naming ``host`` (its Host, or its Origin's host) is served without
        an API key: an IP address, localhost, or one of ``allowed_hosts``. Any other name is
        how a web page elsewhere reaches this server through DNS rebinding."""
        if not host:
            return False
        host = host.lower().rstrip(".")
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            return host == "localhost" or host in (h.lower().rstrip(".") for h in self.allowed_hosts)

    def generate(self, req: GenerationRequest, outcome: Outcome) -> Generator[str, None, None]:
        """Text pieces of the completion; ``outcome`` holds the finish reason once it ends."""
        timer = self.metrics.request(len(req.prompt_tokens))
        ended = False
        try:
            yield from self._generate(req, outcome, timer)
            ended = True
        finally:  # a client gone, or a failure: abort
            timer.end(outcome.finish_reason if ended else "abort")

    def _generate(self, req: GenerationRequest, outcome: Outcome, timer: RequestTimer) -> Generator[str, None, None]:
        with self.slots:
            timer.start()
            text = TextStream(self.farm.tokenizer)
            stop = StopText(req.stop)
            tokens = self.farm.generate_tokens(
                req.prompt_tokens, req.max_tokens, req.sampling, cache_prompt=req.cache_prompt
            )
            with contextlib.closing(tokens):
                for token in tokens:
                    timer.token()
                    outcome.completion_tokens += 1
                    piece = stop.push(text.push(token))
                    if piece:
                        yield piece
                    if stop.stopped:
                        outcome.finish_reason = "stop"
                        return
                rest = stop.push(text.flush())
                rest += stop.flush()
                if rest:
                    yield rest
            stopped_early = outcome.completion_tokens < req.max_tokens
            outcome.finish_reason = "stop" if stop.stopped or stopped_early else "length"


class _DeadlineReader(io.RawIOBase):
    """A client socket's bytes, read against a deadline when one is armed: a request must
    arrive whole within the read timeout, however slowly its bytes trickle in (slowloris)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock, self.timeout = sock, timeout
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the request did not arrive within {self.timeout:g} s")
            self.sock.settimeout(left)
        return self.sock.recv_into(buffer)

    def arm(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def disarm(self) -> None:
        """The request is in: from now on each read and write may take the timeout."""
        self.deadline = None
        self.sock.settimeout(self.timeout)


class Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # (the socket stays open: only this reader of it goes)
        self._reader = _DeadlineReader(self.connection, self.server.api.read_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.arm()  # (a TimeoutError is the stdlib's "Request timed out": the connection closes)
        super().handle_one_request()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the stdlib's name)
        logger.info("%s %s", self.address_string(), format % args)

    # -- routes ---------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self._reader.disarm()
        if self.path in ("/health", "/healthz"):  # open to probes: says only that the API is up
            self._json(HTTPStatus.OK, {"status": "ok"})
            return
        if self.path.rstrip("/") == "/dashboard":  # the page holds no data: its JSON needs the key
            self._send(HTTPStatus.OK, dashboard_page(), "text/html; charset=utf-8")
            return
        try:
            self._authorize()
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                api = self.server.api
                model = {"id": api.model_id, "object": "model", "created": api.created, "owned_by": "llmrpc"}
                self._json(HTTPStatus.OK, {"object": "list", "data": [model]})
            elif self.path == "/dashboard.json":
                self._json(HTTPStatus.OK, self.server.api.dashboard.snapshot())
            elif self.path == "/metrics":
                self._send(HTTPStatus.OK, self.server.api.metrics.exposition(), CONTENT_TYPE)
            else:
                raise ApiError(f"no such route: GET {self.path}", status=404, kind="not_found_error")
        except ApiError as e:
            self._json(e.status, e.body())

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        try:
            self._authorize()
            route = self.path.rstrip("/").removeprefix("/v1")
            if route not in ("/completions", "/chat/completions"):
                self._read_body()  # keep the connection usable
                raise ApiError(f"no such route: POST {self.path}", status=404, kind="not_found_error")
            api = self.server.api
            req = parse_request(self._read_body(), api.farm.tokenizer, api.farm.ctx_size, chat=route != "/completions")
        except ApiError as e:
            self._json(e.status, e.body())
            return
        try:
            if req.stream:
                self._stream(req)
            else:
                self._whole(req)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            logger.info("%s went away during a generation", self.address_string())
            self.close_connection = True
        except Exception as e:  # a server failed: say so, keep serving
            logger.exception("generation failed")
            if not self._started:
                err = ApiError(f"generation failed: {e}", status=502, kind="server_error")
                self._json(err.status, err.body())
            else:
                self.close_connection = True

    # -- answers --------------------------------------------------------------------------------
    _started = False

    def _whole(self, req: GenerationRequest) -> None:
        outcome = Outcome()
        parts = []
        pieces = self.server.api.generate(req, outcome)
        with contextlib.closing(pieces):  # (closed early: the generation is called off)
            for piece in pieces:
                parts.append(piece)
                if self._client_gone():
                    raise ConnectionResetError("the client closed its connection")
        text = "".join(parts)
        ident, created = _ident(req), int(time.time())
        if req.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        choice["finish_reason"] = outcome.finish_reason
        body = {
            "id": ident, "object": "chat.completion" if req.chat else "text_completion", "created": created,
            "model": self.server.api.model_id, "choices": [choice], "usage": _usage(req, outcome),
        }  # fmt: skip
        self._json(HTTPStatus.OK, body)

    def _stream(self, req: GenerationRequest) -> None:
        api = self.server.api
        ident, created = _ident(req), int(time.time())
        kind = "chat.completion.chunk" if req.chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if req.chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if delta is not None:
                    d["content"] = delta
                choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return {"id": ident, "object": kind, "created": created, "model": api.model_id, "choices": [choice]}

        outcome = Outcome()
        pieces = api.generate(req, outcome)
        with contextlib.closing(pieces):
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self._started = True
            self.close_connection = True
            if req.chat:
                self._event(chunk(None, None, role=True))
            for piece in pieces:
                self._event(chunk(piece, None))
        self._event(chunk(None if req.chat else "", outcome.finish_reason))
        if req.include_usage:
            self._event({"id": ident, "object": kind, "created": created, "model": api.model_id, "choices": [],
                         "usage": _usage(req, outcome)})  # fmt: skip
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, body: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self._reader.disarm()  # (a request refused before its body was read)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _client_gone(self) -> bool:
        """Whether the client closed its end (it has nothing more to send while it waits)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- input ----------------------------------------------------------------------------------
    def _authorize(self) -> None:
        key = self.server.api.api_key
        if key is None:
            self._check_host()
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            self.close_connection = True
            raise ApiError("invalid or missing API key (Authorization: Bearer ...)", status=401,
                           code="invalid_api_key", kind="authentication_error")  # fmt: skip

    def _check_host(self) -> None:
        """Without a key: refuse a request whose Host or Origin names this server by a name it
        was not given (a page elsewhere reaching it through DNS rebinding, or posting to it)."""
        for header in ("Host", "Origin"):
            value = self.headers.get(header)
            if value is None:
                continue
            try:
                host = urllib.parse.urlsplit(value if header == "Origin" else f"//{value}").hostname
            except ValueError:
                host = None
            if not self.server.api.host_allowed(host):
                self.close_connection = True
                raise ApiError(
                    f"{header} {value!r} is not a name of this server (llmrpc-head serve --allow-host)",
                    status=403, kind="permission_error",
                )  # fmt: skip

    def _read_body(self) -> object:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            raise ApiError(f"the body must come with a Content-Length of at most {MAX_BODY} bytes", status=413)
        data = self.rfile.read(length)
        self._reader.disarm()
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:  # (too deep, or an integer of thousands of digits)
            raise ApiError(f"the body is not valid JSON: {e}") from e


def _ident(req: GenerationRequest) -> str:
    return ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex


def _usage(req: GenerationRequest, outcome: Outcome) -> dict[str, int]:
    n, m = len(req.prompt_tokens), outcome.completion_tokens
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


class ApiServer(ThreadingHTTPServer):
    """The API's HTTP server: a thread per connection, at most ``api.max_connections`` of them;
    a connection past those is answered 503 at once and closed (a flood of connections costs
    no threads, and the requests being served go on)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: Api) -> None:
        super().__init__(address, Handler)
        self.api = api
        self._open = threading.BoundedSemaphore(api.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._open.acquire(blocking=False):
            logger.warning("%d connections are open, the most allowed: refused %s", self.api.max_connections,
                           client_address[0])  # fmt: skip
            _refuse(request, self.api.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._open.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._open.release()


def _refuse(sock: socket.socket, most: int) -> None:
    """Answer a connection past the cap with a 503 (best effort: it may not read it)."""
    body = json.dumps(
        {
            "error": {
                "message": f"{most} connections are open, the most allowed; try again later",
                "type": "server_error",
                "code": 503,
            }
        }  # fmt: skip
    ).encode()
    head = (
        f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Retry-After: 1\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        sock.settimeout(1.0)
        sock.sendall(head + body)
    except OSError:
        pass
