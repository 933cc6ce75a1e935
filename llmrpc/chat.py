"""A conversation with a farm's model (``farm.chat()``): the messages so far, each turn's
prompt the whole conversation in the model's chat template. The servers keep each turn's cache
(the farm's prefix cache), so a turn computes only what its whole batches do not already hold:
the new messages and the end of the last batch before them.

    with llmrpc.Farm() as farm:
        chat = farm.chat(system="You answer in one sentence.")
        print(chat.send("What is the capital of France?", max_tokens=32, temperature=0))
        print(chat.send("And of Germany?", max_tokens=32, temperature=0))
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmrpc.farm import Farm

logger = logging.getLogger(__name__)


@dataclass
class Chat:
    farm: Farm
    messages: list[dict[str, str]] = field(default_factory=list)  # the conversation, oldest first
    cache_prompt: bool = True  # False: no turn takes or leaves a prefix on the servers

    def prompt(self) -> list[int]:
        """The conversation as the next turn's prompt: its tokens in the chat template, ending
        where the assistant's answer begins."""
        return self.farm.tokenizer.encode_chat(self.messages)

    def stream(
        self, content: str, max_tokens: int = 256, *, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
        seed: int | None = None,
    ) -> Iterator[str]:  # fmt: skip
        """Add a user message and yield the answer's text as it is generated; the answer joins
        the conversation once it ends (stopped early by the caller: what was given out). A turn
        that fails leaves the conversation as it was."""
        self.messages.append({"role": "user", "content": content})
        pieces: list[str] = []
        ended = False
        try:
            for piece in self.farm.stream(
                self.prompt(), max_tokens, temperature, top_k, top_p, seed, cache_prompt=self.cache_prompt
            ):
                pieces.append(piece)
                yield piece
            ended = True
        except GeneratorExit:
            ended = True
            raise
        finally:
            if ended:
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            else:
                self.messages.pop()

    def send(self, content: str, max_tokens: int = 256, **sampling: float | int | None) -> str:
        """Add a user message; the answer, whole (it joins the conversation)."""
        return "".join(self.stream(content, max_tokens, **sampling))  # type: ignore[arg-type]
