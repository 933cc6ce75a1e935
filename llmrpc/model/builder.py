"""The graph builder the family builders (:mod:`llmrpc.model.families`) are written with: the
shared pieces of :mod:`llmrpc.model.graph`, attention and experts in one class."""

from __future__ import annotations

from llmrpc.model.attention import AttentionOps
from llmrpc.model.experts import ExpertOps


class Builder(AttentionOps, ExpertOps):
    """A ggml context for one graph of layers [start, end) and every shared piece of the
    builders. A batch holds the rows of one or more sessions (segments): every matrix
    multiplication runs once over all rows, and each segment attends to its own cache."""
