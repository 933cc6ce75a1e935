"""Architectures as data: where each GGUF tensor lives in a layer range, and which family
(graph builder and hyper-parameter rules) runs an architecture.

Tensor names come from gguf-py's tables (``TENSOR_NAMES``): a tensor ``blk.{i}.*`` belongs
to layer i; the few that belong to no layer are the input (token embeddings: the first
stage), the output (output norm and matrix: the last stage) or shared (rope factors: every
stage). Adding a family is a module under :mod:`llmrpc.model.families` and a row in its
``FAMILIES`` table.
"""

from __future__ import annotations

import enum
import re

from gguf.constants import MODEL_TENSOR, TENSOR_NAMES


class Role(enum.Enum):
    """Where a tensor lives in a layer range: input (first stage), repeating, output (last)."""

    INPUT = "input"
    REPEATING = "repeating"
    OUTPUT = "output"
    SHARED = "shared"  # needed by every stage (e.g. llama3 rope frequency factors)
    UNUSED = "unused"  # in the file, read by no family llmrpc runs (e.g. a vision tower's)


_ROLES = {
    MODEL_TENSOR.TOKEN_EMBD: Role.INPUT,
    MODEL_TENSOR.TOKEN_EMBD_NORM: Role.INPUT,
    MODEL_TENSOR.TOKEN_TYPES: Role.INPUT,
    MODEL_TENSOR.POS_EMBD: Role.INPUT,
    MODEL_TENSOR.OUTPUT: Role.OUTPUT,
    MODEL_TENSOR.OUTPUT_NORM: Role.OUTPUT,
    MODEL_TENSOR.ROPE_FREQS: Role.SHARED,
    MODEL_TENSOR.ROPE_FACTORS_LONG: Role.SHARED,
    MODEL_TENSOR.ROPE_FACTORS_SHORT: Role.SHARED,
}
_BY_NAME = {TENSOR_NAMES[kind]: role for kind, role in _ROLES.items()}
_EXPERTS = re.compile(
    "|".join(
        TENSOR_NAMES[k].replace("{bid}", r"\d+").replace(".", r"\.")
        for k in (
            MODEL_TENSOR.FFN_UP_EXP,
            MODEL_TENSOR.FFN_GATE_EXP,
            MODEL_TENSOR.FFN_DOWN_EXP,
            MODEL_TENSOR.FFN_GATE_UP_EXP,
        )
    )  # fmt: skip
)
_LAYER = re.compile(r"blk\.(\d+)\.")


def tensor_name(kind: MODEL_TENSOR, il: int | None = None, suffix: str = "weight") -> str:
    """The GGUF name of a tensor kind (of layer ``il``): ``blk.3.attn_q.weight``."""
    base = TENSOR_NAMES[kind]
    return f"{base.format(bid=il) if il is not None else base}.{suffix}"


def tensor_role(name: str) -> tuple[Role, int | None]:
    """A tensor's role and, for a repeating one, its layer."""
    m = _LAYER.match(name)
    if m:
        return Role.REPEATING, int(m.group(1))
    base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    return _BY_NAME.get(base, Role.UNUSED), None


def is_expert_tensor(name: str) -> bool:
    """Whether a tensor holds all experts of a layer (a token uses only some of them)."""
    return _EXPERTS.match(name) is not None


class UnsupportedArchitectureError(ValueError):
    pass


def supported_message(name: str, known: list[str]) -> str:
    return f"architecture {name!r} is not supported (supported: {', '.join(sorted(known))})"
