"""llmrpc: one GGUF language model across a farm of machines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Farm", "__version__"]

if TYPE_CHECKING:
    from llmrpc.farm import Farm


def __getattr__(name: str) -> Any:  # lazy: `import llmrpc` stays light for the server
    if name == "Farm":
        from llmrpc.farm import Farm

        return Farm
    raise AttributeError(name)
