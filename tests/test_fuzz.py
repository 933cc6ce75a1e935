"""Property-based fuzzing of every surface a farm exposes, against live processes on 127.0.0.1:
gRPC calls of every method, data-plane frames before and after authentication, weight-upload
frames and API bodies (strategies: llmrpc/bench/fuzz_cases.py, shared with ``llmrpc-bench
fuzz``). For every case the server answers, refuses or closes within a bound, its process
stays alive, it still answers others, and it logs no exception that a check did not catch;
after the whole run, a well-formed request still gets llama.cpp's logits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmrpc.bench import fuzz_calls as fk
from llmrpc.bench import fuzz_cases as fc
from llmrpc.bench.fuzz_targets import BAD, PROMPT, FuzzTargets, Outcome, live_targets, reference_check
from llmrpc.codec import FrameKind

FUZZ = settings(
    deadline=None, derandomize=True, database=None, print_blob=False, suppress_health_check=list(HealthCheck)
)
CASES = {"grpc": 500, "before_auth": 250, "after_auth": 600, "upload": 150, "api": 300}  # 1,800 in all


@pytest.fixture(scope="module")
def targets(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTargets]:
    with live_targets(tiny_models["F32"], tmp_path_factory.mktemp("fuzz")) as live:
        yield live


@pytest.fixture(scope="module")
def api_text_before(targets: FuzzTargets) -> str:
    """The API's greedy completion before any fuzzing."""
    return targets.complete(PROMPT, 8)


def _fuzz(
    surface: str, strategy: st.SearchStrategy[Any], send: Callable[[Any], Outcome], *examples: Any,
    bad: tuple[Outcome, ...] = BAD,
) -> None:  # fmt: skip
    """Run the surface's cases; none may end in a ``bad`` outcome (crashed, hung, a refusal that
    lost what the server held, an exception no check caught)."""
    seen: Counter[Outcome] = Counter()

    @settings(FUZZ, max_examples=CASES[surface])
    @given(case=strategy)
    def run(case: Any) -> None:
        outcome = send(case)
        seen[outcome] += 1
        assert outcome not in bad, f"{surface}: {outcome.value} after {case!r}"

    for case in examples:
        run = example(case=case)(run)
    run()
    print(f"{surface}: {sum(seen.values())} cases, " + ", ".join(f"{o.value} {n}" for o, n in seen.most_common()))
    assert sum(seen.values()) >= CASES[surface]


def test_grpc_methods_answer_every_request(targets: FuzzTargets, api_text_before: str) -> None:
    """A refused call leaves what the server held: a Load whose KV cache type does not fit the
    model's heads unloaded the layers before it was refused."""
    targets.prepare()
    bad_cache = {"model_path": fc.MODEL_PATH, "layer_end": 3, "cache_type_k": "q8_0", "cache_type_v": "f16"}
    _fuzz("grpc", fk.grpc_cases(), targets.grpc, fk.GrpcCase("Load", (bad_cache,)))


def test_data_port_strangers_are_refused_or_closed(targets: FuzzTargets) -> None:
    """No frame meets an exception that a check did not catch: a HELLO whose token holds a lone
    surrogate, or whose description is JSON nested too deep, raised in the server's loop."""
    targets.prepare()
    surrogate = fc.Frame(FrameKind.HELLO, 0, {"token": "\ud800", "link": 5})
    deep = fc.Frame(FrameKind.HELLO, 0, {}, body=b"[" * 5000)
    _fuzz("before_auth", fc.before_auth(), targets.data, fc.DataCase(False, (surrogate,)), fc.DataCase(False, (deep,)))


def test_data_port_frames_after_hello_fail_alone(targets: FuzzTargets) -> None:
    targets.prepare()
    malformed_batch = fc.Frame(
        FrameKind.FORWARD, 3, {"route": [[fc.SELF, fc.TOKEN, [fc.SESSION]]], "hop": 0, "link": fc.LINK, "pos": [0],
                               "rows": [2], "gen": fc.GEN_BASE, "batch": ["a", "x"]},
        (fc.ArraySpec("i32", (2,), "tokens"),),
    )  # fmt: skip
    deep = fc.Frame(FrameKind.FORWARD, 4, {}, body=b"[" * 5000)
    _fuzz("after_auth", fc.after_auth, targets.data, fc.DataCase(True, (malformed_batch,)), fc.DataCase(True, (deep,)))


def test_upload_frames_are_checked(targets: FuzzTargets) -> None:
    """Every upload connection ends with the server's status: kept, or why not."""
    targets.prepare()
    _fuzz("upload", fk.upload_cases, targets.upload, bad=(*BAD, Outcome.CLOSED))


def test_api_bodies_get_an_answer(targets: FuzzTargets) -> None:
    """Every request gets an HTTP answer: a body of JSON nested too deep, with an integer of
    thousands of digits, or with a prompt holding a lone surrogate closed the connection with no
    answer."""
    deep = fk.ApiCase("POST", "/v1/completions", b"[" * 100_000, raw=True)
    digits = fk.ApiCase("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", raw=True)
    surrogate = fk.ApiCase("POST", "/v1/completions", b'{"prompt": "\\ud800"}', raw=True)
    _fuzz("api", fk.api_cases, targets.http, deep, digits, surrogate, bad=(*BAD, Outcome.CLOSED, Outcome.FAILED))


def test_after_fuzzing_the_servers_give_llama_cpps_logits(targets: FuzzTargets, api_text_before: str) -> None:
    """Through the fuzzed servers, a well-formed request gets llama.cpp's logits bit for bit;
    the API's greedy completion is what it was before the fuzzing, and llama.cpp's."""
    check = reference_check(targets)
    assert check["stages"] == 2 and check["logits_equal"], check
    assert check["api_text_equal"] and check["api_text"] == api_text_before, check
    assert all(p.alive() for p in (targets.target.process, targets.peer.process, targets.api))
