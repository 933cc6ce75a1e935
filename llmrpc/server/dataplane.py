"""The server's data plane: activations in, layers computed, activations on to the next server.

gRPC carries control (load, sessions) and stays the reference path for single forwards; per
token, its Python machinery costs about a millisecond per hop. Here a FORWARD frame arrives
on a plain TCP connection, is computed on the compute loop's own thread (the loop waits on
these sockets), and goes straight on to the next server of its route; only the last server
answers the head. A token through three servers is four messages instead of six, with no
thread hand-off on the way.

Who may connect, and the connections kept, are server/connections.py's; how a FORWARD is
checked, server/steps.py's.

A FORWARD that carries ``gen`` generates on its own: the last server samples the next token,
sends it straight back to the first server as the next step (through one server, the step is
queued on its own loop) and reports it to the head in a TOKEN frame. The head is off the
token's path: per token, one message fewer through any number of servers, and through one
server none at all but the report.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from llmrpc import codec, trace, wire
from llmrpc.codec import FrameKind, Generation, shown
from llmrpc.sampling import Sampler
from llmrpc.server.api import EngineError, ErrorCode, Launched, StageEngine, stage_outputs, top_k_logits
from llmrpc.server.connections import Connections
from llmrpc.server.loop import ComputeLoop
from llmrpc.server.native import HOP_COMPUTE_FAILED, HOP_DONE, HOP_ENDED, HOP_NOTHING, HOP_REPORT_LEFT, NativeHop
from llmrpc.server.sessions import SESSION_TTL, SessionKeeper
from llmrpc.server.steps import MAX_GENERATIONS, FrameError, Step, introduces, parse_forward

logger = logging.getLogger(__name__)

HOLD_MAX = 0.25  # seconds a first server may wait for other generations' steps to share a batch
BATCH_WAIT = 0.005  # seconds a server waits for the rest of a batch the previous one sent on


@dataclass
class _Native:
    """A connection's next generation steps, armed for the native hop."""

    hop: NativeHop
    key: tuple[int, int]  # the generation
    hop_index: int  # this server's place on its route
    peer: wire.Connection  # the next server's connection
    step: Step  # the step it was armed after (the generation, its route)
    head: wire.Connection | None  # at the last server: the head's, for the tokens' reports


