"""The slice store: slices kept under the digest the server computed, headers checked as ggml
needs them, a disk budget, uploads that never share a file, model paths confined to the model
directories. The store itself, in this process; tests/test_store_servers.py drives real servers."""

from __future__ import annotations

import dataclasses
import os
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmrpc import codec
from llmrpc.model.gguf_model import ModelInfo, content_hash, read_model
from llmrpc.model.gguf_reader import GGUFFormatError, parse_header
from llmrpc.model.slicefile import IncomingSlice, SliceLayout, build_slice_layout
from llmrpc.model.synthetic import SyntheticSpec, write_gguf
from llmrpc.server.receive import Chunk, TransferError, check_slice
from llmrpc.server.store import CacheFullError, WeightStore

NO_LIMIT = 1 << 40


def incoming(layout: SliceLayout, model_hash: str, start: int, end: int) -> IncomingSlice:
    return codec.slice_header_from_proto(codec.slice_header_to_proto(model_hash, start, end, layout))


def chunks(info: ModelInfo, layout: SliceLayout, piece: int = 1 << 12) -> Iterator[Chunk]:
    """A slice's bytes as a sender streams them, from ``info``'s own file."""
    with open(info.path, "rb") as f:
        for index, t in enumerate(layout.tensors):
            base = info.tensors[t.name].offset
            for off in range(0, t.n_bytes, piece):
                f.seek(base + off)
                data = f.read(min(piece, t.n_bytes - off))
                yield index, off, data, zlib.crc32(data)


def push(store: WeightStore, info: ModelInfo, model_hash: str, start: int, end: int) -> tuple[str, SliceLayout]:
    layout = build_slice_layout(info, start, end, model_hash)
    with store.reserve(incoming(layout, model_hash, start, end), NO_LIMIT) as r:
        path, _ = store.receive(r, chunks(info, layout))
    return path, layout


def five_dims(info: ModelInfo) -> ModelInfo:
    """``info`` with its first layer's attention norm described as a 5-dimensional tensor."""
    name = "blk.0.attn_norm.weight"
    t = info.tensors[name]
    tensors = dict(info.tensors) | {name: dataclasses.replace(t, shape=(*t.shape, 1, 1, 1, 1))}
    return ModelInfo(info.path, info.hparams, tensors, info.metadata)


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelInfo, ModelInfo]:
    """A model and a tampered copy: the same header, other weights."""
    d = tmp_path_factory.mktemp("store-models")
    real = write_gguf(d / "real.gguf", SyntheticSpec(seed=7))
    tampered = write_gguf(d / "tampered.gguf", SyntheticSpec(seed=8))
    return read_model(real), read_model(tampered)


def test_a_slice_is_kept_under_the_digest_the_server_computed(
    victim: tuple[ModelInfo, ModelInfo], tmp_path: Path
) -> None:
    """Finding 4: a slice pushed under another model's hash is kept under the digest of its own
    bytes, so a head asking for the real slice (by its digest) never gets it."""
    real, tampered = victim
    h = content_hash(real.path)
    store = WeightStore(tmp_path, max_bytes=NO_LIMIT)
    poisoned, bad_layout = push(store, tampered, h, 0, 2)  # claims the real model's hash
    want = build_slice_layout(real, 0, 2, h)
    assert bad_layout.header == want.header  # the same header: only the tensor bytes differ
    assert Path(poisoned).name == f"{bad_layout.digest}.gguf" != f"{want.digest}.gguf"
    assert store.verified_slice(want.digest, h, 0, 2) is None
    path, layout = push(store, real, h, 0, 2)
    assert Path(path).name == f"{want.digest}.gguf" and layout.digest == want.digest
    assert store.verified_slice(want.digest, h, 0, 2) == path
    assert store.verified_slice(want.digest, h, 0, 3) is None  # a digest answers for its own range only
    assert read_model(path).slice_range == (0, 2)


