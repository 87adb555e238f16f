"""The one error of the executor family: a malformed manifest, shard, activation or batch.

It lives on its own because the safetensors codec, the layout, the activation wire format,
sampling and the executor all raise it, and callers (the agent server, the replica runners,
the compiler) catch it as one type; none of those modules should depend on another just for
its error class.
"""

from __future__ import annotations


class ExecutionError(ValueError):
    """A malformed manifest, shard, activation or batch; the message names what is wrong."""
