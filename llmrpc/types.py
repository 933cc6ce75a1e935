"""Plain data shared by the head, the server and the wire codec (no compute, no transport)."""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = 3  # 2: STEP frames on the data plane; 3: binary TOKEN frames
# Seconds a server may go without answering before the head asks it for a health check, and
# for that check's answer: one that answers neither is hung (a stopped process, a machine gone
# whose connections linger) and is failed over like one that died, within 2.25 times this.
HUNG_AFTER = 5.0
KV_PAD = 256  # llama.cpp pads KV cells (and the attended length) to this, so graphs keep their shape


UBATCH = 512  # rows a sliding-window cache makes room for beyond its window (llama.cpp's n_ubatch)


def kv_cells(n_ctx: int) -> int:
    """KV cache cells a session of ``n_ctx`` positions gets: the server allocates this many
    and the planner budgets for it."""
    return max(KV_PAD, -(-n_ctx // KV_PAD) * KV_PAD)


def swa_cells(n_ctx: int, window: int) -> int:
    """Cells of a sliding-window layer's cache: the window and one batch, padded, at most the
    context's (llama.cpp's iSWA cache, one sequence)."""
    return min(kv_cells(n_ctx), -(-(window + UBATCH) // KV_PAD) * KV_PAD)


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # ggml's device name, e.g. "CPU", "CUDA0", "Metal"
    description: str
    kind: str  # "cpu", "gpu", "igpu" or "accel"
    memory_free: int
    memory_total: int


@dataclass(frozen=True)
class LoadedRange:
    model_path: str
    architecture: str
    layer_start: int
    layer_end: int  # half-open
    n_layer: int
    n_embd: int
    n_vocab: int
    weight_bytes: int
    model_hash: str = ""
    source: str = ""  # where the weights came from: cache, model-dir or path
    flash_attn: bool = False  # the attention the server runs (auto resolved)
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"

    @property
    def first(self) -> bool:
        return self.layer_start == 0

    @property
    def last(self) -> bool:
        return self.layer_end == self.n_layer


@dataclass(frozen=True)
class PrefixStart:
    """Where a new session's cache starts: the first ``rows`` positions of another session's
    cache on the same server (an open session's, or a closed one kept as a prefix), copied, or
    with ``take`` the kept cache itself adopted."""

    session_id: str
    rows: int
    take: bool = False


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    n_ctx: int
    cache_bytes: int
    evicted: tuple[str, ...] = ()  # kept prefixes the server freed to make room


@dataclass(frozen=True)
class ClosedSession:
    kept: bool  # its cache is kept as a prefix under its id
    evicted: tuple[str, ...] = ()  # kept prefixes the server freed to keep it


@dataclass(frozen=True)
class CachedSlice:
    model_hash: str
    layer_start: int
    layer_end: int
    bytes: int


@dataclass(frozen=True)
class ServerInfo:
    address: str
    protocol_version: int
    server_version: str
    device: DeviceInfo
    threads: int
    loaded: LoadedRange | None
    open_sessions: int
    memory_cap: int = 0
    memory_budget: int = 0
    bandwidth: float = 0.0
    matmul_flops: float = 0.0
    cached: tuple[CachedSlice, ...] = ()
    bytes_received: int = 0
    data_port: int = 0  # the data plane (0: this server has none)
    data_token: str = ""
    machine_id: str = ""  # servers reporting the same one compute on the same cores (llmrpc.machine)


@dataclass(frozen=True)
class MemoryParts:
    """What a server's memory holds, in bytes, by part; all bounded: weights by the plan,
    sessions by --max-sessions and their contexts, spare caches by the engine's count of them,
    prefixes by --prefix-cache, graphs by the kept graphs' count."""

    weights: int = 0  # the loaded layers' weights
    sessions: int = 0  # open sessions' KV caches
    spare: int = 0  # closed sessions' caches kept for the next sessions of their size
    prefixes: int = 0  # closed sessions' caches kept as prefixes
    graphs: int = 0  # built graphs: compute buffers and metadata

    @property
    def total(self) -> int:
        return self.weights + self.sessions + self.spare + self.prefixes + self.graphs


@dataclass(frozen=True)
class ServerHealth:
    serving: bool
    open_sessions: int
    native_steps: int  # generation steps computed through the native hop
    takes_turns: bool = False  # it shares its machine's cores with other servers, taking turns
    prefix_entries: int = 0  # closed sessions' caches kept as prefixes
    prefix_bytes: int = 0  # their bytes
    prefix_budget: int = 0  # the most bytes they may take
    slice_cache_bytes: int = 0  # disk taken by received slices (and uploads under way)
    slice_cache_budget: int = 0  # the most they may take (--cache-max)
    memory: MemoryParts = MemoryParts()  # what its memory holds
