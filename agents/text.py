"""Truncation of client-supplied text before it is echoed into a log line or an error.

A deployment name, shard id or any other string field is chosen by the client and may be
megabytes long; echoed whole it would make a log line per request of that size and an error
detail over gRPC's metadata limit (the call would then fail with an unrelated status). Every
message that quotes such a string quotes `clip(text)`.
"""

from __future__ import annotations

DEFAULT_LIMIT = 200


def clip(text: object, limit: int = DEFAULT_LIMIT) -> str:
    """`repr`-free text of at most `limit` characters plus a marker saying how much was cut."""
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return s
    return f"{s[:limit]}...[{len(s) - limit} more characters]"


def quote(text: object, limit: int = DEFAULT_LIMIT) -> str:
    """`clip` in quotes (the `{name!r}` of error messages, bounded)."""
    return repr(clip(text, limit))
