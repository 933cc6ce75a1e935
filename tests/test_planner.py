"""Table-driven tests of the planner (a pure function)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llmrpc.head.planner import ModelLayout, PlanError, ServerReport, plan

MiB = 2**20
GB = 1e9

# a 30-layer model of 10 MiB layers, 8 MiB embeddings, 8 MiB output
MODEL = ModelLayout(
    n_layer=30, layer_bytes=(10 * MiB,) * 30, input_bytes=8 * MiB, output_bytes=8 * MiB,
    layer_kv_cell_bytes=(768,) * 30, n_embd=576, n_ff=1536, n_head=9, n_vocab=4096,
)  # fmt: skip


def servers(*specs: tuple[float, float]) -> list[ServerReport]:
    """(free MiB, bandwidth GB/s) per server."""
    return [ServerReport(f"s{i}", "CPU", int(mem * MiB), bw * GB) for i, (mem, bw) in enumerate(specs)]


def ranges(p: object) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in p.stages]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "specs", "ctx", "expect"),
    [
        ("equal servers split evenly", [(1000, 10)] * 3, 512, [(0, 10), (10, 20), (20, 30)]),
        ("one server takes all", [(1000, 10)], 512, [(0, 30)]),
        ("a server at half speed gets half the layers", [(1000, 10), (1000, 5)], 512, [(0, 21), (21, 30)]),
        # memory binds: a server with half the memory holds about half as many layers
        ("half the memory, half the layers", [(300, 10), (150, 10)], 512, [(0, 20), (20, 30)]),
        ("memory binds before speed", [(1000, 10), (100, 100)], 512, [(0, 25), (25, 30)]),
    ],
)
def test_plan_table(name: str, specs: list[tuple[float, float]], ctx: int, expect: list[tuple[int, int]]) -> None:
    p = plan(MODEL, servers(*specs), ctx_size=ctx)
    assert ranges(p) == expect, name
    assert all(s.need <= s.memory_free for s in p.stages)


def test_larger_context_moves_layers() -> None:
    """KV cache for a larger context counts against memory: the tight server gives up layers."""
    tight = servers((200, 10), (4000, 10))
    small = plan(MODEL, tight, ctx_size=512)
    large = plan(MODEL, tight, ctx_size=2048, max_sessions=2)
    assert small.stages[0].address == large.stages[0].address == "s0"
    n_small = small.stages[0].end - small.stages[0].start
    n_large = large.stages[0].end - large.stages[0].start
    assert n_large < n_small
    assert all(s.need <= s.memory_free for s in large.stages)
    assert large.stages[0].kv_bytes == 768 * 2048 * 2 * n_large


def test_a_model_that_does_not_fit_fails_with_the_numbers() -> None:
    with pytest.raises(PlanError) as info:
        plan(MODEL, servers((150, 10), (150, 10)), ctx_size=512)
    msg = str(info.value)
    assert "does not fit" in msg and f"{30 * 10 * MiB + 16 * MiB} bytes" in msg
    assert f"s0 has {150 * MiB} bytes free" in msg and f"s1 has {150 * MiB} bytes free" in msg


def test_a_device_too_slow_to_help_is_left_out() -> None:
    p = plan(MODEL, servers((1000, 10), (1000, 10), (1000, 0.01)), ctx_size=512)
    assert p.left_out == ("s2",)
    assert p.left_out_reasons["s2"] == "it would only slow the pipeline down"
    tiny = plan(MODEL, servers((1000, 10), (5, 10)), ctx_size=512)
    assert tiny.left_out == ("s1",) and "not even one layer fits" in tiny.left_out_reasons["s1"]
    assert ranges(p) == [(0, 15), (15, 30)]


def test_every_stage_respects_its_cap_and_ranges_are_contiguous() -> None:
    specs = [(120, 3), (150, 12), (90, 6), (1500, 1)]
    p = plan(MODEL, servers(*specs), ctx_size=2048, max_sessions=2)
    assert p.stages[0].start == 0 and p.stages[-1].end == 30
    for a, b in zip(p.stages, p.stages[1:], strict=False):
        assert a.end == b.start
    assert all(0 <= s.free_after for s in p.stages)


@pytest.mark.parametrize("specs", [[(1000, 10)] * 3, [(120, 3), (150, 12), (90, 6), (1500, 1)], [(1000, 10)]])
def test_embeddings_are_on_the_first_stage_and_the_output_on_the_last(specs: list[tuple[float, float]]) -> None:
    """Each stage's weights are its layers', plus the embeddings on the first and the output on
    the last (both on a single stage): nowhere else, and counted against those servers' memory."""
    p = plan(MODEL, servers(*specs), ctx_size=2048, max_sessions=2)
    last = len(p.stages) - 1
    for i, s in enumerate(p.stages):
        layers = sum(MODEL.layer_bytes[s.start : s.end])
        extra = (MODEL.input_bytes if i == 0 else 0) + (MODEL.output_bytes if i == last else 0)
        assert s.weight_bytes == layers + extra, (i, s)


def test_big_embeddings_take_layers_off_the_first_stage() -> None:
    """Two equal servers where memory binds, and embeddings of 100 MiB: the first holds them, so it
    gets fewer layers than it would without them."""
    heavy = replace(MODEL, input_bytes=100 * MiB)
    p = plan(heavy, servers((260, 10), (260, 10)), ctx_size=512)
    assert ranges(plan(MODEL, servers((260, 10), (260, 10)), ctx_size=512)) == [(0, 15), (15, 30)]
    first, second = p.stages
    assert first.end - first.start < second.end - second.start
    assert first.weight_bytes == 10 * MiB * first.end + 100 * MiB


def test_servers_of_one_machine_count_as_equally_fast() -> None:
    """Servers started together on one machine measure their speed side by side (low, noisy
    figures): the planner gets the best of them for each, so equal servers get equal work."""
    from llmrpc.head.placement import server_reports, shared_hosts
    from llmrpc.types import DeviceInfo, ServerInfo

    cpu = DeviceInfo("CPU", "cpu", "cpu", 8 << 30, 8 << 30)

    def info(address: str, machine: str, bandwidth: float) -> ServerInfo:
        return ServerInfo(address, 3, "x", cpu, 2, None, 0, bandwidth=bandwidth, machine_id=machine)

    infos = [info("a", "m1", 1e9), info("b", "m1", 3e9), info("c", "m1", 2e9), info("d", "m2", 1e9)]
    assert [r.bandwidth for r in server_reports(infos)] == [3e9, 3e9, 3e9, 1e9]
    p = plan(MODEL, server_reports(infos[:3]), ctx_size=512)
    assert ranges(p) == [(0, 10), (10, 20), (20, 30)]
    assert shared_hosts(infos, ["a", "b", "d"]) == {"a": "llmrpc-m1", "b": "llmrpc-m1"}
