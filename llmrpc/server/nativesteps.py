"""The data plane's glue to the native hop (server/hop.c): which connections' next STEP it may
take, and what Python does after each step it took.

After a generation's step came as a STEP and went on as one, its next steps on that connection
may take the native hop, which reads, computes and sends a step in one C call instead of
~0.5 ms of cold Python. Anything else (another frame, another generation's step to batch with,
a connection with bytes queued, a hop not valid any more) disarms it: Python takes the frame.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmrpc import codec, trace, wire
from llmrpc.codec import Generation
from llmrpc.server.api import ErrorCode, StageEngine
from llmrpc.server.batcher import Batcher
from llmrpc.server.connections import Connections
from llmrpc.server.generations import Generations
from llmrpc.server.introduced import Introduced
from llmrpc.server.native import HOP_COMPUTE_FAILED, HOP_DONE, HOP_ENDED, HOP_NOTHING, NativeHop
from llmrpc.server.steps import Step

Key = tuple[int, int]  # a generation: (head link, request)
REPORT_BYTES = codec.DATA_HEADER.size + codec.TOKEN_META.size  # a TOKEN report, as hop.c writes it
Fail = Callable[[int, int, str, str, str], None]  # (link, request, code, message, server)
FailNext = Callable[[int, int, str, str], None]  # (link, request, next server's address, message)


@dataclass
class _Armed:
    """A connection's next generation steps, armed for the native hop."""

    hop: NativeHop
    key: Key  # the generation
    hop_index: int  # this server's place on its route
    peer: wire.Connection  # the next server's connection
    step: Step  # the step it was armed after (the generation, its route)
    head: wire.Connection | None  # at the last server: the head's, for the tokens' reports


class NativeSteps:
    def __init__(
        self, engine: StageEngine, conns: Connections, batcher: Batcher, introduced: Introduced,
        generations: Generations, fail: Fail, fail_next: FailNext,
    ) -> None:  # fmt: skip
        self.engine, self.conns, self.batcher = engine, conns, batcher
        self.introduced, self.generations = introduced, generations
        self._fail, self._fail_next = fail, fail_next
        self._armed: dict[wire.Connection, _Armed] = {}

    def arm(self, s: Step, peer: wire.Connection) -> None:
        """``s`` came as a STEP and went on to ``peer`` as one: arm its connection."""
        conn, gen = s.stepped, s.gen
        if conn is None or gen is None or conn.closed or trace.enabled() or len(s.items) != 1:
            return
        head = self.conns.links.get(s.key[0]) if s.last else None
        if any(c is not None and c.tls for c in (conn, peer, head)):  # the C hop reads and writes plain TCP
            return
        hop = None
        if not s.last or (head is not None and gen.sampling.temperature <= 0):  # greedy: the device's token
            hop = self.engine.native_hop(s.items[0][0])
        if hop is None:
            self._armed.pop(conn, None)
            return
        hop.route(conn.sock.fileno(), peer.sock.fileno(), s.key[0], s.rid, s.hop)
        if head is not None:
            hop.generate(head.sock.fileno(), gen.eog, gen.limit)
        self._armed[conn] = _Armed(hop, s.key, s.hop, peer, s, head)

    def others_come(self, key: Key) -> None:
        """Another generation's step came through Python: disarm the rest (they batch with it)."""
        if self._armed:
            for c in [c for c, armed in self._armed.items() if armed.key != key]:
                del self._armed[c]

    def dropped(self, conn: wire.Connection) -> None:
        for c, armed in list(self._armed.items()):
            if conn in (c, armed.peer, armed.head):
                del self._armed[c]

    def intercept(self, conn: wire.Connection, arrived: float) -> bool:
        """Let the native hop take the next frame on ``conn``; False (and the hop disarmed)
        when the frame is for Python: not the generation's plain next step, or not whole yet."""
        armed = self._armed.get(conn)
        if armed is None:
            return False
        if (
            conn.reader.holds_part or not armed.peer.idle() or self.batcher.ready or not armed.hop.valid()
            or armed.key[0] not in self.conns.links
            or (armed.hop_index == 0 and not self.batcher.alone(armed.key))
            or (armed.head is not None and (not armed.head.idle() or armed.key in self.generations.cancelled))
        ):  # fmt: skip
            del self._armed[conn]
            return False
        result = armed.hop.run()
        if result == HOP_NOTHING:
            return True
        h = armed.hop.hop
        if result != HOP_DONE:
            del self._armed[conn]
            if result == HOP_ENDED:  # the token that ends the generation is Python's to report
                base = armed.step
                assert base.gen is not None
                gen = Generation(int(h.n), int(h.step), base.gen.limit, base.gen.eog, base.gen.sampling)
                self.generations.after_token(base, gen, int(h.token), int(h.pos) + 1)
                return True
            if result != HOP_COMPUTE_FAILED:
                return False
            message = f"graph compute failed: ggml status {h.status}"
            self._fail(armed.key[0], armed.key[1], ErrorCode.INTERNAL.value, message, armed.step.here)
            return True
        if not self._sent_on(armed):
            return True
        # what the Python path does per step, after the step has gone on
        if armed.hop_index == 0:
            self.batcher.arrived(armed.key, arrived)
        self.introduced.passed(conn, armed.peer, armed.key)
        return True

    def _sent_on(self, armed: _Armed) -> bool:
        """After a step the hop computed: send what the sockets did not take (the token's
        report's rest to the head, before anything else for it; the step's rest to the next
        server), or drop the connection that failed. False: the step did not go on."""
        h, key = armed.hop.hop, armed.key
        if armed.head is not None and h.head_err:
            self.conns.drop(armed.head)  # the head is gone: its generations end
        elif armed.head is not None and h.reported < REPORT_BYTES:
            report = b"".join(codec.encode_token(key[1], int(h.token), int(h.step), None))
            self.conns.send_encoded(armed.head, [report[int(h.reported) :]])
        if h.err:
            self.conns.drop(armed.peer)
            self._fail_next(key[0], key[1], armed.peer.peer, f"sending to it failed (errno {h.err})")
            return False
        unsent = armed.hop.unsent()
        if unsent and not self.conns.send_encoded(armed.peer, [unsent]):
            self._fail_next(key[0], key[1], armed.peer.peer, "the connection to it broke")
            return False
        return True
