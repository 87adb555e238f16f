"""The agent's RPC failures, one class per gRPC status code, with no gRPC import.

Every module of the agent raises these (or `ExecutionError` for malformed shards, activations
and batches); the server turns them into statuses through the one table in
`agents.status_codes`, so a code is chosen where the failure is understood and mapped in one
place. Messages name the chip, shard, replica or field at fault; the server truncates them.
"""

from __future__ import annotations


class AgentError(Exception):
    """An RPC failure with a message; the subclass says which status code it maps to."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AgentError):
    """The request (or a byte of it) is malformed or out of bounds."""


class NotFound(AgentError):
    """The chip, shard, deployment or replica named does not exist here."""


class AlreadyExists(AgentError):
    """The thing being created exists already and may not be replaced (e.g. a bound chip)."""


class FailedPrecondition(AgentError):
    """The request is well formed but the agent's state refuses it (failed chip, wrong phase)."""


class ResourceExhausted(AgentError):
    """A bound is reached: SRAM, queue, streams per peer or in all."""


class Aborted(AgentError):
    """The replica stopped (rejected frame, stage error, epoch change) while the call waited."""


class DataLoss(AgentError):
    """Bytes arrived damaged: a checksum or digest does not match."""


class PermissionDenied(AgentError):
    """The authenticated peer is not allowed to make this call."""


class Unauthenticated(AgentError):
    """The peer presented no usable identity."""


class DeadlineExceeded(AgentError):
    """A deadline or an idle timeout passed."""


class Unavailable(AgentError):
    """The agent is stopping or a peer cannot be reached."""


class Cancelled(AgentError):
    """The client ended the call."""


class Internal(AgentError):
    """A bug or an impossible state; the message says what, never a traceback."""
