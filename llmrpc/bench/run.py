"""llama-bench-style pp512 / tg128 through 1, 2 and 3 loopback servers next to llama.cpp itself.

Prints a table with ratios against llama.cpp measured in the same run, and writes JSON.
    llmrpc-bench [--reps 3] [--servers 1,3] [--threads 2] [--model M.gguf]   (see --help)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from llmrpc import trace
from llmrpc.bench.lan import bench_lan, lan_unavailable, print_lan
from llmrpc.bench.llama_rpc import LlamaRpc, bin_dir
from llmrpc.bench.load import LoadTimes, bench_load
from llmrpc.bench.models import resolve_model
from llmrpc.bench.serve import ServingResult, bench_serving
from llmrpc.bench.timeline import print_folder
from llmrpc.farm import Farm
from llmrpc.ggml.device import find_device
from llmrpc.head.local import LocalServers
from llmrpc.reference import extra_bufts_enabled, reference_llama
from llmrpc.reference import gpu_layers as reference_gpu_layers
from llmrpc.sampling import SamplingParams

SERVING_TOKENS = 64  # generated per stream in the serving measurement
GREEDY = SamplingParams(temperature=0)


@dataclass
class Result:
    config: str
    test: str
    tok_s_mean: float
    tok_s_std: float
    samples: list[float]


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks from /proc/stat: a hypervisor that steals time skews every figure."""
    try:
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields), fields[7] if len(fields) > 7 else 0


def settings() -> dict[str, object]:
    """What each side ran with: llama.cpp's extra weight buffer types (repacking) and flash
    attention, and the servers' (the same unless LLMRPC_EXTRA_BUFTS=0)."""
    from llmrpc.ggml.bufts import cpu_extra_names

    names = cpu_extra_names()
    return {
        "llama_cpp": {"extra_buffer_types": extra_bufts_enabled(), "flash_attn": True},
        "servers": {"extra_buffer_types": names, "flash_attn": "auto (on)"},
    }


