"""Sampling: greedy, or temperature with top-k and top-p, seeded (at the head, or on the last
server when it generates on its own: see the data plane)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_SEED = (1 << 64) - 1  # numpy's generators take any non-negative seed; the wire carries up to 64 bits
MAX_DRAWN = (1 << 63) - 1
MAX_TOP_K = (1 << 31) - 1
# Below this, a positive temperature scales logits past float64's range (NaN probabilities)
MIN_TEMPERATURE = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token; every field is checked when made (a ValueError names the field),
    so a bad value is refused where it enters: the library, the API, a server's data port."""

    temperature: float = 0.8  # 0 means greedy; otherwise at least MIN_TEMPERATURE
    top_k: int = 40  # 0 means the whole vocabulary
    top_p: float = 0.95  # within (0, 1]; 1.0 means no nucleus cut
    seed: int | None = None  # within [0, MAX_SEED]; None: a fresh random stream
    # Random draws already taken from the seed's stream (one a sampled token): a generation
    # replayed after a server failed goes on with the draws it would have had.
    drawn: int = 0

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        if not _real(t) or not math.isfinite(t) or not (t == 0 or MIN_TEMPERATURE <= t):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got {t!r}")
        if not _real(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number within (0, 1], got {p!r}")
        if not _integer(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer within [0, {MAX_TOP_K}] (0: all), got {self.top_k!r}")
        if self.seed is not None and (not _integer(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer within [0, {MAX_SEED}] or None, got {self.seed!r}")
        if not _integer(self.drawn) or not 0 <= self.drawn <= MAX_DRAWN:
            raise ValueError(f"drawn must be an integer within [0, {MAX_DRAWN}], got {self.drawn!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        bits = np.random.PCG64(params.seed)  # numpy's default generator (default_rng's)
        if params.drawn > 0:  # one 64-bit draw each, as every sampled token takes: skipped, not made
            bits.advance(params.drawn)
        self._rng = np.random.Generator(bits)

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
