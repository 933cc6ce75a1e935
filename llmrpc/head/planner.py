"""Layer assignment: a pure function from the model's layout and the servers' reports to
contiguous half-open layer ranges.

Each stage's budget is exact bytes: its layers' tensors from the GGUF, their KV cache for the
requested context and sessions, a compute buffer, and the input tensors on the first stage
and the output tensors on the last. Among the assignments that fit, the planner takes the
one whose slowest stage is fastest (a stage's time is the bytes it reads per token over its
measured bandwidth), so a slow device gets fewer layers, or none when it would only slow the
pipeline down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmrpc.types import kv_cells, swa_cells

Q4_0_BYTES_PER_ELEMENT = 18 / 32  # the calibration multiplies Q4_0 weights
HOP_SECONDS = 0.0005  # per-stage cost of passing activations on, so idle-ish stages are not free


@dataclass(frozen=True)
class ModelLayout:
    n_layer: int
    layer_bytes: tuple[int, ...]  # weights of each layer
    input_bytes: int  # token embeddings: the first stage
    output_bytes: int  # output norm and matrix: the last stage
    layer_kv_cell_bytes: tuple[int, ...]  # K and V of one position, per layer
    n_embd: int
    n_ff: int
    n_head: int
    n_vocab: int
    shared_bytes: int = 0  # tensors every stage holds (e.g. llama3 rope factors)
    # Work per token, in weight elements (a Q8_0 and a Q4_1 element cost about the same to
    # multiply on a CPU, though their bytes differ). Empty: use bytes as the measure of work.
    # For a mixture of experts, the elements of the experts a token uses (memory counts all).
    layer_elements: tuple[int, ...] = ()
    output_elements: int = 0
    layer_windows: tuple[int, ...] = ()  # sliding window of each layer (0 or empty: full attention)

    def layer_kv_bytes(self, il: int, ctx_size: int) -> int:
        """One session's K and V of layer ``il``: a sliding-window layer keeps its window."""
        window = self.layer_windows[il] if self.layer_windows else 0
        return self.layer_kv_cell_bytes[il] * (swa_cells(ctx_size, window) if window else kv_cells(ctx_size))


@dataclass(frozen=True)
class ServerReport:
    address: str
    device: str
    memory_free: int  # bytes this server may use (its --mem cap applied)
    bandwidth: float = 0.0  # bytes/s at which it reads weights (0: unknown, treated as equal)


@dataclass(frozen=True)
class StagePlan:
    address: str
    device: str
    start: int
    end: int  # half-open
    weight_bytes: int
    kv_bytes: int
    compute_bytes: int
    memory_free: int
    seconds: float  # estimated time per decoded token

    @property
    def need(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.compute_bytes

    @property
    def free_after(self) -> int:
        return self.memory_free - self.need


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]
    left_out_reasons: dict[str, str] = field(default_factory=dict)  # servers given no layers, and why

    @property
    def left_out(self) -> tuple[str, ...]:
        return tuple(self.left_out_reasons)

    @property
    def bottleneck_seconds(self) -> float:
        return max(s.seconds for s in self.stages)


class PlanError(ValueError):
    """The model does not fit; the message gives bytes needed and available per server."""


def compute_bytes(m: ModelLayout, ctx_size: int, n_batch: int, last: bool) -> int:
    """Activations of one batch through one layer (the graph allocator reuses them across
    layers): hidden, norm, Q/K/V, FFN gate and up, attention scores; logits on the last stage."""
    cells = kv_cells(ctx_size)
    per_layer = 4 * n_batch * (6 * m.n_embd + 3 * m.n_ff) + 4 * cells * n_batch * m.n_head
    return per_layer + (4 * m.n_vocab * n_batch if last else 0)


