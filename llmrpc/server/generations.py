"""The last server's side of a generation that runs on its own: sample each token, report it to
the head (TOKEN), and send it back to the first server as the next step, until it ends.

Through one server the next step is queued on its own loop, with no socket on the way.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmrpc import codec
from llmrpc.codec import FrameKind, Generation
from llmrpc.sampling import Sampler
from llmrpc.server.api import StageEngine, top_k_logits
from llmrpc.server.batcher import Batcher
from llmrpc.server.connections import Connections
from llmrpc.server.peers import Peers
from llmrpc.server.steps import MAX_GENERATIONS, Step

Key = tuple[int, int]  # a generation: (head link, request)
Take = Callable[[Step, float, bool], None]
PassOn = Callable[[Step, str, dict[str, Any], Sequence[np.ndarray], Generation | None], bool]


class Generations:
    def __init__(
        self, engine: StageEngine, conns: Connections, peers: Peers, batcher: Batcher, take: Take, pass_on: PassOn
    ) -> None:
        """``take(step, arrived, at_once)``: a step for this server; ``pass_on(step, address,
        meta, arrays, gen)``: send a step on (False: it failed, and the head was told)."""
        self.engine, self.conns, self.peers, self.batcher = engine, conns, peers, batcher
        self._take, self._pass_on = take, pass_on
        # generations this server samples for (it is their last): (link, request) -> sampler
        self._samplers: OrderedDict[Key, Sampler] = OrderedDict()
        self.cancelled: set[Key] = set()

    def cancel(self, key: Key) -> None:
        """Ends after the step in flight (if it is this server's)."""
        if key in self._samplers:
            self.cancelled.add(key)

    def link_gone(self, link: int) -> None:
        for key in [k for k in self._samplers if k[0] == link]:  # nobody to report to
            self.end(key)

    def end(self, key: Key) -> None:
        self._samplers.pop(key, None)
        self.cancelled.discard(key)

    def generated(self, s: Step, gen: Generation, out: np.ndarray, fed: int) -> None:
        """Sample (or take the greedy token the device found, I32 ``out``), start the next
        step, report the token."""
        key = s.key
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = self._samplers[key] = Sampler(gen.sampling)
            while len(self._samplers) > MAX_GENERATIONS:
                self.end(next(iter(self._samplers)))
        token = int(out[-1]) if out.dtype == np.int32 else _sample(sampler, out[-1:])
        self.after_token(s, gen, token, fed)

    def after_token(self, s: Step, gen: Generation, token: int, fed: int) -> None:
        """Report ``token`` and start the next step, or end the generation."""
        key = s.key
        if key in self.cancelled:
            end: str | None = "cancelled"
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
        report = codec.encode_token(s.rid, token, gen.step, end)
        if end is not None:
            self.end(key)
            self._ended(s)
            self.conns.to_head(s.link, s.rid, report)
            return
        then = gen.next_step()
        nxt = {**s.m, "hop": 0, "pos": [fed], "rows": [1]}
        nxt.pop("batch", None)  # the first server gathers these itself (see Batcher)
        nxt.pop("gen", None)  # ``then`` (a FORWARD sent on describes it, a STEP needs none)
        x = np.array([token], dtype=np.int32)
        if s.alone:  # through this server alone: no socket on the way, nothing to parse
            nxt_step = Step(nxt, s.rid, s.route, 0, [(s.items[0][0], fed, x)], then)
            # on a GPU with no other generation to batch it with, the next step starts
            # now and the token is reported while the device computes it
            at_once = self.engine.overlaps and self.batcher.lone(nxt_step)
            self._take(nxt_step, time.perf_counter(), at_once)
            if self.engine.overlaps and not at_once:  # after the batch starts (queued before)
                self.conns.loop.soon(lambda: self.conns.to_head(s.link, s.rid, report))
                return
            self.conns.to_head(s.link, s.rid, report)
            return
        # The next step is the token's path, the report is not; but on the CPU the report goes
        # first: this server's compute threads are gone, so the head reads it on a free core
        # while the first server reads the step. Sent after, on cores the servers share, it
        # came while the first server computed and took a core from it (3 servers on 2 vCPUs:
        # +2% tok/s, paired runs).
        report_first = not self.engine.overlaps
        if report_first:
            self.conns.to_head(s.link, s.rid, report)
        if not self._pass_on(s, str(s.route[0][0]), nxt, [x], then):
            self.end(key)
            return
        if not report_first:
            self.conns.to_head(s.link, s.rid, report)

    def _ended(self, s: Step) -> None:
        """Tell the first server that a generation's steps come no more (it waits for them)."""
        if s.alone:
            self.batcher.ended(s.key)
            return
        first = self.peers.get(str(s.route[0][0]))
        if first is not None:  # (else it is gone: nothing waits there)
            self.conns.send(first, FrameKind.ENDED, s.rid, {"link": s.key[0]})


def _sample(sampler: Sampler, logits: np.ndarray) -> int:
    """A token from one row of logits [1, n_vocab], picked exactly as the head picks it: from
    the candidates the sampler can choose among (the top k, largest first), when it has fewer
    than all of them (a sort of 40 logits instead of a pass over the whole vocabulary)."""
    k = sampler.candidates()
    if not k:
        return sampler(logits[0])
    ids, values = top_k_logits(logits, min(k, logits.shape[1]))
    return sampler(values[0], ids[0])
