"""Architectures as data: GGUF key templates, tensor-name templates, per-family rows.

Adding a model family that reuses an existing graph builder is adding a row to
``ARCHITECTURES``; a new family adds a builder in its own module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TensorKind(enum.Enum):
    TOKEN_EMBD = "token_embd"
    OUTPUT_NORM = "output_norm"
    OUTPUT = "output"
    ROPE_FREQS = "rope_freqs"
    ATTN_NORM = "blk.{bid}.attn_norm"
    ATTN_Q = "blk.{bid}.attn_q"
    ATTN_K = "blk.{bid}.attn_k"
    ATTN_V = "blk.{bid}.attn_v"
    ATTN_OUT = "blk.{bid}.attn_output"
    FFN_NORM = "blk.{bid}.ffn_norm"
    FFN_GATE = "blk.{bid}.ffn_gate"
    FFN_UP = "blk.{bid}.ffn_up"
    FFN_DOWN = "blk.{bid}.ffn_down"


class Role(enum.Enum):
    """Where a tensor lives in a layer range: input (first stage), repeating, output (last)."""

    INPUT = "input"
    REPEATING = "repeating"
    OUTPUT = "output"
    SHARED = "shared"  # needed by every stage (e.g. llama3 rope frequency factors)


@dataclass(frozen=True)
class TensorSpec:
    kind: TensorKind
    role: Role
    required: bool = True

    def name(self, bid: int | None = None, suffix: str = "weight") -> str:
        base = self.kind.value.format(bid=bid) if bid is not None else self.kind.value
        return f"{base}.{suffix}"


@dataclass(frozen=True)
class Architecture:
    """One row: which graph builder runs it and which tensors it has."""

    name: str
    builder: str  # the graph-builder family in llmrpc.model.graphs
    rope_type: int  # GGML_ROPE_TYPE_*
    tensors: tuple[TensorSpec, ...]
    # bias tensors that may appear next to a weight (".bias" suffix), all optional
    optional_biases: tuple[TensorKind, ...] = ()


_LLAMA_TENSORS = (
    TensorSpec(TensorKind.TOKEN_EMBD, Role.INPUT),
    TensorSpec(TensorKind.OUTPUT_NORM, Role.OUTPUT),
    TensorSpec(TensorKind.OUTPUT, Role.OUTPUT, required=False),  # absent: tied to token_embd
    TensorSpec(TensorKind.ROPE_FREQS, Role.SHARED, required=False),
    TensorSpec(TensorKind.ATTN_NORM, Role.REPEATING),
    TensorSpec(TensorKind.ATTN_Q, Role.REPEATING),
    TensorSpec(TensorKind.ATTN_K, Role.REPEATING),
    TensorSpec(TensorKind.ATTN_V, Role.REPEATING),
    TensorSpec(TensorKind.ATTN_OUT, Role.REPEATING),
    TensorSpec(TensorKind.FFN_NORM, Role.REPEATING),
    TensorSpec(TensorKind.FFN_GATE, Role.REPEATING),
    TensorSpec(TensorKind.FFN_UP, Role.REPEATING),
    TensorSpec(TensorKind.FFN_DOWN, Role.REPEATING),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "llama", 0, _LLAMA_TENSORS),
    "mistral": Architecture("mistral", "llama", 0, _LLAMA_TENSORS),
}


class UnsupportedArchitectureError(ValueError):
    pass


def architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(f"architecture {name!r} is not supported (supported: {known})") from None
