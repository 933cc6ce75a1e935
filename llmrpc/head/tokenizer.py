"""llama.cpp's own tokenizer (llama-cpp-python, vocab only: loads in milliseconds)."""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)


class Tokenizer:
    def __init__(self, model_path: str) -> None:
        import llama_cpp
        from llama_cpp._utils import suppress_stdout_stderr

        self._llama_cpp = llama_cpp
        with suppress_stdout_stderr(disable=False):  # llama.cpp logs context notes on its own
            self._llm: Any = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
        self.n_vocab = int(self._llm.n_vocab())
        meta = self._llm.metadata
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "true") != "false"
        self._eog: list[int] | None = None

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest text one token stands for, in bytes: a text of n bytes is at least
        n / this tokens long (what a prompt's length is checked by before it is tokenized)."""
        vocab = self._llm._model.vocab
        buf = (ctypes.c_char * 256)()
        longest = 1
        for t in range(self.n_vocab):
            n = self._llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, True)
            longest = max(longest, abs(n))  # (negative: the piece's length, longer than buf)
        return longest

    def encode(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        bos = self.add_bos if add_bos is None else add_bos
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special))

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return bytes(self._llm.detokenize(tokens))

    def decode(self, tokens: list[int]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._llm._model.vocab, token))

    def eog_ids(self) -> list[int]:
        """Every end-of-generation token (what a server that generates on its own stops at)."""
        if self._eog is None:
            self._eog = [t for t in range(self.n_vocab) if self.is_eog(t)]
        return self._eog

    def bos_text(self) -> str:
        """The BOS token as text (what a chat template writes for it)."""
        return self._text(self._llm.token_bos())

    def _text(self, token: int) -> str:
        if token < 0:  # the model has no such token
            return ""
        return bytes(self._llm.detokenize([token], special=True)).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render messages with the GGUF's own chat template (Jinja2, as llama-cpp-python does)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (tokenizer.chat_template)")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        fmt = Jinja2ChatFormatter(template=self.chat_template, eos_token=self._text(self._llm.token_eos()),
                                  bos_token=self.bos_text())  # fmt: skip
        return str(fmt(messages=messages).prompt)  # type: ignore[arg-type]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages rendered with the chat template, as tokens: the template's special tokens are
        tokens (not their text), and the BOS only where the template writes it, as
        llama-cpp-python's create_chat_completion tokenizes a rendered template."""
        return self.encode(self.apply_chat_template(messages), add_bos=False, special=True)


class TextStream:
    """Turns generated tokens into text pieces without splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = 0  # bytes already given out

    def push(self, token: int) -> str:
        self.tokens.append(token)
        data = self.tokenizer.decode_bytes(self.tokens)
        piece = data[self.emitted :]
        try:
            text, used = piece.decode("utf-8"), len(piece)
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":  # an incomplete character: wait for more
                text, used = piece[: e.start].decode("utf-8", errors="replace"), e.start
            else:
                text, used = piece.decode("utf-8", errors="replace"), len(piece)
        self.emitted += used
        return text

    def flush(self) -> str:
        data = self.tokenizer.decode_bytes(self.tokens)
        rest = data[self.emitted :]
        self.emitted = len(data)
        return rest.decode("utf-8", errors="replace")
