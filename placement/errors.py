"""Errors raised by the planning core.

Two kinds, because the CLI maps them to different exit codes: `InputError` means the input itself
is malformed (exit 2), `Unplaceable` means a valid request that the cluster cannot hold (exit 1).
Both carry a message meant for a person; neither should ever surface as a traceback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence


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


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def field_path(path: Sequence[str | int]) -> str:
    """`("spec", "placement", "racks", 1)` -> `spec.placement.racks[1]`.

    Keys that are not identifiers (chip ids such as `rack-0/node-1/chip-3`, label keys) are
    shown in brackets and quotes so the path stays unambiguous. Every file loader names fields
    this way, so an error's field also finds its line.
    """
    out = ""
    for element in path:
        if isinstance(element, int):
            out += f"[{element}]"
        elif _IDENTIFIER.match(element) and len(element) <= 80:
            out += f".{element}" if out else element
        else:
            clipped = element if len(element) <= 80 else element[:79] + "…"
            out += f"[{json.dumps(clipped)}]"
    return out
