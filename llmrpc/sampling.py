"""Sampling: greedy, or temperature with top-k and top-p, seeded (at the head, or on the last
server when it generates on its own: see the data plane)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # <= 0 means greedy
    top_k: int = 40  # <= 0 means the whole vocabulary
    top_p: float = 0.95  # 1.0 means no nucleus cut
    seed: int | None = None
    # Random draws already taken from the seed's stream (one a sampled token): a generation
    # replayed after a server failed goes on with the draws it would have had.
    drawn: int = 0


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        if params.top_p <= 0 or params.top_p > 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
        self.params = params
        self._rng = np.random.default_rng(params.seed)
        if params.drawn > 0:
            self._rng.random(params.drawn)  # one 64-bit draw each, as every sampled token takes

    def candidates(self) -> int:
        """How many of the largest logits sampling can ever pick from (0: it needs them all)."""
        p = self.params
        if p.temperature <= 0:
            return 1
        return p.top_k if 0 < p.top_k <= 1024 else 0

    def __call__(self, logits: np.ndarray, ids: np.ndarray | None = None) -> int:
        """Pick a token from full logits, or from candidate ``logits`` with vocabulary ``ids``
        (the top :meth:`candidates` of them, largest first)."""
        if ids is not None:
            return int(ids[self._pick(logits)])
        return self._pick(logits)

    def _pick(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < logits.size:
            idx = np.argpartition(-logits, p.top_k - 1)[: p.top_k]
        else:
            idx = np.arange(logits.size)
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        probs = np.exp(logits[idx] - logits[idx[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, probs = idx[:keep], probs[:keep] / probs[:keep].sum()
        return int(idx[self._rng.choice(idx.size, p=probs)])
