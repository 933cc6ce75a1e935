"""Placement end to end: --mem caps, weights shipped once and cached, damaged data refused."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from llmrpc.farm import Farm
from llmrpc.ggml.lib import ggml
from llmrpc.ggml.openmp import core_places
from llmrpc.head.client import StageClient
from llmrpc.head.local import LocalServers
from llmrpc.head.placement import model_layout, slice_chunks
from llmrpc.head.planner import PlanError, ServerReport, plan
from llmrpc.model.gguf_model import content_hash, read_model
from llmrpc.model.slicefile import build_slice_layout
from llmrpc.model.synthetic import family_spec, write_gguf
from llmrpc.reference import reference_llama
from llmrpc.sampling import SamplingParams
from llmrpc.v1 import llmrpc_pb2 as pb
from tests.threads import pinned_threads

from .conftest import own_caches

MB = 10**6


def test_mem_caps_split_smollm2_over_three_servers(smollm2: str, tmp_path: Path) -> None:
    """SmolLM2 over three servers capped at 60 MB, so that no two of them could hold it
    (the tied output matrix means the first and the last stage each hold the 30 MB embeddings)."""
    cap = 60 * MB
    info = read_model(smollm2)
    layout = model_layout(info)
    for pair in ((0, 1), (0, 2), (1, 2)):
        with pytest.raises(PlanError):
            plan(layout, [ServerReport(f"s{i}", "CPU", cap) for i in pair], ctx_size=512, n_batch=64)
    caches = [["--cache-dir", str(tmp_path / f"c{i}")] for i in range(3)]
    with LocalServers(3, threads=2, extra_args=["--mem", str(cap)], per_server_args=caches, calibrate=True) as local:
        infos = [StageClient(a).hello() for a in local.addresses]
        assert all(i.memory_cap == cap and i.memory_budget == cap for i in infos)
        assert all(i.bandwidth > 0 and i.matmul_flops > 0 for i in infos)  # calibrated at start
        with Farm(smollm2, local.addresses, ctx_size=512, batch=64) as farm:
            assert len(farm.plan) == 3
            assert all(s.need <= cap for s in farm.plan)
            assert all(c.loaded and c.loaded.weight_bytes <= cap for c in farm.pipeline.stages)
            prompt = "The capital of France is"
            got = list(farm.generate_tokens(farm.tokenizer.encode(prompt), 32, SamplingParams(temperature=0)))
    llm = reference_llama(smollm2, n_ctx=512, n_threads=2)
    want = []
    for t in llm.generate(llm.tokenize(prompt.encode(), add_bos=True), temp=0.0, top_k=1, repeat_penalty=1.0):
        want.append(int(t))
        if len(want) == len(got):
            break
    assert got == want


def test_a_model_that_does_not_fit_is_refused_before_loading(smollm2: str, tmp_path: Path) -> None:
    with LocalServers(2, threads=1, extra_args=["--mem", "30MB"], per_server_args=own_caches(tmp_path, 2)) as local:
        with pytest.raises(ValueError, match="does not fit") as info:
            Farm(smollm2, local.addresses, ctx_size=512)
        assert "30000000 bytes free" in str(info.value)
        for a in local.addresses:
            assert StageClient(a).hello().loaded is None  # nothing was loaded
        proc = subprocess.run(
            [sys.executable, "-m", "llmrpc.cli", "plan", "--model", smollm2, "--rpc-servers", ",".join(local.addresses)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1 and "does not fit" in proc.stderr


def test_plan_command_prints_a_table(tiny_models: dict[str, str], servers: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llmrpc.cli", "plan", "--model", tiny_models["F32"], "--rpc-servers",
         ",".join(servers), "--ctx-size", "1024"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["server", "device", "layers", "weights"]
    assert sum(1 for line in lines if line.startswith("127.0.0.1")) >= 1
    assert "[0," in proc.stdout and ", 4)" in proc.stdout


def test_weights_are_shipped_once_then_cached(tiny_models: dict[str, str], tmp_path: Path) -> None:
    path = tiny_models["Q8_0"]
    info = read_model(path)
    caches = [["--cache-dir", str(tmp_path / f"c{i}"), "--no-calibrate"] for i in range(2)]
    with LocalServers(2, threads=1, per_server_args=caches) as local:
        with Farm(path, local.addresses, ctx_size=256) as farm:
            want = farm.logits([1, 5, 9, 200])
            for s in farm.plan:  # each server received exactly the bytes of its own range
                assert farm.bytes_shipped[s.address] == info.range_bytes(s.start, s.end)
                assert farm.load_sources[s.address] == "cache"
            ranges = [(s.start, s.end) for s in farm.plan]
        received = [StageClient(a).hello().bytes_received for a in local.addresses]
        assert received == [info.range_bytes(a, b) for a, b in ranges]
    # restarted servers (same caches) load from their caches: nothing crosses the wire
    with LocalServers(2, threads=1, per_server_args=caches) as local:
        hellos = [StageClient(a).hello() for a in local.addresses]
        assert [(c.layer_start, c.layer_end) for h in hellos for c in h.cached] == ranges
        with Farm(path, local.addresses, ctx_size=256) as farm:
            assert set(farm.bytes_shipped.values()) == {0}
            assert np.array_equal(farm.logits([1, 5, 9, 200]), want)
        assert [StageClient(a).hello().bytes_received for a in local.addresses] == [0, 0]
    # a damaged cached slice is detected, removed and fetched again
    damaged = next((tmp_path / "c1").glob("*.gguf"))
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with LocalServers(2, threads=1, per_server_args=caches) as local:
        with Farm(path, local.addresses, ctx_size=256) as farm:
            shipped = [farm.bytes_shipped[s.address] for s in farm.plan]
            assert shipped[0] == 0 and shipped[1] == info.range_bytes(*ranges[1])
            assert np.array_equal(farm.logits([1, 5, 9, 200]), want)


def test_bad_transfers_are_refused_and_never_cached(tiny_models: dict[str, str], tmp_path: Path) -> None:
    path = tiny_models["F32"]
    info = read_model(path)
    digest = content_hash(path)
    wanted = build_slice_layout(info, 0, 2, digest).digest
    with LocalServers(1, threads=1, extra_args=["--cache-dir", str(tmp_path)]) as local:
        client = StageClient(local.addresses[0])
        assert client.load("", 0, 2, digest, slice_digest=wanted) is None  # no copy: the head must push
        _, messages = slice_chunks(info, digest, 0, 2)
        all_messages = list(messages)

        def push(msgs: list[pb.SliceChunk]) -> grpc.StatusCode:
            with grpc.insecure_channel(local.addresses[0]) as ch:
                from llmrpc.v1 import llmrpc_pb2_grpc as pb_grpc

                with pytest.raises(grpc.RpcError) as err:
                    pb_grpc.StageStub(ch).PushSlice(iter(msgs), timeout=30)
                return err.value.code()  # type: ignore[attr-defined,no-any-return]

        assert push(all_messages[:-1]) == grpc.StatusCode.DATA_LOSS  # interrupted
        bad = pb.SliceChunk()
        bad.CopyFrom(all_messages[2])
        bad.data.data = bytes([bad.data.data[0] ^ 1]) + bad.data.data[1:]  # crc no longer matches
        assert push(all_messages[:2] + [bad] + all_messages[3:]) == grpc.StatusCode.DATA_LOSS
        forged = pb.SliceChunk()
        forged.CopyFrom(all_messages[2])
        forged.data.data = bytes([forged.data.data[0] ^ 1]) + forged.data.data[1:]
        forged.data.crc32 = zlib.crc32(forged.data.data)  # intact in transit, wrong content
        assert push(all_messages[:2] + [forged] + all_messages[3:]) == grpc.StatusCode.DATA_LOSS
        assert push(all_messages[1:]) == grpc.StatusCode.INVALID_ARGUMENT  # no header
        assert client.hello().cached == ()
        assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*.part"))
        assert client.load("", 0, 2, digest, slice_digest=wanted) is None
        assert client.push_slice(iter(all_messages), 0, 2) == info.range_bytes(0, 2)
        assert client.load("", 0, 2, digest) is None  # a slice is only loaded by its digest
        loaded = client.load("", 0, 2, digest, slice_digest=wanted)
        assert loaded is not None and loaded.source == "cache"


def test_model_dir_is_matched_by_content_not_name(tiny_models: dict[str, str], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "renamed.gguf").write_bytes(Path(tiny_models["Q4_0"]).read_bytes())
    (models / "other.gguf").write_bytes(Path(tiny_models["F32"]).read_bytes())
    args = ["--cache-dir", str(tmp_path / "cache"), "--model-dir", str(models)]
    with LocalServers(1, threads=1, extra_args=args) as local:
        with Farm(tiny_models["Q4_0"], local.addresses, ctx_size=256) as farm:
            assert farm.load_sources[local.addresses[0]] == "model-dir"
            assert farm.bytes_shipped[local.addresses[0]] == 0
            assert farm.pipeline.stages[0].loaded is not None
            assert farm.pipeline.stages[0].loaded.model_path.endswith("renamed.gguf")


def test_bulk_upload_checks_token_and_frames(tiny_models: dict[str, str], tmp_path: Path) -> None:
    """The bulk path (OpenUpload) refuses a wrong token and a corrupted frame; keeps nothing."""
    import socket

    from llmrpc import codec

    path = tiny_models["F32"]
    info = read_model(path)
    digest = content_hash(path)
    layout = build_slice_layout(info, 0, 2, digest)
    header = codec.slice_header_to_proto(digest, 0, 2, layout)
    first = info.tensors[layout.tensors[0].name]
    data = Path(path).read_bytes()[first.offset : first.offset + first.n_bytes]
    with LocalServers(1, threads=1, extra_args=["--cache-dir", str(tmp_path), "--no-calibrate"]) as local:
        client = StageClient(local.addresses[0])
        client.hello()

        def upload(token_ok: bool, crc_ok: bool) -> tuple[int, str]:
            port, token = client.open_upload(header, 0, 2)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(token if token_ok else bytes(len(token)))
                crc = zlib.crc32(data) ^ (0 if crc_ok else 1)
                try:
                    s.sendall(codec.UPLOAD_FRAME.pack(0, 0, len(data), crc) + data)
                    s.sendall(codec.UPLOAD_FRAME.pack(codec.UPLOAD_END, 0, 0, 0))
                except OSError:
                    pass
                reply = s.recv(1 << 16)
            ok, _, n = codec.UPLOAD_STATUS.unpack(reply[: codec.UPLOAD_STATUS.size])
            return ok, reply[codec.UPLOAD_STATUS.size :].decode()

        assert upload(token_ok=False, crc_ok=True) == (0, "bad upload token")
        ok, msg = upload(token_ok=True, crc_ok=False)
        assert ok == 0 and "crc32" in msg
        ok, msg = upload(token_ok=True, crc_ok=True)  # only one tensor of several: incomplete
        assert ok == 0 and "interrupted" in msg
        assert client.hello().cached == ()
        assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob("*.part"))
        # the real sender delivers it all, and the server records the digests it computed
        from llmrpc.head.placement import ship_slice

        assert ship_slice(client, info, digest, 0, 2) == info.range_bytes(0, 2)
        loaded = client.load("", 0, 2, digest, slice_digest=layout.digest)
        assert loaded is not None and loaded.source == "cache"


@pytest.mark.parametrize("family", ["qwen3moe", "gpt-oss", "gemma3", "deepseek2"])
def test_planned_bytes_are_what_the_servers_allocate(tmp_path: Path, servers: list[str], family: str) -> None:
    """Weights (all experts) and one session's KV cache (windowed layers keep their window,
    latent attention its compressed K) as planned, within 2% of what each server allocates."""
    path = write_gguf(tmp_path / "m.gguf", family_spec(family, weight_type="Q8_0", n_layer=6, sliding_window=64))
    n_ctx = 2048
    with Farm(path, servers, ctx_size=n_ctx) as farm:
        assert len(farm.plan) == 3
        for stage, client in zip(farm.plan, farm.pipeline.stages, strict=True):
            assert client.loaded is not None
            assert stage.weight_bytes == pytest.approx(client.loaded.weight_bytes, rel=0.02)
            reply = client._stub.OpenSession(pb.OpenSessionRequest(n_ctx=n_ctx))
            client.close_session(reply.session_id)
            assert stage.kv_bytes == pytest.approx(reply.cache_bytes, rel=0.02)
    if family in ("gemma3", "gpt-oss"):  # window + one batch, not the context
        assert sum(s.kv_bytes for s in farm.plan) < 0.8 * sum(
            farm.info.hparams.n_embd_k_gqa(il) * 4 * n_ctx for il in range(6)
        )


def test_servers_started_alone_on_one_machine_are_told_to_take_turns(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    """Three servers started by hand without the shared-host flags report one machine; the
    head tells them to take turns (unless told not to), and the text is the same either way."""
    started = [
        LocalServers(1, threads=2, extra_args=["--no-calibrate", "--cache-dir", str(tmp_path / f"c{i}")])
        for i in range(3)
    ]
    try:
        addresses = [local.start()[0] for local in started]
        clients = [StageClient(a) for a in addresses]
        assert len({c.hello().machine_id for c in clients}) == 1
        assert not any(c.health().takes_turns for c in clients)
        assert not any(pinned_threads(local.processes[0].pid) for local in started)
        prompt = [1, 5, 9, 33]
        with Farm(tiny_models["Q8_0"], addresses, ctx_size=256, share_hosts=False) as farm:
            alone = list(farm.generate_tokens(prompt, 12, SamplingParams(temperature=0), stop_at_eog=False))
        assert not any(c.health().takes_turns for c in clients)
        with Farm(tiny_models["Q8_0"], addresses, ctx_size=256) as farm:
            assert len(farm.plan) == 3
            taking_turns = list(farm.generate_tokens(prompt, 12, SamplingParams(temperature=0), stop_at_eog=False))
        assert all(c.health().takes_turns for c in clients)
        assert taking_turns == alone
        places = core_places()
        if (
            len(places) >= 2
            and all(len(p) == 1 for p in places)
            and "OMP_PROC_BIND" not in os.environ
            and ggml().gomp_path
        ):
            # told to take turns, each keeps its compute thread and its OpenMP worker on a core each
            assert [len(pinned_threads(local.processes[0].pid)) for local in started] == [2, 2, 2]
    finally:
        for local in started:
            local.stop()
