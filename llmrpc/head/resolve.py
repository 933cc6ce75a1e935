"""Server lists as operators write them, turned into the addresses a plan is made over:

- ``host:port``: one server, as written (gRPC resolves the name itself);
- ``dns:NAME:PORT``: every address NAME resolves to (a Kubernetes headless Service gives one per
  ready pod), each at PORT;
- ``lws:PORT``: the workers of this pod's LeaderWorkerSet group, from the variables LeaderWorkerSet
  sets in every pod (``LWS_LEADER_ADDRESS``, ``LWS_GROUP_SIZE``): worker i of the group whose
  leader is ``NAME-G.SUBDOMAIN`` is ``NAME-G-i.SUBDOMAIN``.

A farm resolves its list again whenever it plans again, so that pods that came back with new
addresses, or new pods behind a name, take part in the new plan.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmrpc.types import join_address, split_address

logger = logging.getLogger(__name__)

DNS = "dns:"
LWS = "lws:"
POLL_SECONDS = 1.0  # between resolutions while waiting for servers


@dataclass(frozen=True)
class Name:
    """A name whose addresses are servers: ``each`` (a worker's own name) must resolve; a
    ``dns:`` name may resolve to any number of addresses."""

    host: str
    port: int
    each: bool


def check_spec(spec: str) -> None:
    """Raise ValueError when ``spec`` is none of the forms above."""
    if spec.startswith(LWS):
        _port(spec[len(LWS) :], spec)
    elif spec.startswith(DNS):
        split_address(spec[len(DNS) :])
    else:
        split_address(spec)


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{spec!r}: the port must be a number within 1..65535")
    return int(text)


def lws_workers(port: int, env: Mapping[str, str]) -> list[str]:
    """``host:port`` of every worker of this LeaderWorkerSet group (the leader is index 0)."""
    leader, size = env.get("LWS_LEADER_ADDRESS", ""), env.get("LWS_GROUP_SIZE", "")
    if not leader or not size.isdigit():
        raise ValueError("lws: needs LWS_LEADER_ADDRESS and LWS_GROUP_SIZE (set by LeaderWorkerSet in its pods)")
    first, _, rest = leader.partition(".")
    return [join_address(f"{first}-{i}" + (f".{rest}" if rest else ""), port) for i in range(1, int(size))]


def names(specs: Sequence[str], env: Mapping[str, str] | None = None) -> list[str | Name]:
    """``specs`` with each ``dns:`` and ``lws:`` entry turned into the names to resolve."""
    out: list[str | Name] = []
    for spec in specs:
        check_spec(spec)
        if spec.startswith(DNS):
            host, port = split_address(spec[len(DNS) :])
            out.append(Name(host, port, each=False))
        elif spec.startswith(LWS):
            for worker in lws_workers(_port(spec[len(LWS) :], spec), os.environ if env is None else env):
                out.append(Name(*split_address(worker), each=True))
        else:
            out.append(spec)
    return out


def addresses_of(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, IPv4 before IPv6, each as ``ip:port`` (``[ip]:port``)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ips = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    return [join_address(str(ip), port) for ip in sorted(ips, key=lambda ip: (ip.version, ip))]


def resolve(specs: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[list[str], list[tuple[Name, str]]]:
    """(the servers' addresses now, in the order given, each once; the names that resolve to
    nothing, and why)."""
    found: list[str] = []
    missing: list[tuple[Name, str]] = []
    for entry in names(specs, env):
        if isinstance(entry, str):
            found.append(entry)
            continue
        try:
            resolved = addresses_of(entry.host, entry.port)
        except OSError as e:
            missing.append((entry, str(e.strerror or e)))
            continue
        found.extend(resolved)
    return list(dict.fromkeys(found)), missing


def resolve_servers(
    specs: Sequence[str], *, min_servers: int = 1, timeout: float = 0.0, env: Mapping[str, str] | None = None
) -> list[str]:
    """The servers' addresses, waiting up to ``timeout`` seconds until every worker name
    resolves and there are at least ``min_servers`` of them (pods start in any order). Raises
    ValueError when that does not happen in time."""
    deadline = time.monotonic() + timeout
    while True:
        found, missing = resolve(specs, env)
        unresolved = [f"{n.host} ({why})" for n, why in missing]
        if len(found) >= max(1, min_servers) and not any(n.each for n, _ in missing):
            if unresolved:
                logger.info("no address for %s", ", ".join(unresolved))
            if any(s.startswith((DNS, LWS)) for s in specs):
                logger.info("servers: %s", ", ".join(found))
            return found
        if time.monotonic() >= deadline:
            why = f"; no address for {', '.join(unresolved)}" if unresolved else ""
            raise ValueError(f"{', '.join(specs)} gave {len(found)} server(s), {max(1, min_servers)} wanted{why}")
        time.sleep(POLL_SECONDS)
