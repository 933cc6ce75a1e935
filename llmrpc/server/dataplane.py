"""The server's data plane: activations in, layers computed, activations on to the next server.

gRPC carries control (load, sessions) and stays the reference path for single forwards; per
token, its Python machinery costs about a millisecond per hop. Here a FORWARD frame arrives
on a plain TCP connection, is computed on the compute loop's own thread (the loop waits on
these sockets), and goes straight on to the next server of its route; only the last server
answers the head. A token through three servers is four messages instead of six, with no
thread hand-off on the way.

Who may connect, and the connections kept, are server/connections.py's; which next servers a
head's routes may name, server/peers.py's; how a FORWARD is checked, server/steps.py's; when
generation steps are computed together, server/batcher.py's; the last server's side of a
generation, server/generations.py's; the native hop's glue, server/nativesteps.py's.

A FORWARD that carries ``gen`` generates on its own: the last server samples the next token,
sends it straight back to the first server as the next step (through one server, the step is
queued on its own loop) and reports it to the head in a TOKEN frame. The head is off the
token's path: per token, one message fewer through any number of servers, and through one
server none at all but the report.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from llmrpc import codec, trace, wire
from llmrpc.codec import FrameKind, Generation, shown
from llmrpc.server.api import EngineError, ErrorCode, Launched, StageEngine, stage_outputs
from llmrpc.server.batcher import Batcher
from llmrpc.server.connections import HELLO_TIMEOUT, MAX_CONNECTIONS, Connections
from llmrpc.server.generations import Generations
from llmrpc.server.introduced import Introduced
from llmrpc.server.loop import ComputeLoop
from llmrpc.server.nativesteps import NativeSteps
from llmrpc.server.peers import Peers
from llmrpc.server.sessions import SESSION_TTL, SessionKeeper
from llmrpc.server.steps import FrameError, Step, introduces, parse_forward

logger = logging.getLogger(__name__)


class DataPlane:
    def __init__(
        self, engine: StageEngine, loop: ComputeLoop, host: str, port: int = 0, connect_timeout: float = 5.0,
        tls_server: ssl.SSLContext | None = None, tls_client: ssl.SSLContext | None = None,
        session_ttl: float = SESSION_TTL, max_connections: int = MAX_CONNECTIONS, hello_timeout: float = HELLO_TIMEOUT,
    ) -> None:  # fmt: skip
        """``tls_server``: connections to this port are TLS; ``tls_client``: so are this server's
        connections to the next ones (their certificates checked). ``session_ttl``: seconds a
        session may sit idle (see server/sessions.py); ``max_connections``, ``hello_timeout``:
        see server/connections.py."""
        self.engine = engine
        self.loop = loop
        self.sessions = SessionKeeper(engine, loop, session_ttl)
        self.conns = Connections(
            loop, host, port, on_frame=self._on_frame, on_drop=self._dropped, frame_limit=self._frame_limit,
            intercept=self._intercept, tls_server=tls_server, max_connections=max_connections,
            hello_timeout=hello_timeout,
        )  # fmt: skip
        self.port, self.token = self.conns.port, self.conns.token
        self.peers = Peers(self.conns, loop, connect_timeout, tls_client)
        self.batcher = Batcher(loop, self.port, self._compute, self._failed)
        self.introduced = Introduced()
        self.generations = Generations(engine, self.conns, self.peers, self.batcher, self._take, self._pass_on)
        self.native = NativeSteps(
            engine, self.conns, self.batcher, self.introduced, self.generations, self._fail, self._fail_next
        )
        self.conns.start()

    def declare_peers(self, link: int, peers: Sequence[tuple[str, str]]) -> None:
        """Head ``link``'s next servers here (see server/peers.py); from a gRPC handler."""
        self.peers.declare(link, peers)

    # -- frames (all on the loop thread) --------------------------------------------------
    def _intercept(self, conn: wire.Connection, arrived: float) -> bool:
        return self.native.intercept(conn, arrived)

    def _on_frame(self, conn: wire.Connection, frame: codec.DataFrame, arrived: float) -> None:
        """An authenticated connection's frame; a fault with it fails its request alone."""
        try:
            self._handle(conn, frame, arrived)
        except Exception as e:
            logger.exception("request %d from %s failed", frame.request_id, conn.peer)
            link = conn.link or frame.meta.get("link")
            self._fail(link, frame.request_id, ErrorCode.INTERNAL.value, f"{type(e).__name__}: {e}", "")

    def _handle(self, conn: wire.Connection, frame: codec.DataFrame, arrived: float) -> None:
        if frame.kind == FrameKind.FORWARD:
            self._forward(conn, frame, arrived)
        elif frame.kind == FrameKind.STEP:
            self._step(conn, frame, arrived)
        elif frame.kind == FrameKind.ENDED:  # from the last server: do not wait for its steps
            self.batcher.ended((int(frame.meta.get("link") or 0), frame.request_id))
        elif frame.kind == FrameKind.CANCEL:  # ends after the step in flight (if it is ours)
            self.generations.cancel((conn.link, frame.request_id))
        elif frame.kind == FrameKind.ERROR:  # from a peer we push to: it could not take our frame
            logger.warning("%s: %s", conn.peer, shown(frame.meta.get("message"), 200))
        else:
            self.conns.refuse(conn, frame.request_id, f"unexpected {frame.kind.name} frame")

    def _dropped(self, conn: wire.Connection, head: bool) -> None:
        """A connection closed: forget what this server kept for it."""
        if head:
            self.generations.link_gone(conn.link)
            self.sessions.link_gone(conn.link)
            self.peers.link_gone(conn.link)
        self.peers.forget(conn)
        self.introduced.forget(conn)
        self.native.dropped(conn)

    def _frame_limit(self) -> int:
        return self.engine.max_input_elements() * 4 + 4096

    def _forward(self, conn: wire.Connection, frame: codec.DataFrame, arrived: float) -> None:
        try:
            step = parse_forward(frame, conn.link)
        except FrameError as e:
            self._refuse_frame(conn, frame, str(e))
            return
        if not self._linked(step.link, frame.request_id):
            return
        for address in step.sends_to:  # (no frame makes this server connect anywhere: see server/peers.py)
            if not self.peers.declares(step.link, address):
                message = f"route: {shown(address, 80)} is no next server that head link {step.link} declared here"
                logger.warning("request %d from %s refused: %s", frame.request_id, conn.peer, message)
                self._fail(step.link, frame.request_id, ErrorCode.INVALID_ARGUMENT.value, message, step.here)
                return
        if introduces(step.gen, step.m):  # its next steps on conn are STEPs
            self.introduced.came(conn, step)
        self._take(step, arrived, self.batcher.lone(step))

    def _step(self, conn: wire.Connection, frame: codec.DataFrame, arrived: float) -> None:
        """A STEP frame: the generation's last FORWARD on this connection, with what changed."""
        f, rid = frame.meta, frame.request_id
        if conn.link and f["link"] != conn.link:
            self._refuse_frame(
                conn, frame, f"link {f['link']} is not the link {conn.link} this connection said HELLO with"
            )
            return
        if not self._linked(f["link"], rid):
            return
        key = (f["link"], rid)
        base = self.introduced.base(conn, key)
        if base is None or base.gen is None or not 0 <= f["hop"] < len(base.route):
            message = "a STEP frame for a generation this connection carried no FORWARD of (or a hop off its route)"
            self._fail(f["link"], rid, "invalid_argument", message, "")
            return
        if f["n"] < 1 or f["step"] < 0 or f["pos"] < 0:
            self._refuse_frame(conn, frame, f"a STEP's n, step and pos must be at least 1, 0 and 0, not {f}")
            return
        self.introduced.came_step(conn, key)
        (x,) = frame.arrays
        hop, pos = f["hop"], f["pos"]
        m = {**base.m, "hop": hop, "pos": [pos], "rows": [int(x.shape[0])]}
        gen = replace(base.gen, n=f["n"], step=f["step"])
        step = Step(m, rid, base.route, hop, [(str(base.route[hop][2][0]), pos, x)], gen, stepped=conn)
        self._take(step, arrived, self.batcher.lone(step))

    def _linked(self, link: int, rid: int) -> bool:
        """Whether the head ``link`` is connected here; frames of any other are refused. A head
        connects to every server of its plan before it sends anything, and a new plan is a new
        link: this refuses the frames of a superseded plan (a server stopped and resumed goes on
        with what it was doing) and frames with a link made up."""
        if link in self.conns.links:
            return True
        logger.warning("request %d of head link %s, which is not connected here: refused", rid, link)
        return False

    def _refuse_frame(self, conn: wire.Connection, frame: codec.DataFrame, message: str) -> None:
        """Answer a malformed FORWARD or STEP: on the head's own connection, or for a server's
        frame to the head it names."""
        link = conn.link or frame.meta.get("link")
        logger.warning("request %d from %s refused: %s", frame.request_id, conn.peer, message)
        self._fail(link, frame.request_id, ErrorCode.INVALID_ARGUMENT.value, message, "")

    def _take(self, step: Step, arrived: float, at_once: bool = False) -> None:
        for session_id, _, _ in step.items:
            if not self.sessions.claim(step.link, session_id):
                message = f"session {session_id} belongs to another head link"
                self._fail(step.link, step.rid, "permission_denied", message, step.here)
                return
        step.arrived = arrived
        if step.gen is not None:  # steps of others go through here: batch them
            self.native.others_come(step.key)
        trace.stamp(step.link, step.rid, f"s{step.hop}.arrive", arrived, step.step)
        if step.hop == 0 and step.gen is not None:
            self.batcher.arrived(step.key, arrived)
        if step.gen is None or at_once:
            self._compute([step])
            return
        # Generation steps wait for the end of this turn of the loop: the steps of every
        # generation that are ready then are computed in one batch (weights read once).
        self.batcher.queue(step)

    # -- computing ------------------------------------------------------------------------
    def _compute(self, steps: list[Step]) -> None:
        """Run the steps' rows through the layers in one batch, then send each on."""
        for s in steps:
            trace.stamp(s.link, s.rid, f"s{s.hop}.start", None, s.step)
        # greedy generation steps at their last server: the device finds the token
        greedy = all(s.gen is not None and s.gen.sampling.temperature <= 0 and s.last for s in steps)
        try:
            launched = self.engine.launch_batch(
                [item for s in steps for item in s.items], bool(steps[0].m.get("all_logits")), greedy
            )
        except EngineError as e:
            if len(steps) > 1:  # one refused step must not fail the others
                for s in steps:
                    self._compute([s])
                return
            self.generations.end(steps[0].key)
            self._fail(steps[0].link, steps[0].rid, e.code.value, e.message, steps[0].here)
            return
        except Exception as e:
            self._failed(steps, e)
            return
        if launched.ready:
            self._complete(steps, launched)
        else:  # the device computes while this loop goes on (a token's report, the sockets)
            self.loop.soon(lambda: self._complete(steps, launched))

    def _complete(self, steps: list[Step], launched: Launched) -> None:
        try:
            outs = launched.result()
        except Exception as e:
            self._failed(steps, e)
            return
        # generation steps that go on together are marked so, for the next server to keep them together
        tag = self.batcher.tag(steps)
        at = 0
        for s in steps:
            try:
                self._finish(s, outs[at : at + len(s.items)], tag)
            except Exception as e:  # (sampling, sending on): this step's request alone fails
                self._failed([s], e)
            at += len(s.items)

    def _failed(self, steps: list[Step], error: Exception) -> None:
        """Steps that met an unexpected fault: each one's request fails with it, and its
        generation ends; the loop, and every other step, go on."""
        logger.error("%d steps failed", len(steps), exc_info=error)
        for s in steps:
            self.generations.end(s.key)
            self._fail(s.link, s.rid, ErrorCode.INTERNAL.value, f"{type(error).__name__}: {error}", s.here)

    def _finish(self, s: Step, outs: list[np.ndarray], tag: list[Any] | None) -> None:
        """Send a computed step on (marked with its batch's ``tag``), or answer or generate at
        the last server."""
        trace.stamp(s.link, s.rid, f"s{s.hop}.end", None, s.step)
        out = outs[0] if len(outs) == 1 else np.concatenate(outs)
        if s.gen is not None and s.last:
            _, pos, x = s.items[0]
            self.generations.generated(s, s.gen, out, pos + int(x.shape[0]))
            return
        m = s.m
        outputs = stage_outputs(
            self.engine.loaded(), out, int(m.get("top_k") or 0) if s.last else 0, bool(m.get("f16"))
        )
        if s.last:
            self._answer(s.link, FrameKind.RESULT, s.rid, {}, outputs)
            return
        meta = {**m, "hop": s.hop + 1}
        meta.pop("batch", None)
        if tag is not None:
            meta["batch"] = tag
        self._pass_on(s, str(s.route[s.hop + 1][0]), meta, outputs, s.gen)

    def _pass_on(
        self, s: Step, address: str, meta: dict[str, Any], arrays: Sequence[np.ndarray], gen: Generation | None = None
    ) -> bool:
        """Send a FORWARD (of generation step ``gen``, if one) on to the declared next server at
        ``address``, or a STEP where that connection carried one of the generation's FORWARDs; a
        failure is the head's answer."""
        peer = self.peers.get(address)
        if peer is None:
            self._fail_next(s.link, s.rid, address, f"no connection to it from {s.here} (it closed)")
            return False
        introducing = introduces(gen, meta)
        if gen is not None and introducing and self.introduced.carried(peer, s.key) and len(arrays) == 1:
            pieces = codec.encode_step(s.rid, s.key[0], meta["hop"], meta["pos"][0], gen.step, gen.n, arrays[0])
        else:
            if gen is not None:
                meta["gen"] = gen.to_meta()
            pieces = codec.encode_frame(FrameKind.FORWARD, s.rid, meta, arrays)
        if not self.conns.send_encoded(peer, pieces):
            self._fail_next(s.link, s.rid, address, f"the connection to it from {s.here} broke")
            return False
        if introducing:  # touched per frame, as the receiver does (see server/introduced.py)
            self.introduced.went(peer, s.key)
            if s.stepped is not None and "batch" not in meta:
                self.native.arm(s, peer)
        return True

    # -- answers to the head --------------------------------------------------------------
    def _fail(self, link: Any, rid: int, code: str, message: str, here: str) -> None:
        loaded = self.engine.loaded()
        layers = f"[{loaded.layer_start}, {loaded.layer_end})" if loaded else ""
        self._answer(link, FrameKind.ERROR, rid, {"code": code, "message": message, "server": here, "layers": layers})

    def _fail_next(self, link: Any, rid: int, address: str, message: str) -> None:
        """The next server could not be reached: the error names that server (the head knows its
        layers), as the head's own connection to it would when it closes."""
        self._answer(link, FrameKind.ERROR, rid, {"code": "unavailable", "message": message, "server": address})

    def _answer(
        self, link: Any, kind: FrameKind, rid: int, meta: dict[str, Any], arrays: Sequence[np.ndarray] = ()
    ) -> None:
        self.conns.to_head(link, rid, codec.encode_frame(kind, rid, meta, arrays), str(meta.get("message", kind.name)))

    def close(self) -> None:
        self.conns.close()