class Config:
    """One thing to measure: llama.cpp in this process, a farm of local servers, or llama.cpp's
    RPC backend (a new llama-bench process each time). Each run returns its own tok/s, timing
    only the tokens' work (as llama-bench: not the context's clearing or the session's opening)."""

    def __init__(self, name: str, prefill: Callable[[list[int]], float],
                 decode: Callable[[list[int]], float], close: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.name, self.prefill, self.decode, self.close = name, prefill, decode, close


def llama_cpp_config(model: str, threads: int, n_ctx: int, n_batch: int, gpu_layers: int = 0) -> Config:
    llm = reference_llama(
        model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads, n_gpu_layers=gpu_layers
    )

    def fresh() -> None:
        llm.reset()
        llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None

    def prefill(tokens: list[int]) -> float:
        fresh()  # not timed, as llama-bench clears its context outside the timing
        t0 = time.perf_counter()
        llm.eval(tokens)
        return len(tokens) / (time.perf_counter() - t0)

    def decode(tokens: list[int]) -> float:
        fresh()
        t0 = time.perf_counter()
        for t in tokens:
            llm.eval([t])
        return len(tokens) / (time.perf_counter() - t0)

    return Config("llama.cpp", prefill, decode)


def farm_config(farm: Farm, name: str, head_samples: bool = False) -> Config:
    # Opening and closing the session is not timed, as llama.cpp's context clearing is not
    # (both are per request, and a few ms over gRPC: on a GPU, as long as a whole pp512).
    def prefill(tokens: list[int]) -> float:
        with farm.session() as s:
            t0 = time.perf_counter()
            s.forward(tokens)
            return len(tokens) / (time.perf_counter() - t0)

    def decode(tokens: list[int]) -> float:
        """Greedy generation as Farm.generate runs it: len(tokens) forwards of one token each,
        the servers on their own (or the head sending each token, the last server returning
        the top logit)."""
        with farm.session() as s:
            t0 = time.perf_counter()
            if head_samples or s.pipeline.links is None:
                for t in tokens:
                    s.forward_top_k([t], 1)
            else:
                generated = sum(1 for _ in s.generate(tokens[:1], len(tokens), GREEDY))
                if generated != len(tokens):
                    raise RuntimeError(f"the servers generated {generated} of {len(tokens)} tokens")
            return len(tokens) / (time.perf_counter() - t0)

    return Config(name, prefill, decode, farm.close)


def by_hand_config(model: str, n: int, threads: int, device: str | None, n_ctx: int) -> Config:
    """Servers started one by one as a user would on one machine, without the flags that make
    them take turns: the head sees them share the machine and tells them to."""
    started = [LocalServers(1, threads=threads, device=device, calibrate=False) for _ in range(n)]
    try:
        addresses = [local.start()[0] for local in started]
        farm = Farm(model, addresses, ctx_size=n_ctx)
    except BaseException:
        for local in started:
            local.stop()
        raise
    config = farm_config(farm, f"x{n} by hand")

    def close() -> None:
        farm.close()
        for local in started:
            local.stop()

    config.close = close
    return config


def paired_ratios(results: list[Result]) -> dict[tuple[str, str], list[float]]:
    """Each configuration's tok/s over llama.cpp's in the same repetition, repetition by
    repetition: within one the configurations run in turn, so a drift of the machine's speed
    from one repetition to the next (tens of percent here) cancels out of these, not out of a
    ratio of means."""
    base = {r.test: r.samples for r in results if r.config == "llama.cpp"}
    return {
        (r.config, r.test): [x / b for x, b in zip(r.samples, base[r.test], strict=True)]
        for r in results
        if r.test in base
    }


def measure_interleaved(
    configs: list[Config], tests: list[tuple[str, int]], tokens: list[int], reps: int
) -> list[Result]:
    """Every configuration once per repetition, in turn: a shared VM's speed drifts by tens
    of percent within minutes, and a drift must hit every configuration alike, not one. The turn
    starts one configuration later each repetition, so that none always runs right after the
    same one (on an H200, one server's pp512 took 14.9 ms right after llama.cpp's and 10.4 ms
    after its own, every repetition)."""
    rates: dict[tuple[str, str], list[float]] = {}
    for test, n in tests:
        for c in configs:  # warm-up, as llama-bench does
            (c.prefill if test == "pp" else c.decode)(tokens[:n])
        for rep in range(reps):
            for c in configs[rep % len(configs) :] + configs[: rep % len(configs)]:
                rate = (c.prefill if test == "pp" else c.decode)(tokens[:n])
                rates.setdefault((c.name, f"{test}{n}"), []).append(rate)
    return [
        Result(name, test, statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, xs)
        for (name, test), xs in sorted(rates.items(), key=lambda kv: (kv[0][1][:2] != "pp", kv[0][1]))
    ]


@click.command()
@click.option(
    "--model",
    default=None,
    help="A GGUF file, 'smollm2' (the packaged SmolLM2, default), 'synthetic-1b' (a random 1B-class "
    "llama in Q4_0) or 'synthetic-135m' (SmolLM2's shape in Q4_1), written once to ~/.cache/llmrpc/bench.",
)
@click.option("--reps", default=3, show_default=True, type=int)
@click.option("--servers", default="1,2,3", show_default=True, help="Server counts to run, e.g. 1,3.")
@click.option("--threads", default=os.cpu_count() or 1, show_default=True, type=int, help="Threads per process.")
@click.option("--pp", default=512, show_default=True, type=int)
@click.option("--tg", default=128, show_default=True, type=int)
@click.option(
    "--serving", default="1,4", show_default=True, help="Concurrent streams for the serving metrics ('' skips)."
)
@click.option(
    "--via-head/--no-via-head",
    default=True,
    show_default=True,
    help="Also run the largest farm the old way: activations through the head over gRPC.",
)
@click.option(
    "--head-sampled",
    default="max",
    show_default=True,
    help="Server counts to also decode the old way, the head sampling and sending every token "
    "(by default the servers generate on their own); 'max' is the largest count, '' none.",
)
@click.option(
    "--lan/--no-lan",
    default=True,
    show_default=True,
    help="Also decode through 3 servers on a simulated LAN (network namespaces, 0.5 ms each way, "
    "1 Gbit/s) next to loopback; needs root, skipped with a note otherwise.",
)
@click.option(
    "--llama-rpc/--no-llama-rpc",
    default=True,
    show_default=True,
    help="Also run llama.cpp's RPC backend on the same number of servers, when it is built "
    "(python -m llmrpc.bench.llama_rpc build).",
)
@click.option(
    "--device",
    default=None,
    help="The servers' ggml device (e.g. CUDA0; default: each server's best). On a device other than "
    "CPU, llama.cpp offloads all its layers to the same device.",
)
@click.option(
    "--load/--no-load", default=True, show_default=True, help="Also time loading the model (file, shipped, cached)."
)
@click.option(
    "--by-hand", default=0, show_default=True, type=click.IntRange(0, 8),
    help="Also N servers started one by one without the shared-host flags (as a user would on one "
    "machine): the head sees them share it and tells them to take turns.",
)  # fmt: skip
@click.option(
    "--trace",
    "trace_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Stamp every decode step in the head and the servers into this folder and print where a "
    "step's time goes (LLMRPC_TRACE; python -m llmrpc.bench.timeline FOLDER reads it again). "
    "The stamps cost the servers time (~2% of a token through three): make bench traces a "
    "short run of its own.",
)
@click.option("--out", default="bench/out/latest.json", show_default=True, type=click.Path())
def main(
    model: str | None,
    reps: int,
    servers: str,
    threads: int,
    pp: int,
    tg: int,
    serving: str,
    via_head: bool,
    head_sampled: str,
    lan: bool,
    llama_rpc: bool,
    device: str | None,
    load: bool,
    by_hand: int,
    trace_dir: str | None,
    out: str,
) -> None:
    """llama-bench-style prefill (pp) and decode (tg) through 1, 2 and 3 servers started on this
    machine, next to llama.cpp itself (llama-cpp-python, same process), in one interleaved run;
    then serving metrics for concurrent streams, a simulated LAN (as root), and load times.
    Decode is greedy generation as Farm.generate runs it (the servers on their own); as in
    llama-bench only the tokens' work is timed. Prints a table with ratios against llama.cpp,
    writes JSON and a PNG chart."""
    model = resolve_model(model)
    if device is not None:
        try:  # here, not in a server that would die at start with the same message
            find_device(device)
        except (ValueError, RuntimeError) as e:
            raise click.BadParameter(str(e), param_hint="--device") from None
    if trace_dir:
        start_trace(trace_dir)
    ticks0 = cpu_ticks()
    rng = np.random.default_rng(0)
    tokens = [1] + [int(t) for t in rng.integers(100, 10000, size=max(pp, tg))]
    concurrency = [int(c) for c in serving.split(",") if c]
    n_ctx = max(pp, tg, SERVING_TOKENS + 32) + 16  # the serving streams' prompt and tokens fit too
    gpu_layers = 0 if device is None or device.upper() == "CPU" else reference_gpu_layers(default=999)
    configs = [llama_cpp_config(model, threads, n_ctx, pp, gpu_layers)]
    farms: dict[int, Farm] = {}
    try:
        for n in [int(x) for x in servers.split(",") if x]:
            farms[n] = Farm(model, local=n, threads=threads, device=device, ctx_size=n_ctx,
                            max_sessions=max(concurrency or [1]))  # fmt: skip
            configs.append(farm_config(farms[n], f"llmrpc x{n}"))
        counts = [str(max(farms))] if head_sampled == "max" and farms else head_sampled.split(",")
        for n in [int(x) for x in counts if x and int(x) in farms]:
            configs.append(farm_config(farms[n], f"x{n} head-sampled", head_samples=True))
        if llama_rpc and farms:
            bins = bin_dir()
            if bins is None:
                print("llama.cpp RPC skipped: build it once with `python -m llmrpc.bench.llama_rpc build` (~15 min)")
            else:
                rpc = LlamaRpc(bins, model, max(farms), threads)
                configs.append(Config(f"llama.cpp RPC x{rpc.n}", lambda t: rpc.rate(len(t), 0),
                                      lambda t: rpc.rate(0, len(t)), rpc.close))  # fmt: skip
        if by_hand:
            configs.append(by_hand_config(model, by_hand, threads, device, n_ctx))
        if via_head and farms:
            n = max(farms)
            configs.append(farm_config(Farm(model, local=n, threads=threads, device=device, ctx_size=n_ctx,
                                            data_plane=False), f"x{n} via head"))  # fmt: skip
        results = measure_interleaved(configs, [("pp", pp), ("tg", tg)], tokens, reps)
        trace.configure(None)  # the timeline covers the steps measured above, not the serving streams,
        os.environ.pop(trace.ENV, None)  # nor the processes started later (the simulated LAN's)
        served: dict[int, list[ServingResult]] = {}
        for n, farm in farms.items():
            served[n] = [
                bench_serving(farm, c, SERVING_TOKENS, "Write a short story about a lighthouse keeper.")
                for c in concurrency
            ]
    finally:
        for c in configs:
            c.close()
    ticks1 = cpu_ticks()
    steal = (ticks1[1] - ticks0[1]) / max(1, ticks1[0] - ticks0[0])
    base = {r.test: r.tok_s_mean for r in results if r.config == "llama.cpp"}
    print(f"\nmodel: {Path(model).name}   threads/process: {threads}   reps: {reps}   host: {platform.node()}"
          f"   device: {device or 'best'}")  # fmt: skip
    print(
        f"CPU time stolen by the hypervisor during the run: {steal:.0%}"
        + ("  (figures unreliable)" if steal > 0.05 else "")
    )
    print("(configurations measured in turn, rep by rep; mean ± std over repetitions; paired: the mean")
    print(" and range of each repetition's ratio to llama.cpp's figure in the same repetition)")
    print(f"{'config':<18} {'test':<7} {'tok/s':>18} {'vs llama.cpp':>13}  {'paired':>17}")
    paired = paired_ratios(results)
    for r in results:
        ratio = r.tok_s_mean / base[r.test]
        p = paired[(r.config, r.test)]
        print(
            f"{r.config:<18} {r.test:<7} {r.tok_s_mean:>10.1f} ± {r.tok_s_std:<5.1f} {ratio:>12.2f}x  "
            f"{statistics.mean(p):>5.2f}x ({min(p):.2f}-{max(p):.2f})"
        )
    if concurrency:
        print(f"\nserving: {SERVING_TOKENS} tokens per stream (temperature 0.8)")
        print(f"{'config':<18} {'streams':>7} {'TTFT ms':>8} {'TPOT ms':>8} {'ITL p50':>8} {'ITL p99':>8} {'tok/s':>7}")
        for n, rows in served.items():
            for s in rows:
                print(
                    f"{'llmrpc x' + str(n):<18} {s.concurrency:>7} {s.time_to_first_token_seconds * 1e3:>8.1f} "
                    f"{s.time_per_output_token_seconds * 1e3:>8.1f} {s.inter_token_latency_p50_seconds * 1e3:>8.1f} "
                    f"{s.inter_token_latency_p99_seconds * 1e3:>8.1f} {s.output_tokens_per_second:>7.1f}"
                )
    lan_result = None
    if lan:
        why = lan_unavailable()
        if why:
            print(f"\nsimulated LAN skipped: {why}")
        else:
            lan_result = bench_lan(model, 3, threads, tg, min(pp, 128), reps)
            print_lan(lan_result)
    if trace_dir:  # the servers wrote their stamps as they stopped
        print_folder(trace_dir)
    load_times = bench_load(model) if load else None
    if load_times is not None:
        print_load(load_times)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model, "threads": threads, "device": device, "reps": reps, "steal_fraction": steal,
        "settings": settings(),
        "results": [asdict(r) | {"paired_ratios": paired[(r.config, r.test)]} for r in results],
        "load": None if load_times is None else asdict(load_times) | {
            "ship_rate": load_times.ship_rate, "copy_rate": load_times.copy_rate},
        "serving": {str(n): [asdict(s) for s in rows] for n, rows in served.items()},
        "lan": asdict(lan_result) if lan_result else None,
    }  # fmt: skip
    Path(out).write_text(json.dumps(payload, indent=2))
    chart = str(Path(out).with_suffix(".png"))
    draw_chart(results, chart)
    print(f"\nwrote {out} and {chart}", file=sys.stderr)