def test_sha256_claims_are_checked_and_nothing_is_kept_of_a_bad_push(
    victim: tuple[ModelInfo, ModelInfo], tmp_path: Path
) -> None:
    real, tampered = victim
    h = content_hash(real.path)
    store = WeightStore(tmp_path, max_bytes=NO_LIMIT)
    layout = build_slice_layout(real, 0, 2, h)  # digests of the real tensors
    with store.reserve(incoming(layout, h, 0, 2), NO_LIMIT) as r:
        with pytest.raises(TransferError, match="does not match its sha256"):
            store.receive(r, chunks(tampered, layout))
    assert list(tmp_path.iterdir()) == []
    assert store.disk_bytes() == 0  # the reservation was given back


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("five_dims", r"5 dimensions \(1 to 4 allowed\)"),
        ("claims", "another model or layer range"),
        ("size", "the header says"),
        ("offset", "the header says"),
        ("names", "other tensors"),
        ("data_size", "its tensors end at"),
        ("magic", "not a GGUF header"),
    ],
)
def test_slice_headers_are_checked_before_anything_is_written(
    victim: tuple[ModelInfo, ModelInfo], tmp_path: Path, change: str, words: str
) -> None:
    """Finding 4: a tensor of 5 dimensions reached ggml_new_tensor, whose GGML_ASSERT aborted the
    server; a tensor table other than the header's was written where the loader never reads."""
    real, _ = victim
    h = content_hash(real.path)
    layout = build_slice_layout(five_dims(real) if change == "five_dims" else real, 0, 2, h)
    head = incoming(layout, h, 0, 2)
    t0 = head.tensors[0]
    head = {
        "five_dims": head,
        "claims": dataclasses.replace(head, layer_end=3),
        "size": dataclasses.replace(head, tensors=(dataclasses.replace(t0, n_bytes=t0.n_bytes - 4), *head.tensors[1:])),
        "offset": dataclasses.replace(head, tensors=(dataclasses.replace(t0, offset=32), *head.tensors[1:])),
        "names": dataclasses.replace(head, tensors=head.tensors[1:]),
        "data_size": dataclasses.replace(head, data_size=head.data_size + (1 << 30)),
        "magic": dataclasses.replace(head, header=b"GGUG" + head.header[4:]),
    }[change]
    store = WeightStore(tmp_path, max_bytes=NO_LIMIT)
    with pytest.raises(TransferError, match=words):
        store.reserve(head, NO_LIMIT)
    assert list(tmp_path.iterdir()) == []


def test_gguf_headers_with_tensors_ggml_cannot_take_are_refused(victim: tuple[ModelInfo, ModelInfo]) -> None:
    real, _ = victim
    header = build_slice_layout(five_dims(real), 0, 2, content_hash(real.path)).header
    with pytest.raises(GGUFFormatError, match="5 dimensions"):
        parse_header(header, "x")
    good = build_slice_layout(real, 0, 2, content_hash(real.path)).header
    name = b"blk.0.attn_norm.weight"
    at = good.index(name) + len(name)  # its n_dims (u32), then ne[0] (u64)
    for patch, words in (
        ((0).to_bytes(4, "little"), "0 dimensions"),
        ((1).to_bytes(4, "little") + (0).to_bytes(8, "little"), "shape \\[0\\]"),
        ((1).to_bytes(4, "little") + (1 << 63).to_bytes(8, "little"), "each dimension"),
    ):
        with pytest.raises(GGUFFormatError, match=words):
            parse_header(good[:at] + patch + good[at + len(patch) :], "x")
    check_slice(incoming(build_slice_layout(real, 0, 2, content_hash(real.path)), content_hash(real.path), 0, 2),
                NO_LIMIT)  # fmt: skip


def test_the_cache_keeps_within_its_budget(victim: tuple[ModelInfo, ModelInfo], tmp_path: Path) -> None:
    """Finding 11: least recently used slices make room; the loaded one stays; a slice that
    cannot fit is refused before it is written."""
    real, _ = victim
    h = content_hash(real.path)
    sizes = {r: len(build_slice_layout(real, *r, h).header) + build_slice_layout(real, *r, h).data_size
             for r in ((0, 2), (2, 4), (1, 3))}  # fmt: skip
    budget = sizes[(0, 2)] + sizes[(2, 4)] + 100  # two slices, not three
    store = WeightStore(tmp_path, max_bytes=budget)
    first, a = push(store, real, h, 0, 2)
    second, b = push(store, real, h, 2, 4)
    assert store.disk_bytes() == sizes[(0, 2)] + sizes[(2, 4)]
    assert store.verified_slice(a.digest, h, 0, 2) == first  # used now: [2, 4) is the least recent
    third, _ = push(store, real, h, 1, 3)
    assert not Path(second).exists() and Path(first).exists() and Path(third).exists()
    assert store.disk_bytes() <= budget
    store.use(first)  # loaded: kept whatever the cache needs
    assert store.verified_slice(a.digest, h, 0, 2) == first
    push(store, real, h, 2, 4)  # [1, 3) goes, not the loaded [0, 2)
    assert Path(first).exists() and not Path(third).exists()
    store.use(None)
    small = WeightStore(tmp_path / "small", max_bytes=sizes[(0, 2)] + 100)
    kept, _ = push(small, real, h, 0, 2)
    whole = build_slice_layout(real, 0, 4, h)
    with pytest.raises(CacheFullError, match=f"holds {sizes[(0, 2)] + 100}"):
        small.reserve(incoming(whole, h, 0, 4), NO_LIMIT)
    assert Path(kept).exists()  # refused at once: nothing was evicted for it
    assert not list(tmp_path.glob("**/*.part"))


