"""Text as tokens for ``fmstore serve``: how a prompt becomes token ids, and how generated ids
become text again, a piece at a time (a stream answers as tokens come).

- :class:`ByteText`: UTF-8 bytes as tokens (train.py's byte-level GPT); a character cut between
  two tokens waits for its last byte.
- :class:`TokenizerText`: a transformers tokenizer (``AutoTokenizer`` of a ``--hf-config``
  directory); the text of each step is what decoding all ids so far adds, held back while it
  ends in an incomplete character.

Each has ``encode(text) -> ids``, ``decoder()`` (a new :class:`Decoder`: ``step(id) -> text``,
``flush() -> text``) and ``eos`` (the ids that end a completion, finish_reason ``"stop"``).
"""

from __future__ import annotations

import codecs
from typing import Any, Protocol

__all__ = ["Decoder", "Text", "ByteText", "TokenizerText"]


class Decoder(Protocol):
    def step(self, token: int) -> str: ...

    def flush(self) -> str: ...


class Text(Protocol):
    eos: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decoder(self) -> Decoder: ...


class _BytesDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token: int) -> str:
        return self._utf8.decode(bytes([token]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteText:
    """UTF-8 bytes as tokens: ids 0..255, no end-of-text token."""

    eos: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decoder(self) -> Decoder:
        return _BytesDecoder()


class _TokenizerDecoder:
    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._sent = ""

    def _text(self) -> str:
        return self._tok.decode(self._ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def step(self, token: int) -> str:
        self._ids.append(token)
        text = self._text()
        if text.endswith("\ufffd") or not text.startswith(self._sent):
            return ""  # an incomplete character (byte-level BPE), or a prefix the next id rewrites
        new, self._sent = text[len(self._sent) :], text
        return new

    def flush(self) -> str:
        text = self._text()
        new = text[len(self._sent) :] if text.startswith(self._sent) else ""
        self._sent = text
        return new


class TokenizerText:
    """A transformers tokenizer's ids; ``eos``: the tokenizer's end-of-text id and ``extra_eos``
    (the model config's ``eos_token_id``)."""

    def __init__(self, tokenizer: Any, extra_eos: Any = None) -> None:
        self.tokenizer = tokenizer
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        if isinstance(extra_eos, int):
            eos.add(extra_eos)
        elif extra_eos:
            eos.update(int(e) for e in extra_eos)
        self.eos = frozenset(eos)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decoder(self) -> Decoder:
        return _TokenizerDecoder(self.tokenizer)
