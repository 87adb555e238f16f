"""The one table from the agent's exceptions to gRPC status codes.

Every module of the agent raises the classes of `agents.errors` (or one of the few domain
errors below, raised by code that knows nothing of RPCs); the service maps them here and
nowhere else. An exception this table does not know is a bug: it maps to INTERNAL with a
one-line message naming the exception's type, and its traceback is logged once at debug level
(never at a level a default agent prints, so a hostile input cannot fill the log with
tracebacks, and never to the client).

INVALID_ARGUMENT or NOT_FOUND: a request that cannot be read as given (an empty deployment
name, a field out of its range, bytes that do not parse) is INVALID_ARGUMENT; a well-formed
request naming something this agent does not have — a replica not configured here (StartEpoch,
Halt, RemoveReplica, StageDigests, InjectFault: `agents.replicas.replica_not_here`), a shard a
chip does not hold, a link target with no stage — is NOT_FOUND, which the control plane takes
as "already gone" when it removes a replica, and its Generate gateway as "resume the request
on another replica".
"""

from __future__ import annotations

import logging

import grpc

from agents import errors
from agents.arena import ArenaExhausted
from agents.journal import JournalError, QueueFull
from agents.lockstep import ProtocolError
from agents.stage_core import Stopped
from agents.text import clip
from protos.load_stream import FramingError
from shardformat.errors import ExecutionError

log = logging.getLogger("lockstep.agent")

# Most specific first: the first matching class wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.Internal, grpc.StatusCode.INTERNAL),
    # Domain errors of modules that know nothing of RPCs:
    (ArenaExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),  # SRAM does not fit
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),  # a replica's request queue is full
    (Stopped, grpc.StatusCode.FAILED_PRECONDITION),  # the pipeline stopped (a JournalError)
    (JournalError, grpc.StatusCode.INVALID_ARGUMENT),  # a request the journal cannot take
    (ExecutionError, grpc.StatusCode.INVALID_ARGUMENT),  # malformed activation or batch
    (FramingError, grpc.StatusCode.INVALID_ARGUMENT),  # a malformed LoadShard message
    (ProtocolError, grpc.StatusCode.FAILED_PRECONDITION),  # e.g. unknown chip, old epoch
    (grpc.RpcError, grpc.StatusCode.CANCELLED),  # the client's stream broke under us
)

MESSAGE_LIMIT = 1000  # characters of a status message (gRPC's metadata limit is 8 KiB)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the (bounded) message for `exc`; INTERNAL for anything unknown."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            if isinstance(exc, grpc.RpcError):
                return code, "the client ended the stream"
            message = exc.message if isinstance(exc, errors.AgentError) else str(exc)
            return code, clip(message, MESSAGE_LIMIT)
    log.debug("unexpected %s", type(exc).__name__, exc_info=exc)
    first_line = (str(exc).splitlines() or [""])[0]
    return grpc.StatusCode.INTERNAL, clip(
        f"internal error: {type(exc).__name__}: {first_line}", MESSAGE_LIMIT
    )
