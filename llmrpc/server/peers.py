"""The next servers a server sends to: the peers each head declares for its plan.

A FORWARD's route names the servers its activations go through, but a server sends on only to
peers that the route's head declared to it over gRPC (Peers): the next server of its plan and,
at the last server, the first (a generation's next step, and its end). Their connections are
made when they are declared, on the gRPC handler's thread, never on the compute loop's; the
data plane refuses a route that names any other next server (:meth:`Peers.declares`), so no
data frame can make a server connect anywhere. A declaration lasts as long as the head's link
(its data connection); a connection to a peer that no link declares any more is closed.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

from llmrpc import codec, wire
from llmrpc.codec import FrameKind, shown
from llmrpc.server.connections import Connections
from llmrpc.server.loop import ComputeLoop
from llmrpc.server.steps import MAX_HOPS, MAX_LINK, MAX_TEXT
from llmrpc.types import PROTOCOL_VERSION, split_address

logger = logging.getLogger(__name__)

PEER_INBOX = 1 << 16  # bytes a read from a next server takes (it only ever answers errors)


class Peers:
    def __init__(
        self, conns: Connections, loop: ComputeLoop, connect_timeout: float = 5.0,
        tls_client: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        """``tls_client``: the connections to the next servers are TLS (their certificates checked)."""
        self.conns, self.loop = conns, loop
        self.connect_timeout, self.tls_client = connect_timeout, tls_client
        self._declared: dict[int, frozenset[str]] = {}  # head link -> the data addresses it declared
        self._made: dict[str, wire.Connection] = {}  # data address -> the connection to it

    def declare(self, link: int, peers: Sequence[tuple[str, str]]) -> None:
        """Head ``link``'s next servers here, as (data address, data token): connected now, on
        the caller's thread (a gRPC handler's). Raises ValueError for a bad address, LookupError
        when the link is not connected here, ConnectionError for a peer that cannot be reached."""
        if not 0 < link <= MAX_LINK:
            raise ValueError(f"link must be a head's link id within [1, {MAX_LINK}], not {link}")
        if len(peers) > MAX_HOPS:
            raise ValueError(f"at most {MAX_HOPS} peers, not {len(peers)}")
        for address, token in peers:
            _check(address, token)
        have = self.loop.call(lambda: {a for a, c in self._made.items() if _usable(c)})
        made: dict[str, wire.Connection] = {}
        try:
            for address, token in peers:
                if address not in have and address not in made:
                    made[address] = self._connect(address, token)
        except BaseException:
            for conn in made.values():
                conn.close()
            raise
        self.loop.call(lambda: self._install(link, frozenset(a for a, _ in peers), made))

    def _connect(self, address: str, token: str) -> wire.Connection:
        """A connection to a next server, authenticated."""
        host, port = split_address(address)
        try:
            sock = wire.connect(host, port, self.connect_timeout, self.tls_client)
        except OSError as e:
            raise ConnectionError(f"cannot reach peer {address}: {e}") from None
        conn = wire.Connection(sock, address, 0, inbox=memoryview(bytearray(PEER_INBOX)))
        try:
            conn.send(FrameKind.HELLO, 0, {"token": token, "link": 0, "protocol": PROTOCOL_VERSION})
            reply = wire.wait_frame(conn, self.connect_timeout)
        except (OSError, codec.CodecError) as e:
            conn.close()
            raise ConnectionError(f"peer {address}: {e}") from None
        if reply.kind != FrameKind.WELCOME:
            conn.close()
            raise ConnectionError(f"peer {address}: {shown(reply.meta.get('message', reply.kind.name), 200)}")
        conn.authenticated = True
        return conn

    def _install(self, link: int, addresses: frozenset[str], made: dict[str, wire.Connection]) -> None:
        """On the loop: keep the declaration and the connections made for it."""
        if link not in self.conns.links:
            for conn in made.values():
                conn.close()
            raise LookupError(f"head link {link} has no data connection to this server (connect, then declare)")
        for address, conn in made.items():
            old = self._made.get(address)
            if old is not None and _usable(old):  # (made meanwhile for another link)
                conn.close()
                continue
            if old is not None:
                self.conns.drop(old)
            self._made[address] = conn
            self.conns.adopt(conn)
        self._declared[link] = addresses
        self._prune()

    def declares(self, link: int, address: str) -> bool:
        """Whether head ``link`` declared ``address`` a next server here."""
        declared = self._declared.get(link)
        return declared is not None and address in declared

    def get(self, address: str) -> wire.Connection | None:
        """The open connection to a declared next server (None: it closed, the server is gone)."""
        conn = self._made.get(address)
        return conn if conn is not None and _usable(conn) else None

    def link_gone(self, link: int) -> None:
        if self._declared.pop(link, None) is not None:
            self._prune()

    def forget(self, conn: wire.Connection) -> None:
        """A connection closed: it is no next server's any more."""
        for address in [a for a, c in self._made.items() if c is conn]:
            del self._made[address]

    def _prune(self) -> None:
        """Close the connections to peers that no link declares."""
        wanted = frozenset().union(*self._declared.values())
        for address in [a for a in self._made if a not in wanted]:
            self.conns.drop(self._made.pop(address))


def _check(address: str, token: str) -> None:
    if not (isinstance(address, str) and isinstance(token, str) and max(len(address), len(token)) <= MAX_TEXT):
        raise ValueError(f"a peer is a data address and a data token of at most {MAX_TEXT} characters")
    try:
        _, port = split_address(address)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError(f"a peer's data address must be host:port (port 1..65535), not {shown(address)}")


def _usable(conn: wire.Connection) -> bool:
    return not conn.closed and conn.error is None
