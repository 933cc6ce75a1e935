"""The slice store and the upload port on real servers: a poisoned slice never reaches another
head, a crafted header gets a clean error, the disk budget holds, an upload belongs to its caller."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmrpc import codec
from llmrpc.farm import Farm
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.local import LocalServers
from llmrpc.head.placement import ship_slice, slice_chunks
from llmrpc.model.gguf_model import content_hash, read_model
from llmrpc.model.slicefile import build_slice_layout
from llmrpc.model.synthetic import SyntheticSpec, write_gguf
from llmrpc.reference import reference_llama
from llmrpc.v1 import llmrpc_pb2 as pb

from .test_store import five_dims

TOKENS = [1, 5, 9, 200, 17, 3]


def llama_cpp_logits(path: str, tokens: list[int]) -> np.ndarray:
    llm = reference_llama(path, n_ctx=512, logits_all=True, n_threads=2)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A model and a tampered copy: the same header, other weights."""
    d = tmp_path_factory.mktemp("poison")
    return write_gguf(d / "real.gguf", SyntheticSpec(seed=7)), write_gguf(d / "tampered.gguf", SyntheticSpec(seed=8))


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[str]:
    with LocalServers(1, threads=1, extra_args=["--no-calibrate", "--cache-dir", str(tmp_path / "cache")]) as local:
        yield local.addresses[0]


def test_a_slice_pushed_under_another_models_hash_never_reaches_its_heads(models: tuple[str, str], server: str) -> None:
    """Finding 4: a slice was stored under whatever model hash its uploader claimed, and every
    later head loading that hash got those weights. Pushed both ways (PushSlice and the upload
    port), under the real model's hash, the tampered weights stay unused: the head ships the
    real ones and gets llama.cpp's logits."""
    real, tampered = models
    h = content_hash(real)
    bad = read_model(tampered)
    attacker = StageClient(server)
    attacker.hello()
    _, messages = slice_chunks(bad, h, 0, 4)
    assert attacker.push_slice(messages, 0, 4) == bad.range_bytes(0, 4)
    assert ship_slice(attacker, bad, h, 2, 4) == bad.range_bytes(2, 4)
    assert {(c.model_hash, c.layer_start, c.layer_end) for c in attacker.hello().cached} == {(h, 0, 4), (h, 2, 4)}
    want = llama_cpp_logits(real, TOKENS)
    assert not np.array_equal(llama_cpp_logits(tampered, TOKENS), want)  # the poison would show
    with Farm(real, [server], ctx_size=512) as farm:
        assert farm.load_sources[server] == "cache" and farm.bytes_shipped[server] == read_model(real).range_bytes(0, 4)
        np.testing.assert_array_equal(farm.logits(TOKENS), want)
    with Farm(real, [server], ctx_size=512) as farm:  # the real slice is cached now: nothing shipped
        assert farm.bytes_shipped[server] == 0
        np.testing.assert_array_equal(farm.logits(TOKENS), want)
    # and a server without --model-dir loads no path it is given
    with pytest.raises(StageError, match="not available") as info:
        attacker.load(real, 0, 4)
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_a_slice_with_a_five_dimensional_tensor_gets_a_clean_error(
    models: tuple[str, str], server: str, tmp_path: Path
) -> None:
    """Finding 4: a tensor of 5 dimensions reached GGML_ASSERT and aborted the server. Refused at
    OpenUpload and PushSlice, and in a model file; the server keeps serving."""
    real, _ = models
    h = content_hash(real)
    crafted = five_dims(read_model(real))
    client = StageClient(server)
    client.hello()
    header = codec.slice_header_to_proto(h, 0, 4, build_slice_layout(crafted, 0, 4, h))
    with pytest.raises(StageError, match=r"5 dimensions \(1 to 4 allowed\)") as info:
        client.open_upload(header, 0, 4)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    _, messages = slice_chunks(crafted, h, 0, 4)
    with pytest.raises(StageError, match="5 dimensions") as info:
        client.push_slice(messages, 0, 4)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    # the same header in a file of a model directory: Load refuses it
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    layout = build_slice_layout(crafted, 0, 4, h)
    data = bytearray(layout.data_size)
    with open(real, "rb") as f:
        for t in layout.tensors:
            f.seek(crafted.tensors[t.name].offset)
            data[t.offset : t.offset + t.n_bytes] = f.read(t.n_bytes)
    (models_dir / "crafted.gguf").write_bytes(layout.header + bytes(data))
    args = ["--no-calibrate", "--cache-dir", str(tmp_path / "c2"), "--model-dir", str(models_dir)]
    with LocalServers(1, threads=1, extra_args=args) as local:
        other = StageClient(local.addresses[0])
        with pytest.raises(StageError, match="5 dimensions") as info:
            other.load(str(models_dir / "crafted.gguf"), 0, 4)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert other.health().serving
    assert client.health().serving
    with Farm(real, [server], ctx_size=512) as farm:
        np.testing.assert_array_equal(farm.logits(TOKENS), llama_cpp_logits(real, TOKENS))


