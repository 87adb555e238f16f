"""The node agent's gRPC service: per-chip SRAM, streaming shard loads, status, execution.

State per chip (`Chip`): its `SramArena`, the committed shards, the loads in flight and its
health. A load goes through three steps and only the last one makes it visible:

1. header → validate, then under the chip lock: refuse if the chip failed, answer "already
   loaded" if the chip holds the shard, reserve SRAM (RESOURCE_EXHAUSTED if it does not fit)
   and register the load as in flight (Status shows its byte progress);
2. chunks → written straight into the reserved block and digested (`agents.loader`);
3. end of stream → size and digest verified, the safetensors header parsed out of the arena,
   then under the chip lock the in-flight entry is replaced by the committed shard.

Whatever ends a load early — a broken or cancelled stream, a bad digest, a wrong size, too many
bytes, the chip failing meanwhile — the `finally` of `load_shard` stops the digest thread and
frees the block and its accounting, so nothing half-loaded is ever held or executable.

Locks: `Chip.lock` guards the chip's tables (short critical sections, never held while
receiving); `Chip.exec_lock` serializes executions on the chip (a stage program owns KV-cache
state) and is taken by unload and fail before they free memory a program may be reading.
Order: exec_lock, then lock.

Why the service is registered by hand instead of with `agent_pb2_grpc.add_AgentServicer_to_
server`: LoadShard takes its requests as raw bytes (identity deserializer) so chunk payloads
reach the arena without a protobuf copy; the other methods use the generated messages.
"""

from __future__ import annotations

import functools
import logging
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agents.arena import ArenaExhausted, Block, SramArena
from agents.errors import AgentError, InvalidArgument
from agents.interconnect import SERVICE_NAME as LINK_SERVICE_NAME
from agents.interconnect import LinkService, ping
from agents.interconnect import handlers as link_handlers
from agents.loader import (
    MAX_MESSAGE_BYTES,
    LoadError,
    ShardHeader,
    ShardReceiver,
    chunk_payload,
    parse_header_message,
    validate_header,
)
from agents.lockstep import ProtocolError
from agents.replicas import ReplicaHost
from protos import agent_pb2
from shardformat.codec import parse_header
from shardformat.errors import ExecutionError
from shardformat.manifest import manifest_of_metadata

log = logging.getLogger("lockstep.agent")

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name
_R = TypeVar("_R")


@dataclass
class HeldEntry:
    """A committed shard: its verified header, its arena block and, once built, its program."""

    header: ShardHeader
    block: Block
    digest: str
    loaded_unix_ms: int
    program: Any = None


@dataclass
class InFlight:
    """A load between reservation and commit; `touched` is when its last message arrived."""

    receiver: ShardReceiver
    block: Block
    context: grpc.ServicerContext
    touched: float = field(default_factory=time.monotonic)
    idle: bool = False


