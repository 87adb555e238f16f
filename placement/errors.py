"""Errors raised by the planning core.

Two kinds, because the CLI maps them to different exit codes: `InputError` means the input itself
is malformed (exit 2), `Unplaceable` means a valid request that the cluster cannot hold (exit 1).
Both carry a message meant for a person; neither should ever surface as a traceback.
"""

from __future__ import annotations


class PlacementError(Exception):
    """Base class of every error the planning core raises on purpose."""


class InputError(PlacementError):
    """Malformed input: a topology, profile or model file, or an impossible parameter.

    `source` names the file (or "<preset>"), `field` the dotted path inside it, `line` the
    1-based line when known.
    """

    def __init__(
        self, message: str, *, source: str = "", field: str = "", line: int | None = None
    ) -> None:
        self.message = message
        self.source = source
        self.field = field
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.source
        if where and self.line is not None:
            where = f"{where}:{self.line}"
        parts = [p for p in (where, self.field) if p]
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class Unplaceable(PlacementError):
    """A valid request that does not fit the cluster; the message gives the numbers."""
