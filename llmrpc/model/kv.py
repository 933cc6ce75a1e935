"""The KV cache's shape and rules: which layers share a cache layout, how many cells each
keeps, which cell a position goes to, and which cells a row may attend to (the mask).

Layers fall into groups as in llama.cpp's iSWA cache (``llama-kv-cache-iswa.cpp``): the
full-attention layers keep a cell for every position of the context, at the position's own
index; the sliding-window layers keep only the window plus one batch, reusing cells in the
order llama.cpp's ``find_slot`` picks them, so that cells, masks and hence results are
llama.cpp's own. Everything else (the stage, the planner) asks this module.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from llmrpc.model.hparams import HParams, SwaType, swa_masked
from llmrpc.types import UBATCH, kv_cells, swa_cells

FULL = "full"
SWA = "swa"
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")  # llama.cpp's -ctk/-ctv


@dataclass(frozen=True)
class CacheConfig:
    """How the attention stores and reads its cache (llama.cpp's ``-fa``, ``-ctk``, ``-ctv``):
    with flash attention the V cache is stored like K (a row per cell), else transposed; a
    quantized V needs flash attention. ``flash_attn`` None is llama.cpp's auto: on where the
    device computes it (a server resolves it for its device, :meth:`resolved`)."""

    flash_attn: bool | None = None
    type_k: str = "f16"
    type_v: str = "f16"

    def __post_init__(self) -> None:
        for t in (self.type_k, self.type_v):
            if t not in CACHE_TYPES:
                raise ValueError(f"cache type {t!r} is not one of {', '.join(CACHE_TYPES)}")
        if self.flash_attn is False and self.type_v not in ("f32", "f16", "bf16"):
            raise ValueError(f"a {self.type_v} V cache needs flash attention (as in llama.cpp)")

    def resolved(self) -> CacheConfig:
        """Auto made definite: on (ggml computes fused attention on the CPU and the GPU
        backends llmrpc runs on, where llama.cpp's auto turns it on)."""
        return self if self.flash_attn is not None else replace(self, flash_attn=True)

    @staticmethod
    def ggml_type(name: str) -> int:
        from gguf.constants import GGMLQuantizationType

        return int(GGMLQuantizationType[name.upper()])

    @property
    def ggml_k(self) -> int:
        return self.ggml_type(self.type_k)

    @property
    def ggml_v(self) -> int:
        return self.ggml_type(self.type_v)

    @staticmethod
    def row_bytes(name: str, n: int) -> int:
        """Bytes of ``n`` values in cache type ``name``."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
        if n % block:
            raise ValueError(f"a {name} cache holds rows of whole {block}-value blocks; these have {n} values")
        return n // block * size


@dataclass(frozen=True)
class KVGroup:
    """Layers that share one cell layout (and hence one mask and one set of indices)."""

    name: str  # FULL or SWA
    layers: tuple[int, ...]
    n_embd_v: int  # V rows per cell, the same for the group's layers (the V index input's shape; 0: K only)
    window: int = 0  # sliding window (SWA groups)
    swa_type: SwaType = SwaType.NONE

    def cells(self, n_ctx: int) -> int:
        return kv_cells(n_ctx) if self.name == FULL else swa_cells(n_ctx, self.window)


def layer_group(hp: HParams, il: int) -> str:
    return SWA if hp.is_swa(il) and hp.swa_type != SwaType.NONE else FULL


def kv_groups(hp: HParams, start: int = 0, end: int | None = None) -> list[KVGroup]:
    """The groups of layers [start, end), full first."""
    end = hp.n_layer if end is None else end
    groups = []
    for name in (FULL, SWA):
        layers = tuple(il for il in range(start, end) if layer_group(hp, il) == name)
        if not layers:
            continue
        widths = {v_width(hp, il) for il in layers}
        if len(widths) > 1:
            raise ValueError(f"{hp.arch}: {name} layers with different V widths {sorted(widths)} are not supported")
        window = hp.n_swa if name == SWA else 0
        groups.append(KVGroup(name, layers, widths.pop(), window, hp.swa_type if name == SWA else SwaType.NONE))
    return groups


def v_width(hp: HParams, il: int) -> int:
    """Values a cell of layer ``il`` keeps in the V cache: none with latent attention (MLA),
    whose V is the first part of its K."""
    return 0 if hp.is_mla else hp.n_embd_v_gqa(il)


def check_cache(hp: HParams, cache: CacheConfig) -> None:
    """Refuse a cache type whose blocks do not fit the model's heads, and quantized caches of
    heads whose size is a multiple of 64 (llama.cpp rotates those by a Hadamard matrix, which
    llmrpc does not do yet: their numbers would differ)."""
    for name, width, head in (
        (cache.type_k, "K", hp.head_dim_k),
        (cache.type_v, "V", hp.head_dim_v),
    ):
        if name in ("f32", "f16", "bf16") or (width == "V" and hp.is_mla):  # (latent attention: no V cache)
            continue
        for il in range(hp.n_layer):
            hd = head(il)
            try:
                cache.row_bytes(name, hd)
            except ValueError:
                raise ValueError(f"a {name} {width} cache does not fit heads of {hd} values") from None
            if hd % 64 == 0:
                raise ValueError(
                    f"a {name} {width} cache of {hd}-value heads: llama.cpp rotates those (Hadamard), which is not "
                    "supported; use f16"
                )


def cell_bytes(hp: HParams, il: int, cache: CacheConfig) -> int:
    """K and V bytes of one cell of layer ``il``."""
    v = v_width(hp, il)
    return cache.row_bytes(cache.type_k, hp.n_embd_k_gqa(il)) + (cache.row_bytes(cache.type_v, v) if v else 0)


def layer_kv_bytes(hp: HParams, il: int, n_ctx: int, cache: CacheConfig) -> int:
    window = hp.n_swa if layer_group(hp, il) == SWA else 0
    cells = swa_cells(n_ctx, window) if window else kv_cells(n_ctx)
    return cell_bytes(hp, il, cache) * cells


def kv_bytes(hp: HParams, start: int, end: int, n_ctx: int, cache: CacheConfig) -> int:
    """Bytes of one session's cache for layers [start, end)."""
    return sum(layer_kv_bytes(hp, il, n_ctx, cache) for il in range(start, end))


class NoCellError(RuntimeError):
    pass


class SlidingCells:
    """Cell allocation of one sequence in a sliding-window cache, as llama.cpp's
    ``llama_kv_cache::find_slot`` / ``apply_ubatch`` / ``seq_rm`` do it: positions go to the
    first usable cell from the head on (empty, or holding a position the window has left),
    wrapping around the cache."""

    def __init__(self, size: int, window: int, swa_type: SwaType) -> None:
        self.size = size
        self.window = window
        self.swa_type = swa_type
        self.pos = np.full(size, -1, dtype=np.int64)  # the position each cell holds, -1: empty
        # where the next search starts; in an array, which the native hop (server/hop.c) moves too
        self.heads = np.zeros(1, dtype=np.int64)

    @property
    def head(self) -> int:
        return int(self.heads[0])

    @head.setter
    def head(self, value: int) -> None:
        self.heads[0] = value

    def clear(self) -> None:
        self.pos.fill(-1)
        self.head = 0

    @property
    def pos_max(self) -> int:
        return int(self.pos.max()) if self.size else -1

    @property
    def used_max_p1(self) -> int:
        used = np.flatnonzero(self.pos >= 0)
        return int(used[-1]) + 1 if used.size else 0

    def remove_from(self, p0: int) -> None:
        """Forget positions >= p0 (a rewind): llama.cpp's ``seq_rm(seq, p0, -1)``."""
        self._remove(p0, np.iinfo(np.int64).max)

    def _remove(self, p0: int, p1: int) -> None:
        freed = np.flatnonzero((self.pos >= p0) & (self.pos < p1))
        if freed.size:
            self.pos[freed] = -1
            self.head = min(self.head, int(freed[0]))

    def can_rewind(self, p0: int) -> bool:
        """Whether positions before ``p0`` that a row at ``p0`` attends to are all still held."""
        first = max(0, p0 - self.window + 1) if self.swa_type == SwaType.STANDARD else 0
        held = set(self.pos[self.pos >= 0].tolist())
        return all(p in held for p in range(first, p0))

    def holds_in_order(self, rows: int) -> bool:
        """Whether positions 0..rows-1 are at cells 0..rows-1, where a new sequence computes them
        (no cell of theirs reused by a later position): then a new session may start from them."""
        return rows <= self.size and bool(np.array_equal(self.pos[:rows], np.arange(rows)))

    def start_at(self, rows: int) -> None:
        """The state of a new sequence that has computed positions 0..rows-1 (cell p holds p),
        as :meth:`place` leaves it."""
        self.clear()
        self.pos[:rows] = np.arange(rows)
        self.head = rows

    def place(self, positions: np.ndarray) -> np.ndarray:
        """The cells for a batch of consecutive positions, and the cache updated to hold them."""
        n = len(positions)
        pos_max = self.pos_max
        used = int(np.count_nonzero(self.pos >= 0))
        head = 0 if self.head > used + 2 * n else self.head
        if n > self.size:
            raise NoCellError(f"a batch of {n} rows does not fit a sliding-window cache of {self.size} cells")
        cells: list[int] = []
        tested = 0
        while len(cells) < n:
            if head >= self.size:
                tested += self.size - head
                head = 0
                continue
            idx = head
            head += 1
            tested += 1
            p = int(self.pos[idx])
            if p < 0 or swa_masked(self.swa_type, self.window, p, pos_max + 1):
                cells.append(idx)
            if len(cells) < n and tested >= self.size:
                raise NoCellError(f"no free cell for {n} rows in a sliding-window cache of {self.size} cells")
        out = np.array(cells, dtype=np.int64)
        overwritten = self.pos[out]
        max_rm = int(overwritten.max()) if overwritten.size else -1
        self.pos[out] = positions
        if max_rm >= 0:
            pos_min = int(self.pos[self.pos >= 0].min())
            if pos_min <= max_rm:
                self._remove(pos_min, max_rm + 1)
        self.head = int(out[-1]) + 1
        return out

    def mask(self, rows: np.ndarray, n_kv: int) -> np.ndarray:
        """F32 [n_rows, n_kv]: 0 where a row may attend to a cell, -inf elsewhere."""
        cell_pos = self.pos[None, :n_kv]
        p = rows[:, None].astype(np.int64)
        keep = (cell_pos >= 0) & (cell_pos <= p)
        if self.swa_type == SwaType.STANDARD:
            keep &= p - cell_pos < self.window
        elif self.swa_type != SwaType.NONE:
            keep &= ~np.vectorize(lambda a, b: swa_masked(self.swa_type, self.window, a, b))(cell_pos, p)
        return np.where(keep, np.float32(0), np.float32(-np.inf))


def full_mask(rows: np.ndarray, n_kv: int) -> np.ndarray:
    """The mask of a full-attention cache, where cell i holds position i."""
    cells = np.arange(n_kv, dtype=np.int32)[None, :]
    return np.where(cells <= rows[:, None], np.float32(0), np.float32(-np.inf))


__all__ = ["FULL", "SWA", "UBATCH", "KVGroup", "SlidingCells", "NoCellError", "kv_groups", "kv_bytes"]