class DataPlane:
    def __init__(
        self, engine: StageEngine, loop: ComputeLoop, host: str, port: int = 0, connect_timeout: float = 5.0,
        tls_server: ssl.SSLContext | None = None, tls_client: ssl.SSLContext | None = None,
        session_ttl: float = SESSION_TTL,
    ) -> None:  # fmt: skip
        """``tls_server``: connections to this port are TLS; ``tls_client``: so are this server's
        connections to the next ones (their certificates checked). ``session_ttl``: seconds a
        session may sit idle (see server/sessions.py)."""
        self.engine = engine
        self.loop = loop
        self.sessions = SessionKeeper(engine, loop, session_ttl)
        self.conns = Connections(
            loop, host, port, on_frame=self._on_frame, on_drop=self._dropped, frame_limit=self._frame_limit,
            intercept=self._intercept, connect_timeout=connect_timeout, tls_server=tls_server, tls_client=tls_client,
        )  # fmt: skip
        self.port, self.token = self.conns.port, self.conns.token
        # generations this server samples for (it is their last): (link, request) -> sampler
        self._samplers: OrderedDict[tuple[int, int], Sampler] = OrderedDict()
        self._cancelled: set[tuple[int, int]] = set()
        self._ready: list[Step] = []  # generation steps to compute at the end of this loop turn
        # at the first server: generations whose steps come round, (last arrival, period)
        self._rounds: dict[tuple[int, int], tuple[float, float]] = {}
        self._batches = itertools.count(1)
        # Generations whose FORWARD (no batch tag) went out on a connection, and came in on one:
        # their next steps on it are STEP frames. Both sides touch a key per frame, in the
        # frames' order, so the receiver, keeping twice as many, has every key the sender has.
        self._sent: dict[wire.Connection, OrderedDict[tuple[int, int], None]] = {}
        self._known: dict[wire.Connection, OrderedDict[tuple[int, int], Step]] = {}
        # connections whose next STEP the native hop may take (see _native_step)
        self._native: dict[wire.Connection, _Native] = {}

    # -- frames (all on the loop thread) --------------------------------------------------
    def _intercept(self, conn: wire.Connection, arrived: float) -> bool:
        native = self._native.get(conn)
        return native is not None and self._native_step(conn, native, arrived)

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
            self._rounds.pop((int(frame.meta.get("link") or 0), frame.request_id), None)
        elif frame.kind == FrameKind.CANCEL:  # ends after the step in flight (if it is ours)
            if (conn.link, frame.request_id) in self._samplers:
                self._cancelled.add((conn.link, frame.request_id))
        elif frame.kind == FrameKind.ERROR:  # from a peer we push to: it could not take our frame
            logger.warning("%s: %s", conn.peer, shown(frame.meta.get("message"), 200))
        else:
            self.conns.refuse(conn, frame.request_id, f"unexpected {frame.kind.name} frame")

    def _dropped(self, conn: wire.Connection, head: bool) -> None:
        """A connection closed: forget what this server kept for it."""
        if head:
            for key in [k for k in self._samplers if k[0] == conn.link]:  # nobody to report to
                self._end_generation(key)
            self.sessions.link_gone(conn.link)
        self._sent.pop(conn, None)
        self._known.pop(conn, None)
        for c, native in list(self._native.items()):
            if conn in (c, native.peer, native.head):
                del self._native[c]

    def _frame_limit(self) -> int:
        return self.engine.max_input_elements() * 4 + 4096

    # -- forwarding -----------------------------------------------------------------------
    def _forward(self, conn: wire.Connection, frame: codec.DataFrame, arrived: float) -> None:
        try:
            step = parse_forward(frame, conn.link)
        except FrameError as e:
            self._refuse_frame(conn, frame, str(e))
            return
        if not self._linked(step.link, frame.request_id):
            return
        if introduces(step.gen, step.m):  # its next steps on conn are STEPs
            known = self._known.setdefault(conn, OrderedDict())
            # not its rows (a prompt's, the first time), nor its "gen": a step's Generation is
            # the one truth (a FORWARD sent on describes it anew)
            m = {k: v for k, v in step.m.items() if k != "gen"}
            known[step.key] = replace(step, m=m, items=[])
            known.move_to_end(step.key)
            while len(known) > 2 * MAX_GENERATIONS:
                known.popitem(last=False)
        self._take(step, arrived, at_once=self._lone(step))

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
        known = self._known.get(conn)
        base = known.get(key) if known is not None else None
        if known is None or base is None or base.gen is None or not 0 <= f["hop"] < len(base.route):
            message = "a STEP frame for a generation this connection carried no FORWARD of (or a hop off its route)"
            self._fail(f["link"], rid, "invalid_argument", message, "")
            return
        if f["n"] < 1 or f["step"] < 0 or f["pos"] < 0:
            self._refuse_frame(conn, frame, f"a STEP's n, step and pos must be at least 1, 0 and 0, not {f}")
            return
        known.move_to_end(key)
        (x,) = frame.arrays
        hop, pos = f["hop"], f["pos"]
        m = {**base.m, "hop": hop, "pos": [pos], "rows": [int(x.shape[0])]}
        gen = replace(base.gen, n=f["n"], step=f["step"])
        step = Step(m, rid, base.route, hop, [(str(base.route[hop][2][0]), pos, x)], gen, stepped=conn)
        self._take(step, arrived, at_once=self._lone(step))

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

    def _lone(self, step: Step) -> bool:
        """A generation step with nothing to batch it with, which need not wait for the end of
        the loop's turn: one that arrived (a hop's work runs cold after the others' compute,
        where a loop turn costs ~0.1 ms), or the next step a GPU server alone queues itself.
        Steps a server computed together come tagged (see :meth:`_compute_ready`); the first
        server waits for other generations' steps."""
        if step.gen is None or self._ready or "batch" in step.m:
            return False
        return step.hop > 0 or set(self._rounds) <= {step.key}

    def _take(self, step: Step, arrived: float, at_once: bool = False) -> None:
        for session_id, _, _ in step.items:
            if not self.sessions.claim(step.link, session_id):
                message = f"session {session_id} belongs to another head link"
                self._fail(step.link, step.rid, "permission_denied", message, step.here)
                return
        step.arrived = arrived
        if self._native and step.gen is not None:  # steps of others go through here: batch them
            for c in [c for c, native in self._native.items() if native.key != step.key]:
                del self._native[c]
        trace.stamp(step.link, step.rid, f"s{step.hop}.arrive", arrived, step.step)
        if step.hop == 0 and step.gen is not None:
            self._arrived(step, arrived)
        if step.gen is None or at_once:
            self._compute([step])
            return
        # Generation steps wait for the end of this turn of the loop: the steps of every
        # generation that are ready then are computed in one batch (weights read once).
        self._ready.append(step)
        self.loop.soon(self._compute_ready)

    def _arrived(self, step: Step, now: float) -> None:
        self._arrived_key(step.key, now)

    def _arrived_key(self, key: tuple[int, int], now: float) -> None:
        """Note when a generation's step came back to the first server, and its period."""
        last = self._rounds.pop(key, None)
        self._rounds[key] = (now, now - last[0] if last else 0.0)
        for k in [k for k, (t, period) in self._rounds.items() if now - t > (2 * period + 0.01 if period else 1.0)]:
            del self._rounds[k]  # stalled: not waited for

    def _compute_ready(self) -> None:
        """Compute the ready steps (see :meth:`_batch_ready`); a fault fails those steps alone."""
        try:
            steps = self._batch_ready()
        except Exception as e:
            steps, self._ready = self._ready, []
            self._failed(steps, e)
            return
        if steps:
            self._compute(steps)

    def _batch_ready(self) -> list[Step]:
        """The ready steps to compute now, or none yet (called again later): at the first
        server, wait for the other generations that are on their way round (at most about one
        of their periods): rings that started apart would otherwise never share a batch, each
        step computed alone (4 streams through 3 servers: 34 tok/s instead of 80). Once together
        they stay together, their frames sent on and back one after the other; the last server
        says when one ends (ENDED)."""
        if not self._ready:
            return []
        now = time.perf_counter()
        # steps one server computed in one batch come as separate frames: wait for them all
        tags: dict[str, list[int]] = {}
        for s in self._ready:
            tag = s.m.get("batch")
            if isinstance(tag, list) and len(tag) == 2:
                tags.setdefault(str(tag[0]), [0, int(tag[1])])[0] += 1
        if any(got < want for got, want in tags.values()) and now - self._ready[0].arrived < BATCH_WAIT:
            self.loop.soon(self._compute_ready, BATCH_WAIT / 10)
            return []
        if all(s.hop == 0 and s.gen is not None for s in self._ready):
            ready = {s.key for s in self._ready}
            first = min(s.arrived for s in self._ready)
            due = [period for k, (t, period) in self._rounds.items() if k not in ready and period > 0]
            hold = min(HOLD_MAX, max(due)) if due else 0.0
            if now - first < hold:
                self.loop.soon(self._compute_ready, first + hold - now)
                return []
        steps, self._ready = self._ready, []
        return steps

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
            self._end_generation(steps[0].key)
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
        gens = len(steps) > 1 and all(s.gen is not None and not s.last for s in steps)
        tag = [f"{self.port}.{next(self._batches)}", len(steps)] if gens else None
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
            self._end_generation(s.key)
            self._fail(s.link, s.rid, ErrorCode.INTERNAL.value, f"{type(error).__name__}: {error}", s.here)

    def _finish(self, s: Step, outs: list[np.ndarray], tag: list[Any] | None) -> None:
        """Send a computed step on (marked with its batch's ``tag``), or answer or generate at
        the last server."""
        trace.stamp(s.link, s.rid, f"s{s.hop}.end", None, s.step)
        out = outs[0] if len(outs) == 1 else np.concatenate(outs)
        if s.gen is not None and s.last:
            _, pos, x = s.items[0]
            self._generated(s, s.gen, out, pos + int(x.shape[0]))
            return
        m = s.m
        outputs = stage_outputs(
            self.engine.loaded(), out, int(m.get("top_k") or 0) if s.last else 0, bool(m.get("f16"))
        )
        if s.last:
            self._answer(s.link, FrameKind.RESULT, s.rid, {}, outputs)
            return
        nxt = s.route[s.hop + 1]
        meta = {**m, "hop": s.hop + 1}
        meta.pop("batch", None)
        if tag is not None:
            meta["batch"] = tag
        self._pass_on(s, str(nxt[0]), str(nxt[1]), meta, outputs, s.gen)

    def _pass_on(
        self, s: Step, address: str, token: str, meta: dict[str, Any], arrays: Sequence[np.ndarray],
        gen: Generation | None = None,
    ) -> bool:  # fmt: skip
        """Send a FORWARD (of generation step ``gen``, if one) on to the server at ``address``,
        or a STEP where that connection carried one of the generation's FORWARDs; a failure is
        the head's answer."""
        try:
            peer = self.conns.peer(address, token)
        except (OSError, ValueError) as e:
            self._fail_next(s.link, s.rid, address, f"cannot reach it from {s.here}: {e}")
            return False
        sent = self._sent.setdefault(peer, OrderedDict()) if introduces(gen, meta) else None
        if gen is not None and sent is not None and s.key in sent and len(arrays) == 1:
            pieces = codec.encode_step(s.rid, s.key[0], meta["hop"], meta["pos"][0], gen.step, gen.n, arrays[0])
        else:
            if gen is not None:
                meta["gen"] = gen.to_meta()
            pieces = codec.encode_frame(FrameKind.FORWARD, s.rid, meta, arrays)
        if not self.conns.send_encoded(peer, pieces):
            self._fail_next(s.link, s.rid, address, f"the connection to it from {s.here} broke")
            return False
        if sent is not None:  # touched per frame, as the receiver does (see __init__)
            sent[s.key] = None
            sent.move_to_end(s.key)
            while len(sent) > MAX_GENERATIONS:
                sent.popitem(last=False)
            if s.stepped is not None and "batch" not in meta:
                self._arm(s, peer)
        return True

    # -- the native hop --------------------------------------------------------------------
    def _arm(self, s: Step, peer: wire.Connection) -> None:
        """After a generation's step came as a STEP and went on as one: its next steps on that
        connection may take the native hop (server/hop.c), which reads, computes and sends a
        step in one C call instead of ~0.5 ms of cold Python."""
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
            self._native.pop(conn, None)
            return
        hop.route(conn.sock.fileno(), peer.sock.fileno(), s.key[0], s.rid, s.hop)
        if head is not None:
            hop.generate(head.sock.fileno(), gen.eog, gen.limit)
        self._native[conn] = _Native(hop, s.key, s.hop, peer, s, head)

    def _native_step(self, conn: wire.Connection, native: _Native, arrived: float) -> bool:
        """Let the native hop take the next frame on ``conn``; False (and the hop disarmed)
        when the frame is for Python: not the generation's plain next step, or not whole yet."""
        if (
            conn.reader.holds_part or not native.peer.idle() or self._ready or not native.hop.valid()
            or native.key[0] not in self.conns.links
            or (native.hop_index == 0 and not set(self._rounds) <= {native.key})
            or (native.head is not None and (not native.head.idle() or native.key in self._cancelled))
        ):  # fmt: skip
            del self._native[conn]
            return False
        result = native.hop.run()
        if result == HOP_NOTHING:
            return True
        h = native.hop.hop
        if result != HOP_DONE:
            del self._native[conn]
            if result in (HOP_ENDED, HOP_REPORT_LEFT):  # the token (the last server) is Python's to send on
                base = native.step
                assert base.gen is not None
                gen = Generation(int(h.n), int(h.step), base.gen.limit, base.gen.eog, base.gen.sampling)
                reported = int(h.sent) if result == HOP_REPORT_LEFT else 0
                self._after_token(base, gen, int(h.token), int(h.pos) + 1, reported)
                return True
            if result != HOP_COMPUTE_FAILED:
                return False
            message = f"graph compute failed: ggml status {h.status}"
            self._fail(native.key[0], native.key[1], ErrorCode.INTERNAL.value, message, native.step.here)
            return True
        if h.err:
            self.conns.drop(native.peer)
            self._fail_next(native.key[0], native.key[1], native.peer.peer, f"sending to it failed (errno {h.err})")
            return True
        unsent = native.hop.unsent()
        if unsent and not self.conns.send_encoded(native.peer, [unsent]):
            self._fail_next(native.key[0], native.key[1], native.peer.peer, "the connection to it broke")
            return True
        # what the Python path does per step, after the step has gone on
        if native.hop_index == 0:
            self._arrived_key(native.key, arrived)
        for lru in (self._known.get(conn), self._sent.get(native.peer)):
            if lru is not None and native.key in lru:
                lru.move_to_end(native.key)
        return True

    def _generated(self, s: Step, gen: Generation, out: np.ndarray, fed: int) -> None:
        """The last server of a generation: sample (or take the greedy token the device found,
        I32 ``out``), start the next step, report the token."""
        key = s.key
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = self._samplers[key] = Sampler(gen.sampling)
            while len(self._samplers) > MAX_GENERATIONS:
                self._end_generation(next(iter(self._samplers)))
        token = int(out[-1]) if out.dtype == np.int32 else _sample(sampler, out[-1:])
        self._after_token(s, gen, token, fed)

    def _after_token(self, s: Step, gen: Generation, token: int, fed: int, reported: int = 0) -> None:
        """Report ``token`` (the first ``reported`` bytes of its report are sent already: then
        the generation goes on, as they say) and start the next step, or end the generation."""
        key = s.key
        if reported:
            end = None
        elif key in self._cancelled:
            end = "cancelled"
        elif token in gen.eog:
            end = "eog"
        elif gen.n <= 1:
            end = "length"
        elif fed + 1 > gen.limit:
            end = "context"
        elif key[0] not in self.conns.links:
            end = "gone"  # the head's connection closed: nobody would read on
        else:
            end = None
        report: Sequence[bytes] = codec.encode_token(s.rid, token, gen.step, end)
        if reported:
            report = [b"".join(report)[reported:]]
        if end is None:
            then = gen.next_step()
            nxt = {**s.m, "hop": 0, "pos": [fed], "rows": [1]}
            nxt.pop("batch", None)  # the first server gathers these itself (see _compute_ready)
            nxt.pop("gen", None)  # ``then`` (a FORWARD sent on describes it, a STEP needs none)
            x = np.array([token], dtype=np.int32)
            first = s.route[0]
            if s.alone:  # through this server alone: no socket on the way, nothing to parse
                nxt_step = Step(nxt, s.rid, s.route, 0, [(s.items[0][0], fed, x)], then)
                # on a GPU with no other generation to batch it with, the next step starts
                # now and the token is reported while the device computes it
                at_once = self.engine.overlaps and self._lone(nxt_step)
                self._take(nxt_step, time.perf_counter(), at_once)
                if self.engine.overlaps and not at_once:  # after the batch starts (queued before)
                    self.loop.soon(lambda: self.conns.to_head(s.link, s.rid, report))
                    return
            else:
                # The next step is the token's path, the report is not; but on the CPU the
                # report goes first: this server's compute threads are gone, so the head reads
                # it on a free core while the first server reads the step. Sent after, on cores
                # the servers share, it came while the first server computed and took a core
                # from it (3 servers on 2 vCPUs: +2% tok/s, paired runs).
                report_first = not self.engine.overlaps
                if report_first:
                    self.conns.to_head(s.link, s.rid, report)
                if not self._pass_on(s, str(first[0]), str(first[1]), nxt, [x], then):
                    self._end_generation(key)
                    return
                if report_first:
                    return
        else:
            self._end_generation(key)
            self._ended(s)
        self.conns.to_head(s.link, s.rid, report)

    def _ended(self, s: Step) -> None:
        """Tell the first server that a generation's steps come no more (it waits for them)."""
        first = s.route[0]
        if s.alone:
            self._rounds.pop(s.key, None)
            return
        try:
            self.conns.send(self.conns.peer(str(first[0]), str(first[1])), FrameKind.ENDED, s.rid, {"link": s.key[0]})
        except (OSError, ValueError):
            pass  # it is gone: nothing waits there

    def _end_generation(self, key: tuple[int, int]) -> None:
        self._samplers.pop(key, None)
        self._cancelled.discard(key)

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


def _sample(sampler: Sampler, logits: np.ndarray) -> int:
    """A token from one row of logits [1, n_vocab], picked exactly as the head picks it: from
    the candidates the sampler can choose among (the top k, largest first), when it has fewer
    than all of them (a sort of 40 logits instead of a pass over the whole vocabulary)."""
    k = sampler.candidates()
    if not k:
        return sampler(logits[0])
    ids, values = top_k_logits(logits, min(k, logits.shape[1]))
    return sampler(values[0], ids[0])
