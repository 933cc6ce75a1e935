"""Fuzzing at length: the cases of ``tests/test_fuzz.py`` (llmrpc/bench/fuzz_cases.py), many more
of them, against live servers and an API head on this machine; cases run per surface and their
outcomes, then whether a well-formed request still gets llama.cpp's logits.

``llmrpc-bench fuzz --cases 10000 --out bench/out/fuzz.json``
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

# the share of the cases each surface gets (as the test's CASES)
SHARES = {"grpc": 0.28, "before_auth": 0.14, "after_auth": 0.33, "upload": 0.08, "api": 0.17}
EXAMPLES_KEPT = 5  # cases kept in the JSON for each bad outcome


def _run_surface(targets: Any, surface: str, n: int) -> dict[str, Any]:
    from hypothesis import HealthCheck, given, settings

    from llmrpc.bench import fuzz_calls as fk
    from llmrpc.bench import fuzz_cases as fc
    from llmrpc.bench.fuzz_targets import BAD, Outcome

    strategy, send = {
        "grpc": (fk.grpc_cases(), targets.grpc), "before_auth": (fc.before_auth(), targets.data),
        "after_auth": (fc.after_auth, targets.data), "upload": (fk.upload_cases, targets.upload),
        "api": (fk.api_cases, targets.http),
    }[surface]  # fmt: skip
    seen: Counter[str] = Counter()
    bad: list[str] = []
    dead = [False]

    @settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=strategy)
    def run(case: Any) -> None:
        if dead[0]:
            return  # a process died: the rest of this surface cannot run
        try:
            outcome = send(case)
        except OSError as e:  # (cannot even connect)
            outcome = Outcome.CRASHED
            bad.append(f"{e}: {case!r}"[:2000])
        seen[outcome.value] += 1
        if outcome in BAD:
            bad.append(f"{outcome.value}: {case!r}"[:2000])
            dead[0] = outcome == Outcome.CRASHED

    t0 = time.perf_counter()
    if surface in ("grpc", "before_auth", "after_auth", "upload"):
        targets.prepare()
    run()
    return {"cases": sum(seen.values()), "seconds": round(time.perf_counter() - t0, 1), "outcomes": dict(seen),
            "bad": bad[: EXAMPLES_KEPT * 2]}  # fmt: skip


def _tracebacks(log: Path) -> dict[str, int]:
    """The exceptions a process logged with their tracebacks (an input no check refused), by
    the line that names them."""
    found: Counter[str] = Counter()
    within = False
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("Traceback (most recent call last)"):
            within = True
        elif within and line and not line[0].isspace():
            found[line[:120]] += 1
            within = False
    return dict(found.most_common())


@click.command()
@click.option("--cases", default=10_000, show_default=True, type=click.IntRange(1),
              help="Cases in all, shared among the surfaces: gRPC 28%, data port before HELLO 14% and after 33%, "
              "weight uploads 8%, API bodies 17%.")  # fmt: skip
@click.option("--out", default="bench/out/fuzz.json", show_default=True, type=click.Path(),
              help="Where to write the figures as JSON.")  # fmt: skip
def fuzz(cases: int, out: str) -> None:
    """Hostile gRPC calls, data-plane frames, upload frames and API bodies against live servers: each case
    answered, refused, closed, crashed or hung; then a well-formed request's logits against llama.cpp's. The
    servers hold a tiny random llama model written for the run."""
    try:
        from llmrpc.bench.fuzz_targets import live_targets, reference_check
    except ImportError as e:  # hypothesis is a dev dependency
        raise click.ClickException(f"{e}: install the dev extras (pip install -e '.[dev]')") from e
    from llmrpc.model.synthetic import SyntheticSpec, write_gguf

    with tempfile.TemporaryDirectory(prefix="llmrpc-fuzz-") as tmp:
        work = Path(tmp)
        (work / "models").mkdir()
        path = write_gguf(work / "models" / "tiny.gguf", SyntheticSpec(seed=7))
        t0 = time.perf_counter()
        with live_targets(path, work) as targets:
            surfaces = {s: _run_surface(targets, s, max(1, round(cases * share))) for s, share in SHARES.items()}
            for surface, r in surfaces.items():
                shown = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items(), key=lambda kv: -kv[1]))
                click.echo(f"{surface:12s} {r['cases']:6d} cases in {r['seconds']:6.1f} s: {shown}")
            check = reference_check(targets)
            logs = {p.stem: _tracebacks(p) for p in work.glob("*.log")}
            statuses = dict(targets.statuses.most_common())
            alive = all(p.alive() for p in (targets.target.process, targets.peer.process, targets.api))
    total = sum(r["cases"] for r in surfaces.values())
    bad = sum(r["outcomes"].get(k, 0) for r in surfaces.values() for k in ("crashed", "hung", "lost", "fault"))
    click.echo(
        f"{total} cases, {bad} crashed, hung, lost what the server held or met an unchecked exception, in {time.perf_counter() - t0:.0f} s; processes alive: {alive}"
    )
    click.echo(f"afterwards: logits equal to llama.cpp's: {check['logits_equal']}, the API's greedy text llama.cpp's: "
               f"{check['api_text_equal']}")  # fmt: skip
    result = {
        "cases": total,
        "bad": bad,
        "alive": alive,
        "surfaces": surfaces,
        **check,
        "statuses": statuses,
        "tracebacks": logs,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    if any(logs.values()):
        click.echo("exceptions logged with a traceback (gRPC logs one for each request it cannot parse):")
    for name, found in logs.items():
        for line, n in found.items():
            click.echo(f"  {name}.log: {n} x {line}")
    click.echo(f"wrote {out}")
