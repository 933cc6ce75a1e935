"""Servers and heads that find each other on a LAN by UDP multicast (``llmrpc-server --announce``,
``llmrpc-head --discover``), proving the farm's token.

A head sends a query with a fresh random nonce to the group (239.255.77.77, port 50099, one hop:
it does not leave the LAN). Every announcing server answers the head directly with its gRPC port
and HMAC-SHA256(token, nonce and port). The head keeps the servers whose answer proves its token;
a server's address is the one its answer came from. Nothing secret crosses the network: an
answer cannot be replayed (the nonce is new each time), and without the token none can be made,
so a head never sends its token to a server that does not already hold it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from llmrpc.types import join_address

logger = logging.getLogger(__name__)

GROUP = "239.255.77.77"  # administratively scoped: stays in the organisation's network
PORT = 50099
MAGIC = "llmrpc-discovery"
MAX_DATAGRAM = 2048


def proof(token: str, nonce: str, port: int) -> str:
    return hmac.new(token.encode(), f"{MAGIC}|{nonce}|{port}".encode(), hashlib.sha256).hexdigest()


class Announcer:
    """A server's side: answers every query on the group with its gRPC port and its proof."""

    def __init__(self, grpc_port: int, token: str, group: str = GROUP, port: int = PORT) -> None:
        if not token:
            raise ValueError("--announce needs the farm's token (--token or LLMRPC_TOKEN): answers prove it")
        self.grpc_port, self._token = grpc_port, token
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # several servers on one host
        self._sock.bind(("", port))
        membership = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0"))
        self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="announce", daemon=True)
        self._thread.start()
        logger.info("answering discovery on %s:%d", group, port)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not select.select([self._sock], [], [], 0.5)[0]:
                continue
            try:
                data, sender = self._sock.recvfrom(MAX_DATAGRAM)
                query = json.loads(data)
                nonce = query["nonce"] if query.get(MAGIC) == 1 else None
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
                continue
            answer = {MAGIC: 1, "port": self.grpc_port, "proof": proof(self._token, nonce, self.grpc_port)}
            try:
                self._sock.sendto(json.dumps(answer).encode(), sender)
            except OSError as e:
                logger.debug("cannot answer %s: %s", sender, e)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


@dataclass(frozen=True)
class Found:
    address: str  # host:port of the server's gRPC
    proven: bool  # its answer proves the token


def discover(token: str, wait: float = 2.0, group: str = GROUP, port: int = PORT) -> list[str]:
    """The servers on the LAN that prove ``token``, each as ``ip:port``, sorted; asks three times
    within ``wait`` seconds (a datagram may be lost)."""
    if not token:
        raise ValueError("--discover needs the farm's token (--token or LLMRPC_TOKEN): servers prove it")
    nonce = secrets.token_hex(16)
    found: dict[str, Found] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        query = json.dumps({MAGIC: 1, "nonce": nonce}).encode()
        deadline, asks = time.monotonic() + wait, [0.0, wait / 3, 2 * wait / 3]
        started = time.monotonic()
        while (left := deadline - time.monotonic()) > 0:
            if asks and time.monotonic() - started >= asks[0]:
                asks.pop(0)
                sock.sendto(query, (group, port))
            timeout = min(left, max(0.0, started + asks[0] - time.monotonic())) if asks else left
            if select.select([sock], [], [], timeout)[0]:
                data, (ip, _) = sock.recvfrom(MAX_DATAGRAM)
                answer = _answer(data, token, nonce, ip)
                if answer is not None:
                    found[answer.address] = answer
    refused = sorted(a for a, f in found.items() if not f.proven)
    if refused:
        logger.warning("servers that did not prove the token, left out: %s", ", ".join(refused))
    return sorted((a for a, f in found.items() if f.proven), key=_order)


def _answer(data: bytes, token: str, nonce: str, ip: str) -> Found | None:
    try:
        answer = json.loads(data)
        grpc_port, given = int(answer["port"]), str(answer["proof"])
    except (ValueError, KeyError, TypeError):
        return None
    if answer.get(MAGIC) != 1 or not 0 < grpc_port < 65536:
        return None
    return Found(join_address(ip, grpc_port), hmac.compare_digest(given, proof(token, nonce, grpc_port)))


def _order(address: str) -> tuple[int, ...]:
    host, _, port = address.rpartition(":")
    return (*socket.inet_aton(host), int(port))
