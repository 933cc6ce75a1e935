"""What each server of a farm holds and can do, from its Hello and Health answers
(``llmrpc-head status``). Asking changes nothing on the servers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from llmrpc.auth import ClientSecurity
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.placement import format_size as size
from llmrpc.types import ServerHealth, ServerInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerStatus:
    address: str
    info: ServerInfo | None = None
    health: ServerHealth | None = None
    error: str = ""  # why the server did not answer ("" when it did)

    @property
    def weight_bytes(self) -> int:
        """Memory its loaded layers' weights take."""
        return self.info.loaded.weight_bytes if self.info and self.info.loaded else 0

    @property
    def seconds_per_token(self) -> float:
        """Time to read its loaded weights once at its measured bandwidth: a decoded token's
        cost through its layers (0: nothing loaded, or speed not measured)."""
        if not self.info or not self.info.bandwidth or not self.weight_bytes:
            return 0.0
        return self.weight_bytes / self.info.bandwidth

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address, "ok": not self.error}
        if self.error:
            out["error"] = self.error
        if self.info is not None:
            info = asdict(self.info)
            info.pop("data_token")  # a credential: only heads that ask for it get it
            out["info"] = info
            out["weight_bytes"] = self.weight_bytes
            out["seconds_per_token"] = self.seconds_per_token
        if self.health is not None:
            out["health"] = asdict(self.health)
        return out


def server_status(address: str, security: ClientSecurity, timeout: float) -> ServerStatus:
    client = StageClient(address, connect_timeout=timeout, security=security)
    try:
        return ServerStatus(address, client.hello(), client.health())
    except StageError as e:
        logger.info("%s", e)
        return ServerStatus(address, error=str(e))
    finally:
        client.close()


def farm_status(addresses: Sequence[str], security: ClientSecurity, timeout: float) -> list[ServerStatus]:
    """Every server's status, asked at once; in the order given."""
    if not addresses:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(addresses))) as pool:
        return list(pool.map(lambda a: server_status(a, security, timeout), addresses))


def _layers(info: ServerInfo) -> str:
    r = info.loaded
    if r is None:
        return "-"
    return f"[{r.layer_start}, {r.layer_end}) of {r.n_layer} {r.architecture} {r.model_hash[:8]}".rstrip()


def _cached(info: ServerInfo) -> str:
    if not info.cached:
        return "-"
    return f"{len(info.cached)} ({size(sum(c.bytes for c in info.cached))})"


def _speed(s: ServerStatus) -> str:
    assert s.info is not None
    if not s.info.bandwidth:
        return "not measured"
    text = f"{s.info.bandwidth / 1e9:.1f} GB/s"
    return text + (f", {s.seconds_per_token * 1e3:.2f} ms/token" if s.seconds_per_token else "")


def _row(s: ServerStatus) -> tuple[str, ...]:
    i, h = s.info, s.health
    assert i is not None and h is not None
    d = i.device
    return (
        s.address, f"{d.name} ({d.kind}, {size(d.memory_total)})", _layers(i), str(h.open_sessions),
        size(s.weight_bytes), size(h.memory.sessions + h.memory.spare), size(h.memory.graphs), size(i.memory_budget),
        _cached(i), f"{h.prefix_entries} ({size(h.prefix_bytes)})", str(h.native_steps), _speed(s),
        "yes" if h.takes_turns else "no",
    )  # fmt: skip


HEADER = ("server", "device", "layers", "sessions", "weights", "KV", "graphs", "budget", "cached", "prefixes", "C steps",
          "speed", "turns")  # fmt: skip


def format_status(rows: Sequence[ServerStatus]) -> str:
    """A table: weights is the loaded weights; KV the open sessions' caches and those kept for
    new sessions; graphs the built graphs' buffers (at most 16 decode graphs kept); budget what the server can give a plan (its --mem cap,
    or its device's free memory and what it holds); speed its measured weight-read bandwidth and
    what reading its loaded weights once takes; prefixes the closed sessions' caches it keeps for later
    ones; C steps the generation steps taken in the native hop; turns whether it takes turns on its
    machine's cores with other servers."""
    table = [HEADER] + [_row(s) for s in rows if not s.error]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines += [f"{s.address}: {s.error}" for s in rows if s.error]
    return "\n".join(lines)
