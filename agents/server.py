"""The node agent's gRPC service: per-chip SRAM, streaming shard loads, status, execution.

One job per module: the chip tables (reserve, commit, abort, unload, fail) are
`agents.chips`; the exception → status-code table is `agents.status_codes`; the admission of
streams is `agents.streams`; the settings are `agents.settings`; start-up is `agents.main`.
This module is the servicer (`AgentService`) and `start_server`.

Errors: every method raises the classes of `agents.errors` (or the domain errors the table
knows); `_rpc` turns them into a status whose message names the node and is bounded. An
exception the table does not know is a bug: INTERNAL with one line, the traceback at debug.

Nothing can hold the agent:

* every streaming call (LoadShard, Generate, Link/Exchange, health Watch, reflection) passes
  `StreamLimit` when it starts: at most `max_streams_per_peer` per peer (`peer_key`) and
  `max_streams` in all (the control plane's not counted: other agents cannot lock it out),
  refused at once with RESOURCE_EXHAUSTED beyond; the worker pool has `unary_reserve` more
  threads than streams may take, so Status and health always find one;
* a load whose client sends nothing — no header, or no chunk — for `load_idle_timeout` is
  ended with DEADLINE_EXCEEDED and frees everything (a watchdog thread);
* LinkPing's count and payload and Execute's input are bounded.

Why the service is registered by hand instead of with `agent_pb2_grpc.add_AgentServicer_to_
server`: LoadShard takes its requests as raw bytes (identity deserializer) so chunk payloads
reach the arena without a protobuf copy; the other methods use the generated messages.
"""

from __future__ import annotations

import functools
import itertools
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agents import canary
from agents.chips import Chip, ChipSnapshot, HeldEntry, InFlight, make_chips
from agents.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from agents.interconnect import SERVICE_NAME as LINK_SERVICE_NAME
from agents.interconnect import LinkService, allow_all, ping
from agents.interconnect import handlers as link_handlers
from agents.link_auth import link_authorizer
from agents.loader import (
    MAX_MESSAGE_BYTES,
    ShardHeader,
    ShardReceiver,
    chunk_payload,
    parse_header_message,
    validate_header,
)
from agents.replicas import ReplicaHost
from agents.settings import DEFAULT_SETTINGS, AgentSettings
from agents.status_codes import status_of
from agents.streams import StreamGate
from agents.text import clip, quote
from agents.wire import WireError, WireServer, advertised_port
from agents.wire import ping as wire_ping
from protos import agent_pb2
from security.certs import Credentials
from security.identity import CONTROL_PLANE, OPEN_SERVICES
from security.tls import AuthorizationInterceptor, peer_identity
from shardformat.codec import parse_header
from shardformat.errors import ExecutionError
from shardformat.manifest import manifest_of_metadata

log = logging.getLogger("lockstep.agent")

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
_R = TypeVar("_R")


def peer_key(context: grpc.ServicerContext) -> str:
    """Who is calling, for per-peer bounds: the certificate identity under mutual TLS, else
    the transport address without its port (one client opens as many connections as it
    likes). The one place a peer is named."""
    identity = peer_identity(context)
    if identity is not None:
        return identity
    peer = context.peer() or "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End a call from another thread with `code` (the handler's blocked read then raises).

    `ServicerContext.cancel` always sends CANCELLED; the call object underneath can cancel
    with a status, which is what the client should see (e.g. DEADLINE_EXCEEDED for an idle
    stream). Falls back to a plain cancel if that object is not there.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        from grpc._cython import cygrpc

        call.cancel(getattr(cygrpc.StatusCode, code.name.lower()), message)  # type: ignore[union-attr]
    except Exception:
        context.cancel()


def _aborted(context: grpc.ServicerContext, exc: BaseException) -> bool:
    """Whether `exc` is `context.abort`'s own (grpc raises a bare `Exception()` after setting
    the status on the call's state; the status must then pass through unchanged)."""
    state = getattr(context, "_state", None)
    return bool(getattr(state, "aborted", False)) or (type(exc) is Exception and not exc.args)


