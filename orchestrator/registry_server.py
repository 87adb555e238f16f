"""The node registry's server: `Register` and one long-lived heartbeat stream per agent.

Why a `grpc.aio` server on its own event-loop thread, and not the thread-pool server the admin
API uses: a synchronous gRPC server runs every open stream on a worker thread for the stream's
whole life, so 1,305 agents each holding a heartbeat stream would pin 1,305 threads (or, with
a bounded pool, lock every agent past the pool's size out). On the event loop an open stream
is a suspended coroutine — a few kilobytes, no thread — and a beat is one resumption: read the
frame, check its size and the stream's rate, parse it, put the node's time into the
controller's `HeartbeatBuffer` (a dict under a lock). The store never sees a single beat: the
controller flushes the buffer in one batched transaction per pass, as before. `Register` is
rare (an agent's start, a control-plane restart) but writes the store, so it runs on a small
thread pool (`REGISTER_THREADS`) off the loop, through `RegistryService.Register` unchanged.

Why a client stream, not a unary call per beat: a unary call costs the control plane a whole
HTTP/2 stream per beat — headers in and out, a call object, a worker-thread hand-off and a
status. Measured here (`python -m bench.control_plane`, BENCHMARKS.md) that is most of a
heartbeat's cost; on the stream a beat is one DATA frame. The stream is client-streaming: the
agent never needs an answer per beat, and what the control plane has to tell it (register
again, you were replaced, you went silent, you broke a bound) is the status that ends the
stream.

Bounds, each ending the stream with a status the agent logs before it reconnects:

* identity: only agent certificates (UNAUTHENTICATED / PERMISSION_DENIED); the node is the
  certificate's, and a beat naming another node is PERMISSION_DENIED.
* a node the control plane does not know: FAILED_PRECONDITION (the agent registers again).
* one stream per node: a newer stream of the same node ends the older one (ABORTED), so a
  reconnecting agent never leaves a half-dead stream behind.
* a beat larger than `MAX_BEAT_BYTES`: RESOURCE_EXHAUSTED; a malformed one: INVALID_ARGUMENT.
* rate: a token bucket of `max_beats_per_second` (burst as large): a flood is cut off after a
  second's worth of beats (RESOURCE_EXHAUSTED).
* idle: a stream without a beat for `idle_timeout` seconds ends (DEADLINE_EXCEEDED). The timer
  is moved on only every quarter of the timeout, not per beat.
* at most `MAX_STREAMS` calls open at once in all (gRPC answers RESOURCE_EXHAUSTED beyond).

A stream that ends is not a node failure: only the heartbeat's age counts (the reconciler's
rule), so an agent that reconnects within the heartbeat timeout is never NotReady.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from protos import admin_pb2
from security.certs import Credentials
from security.tls import server_credentials

if TYPE_CHECKING:  # admin_server starts this server: no import cycle at run time
    from orchestrator.admin_server import RegistryService

log = logging.getLogger("lockstep.registry")

REGISTRY_SERVICE = "lockstep.admin.v1.NodeRegistry"
MAX_MESSAGE_BYTES = 2 << 20  # a registration of 1,024 chips fits
MAX_BEAT_BYTES = 64 << 10
MAX_BEATS_PER_SECOND = 50.0  # agents beat twice a second by default
IDLE_TIMEOUT = 10.0  # seconds without a beat before a stream ends
MAX_STREAMS = 8192  # open calls on the registry in all
REGISTER_THREADS = 4
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # agents ping a quiet connection every 10 s (agents.registration): allow that, and ping
    # back so a vanished agent's connection is freed
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
]


_EMPTY_BEAT = admin_pb2.HeartbeatRequest()  # shared, never changed


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _ThreadContext:
    """What `RegistryService` needs of a servicer context, for a call it runs off the loop:
    the caller's certificate (read on the loop beforehand) and an `abort` that raises."""

    def __init__(self, auth: Any) -> None:
        self._auth = auth

    def auth_context(self) -> Any:
        return self._auth

    def abort(self, code: grpc.StatusCode, message: str) -> NoReturn:
        raise _Refused(code, message)


@dataclass(eq=False)
class _Stream:
    node: str
    ended: str = ""  # why the stream was ended from outside: "replaced" or "stopping"
    timer: asyncio.Timeout | None = field(default=None, repr=False)

    def end(self, why: str) -> None:
        """Make the stream's handler end at once (it reads `ended`)."""
        self.ended = why
        if self.timer is not None and not self.timer.expired():
            self.timer.reschedule(asyncio.get_running_loop().time())