def test_a_full_cache_refuses_while_uploads_hold_their_room(
    victim: tuple[ModelInfo, ModelInfo], tmp_path: Path
) -> None:
    real, _ = victim
    h = content_hash(real.path)
    layout = build_slice_layout(real, 0, 2, h)
    size = len(layout.header) + layout.data_size
    store = WeightStore(tmp_path, max_bytes=size + 10)
    held = store.reserve(incoming(layout, h, 0, 2), NO_LIMIT)
    with pytest.raises(CacheFullError, match="uploads under way"):
        store.reserve(incoming(layout, h, 0, 2), NO_LIMIT)
    held.release()
    store.reserve(incoming(layout, h, 0, 2), NO_LIMIT).release()


def test_concurrent_uploads_of_one_slice_write_files_of_their_own(
    victim: tuple[ModelInfo, ModelInfo], tmp_path: Path
) -> None:
    """Finding 11: two uploads of the same slice at once shared one temporary file."""
    real, _ = victim
    h = content_hash(real.path)
    layout = build_slice_layout(real, 0, 2, h)
    store = WeightStore(tmp_path, max_bytes=NO_LIMIT)
    both_writing = threading.Barrier(2, timeout=60)
    seen: list[set[str]] = []
    results: list[str] = []

    def upload() -> None:
        def paced() -> Iterator[Chunk]:
            for i, c in enumerate(chunks(real, layout)):
                yield c
                if i == 0:  # both have a file under way now
                    both_writing.wait()
                    seen.append({p.name for p in tmp_path.glob("*.part")})
                    both_writing.wait()

        with store.reserve(incoming(layout, h, 0, 2), NO_LIMIT) as r:
            results.append(store.receive(r, paced())[0])

    threads = [threading.Thread(target=upload) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(seen) == 2 and all(len(s) == 2 for s in seen)  # two files, one per upload
    assert len(results) == 2 and results[0] == results[1]
    assert store.verified_slice(layout.digest, h, 0, 2) == results[0]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".gguf", ".json"]


def test_model_paths_are_confined_to_the_model_directories(victim: tuple[ModelInfo, ModelInfo], tmp_path: Path) -> None:
    """Finding 8: Load(model_path=...) opened any path on the server."""
    real, _ = victim
    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    models.mkdir()
    elsewhere.mkdir()
    inside = models / "m.gguf"
    inside.write_bytes(Path(real.path).read_bytes())
    outside = elsewhere / "private.gguf"
    outside.write_bytes(Path(real.path).read_bytes())
    (models / "link.gguf").symlink_to(outside)
    (models / "sub").mkdir()
    store = WeightStore(tmp_path / "cache", [models], max_bytes=NO_LIMIT)
    assert store.model_path(str(inside)) == str(inside.resolve())
    assert store.model_path(str(models / "sub" / ".." / "m.gguf")) == str(inside.resolve())
    for path in (outside, models / ".." / "elsewhere" / "private.gguf", models / "link.gguf", models / "no.gguf",
                 models / "sub", Path("/etc/passwd"), Path("relative.gguf")):  # fmt: skip
        assert store.model_path(str(path)) is None, path
    h = content_hash(real.path)
    assert store.model_file(h, str(outside)) == str(inside.resolve())  # found by content, inside only
    assert WeightStore(tmp_path / "cache2", max_bytes=NO_LIMIT).model_path(str(inside)) is None  # no model dirs
    os.unlink(inside)
    assert store.model_file(h, str(outside)) is None


def test_slices_kept_under_a_claimed_model_hash_are_removed_at_start(tmp_path: Path) -> None:
    """Finding 4: such slices survived restarts; nothing vouches for what they hold."""
    claimed = tmp_path / ("ab" * 32)
    claimed.mkdir()
    for name in ("0-2.gguf", "0-2.json", "2-4.part123"):
        (claimed / name).write_bytes(b"x")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "0-2.gguf").write_bytes(b"x")  # not a folder of the store's: left alone
    WeightStore(tmp_path, max_bytes=NO_LIMIT)
    assert not claimed.exists() and (other / "0-2.gguf").exists()