def _rpc(method: Callable[..., _R]) -> Callable[..., _R]:
    """Turn the service's exceptions into gRPC statuses whose message names the node."""

    @functools.wraps(method)
    def wrapper(self: AgentService, request: Any, context: grpc.ServicerContext) -> _R:
        try:
            return method(self, request, context)
        except Exception as exc:
            code, message = status_of(exc)
        log.warning("%s failed: %s %s", method.__name__, code.name, message)
        context.abort(code, f"node {self.node}: {message}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def _chip_message(snap: ChipSnapshot) -> agent_pb2.ChipStatus:
    return agent_pb2.ChipStatus(
        chip=snap.index,
        health=(
            agent_pb2.CHIP_HEALTH_FAILED
            if snap.failed_reason is not None
            else agent_pb2.CHIP_HEALTH_HEALTHY
        ),
        failure_reason=snap.failed_reason or "",
        sram_capacity_bytes=snap.capacity,
        sram_used_bytes=snap.used,
        sram_loading_bytes=snap.loading,
        sram_free_bytes=snap.free,
        shards=[_held_message(e) for e in snap.held],
        loads=[
            agent_pb2.LoadProgress(
                shard_id=f.shard_id,
                bytes_loaded=f.bytes_loaded,
                bytes_total=f.bytes_total,
                reserved_bytes=f.reserved_bytes,
            )
            for f in snap.loads
        ],
    )


def _held_message(entry: HeldEntry) -> agent_pb2.HeldShard:
    h = entry.header
    return agent_pb2.HeldShard(
        shard_id=h.shard_id,
        size_bytes=h.size_bytes,
        reserved_bytes=h.reserved_bytes,
        virtual=h.virtual,
        digest_algorithm=h.algorithm,
        digest=entry.digest,
        loaded_unix_ms=entry.loaded_unix_ms,
    )


class AgentService:
    """The `lockstep.agent.v1.Agent` servicer of one node; `settings` holds every bound."""

    def __init__(
        self,
        node: str,
        profile: str,
        chips: int,
        sram_bytes: int,
        *,
        settings: AgentSettings = DEFAULT_SETTINGS,
        tls: Credentials | None = None,
    ) -> None:
        """`tls`: this agent's certificate, for the links it opens and the Link streams it
        authorizes (None: plaintext links, no link authorization)."""
        self.node = node
        self.profile = profile
        self.settings = settings
        self.tls = tls
        self.chips = make_chips(chips, sram_bytes)
        self.replicas = ReplicaHost(self.chips, settings, tls)
        self.links = LinkService(
            self.replicas.resolve,
            node,
            authorize=allow_all if tls is None else link_authorizer(self.replicas.link_policy),
            idle_timeout=self.settings.link_idle_timeout,
        )
        # The framed link port (`agents.wire`): listening once `start_server` knows the host.
        self.wire = WireServer(self.links, self.replicas.link_policy, tls, settings)
        self.streams = StreamGate(
            settings.max_streams,
            settings.max_streams_per_peer,
            # Under mutual TLS the control plane has places of its own (see agents.streams).
            reserved=frozenset() if tls is None else frozenset({CONTROL_PLANE}),
        )
        self.metrics_port = 0  # of /metrics once served (`agents.metrics`), for Status
        self._closed = threading.Event()
        self._waiting_lock = threading.Lock()
        self._waiting: dict[int, tuple[float, grpc.ServicerContext]] = {}  # loads without header
        self._ids = itertools.count()
        threading.Thread(target=self._reap_idle_loads, name="idle-loads", daemon=True).start()

    @property
    def load_idle_timeout(self) -> float:
        return self.settings.load_idle_timeout

    def close(self) -> None:
        """Stop the idle-load watchdog and every pipeline stage."""
        self._closed.set()
        self.close_pipelines()

    def close_pipelines(self) -> None:
        """Stop every stage and end the link streams (they are open for as long as a replica
        runs, so a graceful stop would otherwise wait out its whole grace period on them)."""
        self.replicas.close()
        self.links.close()
        self.wire.close()

    def _reap_idle_loads(self) -> None:
        """End loads whose client sent nothing — header or chunk — for the idle timeout."""
        timeout = self.load_idle_timeout
        interval = min(1.0, timeout / 4)
        while not self._closed.wait(interval):
            deadline = time.monotonic() - timeout
            with self._waiting_lock:
                silent = [
                    (key, ctx) for key, (since, ctx) in self._waiting.items() if since < deadline
                ]
                for key, _ in silent:
                    del self._waiting[key]
            for _, ctx in silent:
                log.warning("a load sent no header for %.1f s, ending it", timeout)
                end_call(
                    ctx,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"node {self.node}: no LoadShard header within {timeout} s",
                )
            for chip in self.chips:
                for flight in chip.stalled_loads(deadline):
                    flight.idle = True
                    label = flight.receiver.header.label
                    log.warning(
                        "chip %d: %s idle for %.1f s, cancelling", chip.index, label, timeout
                    )
                    flight.cancel(
                        f"node {self.node}: chip {chip.index}: {label}: no data for "
                        f"{timeout} s, load ended"
                    )

    def _chip(self, index: int) -> Chip:
        if not 0 <= index < len(self.chips):
            raise InvalidArgument(f"chip {index} does not exist (chips 0..{len(self.chips) - 1})")
        return self.chips[index]

    # --- LoadShard ------------------------------------------------------------------------

    @_rpc
    def LoadShard(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> agent_pb2.LoadShardResponse:
        started = time.perf_counter()
        first = self._first_message(requests, context)
        header = validate_header(parse_header_message(first), len(self.chips))
        chip = self.chips[header.chip]

        def cancel(message: str) -> None:
            end_call(context, grpc.StatusCode.DEADLINE_EXCEEDED, message)

        flight = chip.begin_load(header, ShardReceiver, cancel)
        if isinstance(flight, HeldEntry):
            return _response(header, flight, started, already=True)
        committed = False
        try:
            self._receive(chip, flight, requests)
            digest = flight.receiver.finish()  # type: ignore[attr-defined]
            _check_blob(header, flight.block.view)
            entry = chip.commit(flight, digest)
            committed = True
        finally:
            if not committed:
                chip.abort(flight)
        log.info(
            "chip %d: loaded %s (%d bytes) in %.3f s",
            chip.index,
            header.label,
            header.size_bytes,
            time.perf_counter() - started,
        )
        return _response(header, entry, started, already=False)

    def _first_message(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """The header message, waited for at most the idle timeout (then DEADLINE_EXCEEDED)."""
        key = next(self._ids)
        with self._waiting_lock:
            self._waiting[key] = (time.monotonic(), context)
        try:
            first = next(requests, None)
        except grpc.RpcError:
            with self._waiting_lock:
                timed_out = key not in self._waiting
            if timed_out:
                raise DeadlineExceeded(
                    f"no LoadShard header within {self.load_idle_timeout} s"
                ) from None
            raise
        finally:
            with self._waiting_lock:
                self._waiting.pop(key, None)
        if first is None:
            raise InvalidArgument("empty LoadShard stream: the first message must be the header")
        return first

    def _receive(self, chip: Chip, flight: InFlight, requests: Iterator[bytes]) -> None:
        """Write every chunk of the stream into the reserved block."""
        header = flight.receiver.header
        receiver: ShardReceiver = flight.receiver  # type: ignore[assignment]
        try:
            for message in requests:
                flight.touched = time.monotonic()
                if chip.failed_reason is not None:
                    with chip.lock:
                        chip.check_healthy("finish loading " + header.label)
                receiver.write(chunk_payload(message))
        except grpc.RpcError:
            if flight.idle:
                raise DeadlineExceeded(
                    f"chip {chip.index}: {header.label}: no data for "
                    f"{self.load_idle_timeout} s, load ended"
                ) from None
            raise

    # --- UnloadShard, Status, MarkChipFailed ----------------------------------------------

    @_rpc
    def UnloadShard(
        self, request: agent_pb2.UnloadShardRequest, context: grpc.ServicerContext
    ) -> agent_pb2.UnloadShardResponse:
        chip = self._chip(request.chip)
        entry = chip.unload(request.shard_id)
        log.info("chip %d: unloaded %s", chip.index, entry.header.label)
        return agent_pb2.UnloadShardResponse(freed_bytes=entry.header.reserved_bytes)

    @_rpc
    def Status(
        self, request: agent_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> agent_pb2.StatusResponse:
        chips = []
        for chip in self.chips:
            message = _chip_message(chip.snapshot())
            message.pipelines.extend(self.replicas.chip_status(chip.index))
            chips.append(message)
        return agent_pb2.StatusResponse(
            node=self.node,
            profile=self.profile,
            chips=chips,
            metrics_port=self.metrics_port,
            link_port=self.wire.port,
        )

    @_rpc
    def MarkChipFailed(
        self, request: agent_pb2.MarkChipFailedRequest, context: grpc.ServicerContext
    ) -> agent_pb2.MarkChipFailedResponse:
        chip = self._chip(request.chip)
        if request.recover:
            snap, lost = chip.recover(), []
            log.warning("chip %d: recovered", chip.index)
        else:
            reason = clip(request.reason or "marked failed", self.settings.text_limit)
            lost, snap = chip.fail(reason)
            log.warning("chip %d: failed (%s)", chip.index, reason)
        return agent_pb2.MarkChipFailedResponse(chip=_chip_message(snap), shards_lost=lost)

    # --- the canary: StageDigests, InjectFault (agents.canary) ------------------------------

    @_rpc
    def StageDigests(
        self, request: agent_pb2.StageDigestsRequest, context: grpc.ServicerContext
    ) -> agent_pb2.StageDigestsResponse:
        return canary.stage_digests(self.replicas, request, self.settings)

    @_rpc
    def InjectFault(
        self, request: agent_pb2.InjectFaultRequest, context: grpc.ServicerContext
    ) -> agent_pb2.InjectFaultResponse:
        canary.inject_fault(self.replicas, request, self.settings)
        log.warning(
            "armed a bit flip in stage %d of replica %d from tick %d",
            request.stage,
            request.replica,
            request.from_tick,
        )
        return agent_pb2.InjectFaultResponse()

    # --- Execute --------------------------------------------------------------------------

    @_rpc
    def Execute(
        self, request: agent_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> agent_pb2.ExecuteResponse:
        """Run one batch through a held shard's program — only on a chip no replica is bound to.

        Why refuse rather than give Execute its own program instance and KV cache: a second
        instance needs a second KV cache the size the plan reserved for the replica, which the
        chip's SRAM accounting does not have (accounting it would make Execute fail or evict
        for reasons unrelated to the request); and Execute is a test and benchmark door for
        shards being brought up, not a serving path. Refusing keeps a serving chip's program
        and cache reachable only by its replica, so nothing else can change served tokens.
        """
        from agents.activation import Activation

        chip = self._chip(request.chip)
        limit = self.settings.max_execute_bytes
        if len(request.activation) > limit:
            raise InvalidArgument(
                f"Execute activation of {len(request.activation)} bytes exceeds {limit}"
            )
        started = time.perf_counter()
        with chip.exec_lock:
            entry = chip.entry_for(request.shard_id, f"execute shard {request.shard_id[:12]}")
            if chip.bound_to is not None:
                raise FailedPrecondition(
                    f"chip {chip.index} serves replica {chip.bound_to}: Execute runs only on "
                    "chips no replica is bound to (RemoveReplica first)"
                )
            program = chip.program(entry)
            try:
                batch = Activation.from_bytes(request.activation)
            except Exception as exc:  # untrusted bytes: any failure to parse is the input's
                raise InvalidArgument(
                    f"chip {chip.index}: {entry.header.label}: malformed activation: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            try:
                output = program.step(batch).to_bytes()
            except (
                ExecutionError,
                ValueError,
                TypeError,
                IndexError,  # e.g. float slots or positions used as indices
                OverflowError,
                struct.error,
            ) as exc:
                raise InvalidArgument(
                    f"chip {chip.index}: {entry.header.label}: {type(exc).__name__}: {exc}"
                ) from None
        return agent_pb2.ExecuteResponse(activation=output, seconds=time.perf_counter() - started)

    # --- the lockstep pipeline (agents.replicas) ---------------------------------------------

    @_rpc
    def ConfigureReplica(
        self, request: agent_pb2.ConfigureReplicaRequest, context: grpc.ServicerContext
    ) -> agent_pb2.ConfigureReplicaResponse:
        ready = self.replicas.configure(request)
        log.info(
            "%s replica %d: stages %s configured",
            quote(request.deployment, self.settings.text_limit),
            request.replica,
            [a.stage for a in request.assignments],
        )
        return agent_pb2.ConfigureReplicaResponse(chips_ready=ready)

    @_rpc
    def StartEpoch(
        self, request: agent_pb2.StartEpochRequest, context: grpc.ServicerContext
    ) -> agent_pb2.StartEpochResponse:
        return agent_pb2.StartEpochResponse(running=self.replicas.start_epoch(request))

    @_rpc
    def Halt(
        self, request: agent_pb2.HaltRequest, context: grpc.ServicerContext
    ) -> agent_pb2.HaltResponse:
        return agent_pb2.HaltResponse(last_tick=self.replicas.halt(request))

    @_rpc
    def RemoveReplica(
        self, request: agent_pb2.RemoveReplicaRequest, context: grpc.ServicerContext
    ) -> agent_pb2.RemoveReplicaResponse:
        self.replicas.remove(request.deployment, request.replica)
        return agent_pb2.RemoveReplicaResponse()

    @_rpc
    def Generate(
        self, request: agent_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.GenerateResponse]:
        """Validation and admission happen here (errors map through `_rpc`); the stream of
        tokens is the returned iterator, whose errors map through the same table."""
        return self._mapped(self.replicas.generate(request, context), context, "Generate")

    def _mapped(
        self, responses: Iterator[_R], context: grpc.ServicerContext, name: str
    ) -> Iterator[_R]:
        """`responses`, with an exception raised while streaming turned into a status like
        `_rpc` does (a status the stream already set with `context.abort` passes through)."""
        try:
            yield from responses
        except Exception as exc:
            if _aborted(context, exc):  # the stream set its status itself
                raise
            code, message = status_of(exc)
            log.warning("%s failed: %s %s", name, code.name, message)
            context.abort(code, f"node {self.node}: {message}")

    @_rpc
    def LinkPing(
        self, request: agent_pb2.LinkPingRequest, context: grpc.ServicerContext
    ) -> agent_pb2.LinkPingResponse:
        s = self.settings
        if not request.peer or not 1 <= request.count <= s.ping_max_count:
            raise InvalidArgument(f"LinkPing needs a peer and a count from 1 to {s.ping_max_count}")
        if not 0 <= request.payload_bytes <= s.ping_max_payload_bytes:
            raise InvalidArgument(
                f"LinkPing payload_bytes {request.payload_bytes} is over the limit of "
                f"{s.ping_max_payload_bytes}"
            )
        peer = peer_key(context)  # a ping holds a worker as long as a stream: admit it as one
        self.streams.enter(peer, "LinkPing")
        try:
            if request.transport == agent_pb2.LINK_TRANSPORT_FRAMED:
                one_way, round_trip = self._wire_ping(request)
            else:
                one_way, round_trip = ping(
                    request.peer, request.count, request.payload_bytes, self.tls
                )
        except (OSError, WireError) as exc:
            raise Unavailable(
                f"LinkPing to {quote(request.peer)} over the framed link failed: {clip(str(exc))}"
            ) from None
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else ""
            raise Unavailable(
                f"LinkPing to {quote(request.peer)} failed: "
                f"{code.name if code else 'error'} {clip(details or '')}"
            ) from None
        finally:
            self.streams.leave(peer)
        return agent_pb2.LinkPingResponse(one_way_ms=one_way, round_trip_ms=round_trip)

    def _wire_ping(self, request: agent_pb2.LinkPingRequest) -> tuple[list[float], list[float]]:
        """A framed-link ping: the peer's link port from its Status, then `agents.wire.ping`."""
        port = advertised_port(request.peer, self.tls, None)
        if port == 0:
            raise WireError(grpc.StatusCode.UNAVAILABLE, "the peer serves no framed link port")
        host = request.peer.rsplit(":", 1)[0]
        return wire_ping(host, port, request.count, request.payload_bytes, self.tls)


def _response(
    header: ShardHeader, entry: HeldEntry, started: float, *, already: bool
) -> agent_pb2.LoadShardResponse:
    return agent_pb2.LoadShardResponse(
        shard_id=header.shard_id,
        chip=header.chip,
        already_loaded=already,
        bytes_received=0 if already else header.size_bytes,
        reserved_bytes=entry.header.reserved_bytes,
        digest_algorithm=entry.header.algorithm,
        digest=entry.digest,
        seconds=time.perf_counter() - started,
        message="already loaded" if already else "loaded and verified",
    )


def _check_blob(header: ShardHeader, view: memoryview) -> None:
    """The blob must be safetensors; a manifest, if any, must parse (`Manifest.from_json`
    checks every field), list exactly the blob's tensors, and agree with the header."""
    where = f"chip {header.chip}: {header.label}"
    try:
        parsed = parse_header(view, len(view))
        manifest = manifest_of_metadata(parsed.metadata)
        if manifest is not None:
            manifest.check_entries(parsed.entries)
    except ExecutionError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    if manifest is None:
        return
    if manifest.virtual != header.virtual:
        raise InvalidArgument(
            f"{where}: header says virtual={header.virtual}, the manifest says {manifest.virtual}"
        )
    if header.virtual and header.declared_bytes < manifest.declared_bytes:
        raise InvalidArgument(
            f"{where}: header declares {header.declared_bytes} bytes, "
            f"the manifest {manifest.declared_bytes}"
        )


# --- the server ------------------------------------------------------------------------------


class StreamLimit(grpc.ServerInterceptor):  # type: ignore[misc]
    """Admit every streaming call through the `StreamGate` when it starts (see the module
    docstring): over a bound it ends at once with RESOURCE_EXHAUSTED, before its handler can
    block a worker on a silent client. The count is released when the call ends, however.

    Streams of the open services (health Watch, reflection: any agent of the cluster may call
    them) have no idle timeout of their own and carry nothing the agent must keep open, so
    they end with DEADLINE_EXCEEDED after `open_stream_lifetime` seconds (None: never); a
    health watcher re-watches. Without it a few agent certificates held stream places and
    workers for good with silent Watch streams.
    """

    def __init__(
        self, gate: StreamGate, node: str, open_stream_lifetime: float | None = None
    ) -> None:
        self.gate = gate
        self.node = node
        self.open_stream_lifetime = open_stream_lifetime

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        method = str(details.method).rsplit("/", 1)[-1]
        if handler.request_streaming and handler.response_streaming:
            kind = "stream_stream"
        elif handler.request_streaming:
            kind = "stream_unary"
        else:
            kind = "unary_stream"
        behavior = getattr(handler, kind)
        service = str(details.method).lstrip("/").split("/", 1)[0]
        lifetime = self.open_stream_lifetime if service in OPEN_SERVICES else None
        guarded = self._guard(
            behavior, method, streaming_response=handler.response_streaming, lifetime=lifetime
        )
        return handler._replace(**{kind: guarded})  # type: ignore[no-any-return]

    def _guard(
        self,
        behavior: Callable[..., Any],
        method: str,
        *,
        streaming_response: bool,
        lifetime: float | None = None,
    ) -> Callable[..., Any]:
        gate, node = self.gate, self.node

        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            peer = peer_key(context)
            try:
                gate.enter(peer, method)
            except Exception as exc:
                code, message = status_of(exc)
                log.warning("%s refused: %s", method, message)
                context.abort(code, f"node {node}: {message}")
            done = threading.Lock()
            released = False
            timer: threading.Timer | None = None
            if lifetime is not None:
                timer = threading.Timer(
                    lifetime,
                    end_call,
                    (
                        context,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"node {node}: {method} streams end after {lifetime} s",
                    ),
                )
                timer.daemon = True

            def release() -> None:
                nonlocal released
                with done:
                    if released:
                        return
                    released = True
                if timer is not None:
                    timer.cancel()
                gate.leave(peer)

            if not context.add_callback(release):  # the call already ended
                release()
                return None
            if timer is not None:
                timer.start()
            try:
                result = behavior(request, context)
            except BaseException:
                release()
                raise
            if not streaming_response:
                release()
                return result
            return _released_after(result, release)

        return guarded


def _released_after(responses: Iterator[Any], release: Callable[[], None]) -> Iterator[Any]:
    try:
        yield from responses
    finally:
        release()


def _handlers(service: AgentService) -> grpc.GenericRpcHandler:
    def unary(name: str, request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            getattr(service, name),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "LoadShard": grpc.stream_unary_rpc_method_handler(
                service.LoadShard,
                request_deserializer=None,
                response_serializer=agent_pb2.LoadShardResponse.SerializeToString,
            ),
            "UnloadShard": unary(
                "UnloadShard", agent_pb2.UnloadShardRequest, agent_pb2.UnloadShardResponse
            ),
            "Status": unary("Status", agent_pb2.StatusRequest, agent_pb2.StatusResponse),
            "Execute": unary("Execute", agent_pb2.ExecuteRequest, agent_pb2.ExecuteResponse),
            "MarkChipFailed": unary(
                "MarkChipFailed", agent_pb2.MarkChipFailedRequest, agent_pb2.MarkChipFailedResponse
            ),
            "ConfigureReplica": unary(
                "ConfigureReplica",
                agent_pb2.ConfigureReplicaRequest,
                agent_pb2.ConfigureReplicaResponse,
            ),
            "StartEpoch": unary(
                "StartEpoch", agent_pb2.StartEpochRequest, agent_pb2.StartEpochResponse
            ),
            "Halt": unary("Halt", agent_pb2.HaltRequest, agent_pb2.HaltResponse),
            "RemoveReplica": unary(
                "RemoveReplica", agent_pb2.RemoveReplicaRequest, agent_pb2.RemoveReplicaResponse
            ),
            "Generate": grpc.unary_stream_rpc_method_handler(
                service.Generate,
                request_deserializer=agent_pb2.GenerateRequest.FromString,
                response_serializer=agent_pb2.GenerateResponse.SerializeToString,
            ),
            "LinkPing": unary("LinkPing", agent_pb2.LinkPingRequest, agent_pb2.LinkPingResponse),
            "StageDigests": unary(
                "StageDigests", agent_pb2.StageDigestsRequest, agent_pb2.StageDigestsResponse
            ),
            "InjectFault": unary(
                "InjectFault", agent_pb2.InjectFaultRequest, agent_pb2.InjectFaultResponse
            ),
        },
    )


SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Cap gRPC's read-ahead during a load: bandwidth probing grows the flow-control window on
    # a long-lived connection and buffered messages pile up in the heap while the copy and
    # digest lag (measured: per-load peak RSS stepping 350 -> 402 MiB over 100 loads by
    # default, flat at 340-356 MiB with these, same throughput).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 8 << 20),
    # A fixed --listen port must not be silently shared by two agents.
    ("grpc.so_reuseport", 0),
    # Notice clients that vanished without closing (a broken stream frees its reservation).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]


@dataclass
class AgentServer:
    """A started agent: the gRPC server, its bound port and its health servicer."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service: AgentService
    metrics: Any = None  # the /metrics HTTP server (`agents.metrics.attach_metrics`), if any

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, then stop accepting calls and wait up to `grace` for them."""
        self.health.enter_graceful_shutdown()
        self.service.close_pipelines()
        self.server.stop(grace).wait()
        self.service.close()
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics.server_close()


def start_server(
    service: AgentService,
    listen: str,
    *,
    credentials: grpc.ServerCredentials | None = None,
    max_workers: int | None = None,
) -> AgentServer:
    """Bind `listen` (HOST:PORT, port 0 = any free port), start serving, return the port.

    The worker pool is `settings.workers` (every allowed stream plus the unary reserve), so
    streams can never take the workers Status and health need. With `credentials`
    (`security.tls.server_credentials`) the port speaks mutual TLS and every call passes the
    authorization table (`security.identity.METHOD_ROLES`) before it may take a stream place;
    None is plaintext with no authorization (`lpuctl agent --insecure`, loopback only).
    """
    workers = max_workers or service.settings.workers
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent-rpc"),
        interceptors=(
            *(() if credentials is None else (AuthorizationInterceptor(service.node),)),
            StreamLimit(service.streams, service.node, service.settings.link_idle_timeout),
        ),
        options=SERVER_OPTIONS,
    )
    server.add_generic_rpc_handlers((_handlers(service), link_handlers(service.links)))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, LINK_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if credentials is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    if service.settings.link_port is not None:
        try:
            service.wire.listen(listen.rsplit(":", 1)[0], service.settings.link_port)
        except OSError:
            server.stop(0)
            raise
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return AgentServer(server, port, health_servicer, service)