class HeartbeatStreams:
    """The `NodeRegistry` handlers on the event loop (see the module docstring)."""

    def __init__(
        self,
        service: RegistryService,
        pool: futures.Executor,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_beats_per_second: float = MAX_BEATS_PER_SECOND,
    ) -> None:
        self.service = service
        self.pool = pool
        self.idle_timeout = idle_timeout
        self.rate = max_beats_per_second
        self.streams: dict[str, _Stream] = {}  # touched only on the loop: no lock

    async def register(self, request: admin_pb2.RegisterRequest, context: Any) -> Any:
        shim = _ThreadContext(context.auth_context())
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.pool, self.service.Register, request, shim)
        except _Refused as refused:
            await context.abort(refused.code, refused.message)

    async def heartbeat_stream(self, requests: Any, context: Any) -> bytes:
        try:
            node = self.service.node_of(_ThreadContext(context.auth_context()))
        except _Refused as refused:
            await context.abort(refused.code, refused.message)
        if not self.service.known(node):
            await _unknown(context, node)
        stream = _Stream(node)
        older = self.streams.get(node)
        self.streams[node] = stream
        if older is not None:
            older.end("replaced")
        try:
            beats = await self._beats(stream, context)
        finally:
            if self.streams.get(node) is stream:
                del self.streams[node]
        reply: bytes = admin_pb2.HeartbeatStreamResponse(beats=beats).SerializeToString()
        return reply

    async def _beats(self, stream: _Stream, context: Any) -> int:
        loop = asyncio.get_running_loop()
        idle, rate, node = self.idle_timeout, self.rate, stream.node
        tokens, last = rate, loop.time()
        beats = 0
        try:
            async with asyncio.timeout(idle) as timer:
                stream.timer = timer
                while True:
                    raw = await context.read()
                    if raw is grpc.aio.EOF:
                        return beats
                    now = loop.time()
                    tokens = min(rate, tokens + (now - last) * rate) - 1.0
                    last = now
                    problem = _check(raw, tokens, rate)
                    if problem is not None:
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, problem)
                    beat = _EMPTY_BEAT  # an idle agent's beat has no field set: no bytes
                    if raw:
                        beat = admin_pb2.HeartbeatRequest()
                        try:
                            beat.ParseFromString(raw)
                        except DecodeError:
                            await context.abort(
                                grpc.StatusCode.INVALID_ARGUMENT, "a heartbeat that does not parse"
                            )
                    if beat.node and beat.node != node:
                        await context.abort(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"the certificate is node {node}'s; it cannot beat for "
                            f"{beat.node[:100]!r}",
                        )
                    if not self.service.beat(node, beat):
                        await _unknown(context, node)
                    beats += 1
                    when = timer.when()
                    if when is not None and now + idle - when > idle / 4:
                        timer.reschedule(now + idle)
        except TimeoutError:
            if stream.ended == "replaced":
                await context.abort(
                    grpc.StatusCode.ABORTED,
                    f"a newer heartbeat stream of node {node} replaced this one",
                )
            if stream.ended == "stopping":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the control plane is stopping")
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no heartbeat for {idle:g} s: the stream ends (open a new one)",
            )
        raise AssertionError("unreachable: the loop returns or aborts")

    async def end_all(self, wait: float) -> None:
        """End every stream with UNAVAILABLE and wait (at most `wait` seconds) for their
        handlers to return: a stream the server's stop cancelled instead would print a
        traceback from gRPC's task."""
        for stream in list(self.streams.values()):
            stream.end("stopping")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.streams and loop.time() < deadline:
            await asyncio.sleep(0.01)
        # gRPC sends a status after its handler returns: give those sends their turn on the
        # loop before the server's stop cancels whatever is still open
        await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))


def _check(raw: bytes, tokens: float, rate: float) -> str | None:
    if len(raw) > MAX_BEAT_BYTES:
        return f"a heartbeat is at most {MAX_BEAT_BYTES:,} bytes, this one {len(raw):,}"
    if tokens < 0:
        return f"more than {rate:g} heartbeats a second: the stream ends"
    return None


async def _unknown(context: Any, node: str) -> NoReturn:
    await context.abort(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"the control plane does not know node {node}: Register first",
    )
    raise AssertionError("unreachable: abort raises")


class RegistryServer:
    """The node registry's `grpc.aio` server on its own thread and event loop."""

    def __init__(
        self,
        service: RegistryService,
        credentials: Credentials,
        listen: str = "127.0.0.1:0",
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_beats_per_second: float = MAX_BEATS_PER_SECOND,
    ) -> None:
        self.pool = futures.ThreadPoolExecutor(REGISTER_THREADS, thread_name_prefix="register")
        self.handlers = HeartbeatStreams(
            service,
            self.pool,
            idle_timeout=idle_timeout,
            max_beats_per_second=max_beats_per_second,
        )
        self.credentials = credentials
        self.listen = listen
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._grace = 0.0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="registry", daemon=True)

    def start(self) -> int:
        """Serve; returns the port. OSError when it cannot listen."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise OSError(f"cannot serve the node registry on {self.listen}: {self._error}")
        return self.port

    def stop(self, grace: float = 2.0) -> None:
        """End every stream (after `grace` seconds at most) and the thread."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and self._thread.is_alive():
            self._grace = grace
            loop.call_soon_threadsafe(stopping.set)
            self._thread.join(grace + 10.0)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start(); nothing else runs on this thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=MAX_STREAMS)
        server.add_generic_rpc_handlers((self._generic_handler(),))
        self.port = server.add_secure_port(self.listen, server_credentials(self.credentials))
        if not self.port:
            raise OSError("no port")
        await server.start()
        self._ready.set()
        await self._stopping.wait()
        await self.handlers.end_all(min(self._grace, 2.0) or 0.5)
        await server.stop(self._grace)

    def _generic_handler(self) -> grpc.GenericRpcHandler:
        h = self.handlers
        register: Callable[..., Any] = h.register
        return grpc.method_handlers_generic_handler(
            REGISTRY_SERVICE,
            {
                "Register": grpc.unary_unary_rpc_method_handler(
                    register,
                    request_deserializer=admin_pb2.RegisterRequest.FromString,
                    response_serializer=admin_pb2.RegisterResponse.SerializeToString,
                ),
                # raw bytes in: the size is checked before anything parses them
                "HeartbeatStream": grpc.stream_unary_rpc_method_handler(h.heartbeat_stream),
            },
        )


__all__ = [
    "IDLE_TIMEOUT",
    "MAX_BEATS_PER_SECOND",
    "MAX_BEAT_BYTES",
    "HeartbeatStreams",
    "RegistryServer",
]
