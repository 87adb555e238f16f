"""Text in and out of a replica: the stage-0 shard's tokenizer, through the `tokenizers` library.

`TextCodec.encode` turns a prompt into ids (no special tokens are added beyond what the
tokenizer's own post-processor adds: a Llama tokenizer.json prepends <s> itself).
`TextCodec.stream` gives a per-request decoder that turns each generated id into the text it
adds: byte-level tokenizers can split one character over several tokens, so a piece is held
back until its bytes form whole characters (the library's `DecodeStream`); special tokens
(EOS) add no text.
"""

from __future__ import annotations

from typing import Any

from shardformat.text import TextSpec

MAX_PROMPT_CHARS = 1 << 20


class TextError(ValueError):
    """A tokenizer that does not load, or text that cannot be encoded."""


class TextDecoder:
    """Generated ids → text pieces, one call per id."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        """The text `token` completes ("" while a character is still incomplete)."""
        try:
            piece = self._stream.step(self._tokenizer, token)
        except Exception:  # an id outside the tokenizer's vocabulary decodes to nothing
            return ""
        return piece or ""


class TextCodec:
    def __init__(self, spec: TextSpec) -> None:
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_str(spec.tokenizer_json)
        except Exception as exc:
            raise TextError(f"the tokenizer does not load: {str(exc)[:200]}") from None
        self.spec = spec
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if len(text) > MAX_PROMPT_CHARS:
            raise TextError(f"prompt_text exceeds {MAX_PROMPT_CHARS} characters")
        ids: list[int] = self._tokenizer.encode(text).ids
        if not ids:
            raise TextError("prompt_text encodes to no tokens")
        return ids

    def decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def stream(self) -> TextDecoder:
        return TextDecoder(self._tokenizer)