@dataclass
class Chip:
    """One chip of the node: SRAM arena, shard tables and health."""

    index: int
    arena: SramArena
    held: dict[str, HeldEntry] = field(default_factory=dict)
    loading: dict[str, InFlight] = field(default_factory=dict)
    failed_reason: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    exec_lock: threading.Lock = field(default_factory=threading.Lock)

    def check_healthy(self, action: str) -> None:
        if self.failed_reason is not None:
            raise LoadError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"chip {self.index} is failed ({self.failed_reason}): cannot {action}",
            )

    def usage(self) -> str:
        """What occupies the chip, for error messages; call with `lock` held."""
        used = sum(e.header.reserved_bytes for e in self.held.values())
        loading = sum(f.receiver.header.reserved_bytes for f in self.loading.values())
        return (
            f"chip {self.index} holds {len(self.held)} shard(s) ({used} bytes) and has "
            f"{len(self.loading)} load(s) in flight ({loading} bytes)"
        )

    def snapshot(self) -> agent_pb2.ChipStatus:
        """Status of the chip; call with `lock` held."""
        used = sum(e.header.reserved_bytes for e in self.held.values())
        loading = sum(f.receiver.header.reserved_bytes for f in self.loading.values())
        return agent_pb2.ChipStatus(
            chip=self.index,
            health=(
                agent_pb2.CHIP_HEALTH_FAILED
                if self.failed_reason is not None
                else agent_pb2.CHIP_HEALTH_HEALTHY
            ),
            failure_reason=self.failed_reason or "",
            sram_capacity_bytes=self.arena.capacity,
            sram_used_bytes=used,
            sram_loading_bytes=loading,
            sram_free_bytes=self.arena.free,
            shards=[_held_message(e) for e in self.held.values()],
            loads=[
                agent_pb2.LoadProgress(
                    shard_id=f.receiver.header.shard_id,
                    bytes_loaded=f.receiver.bytes_loaded,
                    bytes_total=f.receiver.header.size_bytes,
                    reserved_bytes=f.receiver.header.reserved_bytes,
                )
                for f in self.loading.values()
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


def _rpc(method: Callable[..., _R]) -> Callable[..., _R]:
    """Turn the service's exceptions into gRPC statuses whose message names the node."""

    @functools.wraps(method)
    def wrapper(self: AgentService, request: Any, context: grpc.ServicerContext) -> _R:
        try:
            return method(self, request, context)
        except LoadError as exc:
            code, message = exc.code, exc.message
        except AgentError as exc:  # interim: the one table is `agents.status_codes` (core)
            code = getattr(grpc.StatusCode, _snake(type(exc).__name__), grpc.StatusCode.INTERNAL)
            message = exc.message
        except ArenaExhausted as exc:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except ProtocolError as exc:  # e.g. StartEpoch: an unknown chip, a non-increasing epoch
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except grpc.RpcError:
            code, message = grpc.StatusCode.CANCELLED, "the client ended the stream"
        log.warning("%s failed: %s %s", method.__name__, code.name, message)
        context.abort(code, f"node {self.node}: {message}")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


class AgentService:
    """The `lockstep.agent.v1.Agent` servicer of one node.

    `load_idle_timeout`: a load whose client sends nothing for this long is cancelled and its
    SRAM freed. A vanished peer is noticed by TCP and keepalive; this catches a live client
    that stalls mid-stream and would otherwise hold its reservation forever.
    """

    def __init__(
        self,
        node: str,
        profile: str,
        chips: int,
        sram_bytes: int,
        *,
        load_idle_timeout: float = 60.0,
    ) -> None:
        if chips < 1:
            raise ValueError(f"a node needs at least one chip, got {chips}")
        self.node = node
        self.profile = profile
        self.chips = [Chip(i, SramArena(i, sram_bytes)) for i in range(chips)]
        self.load_idle_timeout = load_idle_timeout
        self.replicas = ReplicaHost(self.chips, _build_program)
        self.links = LinkService(self.replicas.resolve, node)
        self._closed = threading.Event()
        threading.Thread(target=self._reap_idle_loads, name="idle-loads", daemon=True).start()

    def close(self) -> None:
        """Stop the idle-load watchdog and every pipeline stage."""
        self._closed.set()
        self.close_pipelines()

    def close_pipelines(self) -> None:
        """Stop every stage and end the link streams (they are open for as long as a replica
        runs, so a graceful stop would otherwise wait out its whole grace period on them)."""
        self.replicas.close()
        self.links.close()

    def _reap_idle_loads(self) -> None:
        interval = min(1.0, self.load_idle_timeout / 4)
        while not self._closed.wait(interval):
            deadline = time.monotonic() - self.load_idle_timeout
            for chip in self.chips:
                with chip.lock:
                    stalled = [f for f in chip.loading.values() if f.touched < deadline]
                for flight in stalled:
                    flight.idle = True
                    log.warning(
                        "chip %d: %s idle for %.1f s, cancelling",
                        chip.index,
                        flight.receiver.header.label,
                        self.load_idle_timeout,
                    )
                    flight.context.cancel()

    def _chip(self, index: int) -> Chip:
        if index >= len(self.chips):
            raise LoadError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chip {index} does not exist (chips 0..{len(self.chips) - 1})",
            )
        return self.chips[index]

    # --- LoadShard ------------------------------------------------------------------------

    @_rpc
    def LoadShard(
        self, requests: Iterator[bytes], context: grpc.ServicerContext
    ) -> agent_pb2.LoadShardResponse:
        started = time.perf_counter()
        first = next(requests, None)
        if first is None:
            raise LoadError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "empty LoadShard stream: the first message must be the header",
            )
        header = validate_header(parse_header_message(first), len(self.chips))
        chip = self.chips[header.chip]
        flight = self._begin_load(chip, header, context)
        if isinstance(flight, HeldEntry):
            return _response(header, flight, started, already=True)
        committed = False
        try:
            self._receive(chip, flight, requests)
            digest = flight.receiver.finish()
            _check_blob(header, flight.block.view)
            entry = self._commit(chip, header, flight, digest)
            committed = True
        finally:
            if not committed:
                self._abort_load(chip, header, flight)
        log.info(
            "chip %d: loaded %s (%d bytes) in %.3f s",
            chip.index,
            header.label,
            header.size_bytes,
            time.perf_counter() - started,
        )
        return _response(header, entry, started, already=False)

    def _receive(self, chip: Chip, flight: InFlight, requests: Iterator[bytes]) -> None:
        """Write every chunk of the stream into the reserved block."""
        header = flight.receiver.header
        try:
            for message in requests:
                flight.touched = time.monotonic()
                if chip.failed_reason is not None:
                    chip.check_healthy("finish loading " + header.label)
                flight.receiver.write(chunk_payload(message))
        except grpc.RpcError:
            if flight.idle:
                raise LoadError(
                    grpc.StatusCode.CANCELLED,
                    f"chip {chip.index}: {header.label}: no data for "
                    f"{self.load_idle_timeout} s, load cancelled",
                ) from None
            raise

    def _begin_load(
        self, chip: Chip, header: ShardHeader, context: grpc.ServicerContext
    ) -> HeldEntry | InFlight:
        """Reserve SRAM and register the load; the held entry if the chip already has it."""
        with chip.lock:
            chip.check_healthy("load " + header.label)
            held = chip.held.get(header.shard_id)
            if held is not None:
                # The held shard was verified under this id (every commit is), so the id alone
                # proves its bytes; a header that describes it otherwise is refused.
                if (held.header.size_bytes, held.header.virtual) != (
                    header.size_bytes,
                    header.virtual,
                ):
                    raise InvalidArgument(
                        f"chip {chip.index} holds {header.label} with "
                        f"{held.header.size_bytes} bytes, virtual={held.header.virtual}; the "
                        f"header says {header.size_bytes} bytes, virtual={header.virtual}"
                    )
                return held
            if header.shard_id in chip.loading:
                raise LoadError(
                    grpc.StatusCode.ABORTED,
                    f"chip {chip.index}: {header.label} is already being loaded",
                )
            try:
                block = chip.arena.reserve(header.label, header.reserved_bytes, header.size_bytes)
            except ArenaExhausted as exc:
                raise LoadError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; {chip.usage()}"
                ) from None
            try:
                flight = InFlight(ShardReceiver(header, block.view), block, context)
            except LoadError:
                chip.arena.free_block(block)  # nothing holds the block yet: give it back
                raise
            except Exception as exc:
                chip.arena.free_block(block)
                raise LoadError(
                    grpc.StatusCode.INTERNAL,
                    f"chip {chip.index}: {header.label}: could not start the load: {exc}",
                ) from None
            chip.loading[header.shard_id] = flight
        return flight

    def _commit(self, chip: Chip, header: ShardHeader, flight: InFlight, digest: str) -> HeldEntry:
        with chip.lock:
            chip.check_healthy("commit " + header.label)
            entry = HeldEntry(header, flight.block, digest, int(time.time() * 1000))
            del chip.loading[header.shard_id]
            chip.held[header.shard_id] = entry
        return entry

    def _abort_load(self, chip: Chip, header: ShardHeader, flight: InFlight) -> None:
        flight.receiver.close()
        with chip.lock:
            if chip.loading.get(header.shard_id) is flight:
                del chip.loading[header.shard_id]
        chip.arena.free_block(flight.block)

    # --- UnloadShard, Status, MarkChipFailed ----------------------------------------------

    @_rpc
    def UnloadShard(
        self, request: agent_pb2.UnloadShardRequest, context: grpc.ServicerContext
    ) -> agent_pb2.UnloadShardResponse:
        chip = self._chip(request.chip)
        with chip.exec_lock, chip.lock:
            entry = chip.held.pop(request.shard_id, None)
            if entry is None:
                raise _not_held(chip, request.shard_id)
            entry.program = None
            chip.arena.free_block(entry.block)
        log.info("chip %d: unloaded %s", chip.index, entry.header.label)
        return agent_pb2.UnloadShardResponse(freed_bytes=entry.header.reserved_bytes)

    @_rpc
    def Status(
        self, request: agent_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> agent_pb2.StatusResponse:
        chips = []
        for chip in self.chips:
            with chip.lock:
                snapshot = chip.snapshot()
            snapshot.pipelines.extend(self.replicas.chip_status(chip.index))
            chips.append(snapshot)
        return agent_pb2.StatusResponse(node=self.node, profile=self.profile, chips=chips)

    @_rpc
    def MarkChipFailed(
        self, request: agent_pb2.MarkChipFailedRequest, context: grpc.ServicerContext
    ) -> agent_pb2.MarkChipFailedResponse:
        chip = self._chip(request.chip)
        with chip.exec_lock, chip.lock:
            lost = list(chip.held)
            if request.recover:
                chip.failed_reason, lost = None, []
            else:
                chip.failed_reason = request.reason or "marked failed"
                for entry in chip.held.values():
                    entry.program = None
                    chip.arena.free_block(entry.block)
                chip.held.clear()
            status = chip.snapshot()
        log.warning(
            "chip %d: %s",
            chip.index,
            "recovered" if request.recover else f"failed ({chip.failed_reason})",
        )
        return agent_pb2.MarkChipFailedResponse(chip=status, shards_lost=lost)

    # --- Execute --------------------------------------------------------------------------

    @_rpc
    def Execute(
        self, request: agent_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> agent_pb2.ExecuteResponse:
        from agents import executor
        from agents.activation import Activation

        chip = self._chip(request.chip)
        started = time.perf_counter()
        with chip.exec_lock:
            with chip.lock:
                chip.check_healthy(f"execute shard {request.shard_id[:12]}")
                entry = chip.held.get(request.shard_id)
                if entry is None:
                    raise _not_held(chip, request.shard_id)
            program = _program_of(chip, entry, executor)
            try:
                batch = Activation.from_bytes(request.activation)
                output = program.step(batch).to_bytes()
            except (ExecutionError, ValueError, struct.error) as exc:
                raise LoadError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"chip {chip.index}: {entry.header.label}: {exc}",
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
            request.deployment,
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
        tokens is the returned iterator."""
        return self.replicas.generate(request, context)

    @_rpc
    def LinkPing(
        self, request: agent_pb2.LinkPingRequest, context: grpc.ServicerContext
    ) -> agent_pb2.LinkPingResponse:
        if not request.peer or not 1 <= request.count <= 100_000:
            raise LoadError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "LinkPing needs a peer and a count from 1 to 100000",
            )
        one_way, round_trip = ping(request.peer, request.count, request.payload_bytes)
        return agent_pb2.LinkPingResponse(one_way_ms=one_way, round_trip_ms=round_trip)


def _build_program(chip: Chip, entry: HeldEntry) -> Any:
    from agents import executor

    with chip.exec_lock:
        return _program_of(chip, entry, executor)


def _program_of(chip: Chip, entry: HeldEntry, executor: Any) -> Any:
    """The shard's stage program, built on first use (weights are views into the arena)."""
    if entry.header.virtual:
        raise LoadError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"chip {chip.index}: {entry.header.label} is virtual (manifest only): it "
            f"accounts {entry.header.reserved_bytes} bytes of SRAM but has no "
            "weights to execute",
        )
    if entry.program is None:
        try:
            entry.program = executor.load_shard(entry.block.view)
        except ExecutionError as exc:
            raise LoadError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"chip {chip.index}: {entry.header.label} cannot run: {exc}",
            ) from None
    return entry.program


def _not_held(chip: Chip, shard_id: str) -> LoadError:
    loading = " (a load of it is in progress)" if shard_id in chip.loading else ""
    return LoadError(
        grpc.StatusCode.NOT_FOUND,
        f"chip {chip.index} does not hold shard {shard_id[:64]!r}{loading}",
    )


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


def _snake(name: str) -> str:
    """`InvalidArgument` -> `INVALID_ARGUMENT`: an `AgentError` class to its status name."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


# --- the server ------------------------------------------------------------------------------


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

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, then stop accepting calls and wait up to `grace` for them."""
        self.health.enter_graceful_shutdown()
        self.service.close_pipelines()
        self.server.stop(grace).wait()
        self.service.close()


def start_server(
    service: AgentService, listen: str, *, max_workers: int | None = None
) -> AgentServer:
    """Bind `listen` (HOST:PORT, port 0 = any free port), start serving, return the port."""
    workers = max_workers or max(16, 2 * len(service.chips) + 8)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent-rpc"),
        options=SERVER_OPTIONS,
    )
    server.add_generic_rpc_handlers((_handlers(service), link_handlers(service.links)))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, LINK_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return AgentServer(server, port, health_servicer, service)
