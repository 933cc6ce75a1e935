"""A model's hyper-parameters, read from its GGUF keys with gguf-py's key templates.

What llama.cpp reads for every architecture (``llama_model::load_hparams``) is read here;
what only some families read (sliding windows, soft-capping, experts, MLA ranks) is read by
the family's own ``hparams`` hook (:mod:`llmrpc.model.families`), as llama.cpp's
``load_arch_hparams`` does. Per-layer values (heads, FFN width, sliding-window layers) are
tuples indexed by layer, so layers of one model may differ.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import Keys

from llmrpc.model.gguf_reader import ArrayInfo


class SwaType(enum.IntEnum):
    """How a sliding-window layer masks (llama.cpp's ``llama_swa_type``)."""

    NONE = 0
    STANDARD = 1  # a cell further back than the window is masked
    CHUNKED = 2  # only cells of the row's own chunk of n_swa positions
    SYMMETRIC = 3


class Gating(enum.IntEnum):
    """How experts are weighted (llama.cpp's ``llama_expert_gating_func_type``)."""

    NONE = 0
    SOFTMAX = 1
    SIGMOID = 2
    SOFTMAX_WEIGHT = 3  # softmax over the chosen experts' logits (gpt-oss)


class RopeScaling(enum.IntEnum):
    NONE = 0
    LINEAR = 1
    YARN = 2
    LONGROPE = 3


ROPE_TYPE_NORM = 0
ROPE_TYPE_NEOX = 2


class HParamsError(ValueError):
    pass


@dataclass(frozen=True)
class Rope:
    """Rotary embedding arguments as llama.cpp's context derives them from the GGUF."""

    freq_base: float
    freq_scale: float
    ext_factor: float
    attn_factor: float
    beta_fast: float
    beta_slow: float
    n_ctx_orig: int
    scaling: RopeScaling


@dataclass(frozen=True)
class HParams:
    arch: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head_arr: tuple[int, ...]
    n_head_kv_arr: tuple[int, ...]
    n_ff_arr: tuple[int, ...]
    head_dim_k_full: int  # n_embd_head_k of full-attention layers
    head_dim_v_full: int
    head_dim_k_swa: int  # of sliding-window layers
    head_dim_v_swa: int
    n_rot_full: int
    n_rot_swa: int
    rms_eps: float
    norm_eps: float
    rope: Rope
    rope_type: int = ROPE_TYPE_NORM  # GGML_ROPE_TYPE_*: the family's
    rope_freq_base_swa: float = 10000.0  # of sliding-window layers (llama.cpp's default)
    rope_freq_scale_swa: float = 1.0
    rope_yarn_log_mul: float = 0.0
    rope_layers: tuple[bool, ...] = ()  # which layers rotate Q and K (llama.cpp's has_rope); empty: all
    # sliding windows
    n_swa: int = 0
    swa_type: SwaType = SwaType.NONE
    is_swa_arr: tuple[bool, ...] = ()
    # attention
    attn_scale: float = 0.0  # the family's kq scale (0: 1/sqrt(head dim))
    attn_temp_scale: float = 0.0  # Q times a factor growing with the position (llama 4's temperature; 0: off)
    attn_temp_floor: int = 0  # positions per step of that factor
    attn_temp_offset: float = 0.0
    attn_softcap: float = 0.0  # tanh soft-capping of attention scores (0: off)
    final_softcap: float = 0.0  # of the output logits
    embedding_scale: float = 0.0  # multiplies token embeddings (0: off)
    residual_scale: float = 0.0  # multiplies each block's output before the residual add (0: off)
    logit_scale: float = 0.0  # multiplies (or divides, by family) the output logits (0: off)
    # per layer: alpha_n, alpha_p, beta and eps of the xIELU activation (apertus)
    xielu: tuple[tuple[float, float, float, float], ...] = ()
    # mixture of experts
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    n_expert_shared: int = 0
    expert_weights_scale: float = 0.0
    expert_weights_norm: bool = False
    expert_gating: Gating = Gating.NONE
    n_layer_dense_lead: int = 0
    n_moe_layer_step: int = 0  # experts on every n-th layer (after the dense leading ones; 0: every layer)
    n_expert_groups: int = 0  # experts in groups, only the best n_group_used selectable (DeepSeek V3)
    n_group_used: int = 0
    # multi-head latent attention (deepseek2)
    n_lora_q: int = 0
    n_lora_kv: int = 0
    head_dim_k_mla: int = 0
    head_dim_v_mla: int = 0

    # -- per layer -------------------------------------------------------------------------
    def n_head(self, il: int = 0) -> int:
        return self.n_head_arr[il]

    def n_head_kv(self, il: int = 0) -> int:
        return self.n_head_kv_arr[il]

    def n_ff(self, il: int = 0) -> int:
        return self.n_ff_arr[il]

    def is_swa(self, il: int) -> bool:
        return bool(self.is_swa_arr) and self.is_swa_arr[il]

    def has_rope(self, il: int) -> bool:
        """Whether layer ``il`` rotates Q and K (layers without are NoPE layers)."""
        return not self.rope_layers or self.rope_layers[il]

    def head_dim_k(self, il: int = 0) -> int:
        return self.head_dim_k_swa if self.is_swa(il) else self.head_dim_k_full

    def head_dim_v(self, il: int = 0) -> int:
        return self.head_dim_v_swa if self.is_swa(il) else self.head_dim_v_full

    def n_rot(self, il: int = 0) -> int:
        return self.n_rot_swa if self.is_swa(il) else self.n_rot_full

    def n_embd_k_gqa(self, il: int = 0) -> int:
        return self.head_dim_k(il) * self.n_head_kv(il)

    def n_embd_v_gqa(self, il: int = 0) -> int:
        return self.head_dim_v(il) * self.n_head_kv(il)

    def rope_base(self, il: int) -> float:
        return self.rope_freq_base_swa if self.is_swa(il) else self.rope.freq_base

    def rope_scale(self, il: int) -> float:
        return self.rope_freq_scale_swa if self.is_swa(il) else self.rope.freq_scale

    def kq_scale(self, head_dim: int) -> float:
        return self.attn_scale if self.attn_scale else 1.0 / math.sqrt(head_dim)

    @property
    def is_mla(self) -> bool:
        """Latent attention: the cache holds one compressed K per position, V its first part."""
        return self.head_dim_k_mla > 0 and self.head_dim_v_mla > 0

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def has_swa(self) -> bool:
        return self.swa_type != SwaType.NONE and any(self.is_swa_arr)

    def swa_masked(self, p0: int, p1: int) -> bool:
        """Whether a row at position ``p1`` may not see a cell at ``p0`` (sliding window)."""
        return swa_masked(self.swa_type, self.n_swa, p0, p1)


def attn_temp_scales(hp: HParams, pos: np.ndarray) -> np.ndarray:
    """F32 [1, 1, n]: the attention temperature factor of each row's position
    (``log(floor((pos + offset) / floor_scale) + 1) * scale + 1``), in llama.cpp's float and
    double arithmetic (``llm_graph_input_attn_temp``)."""
    f32 = np.float32
    steps = np.floor((pos.astype(f32) + f32(hp.attn_temp_offset)) / f32(hp.attn_temp_floor)).astype(f32)
    scales = np.log(steps.astype(np.float64) + 1.0) * float(f32(hp.attn_temp_scale)) + 1.0
    return scales.astype(f32).reshape(1, 1, -1)


def swa_masked(swa_type: SwaType, n_swa: int, p0: int, p1: int) -> bool:
    """llama.cpp's ``is_masked_swa``: the one rule for a sliding window's cells."""
    if swa_type == SwaType.STANDARD:
        return p1 - p0 >= n_swa
    if swa_type == SwaType.CHUNKED:
        return p0 < (p1 // n_swa) * n_swa
    if swa_type == SwaType.SYMMETRIC:
        half = n_swa // 2
        return p1 - p0 < -half or p1 - p0 > half
    return False


class KeyReader:
    """GGUF keys of one architecture, by gguf-py's templates (``Keys.LLM.BLOCK_COUNT`` ...)."""

    def __init__(self, fields: Mapping[str, Any], arch: str, path: str = "") -> None:
        self.fields = fields
        self.arch = arch
        self.path = path

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def has(self, template: str) -> bool:
        return self.key(template) in self.fields

    def get(self, template: str, default: Any = None) -> Any:
        value = self.fields.get(self.key(template))
        if isinstance(value, ArrayInfo):
            raise HParamsError(f"{self.path}: GGUF key {self.key(template)} is an array, expected one value")
        return default if value is None else value

    def req(self, template: str) -> Any:
        value = self.get(template)
        if value is None:
            raise HParamsError(f"{self.path}: GGUF key {self.key(template)} is missing")
        return value

    def per_layer(self, template: str, n_layer: int, default: int | None = None) -> tuple[int, ...] | None:
        """A key that is one number for every layer or an array of one per layer
        (llama.cpp's ``get_key_or_arr``); ``default`` (or None) when absent."""
        value = self.fields.get(self.key(template))
        if value is None:
            return None if default is None else (default,) * n_layer
        if isinstance(value, ArrayInfo):
            if value.values is None or len(value.values) != n_layer:
                raise HParamsError(f"{self.path}: {self.key(template)} has {value.count} values for {n_layer} layers")
            return tuple(int(v) for v in value.values)
        return (int(value),) * n_layer

    def per_layer_float(self, template: str, n_layer: int) -> tuple[float, ...]:
        """A required key of one number for every layer or one per layer (as ``per_layer``)."""
        values = self.array(template)
        if values is None:
            return (float(self.req(template)),) * n_layer
        if len(values) != n_layer:
            raise HParamsError(f"{self.path}: {self.key(template)} has {len(values)} values for {n_layer} layers")
        return tuple(float(v) for v in values)

    def array(self, template: str) -> tuple[Any, ...] | None:
        value = self.fields.get(self.key(template))
        if isinstance(value, ArrayInfo):
            if value.values is None:
                raise HParamsError(f"{self.path}: {self.key(template)} is too long to be a hyper-parameter")
            return value.values
        return None


_SCALING = {"none": RopeScaling.NONE, "linear": RopeScaling.LINEAR, "yarn": RopeScaling.YARN,
            "longrope": RopeScaling.LONGROPE}  # fmt: skip


def read_base(r: KeyReader, n_vocab: int) -> dict[str, Any]:
    """What every architecture has (llama.cpp's generic ``load_hparams``), as HParams fields."""
    n_layer_all = int(r.req(Keys.LLM.BLOCK_COUNT))  # with next-token-prediction layers, which are not run
    n_layer = n_layer_all - int(r.get(Keys.LLM.NEXTN_PREDICT_LAYERS, 0))
    n_embd = int(r.req(Keys.LLM.EMBEDDING_LENGTH))
    n_head = r.per_layer(Keys.Attention.HEAD_COUNT, n_layer_all, 0)
    assert n_head is not None
    n_head_kv = r.per_layer(Keys.Attention.HEAD_COUNT_KV, n_layer_all) or n_head
    n_ff = r.per_layer(Keys.LLM.FEED_FORWARD_LENGTH, n_layer_all, 0)
    assert n_ff is not None
    n_head, n_head_kv, n_ff = n_head[:n_layer], n_head_kv[:n_layer], n_ff[:n_layer]
    head0 = max(n_head) or 1
    hd_k = int(r.get(Keys.Attention.KEY_LENGTH, n_embd // head0))
    hd_v = int(r.get(Keys.Attention.VALUE_LENGTH, n_embd // head0))
    n_rot = int(r.get(Keys.Rope.DIMENSION_COUNT, hd_k))
    scaling_name = str(r.get(Keys.Rope.SCALING_TYPE, "linear"))
    if scaling_name not in _SCALING:
        raise HParamsError(f"{r.path}: rope scaling {scaling_name!r} is not supported")
    factor = float(r.get(Keys.Rope.SCALING_FACTOR, 0.0))
    n_ctx_train = int(r.req(Keys.LLM.CONTEXT_LENGTH))
    return dict(
        arch=r.arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_ctx_train=n_ctx_train,
        n_head_arr=n_head,
        n_head_kv_arr=n_head_kv,
        n_ff_arr=n_ff,
        head_dim_k_full=hd_k,
        head_dim_v_full=hd_v,
        head_dim_k_swa=int(r.get(Keys.Attention.KEY_LENGTH_SWA, hd_k)),
        head_dim_v_swa=int(r.get(Keys.Attention.VALUE_LENGTH_SWA, hd_v)),
        n_rot_full=n_rot,
        n_rot_swa=int(r.get(Keys.Rope.DIMENSION_COUNT_SWA, n_rot)),
        rms_eps=float(r.get(Keys.Attention.LAYERNORM_RMS_EPS, 0.0)),
        norm_eps=float(r.get(Keys.Attention.LAYERNORM_EPS, 0.0)),
        n_expert=int(r.get(Keys.LLM.EXPERT_COUNT, 0)),
        n_expert_used=int(r.get(Keys.LLM.EXPERT_USED_COUNT, 0)),
        n_expert_groups=int(r.get(Keys.LLM.EXPERT_GROUP_COUNT, 0)),
        n_group_used=int(r.get(Keys.LLM.EXPERT_GROUP_USED_COUNT, 0)),
        is_swa_arr=(False,) * n_layer,
        rope=dict(
            freq_base=float(r.get(Keys.Rope.FREQ_BASE, 10000.0)),
            freq_scale=1.0 / factor if factor else 1.0,
            scaling=_SCALING[scaling_name],
            n_ctx_orig=int(r.get(Keys.Rope.SCALING_ORIG_CTX_LEN, n_ctx_train)),
            rope_attn_factor=float(r.get(Keys.Rope.SCALING_ATTN_FACTOR, 1.0)),
            # YaRN's own keys are read by the families that read them (read_yarn_betas)
            yarn_ext_factor=-1.0,
            yarn_attn_factor=1.0,
            beta_fast=32.0,
            beta_slow=1.0,
        ),
    )


def read_yarn_betas(r: KeyReader, fields: dict[str, Any]) -> None:
    """YaRN's correction dimensions from the GGUF, for the families whose llama.cpp loader
    reads them (the others keep 32 and 1)."""
    rope = fields["rope"]
    rope["beta_fast"] = float(r.get(Keys.Rope.SCALING_YARN_BETA_FAST, rope["beta_fast"]))
    rope["beta_slow"] = float(r.get(Keys.Rope.SCALING_YARN_BETA_SLOW, rope["beta_slow"]))


def context_rope(rope: Mapping[str, Any], rope_yarn_log_mul: float, mscale_is_log_mul: bool) -> Rope:
    """The rope arguments a llama.cpp context computes from the model's (``llama_context``'s
    constructor with its default parameters): YaRN's extrapolation mix and attention factor,
    in float32 arithmetic as there."""
    f32 = np.float32
    scaling = RopeScaling(rope["scaling"])
    freq_scale = f32(1.0 if scaling == RopeScaling.NONE else rope["freq_scale"])
    ext_factor = f32(rope["yarn_ext_factor"])
    if ext_factor < 0:
        ext_factor = f32(1.0 if scaling == RopeScaling.YARN else 0.0)
    attn_factor = f32(rope["yarn_attn_factor"])
    if ext_factor != 0:
        factor = f32(1.0) / freq_scale

        def mscale(scale: np.float32, m: np.float32) -> np.float32:
            return f32(1.0) if scale <= 1.0 else f32(f32(0.1) * m * np.log(scale) + f32(1.0))

        log_mul = f32(rope_yarn_log_mul)
        if log_mul != 0.0:
            m = log_mul if (mscale_is_log_mul and log_mul != 1.0) else f32(1.0)
            attn_factor = f32(mscale(factor, m) / mscale(factor, log_mul))
        else:
            attn_factor = mscale(factor, f32(1.0))
        attn_factor = f32(attn_factor * (f32(1.0) / (f32(1.0) + f32(0.1) * np.log(factor))))
    attn_factor = f32(attn_factor * f32(rope["rope_attn_factor"]))
    return Rope(
        freq_base=float(rope["freq_base"]),
        freq_scale=float(freq_scale),
        ext_factor=float(ext_factor),
        attn_factor=float(attn_factor),
        beta_fast=float(rope["beta_fast"]),
        beta_slow=float(rope["beta_slow"]),
        n_ctx_orig=int(rope["n_ctx_orig"]),
        scaling=scaling,
    )


def swa_pattern(n_layer: int, n_pattern: int, dense_first: bool = False) -> tuple[bool, ...]:
    """Which layers use the sliding window, from a period (llama.cpp's ``set_swa_pattern``):
    every ``n_pattern``-th layer is a full-attention layer (the first of each period when
    ``dense_first``, else the last); 0 makes every layer a sliding-window one."""
    if dense_first:
        return tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    return tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))


def read_swa(r: KeyReader, n_layer: int, default_pattern: int, dense_first: bool = False) -> tuple[bool, ...]:
    """The sliding-window layers: an explicit per-layer array, or a period (llama.cpp's
    ``load_swa_pattern``)."""
    values = r.array(Keys.Attention.SLIDING_WINDOW_PATTERN)
    if values is not None:
        if len(values) != n_layer:
            raise HParamsError(f"{r.path}: sliding_window_pattern has {len(values)} values for {n_layer} layers")
        return tuple(bool(v) for v in values)
    return swa_pattern(n_layer, int(r.get(Keys.Attention.SLIDING_WINDOW_PATTERN, default_pattern)), dense_first)


def finish(fields: dict[str, Any], mscale_is_log_mul: bool = False) -> HParams:
    """HParams from the generic and the family's fields; checks what would otherwise fail
    inside ggml."""
    rope = fields.pop("rope")
    fields["rope"] = context_rope(rope, float(fields.get("rope_yarn_log_mul", 0.0)), mscale_is_log_mul)
    names = {f.name for f in dataclasses.fields(HParams)}
    unknown = set(fields) - names
    if unknown:
        raise AssertionError(f"unknown hyper-parameters {sorted(unknown)}")
    hp = HParams(**fields)
    _check(hp)
    return hp


def _check(hp: HParams) -> None:
    def positive(name: str, values: Sequence[int]) -> None:
        if any(v <= 0 for v in values):
            raise HParamsError(f"{hp.arch}: {name} must be positive, got {list(values)}")

    positive("block_count", [hp.n_layer])
    positive("embedding_length", [hp.n_embd])
    positive("attention.head_count", hp.n_head_arr)
    positive("attention.head_count_kv", hp.n_head_kv_arr)
    for il in range(hp.n_layer):
        if hp.n_head(il) % hp.n_head_kv(il):
            raise HParamsError(f"{hp.arch}: layer {il} has {hp.n_head(il)} heads, not a multiple of {hp.n_head_kv(il)}")
    if hp.n_expert and not 0 < hp.n_expert_used <= hp.n_expert:
        raise HParamsError(f"{hp.arch}: expert_used_count {hp.n_expert_used} is not within 1..{hp.n_expert}")
    if hp.n_expert_groups > 1 and (hp.n_expert % hp.n_expert_groups or not 0 < hp.n_group_used < hp.n_expert_groups):
        raise HParamsError(
            f"{hp.arch}: {hp.n_expert} experts in {hp.n_expert_groups} groups, {hp.n_group_used} of them used"
        )
    if hp.swa_type != SwaType.NONE and hp.n_swa <= 0:
        raise HParamsError(f"{hp.arch}: a sliding window of {hp.n_swa} positions")
