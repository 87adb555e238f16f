"""The model's text side as a stage-0 shard carries it: tokenizer and end-of-sequence ids.

Generate takes text and streams text only where stage 0 runs, so the compiler puts the
checkpoint's `tokenizer.json` (verbatim) and the EOS ids (from `generation_config.json`, else
`config.json`) into the `__metadata__` of stage 0's shard blobs, under `TOKENIZER_KEY` and
`GENERATION_KEY`. They are then part of the shard's content address: an agent holding stage 0
has exactly the tokenizer the shard was compiled with, verified like the weights, and needs no
file of its own. Other stages' blobs do not carry it (their bytes, and addresses, are
unchanged by it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from shardformat.errors import ExecutionError

TOKENIZER_KEY = "lockstep.tokenizer"
GENERATION_KEY = "lockstep.generation"
MAX_TOKENIZER_BYTES = 64 << 20
"""Bound on a tokenizer.json (real ones are 2-20 MB)."""
MAX_EOS_IDS = 64


@dataclass(frozen=True)
class TextSpec:
    """A tokenizer (the text of a Hugging Face `tokenizer.json`) and the ids that end a
    sequence (generation stops after emitting one)."""

    tokenizer_json: str
    eos_token_ids: tuple[int, ...] = ()

    def metadata(self) -> dict[str, str]:
        generation = {"eos_token_ids": list(self.eos_token_ids)}
        return {
            TOKENIZER_KEY: self.tokenizer_json,
            GENERATION_KEY: json.dumps(generation, sort_keys=True, separators=(",", ":")),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> TextSpec | None:
        """The spec a shard's metadata carries, None if it has none; ExecutionError if bad."""
        tokenizer = metadata.get(TOKENIZER_KEY)
        if tokenizer is None:
            return None
        if len(tokenizer) > MAX_TOKENIZER_BYTES:
            raise ExecutionError(f"{TOKENIZER_KEY} exceeds {MAX_TOKENIZER_BYTES} bytes")
        try:
            generation = json.loads(metadata.get(GENERATION_KEY, "{}"))
            ids = generation.get("eos_token_ids", []) if isinstance(generation, dict) else None
        except ValueError:
            ids = None
        return cls(tokenizer, eos_token_ids(ids, GENERATION_KEY))


def eos_token_ids(value: object, where: str) -> tuple[int, ...]:
    """EOS ids as Hugging Face spells them (an int, a list of ints, or null), checked."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_EOS_IDS or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 31 for i in items
    ):
        raise ExecutionError(
            f"{where}: eos_token_id must be a token id or a list of at most {MAX_EOS_IDS}"
        )
    return tuple(sorted(set(items)))
