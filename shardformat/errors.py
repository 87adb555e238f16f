"""The one error of the shard format and the executor family.

A malformed manifest, shard header, activation or batch raises `ExecutionError`, whichever
side finds it: the codec, the manifest parser and the layout (this package), the activation
wire format, sampling and the executor (`agents`). It lives here, at the bottom of the layers,
because both the compiler (`orchestrator`) and the agent raise and catch it as one type, and
neither may import the other. The name is kept from when it lived in `agents` (its users catch
it by that name); the agent maps it to INVALID_ARGUMENT or FAILED_PRECONDITION, never UNKNOWN.
"""

from __future__ import annotations


class ExecutionError(ValueError):
    """A malformed manifest, shard, activation or batch; the message names what is wrong."""
