"""The OpenAI-compatible HTTP API: `llmrpc-head serve` as a real process on 127.0.0.1, driven by
OpenAI's own Python client, answering what llama.cpp answers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from llmrpc.head.tokenizer import Tokenizer
from llmrpc.openai_api import ApiError, StopText, parse_request
from llmrpc.reference import reference_llama
from tests.servers import running

from .test_metrics import scrape, value

KEY = "test-key"
PREFIX = "llmrpc-head serve listening on "
CTX = 256
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# -- pure parts -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stops", "pieces", "given", "stopped"),
    [
        ((), ["Hello", " world"], ["Hello", " world"], False),
        (("\n",), ["Hello", " world\nmore"], ["Hello", " world"], True),
        ((".",), ["Paris", ".", " It"], ["Paris", "", ""], True),
        (("END",), ["abc E", "N", "D tail"], ["abc ", "", ""], True),  # held back while it may be a stop
        (("END",), ["abc E", "N", "x"], ["abc ", "", "ENx"], False),  # given out once it cannot
        (("ab", "b c"), ["xa", "b c"], ["x", ""], True),  # the earliest stop wins
        (("stop",), ["st", "op", "after"], ["", "", ""], True),
    ],
)
def test_stop_sequences_cut_the_text(
    stops: tuple[str, ...], pieces: list[str], given: list[str], stopped: bool
) -> None:
    s = StopText(stops)
    assert [s.push(p) for p in pieces] == given
    assert s.stopped == stopped


def test_stop_text_gives_out_what_it_held_at_the_end() -> None:
    s = StopText(("END",))
    assert s.push("the E") == "the "
    assert s.flush() == "E"
    assert not s.stopped


@pytest.fixture(scope="module")
def tokenizer(smollm2: str) -> Tokenizer:
    return Tokenizer(smollm2)


@pytest.mark.parametrize(
    ("chat", "body", "param", "words"),
    [
        (False, [], None, "JSON object"),
        (False, {"prompt": 5}, "prompt", "must be a string"),
        (False, {"prompt": [1, 99999999]}, "prompt", "outside the vocabulary"),
        (False, {"prompt": ""}, "prompt", "empty"),
        (False, {"prompt": "hi", "max_tokens": 0}, "max_tokens", "at least 1"),
        (False, {"prompt": "hi", "max_tokens": CTX}, "max_tokens", "context holds 256"),
        (False, {"prompt": "hi", "temperature": 3}, "temperature", "within [0, 2]"),
        (False, {"prompt": "hi", "temperature": "hot"}, "temperature", "must be a number"),
        (False, {"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
        (False, {"prompt": "hi", "n": 2}, "n", "only n=1"),
        (False, {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        (False, {"prompt": "hi", "stop": 3}, "stop", "string or a list"),
        (False, {"prompt": "hi", "logprobs": 2}, "logprobs", "not supported"),
        (False, {"prompt": "hi", "seed": 1.5}, "seed", "integer"),
        (False, {"prompt": "hi", "seed": -1}, "seed", "within [0, 18446744073709551615]"),
        (False, {"prompt": "hi", "seed": 1 << 64}, "seed", "within [0, "),
        (False, {"prompt": "hi", "seed": True}, "seed", "integer"),
        (False, {"prompt": "hi", "temperature": math.nan}, "temperature", "within [0, 2]"),
        (False, {"prompt": "hi", "temperature": -0.1}, "temperature", "within [0, 2]"),
        (False, {"prompt": "hi", "temperature": 1e-9}, "temperature", "0 or at least"),
        (False, {"prompt": "hi", "top_p": math.inf}, "top_p", "within [0, 1]"),
        (False, {"prompt": "hi", "top_k": -1}, "top_k", "within [0, "),
        (False, {"prompt": "hi", "top_k": 1 << 40}, "top_k", "within [0, "),
        (False, {"prompt": "hi", "max_tokens": -5}, "max_tokens", "at least 1"),
        (False, {"prompt": "hi", "max_tokens": 2.5}, "max_tokens", "integer"),
        (False, {"prompt": "hi", "n": 0}, "n", "only n=1"),
        (False, {"prompt": "hi", "presence_penalty": 3}, "presence_penalty", "within [-2, 2]"),
        (False, {"prompt": "hi", "frequency_penalty": "x"}, "frequency_penalty", "within [-2, 2]"),
        (False, {"prompt": "hi", "stream_options": {"include_usage": "yes"}}, "stream_options", "true or false"),
        (False, {"prompt": "hi", "stop": ["a", 5]}, "stop", "list of strings"),
        (False, {"prompt": "hi", "stream": "yes"}, "stream", "true or false"),
        (True, {"messages": []}, "messages", "non-empty list"),
        (True, {"messages": [{"content": "hi"}]}, "messages[0]", "'role'"),
        (True, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0]", "only text"),
        (True, {"messages": QUESTION, "max_completion_tokens": 10_000}, "max_completion_tokens", "context"),
        (True, {"messages": [{"role": "user", "content": "word " * 400}]}, "messages", "context holds"),
    ],
)
def test_bad_requests_are_refused_with_openais_error_fields(
    tokenizer: Tokenizer, chat: bool, body: object, param: str | None, words: str
) -> None:
    with pytest.raises(ApiError) as info:
        parse_request(body, tokenizer, CTX, chat=chat)
    assert info.value.status == 400
    assert info.value.param == param
    assert words in str(info.value)
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_requests_take_openais_defaults(tokenizer: Tokenizer) -> None:
    completion = parse_request({"prompt": "Hello"}, tokenizer, CTX, chat=False)
    assert completion.max_tokens == 16 and completion.sampling.temperature == 1.0 and completion.sampling.top_p == 1.0
    assert completion.prompt_tokens == tokenizer.encode("Hello")
    chat = parse_request({"messages": QUESTION, "stop": "."}, tokenizer, CTX, chat=True)
    assert chat.max_tokens == CTX - len(chat.prompt_tokens)  # up to the context
    assert chat.stop == (".",)
    # the template's special tokens are single tokens, not their text spelled out
    im_start = tokenizer.encode("<|im_start|>", add_bos=False, special=True)
    assert len(im_start) == 1 and chat.prompt_tokens[0] == im_start[0]
    assert chat.prompt_tokens.count(im_start[0]) == 3  # system, user, assistant
    assert parse_request({"prompt": [1, 2, 3]}, tokenizer, CTX, chat=False).prompt_tokens == [1, 2, 3]


# -- the server, for real ---------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.fixture(scope="module")
def api(smollm2: str) -> Iterator[str]:
    cmd = [sys.executable, "-m", "llmrpc.cli", "serve", "--model", smollm2, "--port", "0", "--local", "2",
           "--threads", "1", "--parallel", "2", "--ctx-size", str(CTX), "--api-key", KEY]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(PREFIX), f"no ready line: {line!r}"
        servers = _children(proc.pid)
        assert len(servers) == 2  # the two local llmrpc-servers it started
        yield line[len(PREFIX) :].split()[0]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0  # a clean stop on SIGTERM
    for pid in servers:  # and it stopped the servers it started
        assert not running(pid)


@pytest.fixture(scope="module")
def client(api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def llama(smollm2: str) -> Any:
    return reference_llama(smollm2, n_ctx=CTX, n_threads=2)


def _llama_completion(llama: Any, prompt: str, n: int, stop: list[str] | None = None) -> tuple[str, str]:
    llama.reset()
    out = llama.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, repeat_penalty=1.0, stop=stop)
    return out["choices"][0]["text"], out["choices"][0]["finish_reason"]


def test_models_lists_the_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_greedy_completion_is_llama_cpps(client: openai.OpenAI, llama: Any) -> None:
    prompt = "Once upon a time, in a small village by the sea,"
    want, reason = _llama_completion(llama, prompt, 40)
    got = client.completions.create(model="any", prompt=prompt, max_tokens=40, temperature=0)
    assert got.choices[0].text == want and len(want) > 50
    assert got.choices[0].finish_reason == reason == "length"
    assert got.usage is not None and got.usage.completion_tokens == 40
    assert got.usage.prompt_tokens == len(llama.tokenize(prompt.encode(), add_bos=True))


def test_greedy_chat_is_llama_cpps_whole_and_streamed(client: openai.OpenAI, llama: Any) -> None:
    llama.reset()
    want = llama.create_chat_completion(QUESTION, max_tokens=48, temperature=0.0, top_k=1, repeat_penalty=1.0)
    want_text = want["choices"][0]["message"]["content"]
    assert len(want_text) > 40  # (the 135M model answers oddly, but as llama.cpp does)
    got = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=48, temperature=0)  # type: ignore[arg-type]
    assert got.choices[0].message.content == want_text
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    chunks = list(
        client.chat.completions.create(
            model="any", messages=QUESTION, max_tokens=48, temperature=0,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == got.choices[0].finish_reason
    assert chunks[-1].usage is not None and got.usage is not None
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_stop_sequences_end_the_text_as_llama_cpp_does(client: openai.OpenAI, llama: Any) -> None:
    prompt = "The capital of France is"
    want, reason = _llama_completion(llama, prompt, 40, stop=["."])
    assert reason == "stop" and "." not in want
    got = client.completions.create(model="any", prompt=prompt, max_tokens=40, temperature=0, stop=["."])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (want, "stop")
    streamed = client.completions.create(
        model="any", prompt=prompt, max_tokens=40, temperature=0, stop=["."], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == want


def test_requests_at_once_get_the_answers_they_get_alone(client: openai.OpenAI) -> None:
    """Five requests, two generated at a time (--parallel 2): each answer is the one it gets alone."""
    prompts = ["def fibonacci(n):", "The capital of France is", "Once upon a time", "1, 2, 3, 4,", "Hello, my name"]

    def ask(p: str) -> str:
        return client.completions.create(model="any", prompt=p, max_tokens=24, temperature=0).choices[0].text or ""

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_sampling_follows_the_seed_and_the_temperature(client: openai.OpenAI, llama: Any) -> None:
    """One seed, one text; other seeds, other texts; temperature 0 is llama.cpp's greedy text
    whatever the seed; and the temperature changes what a seed draws."""
    prompt = "Once upon a time"

    def ask(seed: int, temperature: float = 1.0) -> str:
        return client.completions.create(
            model="any", prompt=prompt, max_tokens=24, temperature=temperature, seed=seed
        ).choices[0].text or ""  # fmt: skip

    assert ask(5) == ask(5)
    assert len({ask(5), ask(6), ask(7)}) == 3
    greedy, _ = _llama_completion(llama, prompt, 24)
    assert ask(5, 0) == ask(6, 0) == greedy
    assert ask(5, 0.2) != ask(5, 1.5)


def _post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize(
    "values",
    [{"seed": -1}, {"seed": 1 << 64}, {"temperature": math.nan}, {"top_p": 0}, {"top_k": -1}, {"max_tokens": -1},
     {"n": 2}, {"stop": [1]}, {"presence_penalty": 9}],
)  # fmt: skip
def test_out_of_range_sampling_values_get_a_400_at_once(api: str, values: dict[str, Any]) -> None:
    """A negative seed used to reach the last server's sampler, which raised: the request had no
    answer for 10 minutes and held one of the --parallel slots all that time."""
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 5, **values}).encode()
    status, reply = _post(api + "/completions", body)
    assert status == 400 and reply["error"]["param"] == next(iter(values))
    assert reply["error"]["type"] == "invalid_request_error"


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(api: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api, api_key="wrong", max_retries=0).models.list()
    status, body = _post(api + "/completions", b'{"prompt": "hi"}', key=None)
    assert status == 401 and "API key" in body["error"]["message"]
    status, body = _post(api + "/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(api + "/embeddings", b"{}")
    assert status == 404 and "no such route" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="any", prompt="hi", max_tokens=10_000)
    assert "context holds 256" in str(info.value)
    assert client.completions.create(model="any", prompt="Hi", max_tokens=4, temperature=0).choices[0].text


LONG = CTX - 32  # tokens a stream asks for: it runs for seconds
STORY = "Once upon a time, in a small village by the sea,"


def _metrics(api: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return scrape(api, key=KEY)[1]


def _wait_for(what: Callable[[], bool], why: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def _ask_later(client: openai.OpenAI, into: list[str]) -> threading.Thread:
    def ask() -> None:
        into.append(client.completions.create(model="any", prompt="Hi", max_tokens=4, temperature=0).choices[0].text)

    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def test_a_client_that_leaves_frees_its_slot(api: str, client: openai.OpenAI) -> None:
    """Both slots (--parallel 2) taken by streams whose clients go away after the first piece:
    each generation stops (an abort) long before its max_tokens, and the slots serve the next
    requests, two at once."""
    before = _metrics(api)
    streams = [
        client.completions.create(model="any", prompt=STORY, max_tokens=LONG, temperature=0, stream=True)
        for _ in range(2)
    ]
    for stream in streams:
        next(iter(stream))
    for stream in streams:
        stream.close()

    def aborted() -> bool:
        now = _metrics(api)
        ended = value(now, "request_success_total", finished_reason="abort")
        return ended - value(before, "request_success_total", finished_reason="abort") == 2 and not value(
            now, "num_requests_running"
        )

    _wait_for(aborted, "the streams' generations did not stop when their clients left")
    generated = value(_metrics(api), "generation_tokens_total") - value(before, "generation_tokens_total")
    assert generated < LONG  # neither ran on to its max_tokens
    results: list[str] = []
    threads = [_ask_later(client, results) for _ in range(2)]
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2 and results[0] == results[1]


def test_a_request_over_the_parallel_cap_waits_its_turn(api: str, client: openai.OpenAI) -> None:
    """--parallel 2: a third request waits (two running, one waiting) until a slot is free,
    then gets the answer it gets alone."""
    alone = client.completions.create(model="any", prompt="Hi", max_tokens=4, temperature=0).choices[0].text
    streams = [
        client.completions.create(model="any", prompt=STORY, max_tokens=LONG, temperature=0, stream=True)
        for _ in range(2)
    ]
    pieces = [[next(iter(s)).choices[0].text] for s in streams]  # both generating
    third: list[str] = []
    thread = _ask_later(client, third)
    seen: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []

    def one_waits() -> bool:
        seen.append(_metrics(api))
        return value(seen[-1], "num_requests_waiting") == 1

    _wait_for(one_waits, "the third request did not wait")
    assert value(seen[-1], "num_requests_running") == 2
    for stream, got in zip(streams, pieces, strict=True):
        got += [c.choices[0].text for c in stream]
    thread.join(timeout=120)
    assert third == [alone]
    assert "".join(pieces[0]) == "".join(pieces[1])  # (greedy: both streams said the same)


def test_a_request_outlives_a_server_that_dies(smollm2: str) -> None:
    """A stream in flight when one of the servers is killed goes on (the farm re-plans and
    replays) and says what it would have said."""
    cmd = [sys.executable, "-m", "llmrpc.cli", "serve", "--model", smollm2, "--port", "0", "--local", "3",
           "--threads", "1", "--ctx-size", str(CTX)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(PREFIX), line
        servers = _children(proc.pid)
        assert len(servers) == 3
        client = openai.OpenAI(base_url=line[len(PREFIX) :].split()[0], api_key="x", max_retries=0, timeout=120)
        prompt = "Once upon a time, in a small village by the sea,"
        pieces = []
        stream = client.completions.create(model="any", prompt=prompt, max_tokens=60, temperature=0, stream=True)
        for i, part in enumerate(stream):
            pieces.append(part.choices[0].text)
            if i == 10:
                os.kill(servers[1], signal.SIGKILL)
        alone = client.completions.create(model="any", prompt=prompt, max_tokens=60, temperature=0)
        assert "".join(pieces) == alone.choices[0].text and len(alone.choices[0].text) > 100
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "re-planned over 2 of 3 servers" in err  # it did lose a server in the middle