def _slice_bytes(info_path: str, start: int, end: int) -> int:
    info = read_model(info_path)
    layout = build_slice_layout(info, start, end, content_hash(info_path))
    return len(layout.header) + layout.data_size


def test_the_slice_cache_keeps_to_its_budget(models: tuple[str, str], tmp_path: Path) -> None:
    """Finding 11: the upload port had no disk quota. With --cache-max, the least recently used
    slice makes room, the loaded one stays, one that cannot fit is refused before it is written,
    and Health says what the cache takes."""
    real, _ = models
    h = content_hash(real)
    info = read_model(real)
    budget = _slice_bytes(real, 0, 2) + _slice_bytes(real, 2, 4) + 100
    args = ["--no-calibrate", "--cache-dir", str(tmp_path / "cache"), "--cache-max", str(budget)]
    with LocalServers(1, threads=1, extra_args=args) as local:
        client = StageClient(local.addresses[0])
        client.hello()
        for start, end in ((0, 2), (2, 4), (1, 3)):
            assert ship_slice(client, info, h, start, end) == info.range_bytes(start, end)
        assert sorted((c.layer_start, c.layer_end) for c in client.hello().cached) == [(1, 3), (2, 4)]
        health = client.health()
        assert health.slice_cache_budget == budget
        assert health.slice_cache_bytes == _slice_bytes(real, 1, 3) + _slice_bytes(real, 2, 4)
        digest = build_slice_layout(info, 1, 3, h).digest
        assert client.load("", 1, 3, h, slice_digest=digest) is not None  # loaded: it stays
        assert ship_slice(client, info, h, 0, 2) == info.range_bytes(0, 2)
        assert sorted((c.layer_start, c.layer_end) for c in client.hello().cached) == [(0, 2), (1, 3)]
        with pytest.raises(StageError, match="slice cache is full") as err:  # even without [0, 2)
            ship_slice(client, info, h, 0, 4)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not list((tmp_path / "cache").glob("*.part"))
        assert sorted((c.layer_start, c.layer_end) for c in client.hello().cached) == [(0, 2), (1, 3)]


def test_an_upload_belongs_to_the_caller_of_open_upload(models: tuple[str, str], server: str) -> None:
    """Finding 11: whoever connected first to the upload port won it (a stranger's connection
    ended the upload). Strangers that connect first, silent or with a wrong token, are turned
    away, and the caller's upload goes through; two uploads of one slice at once both do."""
    real, _ = models
    h = content_hash(real)
    info = read_model(real)
    client = StageClient(server)
    client.hello()
    opened = client.open_upload
    turned_away: list[bytes] = []
    strangers: list[socket.socket] = []

    def open_with_strangers(header: pb.SliceHeader, start: int, end: int) -> tuple[int, bytes]:
        port, token = opened(header, start, end)
        silent = socket.create_connection(("127.0.0.1", port), timeout=60)
        wrong = socket.create_connection(("127.0.0.1", port), timeout=60)
        wrong.sendall(bytes(len(token)))
        turned_away.append(wrong.recv(4096))
        strangers.extend((silent, wrong))
        return port, token

    client.open_upload = open_with_strangers  # type: ignore[method-assign]
    try:
        assert ship_slice(client, info, h, 0, 2) == info.range_bytes(0, 2)
    finally:
        for s in strangers:
            s.close()
    assert turned_away and turned_away[0].endswith(b"bad upload token")
    assert codec.UPLOAD_STATUS.unpack(turned_away[0][: codec.UPLOAD_STATUS.size])[0] == 0
    # two uploads of one slice, both tickets open before either sends
    both_open = threading.Barrier(2, timeout=60)

    def open_together(header: pb.SliceHeader, start: int, end: int) -> tuple[int, bytes]:
        ticket = opened(header, start, end)
        both_open.wait()
        return ticket

    client.open_upload = open_together  # type: ignore[method-assign]
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(ship_slice(client, info, h, 2, 4))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [info.range_bytes(2, 4)] * 2
    digest = build_slice_layout(info, 2, 4, h).digest
    loaded = StageClient(server).load("", 2, 4, h, slice_digest=digest)
    assert loaded is not None and loaded.source == "cache"


def test_servers_a_head_starts_read_the_model_from_its_folder(models: tuple[str, str], tmp_path: Path) -> None:
    """The head gives the servers it starts the model's folder as their --model-dir: they read
    the model there (a path is read only inside one), nothing is shipped."""
    real, _ = models
    with Farm(real, local=1, threads=1, ctx_size=512, server_args=["--cache-dir", str(tmp_path)]) as farm:
        (address,) = farm.addresses
        assert (farm.load_sources[address], farm.bytes_shipped[address]) == ("model-dir", 0)
        np.testing.assert_array_equal(farm.logits(TOKENS), llama_cpp_logits(real, TOKENS))
    assert not list(tmp_path.iterdir())
