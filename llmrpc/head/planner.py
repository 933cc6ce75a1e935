"""Layer assignment: a pure function from the model's layout and the servers' reports to
contiguous half-open layer ranges."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerBudget:
    address: str
    memory_free: int  # bytes the server may use


@dataclass(frozen=True)
class Assignment:
    address: str
    start: int
    end: int  # half-open
    weight_bytes: int
    memory_free: int


class PlanError(ValueError):
    """The model does not fit; the message gives bytes needed and available per server."""


def split_by_memory(
    layer_bytes: list[int], input_bytes: int, output_bytes: int, servers: list[ServerBudget]
) -> list[Assignment]:
    """Contiguous ranges with layer counts in proportion to each server's free memory.

    ``layer_bytes[i]`` is what layer i costs (weights plus its KV cache); the first stage
    also carries ``input_bytes`` and the last ``output_bytes``. Servers keep their order; a
    server is left out only when there are more servers than layers (the smallest go).
    """
    n_layer = len(layer_bytes)
    if n_layer == 0 or not servers:
        raise PlanError("nothing to plan: the model has no layers or no server was given")
    used = sorted(servers, key=lambda s: -s.memory_free)[:n_layer]
    used = [s for s in servers if s in used]
    total = sum(s.memory_free for s in used)
    bounds = [0]
    acc = 0
    for i, s in enumerate(used[:-1]):
        acc += s.memory_free
        ideal = round(n_layer * acc / total) if total else (i + 1) * n_layer // len(used)
        lo, hi = bounds[-1] + 1, n_layer - (len(used) - 1 - i)
        bounds.append(min(max(ideal, lo), hi))
    bounds.append(n_layer)
    plan = []
    for i, s in enumerate(used):
        start, end = bounds[i], bounds[i + 1]
        need = sum(layer_bytes[start:end]) + (input_bytes if start == 0 else 0)
        need += output_bytes if end == n_layer else 0
        plan.append(Assignment(s.address, start, end, need, s.memory_free))
    short = [a for a in plan if a.weight_bytes > a.memory_free]
    if short:
        lines = ", ".join(
            f"{a.address} needs {a.weight_bytes} bytes for layers [{a.start}, {a.end}) but has {a.memory_free}"
            for a in short
        )
        raise PlanError(f"the model does not fit: {lines}")
    return plan
