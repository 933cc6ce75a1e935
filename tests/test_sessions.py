"""A closed session's KV cache is kept for the next session of its size, and given back when a
new session needs the memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmrpc.farm import Farm
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.local import LocalServers
from llmrpc.model.gguf_model import content_hash, read_model
from llmrpc.model.kv import CacheConfig, kv_bytes
from llmrpc.reference import reference_llama


def test_a_reused_cache_gives_a_new_session_the_right_logits(
    tiny_models: dict[str, str], servers: list[str], prompt_tokens: list[int]
) -> None:
    """The second session gets the first one's cache, full of its keys and values: a shorter
    prompt must still see none of them."""
    path = tiny_models["Q8_0"]
    short = prompt_tokens[:7]
    ref = reference_llama(path, n_ctx=512, logits_all=True, n_threads=2)
    ref.eval(short)
    want = np.array(ref.scores[: len(short)], dtype=np.float32)
    with Farm(path, servers[:1], ctx_size=512) as farm:
        with farm.session() as s:
            s.forward(prompt_tokens)
            for t in (5, 6, 7):
                s.forward_top_k([t], 1)
        with farm.session() as s:
            got = s.forward(short, all_logits=True)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_spare_caches_make_room_under_the_memory_cap(tiny_models: dict[str, str], tmp_path: Path) -> None:
    path = tiny_models["F32"]
    info = read_model(path)
    n = info.hparams.n_layer
    small = kv_bytes(info.hparams, 0, n, 512, CacheConfig())
    cap = info.range_bytes(0, n) + 2 * small + small // 2  # a 1024-cell cache fits only without the spare
    args = ["--no-calibrate", "--mem", str(cap), "--cache-dir", str(tmp_path)]
    with LocalServers(1, threads=1, extra_args=args) as local:
        client = StageClient(local.addresses[0])
        client.hello()
        assert client.load(path, 0, n, content_hash(path)) is not None
        client.close_session(client.open_session(512))  # its cache stays as a spare
        big = client.open_session(1024)  # needs the spare's memory
        client.close_session(big)
        first = client.open_session(512)  # the spare 1024-cell cache is not this size: freed for it
        second = client.open_session(512)  # both 512-cell caches fit
        assert first != second
        client.close()


def test_a_session_refused_by_one_server_leaves_none_open_on_the_others(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    path = tiny_models["Q8_0"]
    caches = [["--cache-dir", str(tmp_path / f"c{i}")] for i in range(3)]
    caches[2] += ["--max-sessions", "1"]
    with LocalServers(3, threads=1, extra_args=["--no-calibrate"], per_server_args=caches) as local:
        with Farm(path, list(local.addresses), ctx_size=64) as farm, farm.session():
            with pytest.raises(StageError) as refused:
                farm.session()  # all three are asked at once; the third has no room
            assert refused.value.address == local.addresses[2]
            open_now = [StageClient(a).hello().open_sessions for a in local.addresses]
            assert open_now == [1, 1, 1]  # the first session only: the refused one's two were closed
