"""The HTTP API's limits on clients (finding 10): a request must arrive within the read timeout,
oversize bodies and prompts are refused before any work, requests without a key must name this
server, and a whole (non-streamed) request whose client leaves stops generating. Against a real
`llmrpc-head serve` with --parallel 1 and no API key."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmrpc.openai_api import ApiError, parse_request

PREFIX = "llmrpc-head serve listening on "
CTX = 256
READ_TIMEOUT = 2.0


# -- pure: the length check before tokenizing ------------------------------------------------------
class _MustNotTokenize:
    """A tokenizer whose longest token is 4 bytes, and that fails the test if asked to tokenize."""

    n_vocab = 320
    max_token_bytes = 4

    def encode(self, *args: object, **kwargs: object) -> list[int]:
        raise AssertionError("tokenized")

    def encode_chat(self, *args: object, **kwargs: object) -> list[int]:
        raise AssertionError("tokenized")


@pytest.mark.parametrize("chat", [False, True])
def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenized(chat: bool) -> None:
    """Finding 10: a 16 MiB prompt was tokenized before its length was checked."""
    text = "x" * (CTX * 4 + 1)  # at least CTX + 1 tokens of at most 4 bytes
    body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    with pytest.raises(ApiError, match="more than 256 tokens") as info:
        parse_request(body, _MustNotTokenize(), CTX, chat=chat)  # type: ignore[arg-type]
    assert info.value.code == "context_length_exceeded" and info.value.status == 400
    shorter = {"messages": [{"role": "user", "content": text[1:]}]} if chat else {"prompt": text[1:]}
    with pytest.raises(AssertionError, match="tokenized"):  # one that may fit is tokenized
        parse_request(shorter, _MustNotTokenize(), CTX, chat=chat)  # type: ignore[arg-type]


# -- the server, for real ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(smollm2: str) -> Iterator[tuple[str, int]]:
    cmd = [sys.executable, "-m", "llmrpc.cli", "serve", "--model", smollm2, "--port", "0", "--local", "1",
           "--threads", "1", "--parallel", "1", "--ctx-size", str(CTX), "--read-timeout", str(READ_TIMEOUT),
           "--allow-host", "llm.example"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(PREFIX), f"no ready line: {line!r}"
        host, port = line[len(PREFIX) :].split()[0].removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
        yield host, int(port)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def request(
    api: tuple[str, int], method: str, path: str, body: dict[str, Any] | None = None, **headers: str
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(*api, timeout=120)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **headers})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


def metrics(api: tuple[str, int]) -> dict[tuple[str, str], float]:
    conn = http.client.HTTPConnection(*api, timeout=60)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {
        (s.name, s.labels.get("finished_reason", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_slow_client_is_closed_after_the_read_timeout_while_others_are_served(api: tuple[str, int]) -> None:
    """Finding 10 (slowloris): a client sending its headers a byte at a time, never idle for long,
    held its connection and thread for ever."""
    slow = socket.create_connection(api, timeout=60)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:  # a byte every 0.3 s: no single read ever waits the timeout
        while not stop.wait(0.3):
            try:
                slow.sendall(b"x")
            except OSError:
                return

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        assert request(api, "GET", "/v1/models")[0] == 200  # served meanwhile
        try:
            closed = slow.recv(4096) == b""  # (the server answers nothing: it closes)
        except ConnectionResetError:
            closed = True
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        sender.join()
        slow.close()
    assert closed and READ_TIMEOUT * 0.9 <= elapsed < 30
    assert request(api, "GET", "/v1/models")[0] == 200


def test_an_oversize_body_is_refused_before_it_is_read(api: tuple[str, int]) -> None:
    with socket.create_connection(api, timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n{" % (17 << 20))  # fmt: skip
        reply = s.recv(65536)  # no more of the body is sent: answered at once, or closed at the timeout
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:100]
    status, body = request(api, "POST", "/v1/completions", {"prompt": "x " * (CTX * 100), "max_tokens": 1})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_requests_without_a_key_must_name_this_server(api: tuple[str, int]) -> None:
    """Finding 10 (DNS rebinding): without an API key, any Host was served, so a web page whose
    name resolves to 127.0.0.1 could use the API."""
    port = api[1]
    for host in (f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", "llm.example", f"LLM.example.:{port}"):
        assert request(api, "GET", "/v1/models", Host=host)[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "", "a b"):
        status, body = request(api, "GET", "/v1/models", Host=host)
        assert status == 403 and "--allow-host" in body["error"]["message"], host
    status, _ = request(api, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}, Origin="http://evil.example")
    assert status == 403
    status, _ = request(api, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}, Origin="null")
    assert status == 403
    status, _ = request(
        api, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}, Origin="http://localhost:3000"
    )
    assert status == 200
    assert request(api, "GET", "/health", Host="evil.example")[0] == 200  # probes need no name


def test_a_whole_request_whose_client_leaves_frees_its_slot(api: tuple[str, int]) -> None:
    """Finding 10: a non-streamed request went on generating after its client left, holding its
    slot. With --parallel 1, the next request is answered before the abandoned one would have
    generated all its tokens: counted by the server's own token counter, not by the clock."""
    before = metrics(api)
    tokens = before.get(("llmrpc:generation_tokens_total", ""), 0.0)
    aborts = before.get(("llmrpc:request_success_total", "abort"), 0.0)
    body = json.dumps({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 230, "temperature": 0}).encode()  # (counts on)
    leaving = socket.create_connection(api, timeout=60)
    leaving.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    deadline = time.monotonic() + 120
    polled = threading.Event()
    while metrics(api).get(("llmrpc:generation_tokens_total", ""), 0.0) == tokens:  # it generates
        assert time.monotonic() < deadline, "the abandoned request never started"
        polled.wait(0.02)  # (a poll's interval, to leave the cores to the generation)
    leaving.close()
    status, reply = request(api, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] == 4
    after = metrics(api)
    assert after[("llmrpc:request_success_total", "abort")] == aborts + 1  # called off, not finished
    assert after[("llmrpc:generation_tokens_total", "")] - tokens - 4 < 230


def test_connections_past_the_cap_are_refused_at_once_and_the_rest_served(tiny_models: dict[str, str]) -> None:
    """With no cap, every idle connection held a thread until its read timeout: a flood of them
    took the process's threads. Past --max-connections a connection gets a 503 and is closed;
    once some close, new ones are served again."""
    cap = 4
    cmd = [sys.executable, "-m", "llmrpc.cli", "serve", "--model", tiny_models["Q8_0"], "--port", "0", "--local", "1",
           "--threads", "1", "--ctx-size", "64", "--max-connections", str(cap), "--read-timeout", "60"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    held: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(PREFIX), f"no ready line: {line!r}"
        address = line[len(PREFIX) :].split()[0].removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
        api = (address[0], int(address[1]))
        # a connection the server has accepted answers a request; hold `cap` open, idle after one
        for _ in range(cap):
            conn = socket.create_connection(api, timeout=30)
            held.append(conn)
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = conn.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200"), answer
        with socket.create_connection(api, timeout=30) as extra:
            answer = b""
            while chunk := extra.recv(4096):  # the 503, then the close
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503") and b"connections are open" in answer
        held.pop().close()
        deadline = time.monotonic() + 30  # the server sees the close as its handler's next read ends
        while (status := _status(api)) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
    finally:
        for conn in held:
            conn.close()
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def _status(api: tuple[str, int]) -> int:
    """A GET's status; 0 when the connection was closed before its answer could be read."""
    try:
        return request(api, "GET", "/v1/models")[0]
    except (OSError, http.client.HTTPException):
        return 0
