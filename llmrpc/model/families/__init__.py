"""Model families: one small graph builder per family, on the shared pieces of
:mod:`llmrpc.model.graph`, plus the hyper-parameters only that family reads.

``FAMILIES`` maps a GGUF's ``general.architecture`` to its family. Each builder mirrors
llama.cpp's ``src/models/<family>.cpp`` op for op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmrpc.ggml import lib as g
from llmrpc.model.arch import UnsupportedArchitectureError, supported_message
from llmrpc.model.builder import Builder
from llmrpc.model.families import (
    cohere,
    deepseek,
    exaone,
    gemma,
    glm,
    gptoss,
    granite,
    llama,
    olmo,
    phi,
    qwen,
    starcoder,
)
from llmrpc.model.hparams import ROPE_TYPE_NEOX, ROPE_TYPE_NORM, KeyReader


def _no_hparams(r: KeyReader, fields: dict[str, Any]) -> None:
    pass


@dataclass(frozen=True)
class Family:
    build: Callable[[Builder], g.Tensor]
    rope_type: int  # GGML_ROPE_TYPE_* (llama.cpp's llama_model_rope_type)
    # reads the family's own keys into the HParams fields (llama.cpp's load_arch_hparams)
    hparams: Callable[[KeyReader, dict[str, Any]], None] = _no_hparams
    moe: bool = False  # always a mixture of experts (others: when the GGUF has experts)
    mscale_is_log_mul: bool = False  # YaRN's mscale is the log multiplier (deepseek2's rule)


FAMILIES: dict[str, Family] = {
    "llama": Family(llama.build, ROPE_TYPE_NORM),
    "mistral": Family(llama.build, ROPE_TYPE_NORM),
    "qwen2": Family(qwen.build_qwen2, ROPE_TYPE_NEOX),
    "qwen3": Family(qwen.build_qwen3, ROPE_TYPE_NEOX),
    "qwen3moe": Family(qwen.build_qwen3moe, ROPE_TYPE_NEOX, qwen.hparams_moe, moe=True),
    "gemma3": Family(gemma.build_gemma3, ROPE_TYPE_NEOX, gemma.hparams_gemma3),
    "phi3": Family(phi.build_phi3, ROPE_TYPE_NEOX),
    "gpt-oss": Family(gptoss.build, ROPE_TYPE_NEOX, gptoss.hparams, moe=True),
    "deepseek2": Family(deepseek.build, ROPE_TYPE_NORM, deepseek.hparams, moe=True, mscale_is_log_mul=True),
}
FAMILIES.update(
    {
        "gemma2": Family(gemma.build_gemma2, ROPE_TYPE_NEOX, gemma.hparams_gemma2),
        "granite": Family(granite.build, ROPE_TYPE_NORM, granite.hparams_granite),
        "granitemoe": Family(granite.build, ROPE_TYPE_NORM, granite.hparams_granitemoe, moe=True),
        "olmo2": Family(olmo.build_olmo2, ROPE_TYPE_NEOX, olmo.hparams_olmo2),
        "smollm3": Family(llama.build_smollm3, ROPE_TYPE_NORM, llama.hparams_smollm3),
        "mistral3": Family(llama.build, ROPE_TYPE_NORM, llama.hparams_mistral3),
        "starcoder2": Family(starcoder.build_starcoder2, ROPE_TYPE_NEOX),
        "exaone4": Family(exaone.build_exaone4, ROPE_TYPE_NEOX, exaone.hparams_exaone4),
        "cohere2": Family(cohere.build_cohere2, ROPE_TYPE_NORM, cohere.hparams_cohere2),
        "glm4": Family(glm.build_glm4, ROPE_TYPE_NORM, glm.hparams_glm4),
        "glm4moe": Family(glm.build_glm4moe, ROPE_TYPE_NEOX, glm.hparams_glm4moe, moe=True),
        "qwen2moe": Family(qwen.build_qwen2moe, ROPE_TYPE_NEOX, qwen.hparams_qwen2moe, moe=True),
        "olmoe": Family(olmo.build_olmoe, ROPE_TYPE_NEOX, moe=True),
        "arcee": Family(llama.build_arcee, ROPE_TYPE_NORM),
        "seed_oss": Family(llama.build_seed_oss, ROPE_TYPE_NEOX),
        "ernie4_5": Family(llama.build_ernie4_5, ROPE_TYPE_NORM),
        "ernie4_5-moe": Family(llama.build_ernie4_5_moe, ROPE_TYPE_NORM, llama.hparams_ernie4_5_moe, moe=True),
        "apertus": Family(llama.build_apertus, ROPE_TYPE_NEOX, llama.hparams_apertus),
        "gemma": Family(gemma.build_gemma, ROPE_TYPE_NEOX, gemma.hparams_gemma),
        "command-r": Family(cohere.build_command_r, ROPE_TYPE_NORM, cohere.hparams_command_r),
    }
)


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedArchitectureError(supported_message(name, list(FAMILIES))) from None
