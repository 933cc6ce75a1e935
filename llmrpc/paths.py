"""Where llmrpc keeps files of its own: one cache folder (``$XDG_CACHE_HOME/llmrpc``, else
``~/.cache/llmrpc``), a subfolder per kind (received slices, built C code, models)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmrpc" / kind
