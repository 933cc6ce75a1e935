"""Pure pieces: planner, sampler, codec, text streaming, GGUF reading."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from llmrpc import codec
from llmrpc.head.rejoin import SessionGate
from llmrpc.model.arch import UnsupportedArchitectureError
from llmrpc.model.gguf_model import read_model
from llmrpc.model.graph import padded_n_kv
from llmrpc.model.graphs import room_nodes
from llmrpc.sampling import Sampler, SamplingParams
from llmrpc.v1 import llmrpc_pb2 as pb


@pytest.mark.parametrize(
    ("used", "kv_size", "pad", "n_kv"),
    [
        (1, 512, 256, 256),  # llama.cpp's get_n_kv
        (256, 512, 256, 256),
        (257, 512, 256, 512),
        (300, 256, 256, 256),  # never past the cache
        (1, 512, 32, 32),  # the CPU's pad
        (32, 512, 32, 32),
        (33, 512, 32, 64),
        (500, 512, 32, 512),
        (511, 512, 32, 512),
    ],
)
def test_padded_n_kv(used: int, kv_size: int, pad: int, n_kv: int) -> None:
    assert padded_n_kv(used, kv_size, pad) == n_kv


@pytest.mark.parametrize(
    ("segment_nodes", "n_segments", "nodes"),
    [
        (176, 1, 512),  # 176 + 256 margin, rounded up to a step of 512
        (176, 2, 1024),  # 608
        (256, 1, 512),  # exactly a step
        (300, 64, 19456),  # 19,200 + 256
        (1500, 0, 2048),  # no sessions is sized as one
    ],
)
def test_a_room_holds_every_session_of_its_graph(segment_nodes: int, n_segments: int, nodes: int) -> None:
    assert room_nodes(segment_nodes, n_segments) == nodes


def test_greedy_and_seeded_sampling() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    assert Sampler(SamplingParams(temperature=0))(logits) == int(np.argmax(logits))
    assert Sampler(SamplingParams(temperature=1.0, top_k=1))(logits) == int(np.argmax(logits))
    assert Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1e-6))(logits) == int(np.argmax(logits))
    a = [Sampler(SamplingParams(temperature=1.0, top_k=50, seed=5))(logits) for _ in range(5)]
    b = [Sampler(SamplingParams(temperature=1.0, top_k=50, seed=5))(logits) for _ in range(5)]
    assert a == b
    draws = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=1))
    top3 = set(np.argsort(-logits)[:3].tolist())
    assert {draws(logits) for _ in range(200)} <= top3
    with pytest.raises(ValueError):
        Sampler(SamplingParams(top_p=0))


def test_the_temperature_shapes_the_draws() -> None:
    """Seeded draws from fixed logits follow softmax(logits / T): a sampler that ignored the
    temperature would draw alike at 0.25 and at 2, and the top token as often as at 1."""
    logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)

    def shares(temperature: float, seed: int) -> np.ndarray:
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=0, top_p=1.0, seed=seed))
        return np.bincount([sampler(logits) for _ in range(4000)], minlength=4) / 4000

    for temperature in (0.25, 1.0, 2.0):
        want = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        assert np.abs(shares(temperature, 1) - want).max() < 0.03, temperature
    assert shares(0.25, 2)[0] > 0.95 and shares(2.0, 2)[0] < 0.55
    assert not np.array_equal(shares(1.0, 3), shares(1.0, 4))  # another seed, other draws


def test_a_sampler_goes_on_from_the_draws_already_taken() -> None:
    """What a replay relies on: a sampler told that 7 tokens were drawn picks the 8th token
    onwards as the one that drew them (one draw a token, whatever the logits)."""
    rng = np.random.default_rng(1)
    rows = [rng.standard_normal(500).astype(np.float32) for _ in range(20)]
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=3)
    whole = Sampler(params)
    picks = [whole(r) for r in rows]
    later = Sampler(SamplingParams(0.9, 40, 0.95, 3, drawn=7))
    assert [later(r) for r in rows[7:]] == picks[7:]
    assert [Sampler(params)(r) for r in rows[7:]] != picks[7:]


def test_codec_round_trip_and_validation() -> None:
    for arr in (np.arange(6, dtype=np.int32), np.ones((2, 3), np.float32), np.ones((2, 3), np.float16)):
        back = codec.tensor_from_proto(codec.tensor_to_proto(arr), max_elements=100)
        assert back.dtype == arr.dtype and np.array_equal(back, arr)
    with pytest.raises(codec.CodecError, match="exceeds"):
        codec.tensor_from_proto(codec.tensor_to_proto(np.ones(10, np.float32)), max_elements=5)
    with pytest.raises(codec.CodecError, match="shape"):
        codec.tensor_from_proto(pb.Tensor(dtype=pb.DTYPE_F32, shape=[0], data=b""), max_elements=5)
    with pytest.raises(codec.CodecError, match="cannot be sent"):
        codec.tensor_to_proto(np.ones(3, np.float64))


@pytest.mark.parametrize(
    ("text", "expect"),
    [("6GiB", 6 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1000", 1000), ("2 kib", 2048)],
)
def test_parse_bytes(text: str, expect: int) -> None:
    from llmrpc.cli import parse_bytes

    assert parse_bytes(text) == expect


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-5MiB", "0"])
def test_parse_bytes_refuses_nonsense(text: str) -> None:
    from llmrpc.cli import parse_bytes

    with pytest.raises(ValueError):
        parse_bytes(text)


def test_read_model(tiny_models: dict[str, str]) -> None:
    info = read_model(tiny_models["Q4_0"])
    hp = info.hparams
    assert (hp.n_layer, hp.n_embd, hp.n_head(0), hp.n_head_kv(3), hp.n_vocab) == (4, 64, 4, 2, 320)
    first = info.range_tensor_names(0, 2)
    last = info.range_tensor_names(2, 4)
    assert "token_embd.weight" in first and "output_norm.weight" not in first
    assert "output_norm.weight" in last and "token_embd.weight" in last  # tied output
    assert not any(n.startswith("blk.2.") for n in first)
    assert info.range_bytes(0, 4) < sum(t.n_bytes for t in info.tensors.values()) + 1


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    w = GGUFWriter(str(path), "mamba")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="'mamba' is not supported"):
        read_model(path)


def test_text_stream_never_splits_a_character(smollm2: str) -> None:
    from llmrpc.head.tokenizer import TextStream, Tokenizer

    tok = Tokenizer(smollm2)
    text = "naïve café 🙂 done"
    ids = tok.encode(text, add_bos=False)
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_top_k_matches_a_full_sort() -> None:
    from llmrpc.server.api import top_k_logits as top_k

    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 500)).astype(np.float32)
    logits[1, 7] = logits[1, 9] = 50.0  # a tie: the lower id comes first, as argmax picks
    for k in (1, 5, 40):
        ids, values = top_k(logits, k)
        want = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        assert np.array_equal(ids, want)
        assert np.array_equal(values, np.take_along_axis(logits, want, axis=1))


def test_sampling_from_candidates_equals_sampling_from_all() -> None:
    rng = np.random.default_rng(4)
    logits = rng.standard_normal(2000).astype(np.float32)
    order = np.argsort(-logits, kind="stable")
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3)):
        full, cand = Sampler(params), Sampler(params)
        k = cand.candidates()
        assert k in (1, 20)
        ids = order[:k]
        assert [full(logits) for _ in range(30)] == [cand(logits[ids], ids) for _ in range(30)]


def test_a_generation_crosses_the_wire_and_bad_ones_are_refused() -> None:
    gen = codec.Generation(12, 3, 512, frozenset({2, 0}), SamplingParams(0.7, 40, 0.9, 11))
    assert codec.Generation.parse(gen.to_meta()) == gen
    replayed = codec.Generation(12, 3, 512, frozenset({2, 0}), SamplingParams(0.7, 40, 0.9, 11, drawn=9))
    assert codec.Generation.parse(replayed.to_meta()) == replayed
    assert gen.next_step() == codec.Generation(11, 4, 512, frozenset({0, 2}), gen.sampling)
    good = gen.to_meta()
    for bad in (
        {**good, "n": 0},
        {**good, "step": -1},
        {**good, "limit": 0},
        {**good, "sampling": [0.7, 40, 0.0, None]},
        {**good, "sampling": [0.7, 40]},
        {**good, "sampling": [0.7, 40, 0.9, 11, -1]},
        {**good, "sampling": [0.7, 40, 0.9, 11, 1, 2]},
        {**good, "eog": ["x"]},
        {k: v for k, v in good.items() if k != "limit"},
    ):
        with pytest.raises((ValueError, KeyError, TypeError)):
            codec.Generation.parse(bad)


def test_a_models_hash_is_remembered_across_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashed once: a later process (here: the in-process memo cleared) reads the record the
    first one left, keyed by path, size, mtime and inode; a changed file is hashed again."""
    from llmrpc.model import gguf_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(1000))
    first = gguf_model.content_hash(model)
    assert first == hashlib.sha256(model.read_bytes()).hexdigest()
    gguf_model._HASHES.clear()

    def no_reading(*args: object, **kwargs: object) -> str:
        raise AssertionError("hashed again")

    monkeypatch.setattr(gguf_model, "sha256_of", no_reading)
    assert gguf_model.content_hash(model) == first
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model.write_bytes(b"GGUF" + bytes(1000) + b"x")  # (another size: mtime alone may not change)
    assert gguf_model.content_hash(model) == hashlib.sha256(model.read_bytes()).hexdigest() != first


def test_a_replan_that_cannot_have_the_gate_in_time_lets_the_waiting_sessions_in() -> None:
    """A re-plan waiting for the gate keeps new sessions waiting, for REJOIN_WAIT at most: one
    session that never ends held every later one back for good."""
    gate = SessionGate()
    gate.enter()  # a session that does not end
    entered = threading.Event()
    with gate.alone(0.3) as alone:
        assert not alone  # it did not end within the bound
        newcomer = threading.Thread(target=lambda: (gate.enter(), entered.set()))
        newcomer.start()
        assert entered.wait(10), "a new session waited on a re-plan that gave up"
    newcomer.join()
    assert gate.open == 2
    gate.leave()
    gate.leave()
    with gate.alone(0.3) as alone:  # none open: it has the gate, and sessions wait for it
        assert alone
        late = threading.Thread(target=gate.enter)
        late.start()
        late.join(0.3)
        assert late.is_alive() and gate.open == 0
    late.join(10)
    assert gate.open == 1
