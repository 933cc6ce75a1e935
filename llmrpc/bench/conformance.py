"""Conformance: every supported family, as a small random model in the tensor types people
download, through 1, 2 and 3 local servers against llama.cpp on the same machine.

For each family and type it writes the model (F32/F16/Q8_0 with gguf-py; K-quant mixes such
as Q4_K_M with llama.cpp's own quantizer), takes llama.cpp's logits for a prompt and its
greedy continuation, then llmrpc's through 1, 2 and 3 servers, and reports the largest logit
difference relative to the largest logit and whether the greedy tokens are identical. The
table it prints is the support matrix of the README.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

from llmrpc.farm import Farm
from llmrpc.head.local import LocalServers
from llmrpc.model import synthetic
from llmrpc.model.gguf_model import read_model
from llmrpc.reference import extra_bufts_enabled, reference_llama
from llmrpc.sampling import SamplingParams

logger = logging.getLogger(__name__)

TYPES = ("F32", "F16", "Q8_0", "Q4_K_M")
# Big enough for K-quants' 256-value blocks in every matrix of the dense families.
SHAPE = {"n_embd": 256, "n_ff": 512, "n_head": 4, "head_dim": 64, "n_ff_exp": 256}
N_PROMPT, N_GREEDY = 32, 32


@dataclass(frozen=True)
class Row:
    family: str  # the synthetic family's name (llama-moe: llama with Mixtral-style experts)
    arch: str  # its general.architecture
    type: str
    servers: int
    stages: int  # stages the plan made (the servers it used)
    max_rel_diff: float  # max |Δlogit| / max |logit| over the prompt's positions
    greedy_equal: bool  # N_GREEDY greedy tokens identical to llama.cpp's


def model_file(folder: Path, family: str, ftype: str) -> str:
    """The family's conformance model in ``ftype``, written once into ``folder``."""
    path = folder / f"{family}-{ftype.lower()}.gguf"
    if path.exists():
        return str(path)
    defaults = synthetic.FAMILIES[family].defaults or {}
    shape = {k: v for k, v in SHAPE.items() if k != "n_ff_exp" or "n_ff_exp" in defaults}  # (llama's experts: n_ff)
    direct = ftype in ("F32", "F16", "Q8_0")
    spec = synthetic.family_spec(family, weight_type=ftype if direct else "F32", seed=3, **shape)
    if direct:
        return synthetic.write_gguf(path, spec)
    src = synthetic.write_gguf(folder / f"{family}-f32-src.gguf", spec)
    synthetic.quantize_gguf(src, path, ftype)
    os.unlink(src)
    return str(path)


def check(path: str, family: str, ftype: str, addresses: Sequence[str]) -> list[Row]:
    """One model against llama.cpp through 1..len(addresses) servers."""
    rng = np.random.default_rng(17)
    n_vocab = read_model(path).hparams.n_vocab
    prompt = [1] + [int(t) for t in rng.integers(3, n_vocab, size=N_PROMPT - 1)]
    llm = reference_llama(path, n_ctx=256, logits_all=True, n_threads=2)
    llm.eval(prompt)
    ref = np.array(llm.scores[: len(prompt)], dtype=np.float32)
    llm = reference_llama(path, n_ctx=256, n_threads=2)
    want = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        want.append(int(t))
        if len(want) == N_GREEDY:
            break
    rows = []
    for n in range(1, len(addresses) + 1):
        with Farm(path, addresses[:n], ctx_size=256) as farm:
            got = farm.logits(prompt)
            tokens = list(farm.generate_tokens(prompt, N_GREEDY, SamplingParams(temperature=0), stop_at_eog=False))
            stages = len(farm.plan)
        diff = float(np.abs(got - ref).max() / np.abs(ref).max())
        rows.append(Row(family, read_model(path).arch, ftype, n, stages, diff, tokens == want))
    return rows