def plan(
    m: ModelLayout,
    servers: Sequence[ServerReport],
    *,
    ctx_size: int,
    max_sessions: int = 1,
    n_batch: int = 512,
    hop_seconds: float = HOP_SECONDS,
) -> Plan:
    if m.n_layer <= 0 or not servers:
        raise PlanError("nothing to plan: the model has no layers or no server was given")
    n = m.n_layer
    prefix = [0]
    for b in m.layer_bytes:
        prefix.append(prefix[-1] + b)
    kv_prefix = [0]
    for il in range(n):
        kv_prefix.append(kv_prefix[-1] + m.layer_kv_bytes(il, ctx_size) * max_sessions)
    known = [s.bandwidth for s in servers if s.bandwidth > 0]
    default_bw = min(known) if known else 1e9
    # Work per token: elements scaled to Q4_0 bytes (what the calibration measures), or bytes.
    if m.layer_elements:
        work = [0.0]
        for e in m.layer_elements:
            work.append(work[-1] + e * Q4_0_BYTES_PER_ELEMENT)
        output_work = m.output_elements * Q4_0_BYTES_PER_ELEMENT
    else:
        work = [float(x) for x in prefix]
        output_work = float(m.output_bytes)

    def stage(s: ServerReport, a: int, b: int) -> StagePlan:
        weights = prefix[b] - prefix[a] + (m.input_bytes if a == 0 else 0) + (m.output_bytes if b == n else 0)
        weights += m.shared_bytes
        # the first stage only gathers rows of the embeddings: they cost memory, not work
        read = work[b] - work[a] + (output_work if b == n else 0.0)
        bw = s.bandwidth if s.bandwidth > 0 else default_bw
        return StagePlan(
            s.address, s.device, a, b, weights, kv_prefix[b] - kv_prefix[a],
            compute_bytes(m, ctx_size, n_batch, b == n), s.memory_free, read / bw + hop_seconds,
        )  # fmt: skip

    inf = (math.inf, math.inf)
    # best[j]: (slowest stage, sum of stage times) covering layers [0, j) with the servers so far
    best: list[tuple[float, float]] = [(0.0, 0.0)] + [inf] * n
    choice: list[list[int | None]] = []  # per server: for each j, the k it starts at (None: skipped)
    for s in servers:
        nxt = list(best)
        pick: list[int | None] = [None] * (n + 1)
        for j in range(1, n + 1):
            for k in range(j):
                if best[k] == inf:
                    continue
                st = stage(s, k, j)
                if st.need > s.memory_free:
                    continue
                cand = (max(best[k][0], st.seconds), best[k][1] + st.seconds)
                if cand < nxt[j]:
                    nxt[j], pick[j] = cand, k
        best = nxt
        choice.append(pick)
    if best[n] == inf:
        raise PlanError(_no_fit_message(m, servers, stage))
    stages: list[StagePlan] = []
    j = n
    for i in range(len(servers) - 1, -1, -1):
        start = choice[i][j]
        if start is not None and j > 0:
            stages.append(stage(servers[i], start, j))
            j = start
    stages.reverse()
    used = {st.address for st in stages}
    left = [s for s in servers if s.address not in used]
    middle = 1 if n > 2 else 0
    reasons = {
        s.address: (
            f"not even one layer fits: it needs {stage(s, middle, middle + 1).need} bytes, {s.memory_free} are free"
            if stage(s, middle, middle + 1).need > s.memory_free
            else "it would only slow the pipeline down"
        )
        for s in left
    }
    return Plan(tuple(stages), reasons)


def _no_fit_message(m: ModelLayout, servers: Sequence[ServerReport], stage: object) -> str:
    total = sum(m.layer_bytes) + m.input_bytes + m.output_bytes
    offered = ", ".join(f"{s.address} has {s.memory_free} bytes free" for s in servers)
    return (
        f"the model does not fit: its weights alone are {total} bytes, plus KV cache and compute "
        f"buffers per stage; {offered} (total {sum(s.memory_free for s in servers)} bytes). "
        "Add servers, raise their --mem caps, or lower --ctx-size."
    )