def start_trace(folder: str) -> None:
    """Servers started from now on stamp into ``folder`` (emptied first), and so does the head."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for old in Path(folder).glob("*.trace"):
        old.unlink()
    os.environ[trace.ENV] = folder
    trace.configure(folder)


def print_load(load: LoadTimes) -> None:
    print(f"\nload of all {load.tensor_bytes / 1e6:.1f} MB of tensors into one server")
    print(f"  from a local file     {load.local_file_s:6.2f} s")
    print(
        f"  shipped over loopback {load.shipped_s:6.2f} s  (push {load.push_s:.2f} s: {load.ship_rate / 1e6:.0f} MB/s)"
    )
    print(f"  from its cache        {load.cached_s:6.2f} s")
    print(f"  loopback TCP file copy of the same bytes: {load.copy_rate / 1e6:.0f} MB/s; "
          f"shipping runs at {load.ship_rate / load.copy_rate:.2f}x of it")  # fmt: skip


def draw_chart(results: list[Result], path: str) -> None:
    """tok/s by configuration, one panel per test, error bars = std over repetitions."""
    try:
        import matplotlib
    except ImportError:
        print(f"no chart: matplotlib is not installed (pip install matplotlib); {path} not drawn", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = sorted({r.test for r in results}, key=lambda t: (t[:2] != "pp", t))
    fig, axes = plt.subplots(1, len(tests), figsize=(5 * len(tests), 4))
    for ax, test in zip(list(getattr(axes, "flat", [axes])), tests, strict=False):
        rows = [r for r in results if r.test == test]
        ax.bar([r.config for r in rows], [r.tok_s_mean for r in rows], yerr=[r.tok_s_std for r in rows],
               color=["#888888"] + ["#3b7dd8"] * (len(rows) - 1))  # fmt: skip
        ax.set_title(test)
        ax.set_ylabel("tok/s")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("llmrpc vs llama.cpp (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
