"""The Activation: what travels between op pieces and pipeline stages, and its wire format.

An `Activation` carries a batch's rows (slots, positions, tokens), the hidden state entering
the current op, the partial sum of the op so far, MoE routing and the logits prefix, and a
cursor naming the next piece. `to_bytes()` is a versioned safetensors blob, so one format
serves in-process hand-offs, the interconnect links and the agent's Execute RPC.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from shardformat.codec import encode_safetensors, parse_safetensors
from shardformat.errors import ExecutionError

ACTIVATION_KEY = "lockstep.activation"
ACTIVATION_VERSION = 1


@dataclass
class Activation:
    """What flows between pieces and stages for a batch of rows (one row = slot + position).

    `hidden` is the hidden state entering the op at `cursor` (None before the embedding has
    started); `partial` the sum of that op's pieces so far (inside an attention, MLP or MoE
    block); `route_ids/route_weights` the MoE routing of the current layer; `logits` the
    vocabulary prefix `[0, n)` produced so far by the LM head; `cursor` (op, chunk) the next
    piece to run — `(len(ops), 0)` once the model is done. Tokens travel along so stages cut
    inside the embedding can look their rows up.
    """

    slots: np.ndarray
    positions: np.ndarray
    tokens: np.ndarray
    hidden: np.ndarray | None = None
    partial: np.ndarray | None = None
    route_ids: np.ndarray | None = None
    route_weights: np.ndarray | None = None
    logits: np.ndarray | None = None
    cursor: tuple[int, int] = (0, 0)

    @classmethod
    def for_tokens(
        cls, slots: Sequence[int], positions: Sequence[int], tokens: Sequence[int]
    ) -> Activation:
        """Stage 0's input: token ids of `(slot, position)` rows."""
        return cls(
            np.asarray(slots, np.int32),
            np.asarray(positions, np.int32),
            np.asarray(tokens, np.int32),
        )

    @property
    def rows(self) -> int:
        return int(self.slots.shape[0])

    def require_logits(self) -> np.ndarray:
        """The logits produced so far; an error when the run stopped before the LM head."""
        if self.logits is None:
            raise ExecutionError(f"the pipeline stopped at op/chunk {self.cursor} without logits")
        return self.logits

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "cursor" and getattr(self, f.name) is not None
        }

    def copy(self) -> Activation:
        return Activation(**{k: v.copy() for k, v in self._arrays().items()}, cursor=self.cursor)

    def to_bytes(self) -> bytes:
        """A safetensors blob: one tensor per present field, the cursor in the metadata."""
        meta = {"version": ACTIVATION_VERSION, "cursor": list(self.cursor)}
        return encode_safetensors(self._arrays(), {ACTIVATION_KEY: json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Activation:
        view = parse_safetensors(data)
        try:
            meta = json.loads(view.metadata[ACTIVATION_KEY])
            version, cursor = meta["version"], tuple(int(c) for c in meta["cursor"])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError):
            raise ExecutionError("not an activation blob: missing or bad metadata") from None
        if len(cursor) != 2:
            raise ExecutionError(
                f"not an activation blob: cursor {list(cursor)} is not (op, chunk)"
            )
        if version != ACTIVATION_VERSION:
            raise ExecutionError(
                f"activation format version {version} is not supported "
                f"(this executor reads version {ACTIVATION_VERSION})"
            )
        known = {f.name for f in fields(cls)} - {"cursor"}
        unknown = set(view.tensors) - known
        if unknown or not {"slots", "positions", "tokens"} <= set(view.tensors):
            raise ExecutionError(
                f"activation blob has unexpected tensors {sorted(unknown)} "
                "or lacks slots/positions/tokens"
            )
        arrays = {k: np.array(v) for k, v in view.tensors.items()}
        act = cls(**arrays, cursor=(cursor[0], cursor[1]))
        act.check_rows()
        return act

    def check_rows(self) -> None:
        """Fail unless every present field has one entry per row.

        A malformed blob or batch is then reported here, naming the field, rather than as a
        shape error deep inside a kernel.
        """
        rows = self.rows
        for name, array in self._arrays().items():
            if array.shape[:1] != (rows,):
                raise ExecutionError(
                    f"activation field {name} has {array.shape[:1]} rows, expected {rows}"
                )