def run(families: Sequence[str], types: Sequence[str], n_servers: int, folder: Path) -> list[Row]:
    rows: list[Row] = []
    caches = [["--cache-dir", str(folder / f"cache{i}")] for i in range(n_servers)]
    with LocalServers(n_servers, threads=2, extra_args=["--no-calibrate"], per_server_args=caches) as local:
        for family in families:
            for ftype in types:
                started = time.monotonic()
                path = model_file(folder, family, ftype)
                got = check(path, family, ftype, local.addresses)
                rows += got
                click.echo(f"{family:10s} {ftype:7s} {_cells(got)}  ({time.monotonic() - started:.1f} s)", err=True)
    return rows


def _cells(rows: Sequence[Row]) -> str:
    return "  ".join(
        f"x{r.servers}: {'0' if r.max_rel_diff == 0 else f'{r.max_rel_diff:.1e}'} {'=' if r.greedy_equal else '!='}"
        for r in rows
    )


def markdown(rows: Sequence[Row]) -> str:
    """The support matrix: the families with the same tensor types and verdicts in one line."""
    by_family: dict[str, list[Row]] = {}
    for r in rows:
        by_family.setdefault(r.family, []).append(r)
    lines: dict[tuple[str, str, str], list[str]] = {}
    for family, rs in by_family.items():
        arch = f"`{rs[0].arch}`" if family == rs[0].arch else f"`{rs[0].arch}` with experts"
        types = ", ".join(sorted({r.type for r in rs}, key=lambda t: TYPES.index(t) if t in TYPES else len(TYPES)))
        worst = max(r.max_rel_diff for r in rs)
        logits = "identical" if worst == 0 else f"max Δ {worst:.1e} of max logit"
        greedy = "identical" if all(r.greedy_equal for r in rs) else "differs"
        lines.setdefault((types, logits, greedy), []).append(arch)
    out = [
        "| families (`general.architecture`) | tensor types | logits through 1 / 2 / 3 servers | greedy 32 tokens |",
        "| --- | --- | --- | --- |",
    ]
    out += [f"| {', '.join(archs)} | {t} | {lg} | {gr} |" for (t, lg, gr), archs in lines.items()]
    return "\n".join(out)


@click.command()
@click.option("--families", default=",".join(synthetic.FAMILIES), show_default=True, help="Families to check.")
@click.option("--types", "types_", default=",".join(TYPES), show_default=True, help="Tensor types to check.")
@click.option("--servers", "n_servers", default=3, show_default=True, type=click.IntRange(1, 8))
@click.option("--out", default="bench/out/conformance.json", show_default=True, type=click.Path())
@click.option("--keep", type=click.Path(file_okay=False), default=None, help="Keep the models in this folder.")
def conformance(families: str, types_: str, n_servers: int, out: str, keep: str | None) -> None:
    """Every supported family, as a small random model in each tensor type, through 1..N local
    servers against llama.cpp (llama-cpp-python) on this machine: max |Δlogit| / max |logit| and
    whether 32 greedy tokens are identical. Prints the support matrix and writes JSON."""
    names = [f.strip() for f in families.split(",") if f.strip()]
    unknown = [f for f in names if f not in synthetic.FAMILIES]
    if unknown:
        raise click.BadParameter(f"unknown families {unknown}; known: {', '.join(synthetic.FAMILIES)}")
    kinds = [t.strip() for t in types_.split(",") if t.strip()]
    bad = [t for t in kinds if t not in synthetic.FTYPES]
    if bad:
        raise click.BadParameter(f"unknown types {bad}; known: {', '.join(synthetic.FTYPES)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows = run(names, kinds, n_servers, folder)
    table = markdown(rows)
    click.echo(table)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    report = {
        "what": "llmrpc against llama.cpp on small random models of every family (llmrpc-bench conformance)",
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "reference_extra_buffer_types": extra_bufts_enabled(),
        "prompt_tokens": N_PROMPT,
        "greedy_tokens": N_GREEDY,
        "rows": [asdict(r) for r in rows],
        "markdown": table,
    }
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    click.echo(f"wrote {out}", err=True)
    failed = [r for r in rows if not r.greedy_equal or r.stages != r.servers]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(rows)} checks differ from llama.cpp or made fewer stages")
