"""One virtual node agent of the simulated fleet: the `lockstep.agent.v1.Agent` API on asyncio.

A virtual node answers the same RPCs the control plane drives on a real agent, with the same
authorization table (`security.identity.METHOD_ROLES`, checked per call from the peer's
certificate), the same bounds (`agents.settings.AgentSettings`: message sizes, stream limits,
the load idle timeout, ConfigureReplica's checks) and the same status codes
(`agents.status_codes`), reusing the real code: the chip tables (`agents.chips.Chip`: reserve,
commit, abort, unload, fail, bind), the loader's header validation, the blob checks of
`agents.server`, the canary's digest answers (`agents.canary`). What differs:

* **SRAM is accounted, not allocated.** `VirtualArena` has the `SramArena` interface and the
  same refusal (`ArenaExhausted` -> RESOURCE_EXHAUSTED naming chip, need and free bytes), but
  holds only the blob bytes received (a virtual shard's manifest-only blob: kilobytes), never
  the capacity. A virtual shard reserves its declared bytes, as on a real agent.
* **Loads are verified the same way** (BLAKE3 = shard id, sha256 when asked, DATA_LOSS
  otherwise, size bounds, the manifest checked against the header), hashed inline: blobs are
  small, and a digest thread per load would cost more than the hash.
* **No executor.** Execute is FAILED_PRECONDITION (virtual shards have no weights; the fleet
  runs no kernels), LinkPing too (there are no links). Stages run timing-only
  (`agents.virtual_pipeline`); Generate takes token ids (`prompt_text` is INVALID_ARGUMENT:
  synthetic tokens have no text). InjectFault is refused as on an agent started without
  `--allow-fault-injection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from agents import canary
from agents.arena import ArenaExhausted, Block
from agents.chips import Chip, HeldEntry
from agents.errors import (
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from agents.journal import Journal
from agents.loader import (
    MAX_CHUNK_BYTES,
    ShardHeader,
    chunk_payload,
    new_hash,
    parse_header_message,
    validate_header,
)
from agents.lockstep import Schedule
from agents.replicas import (
    ReplicaHost,
    owner_label,
    replica_not_here,
    resume_tokens_of,
)
from agents.sampling import Sampling
from agents.server import _check_blob, _chip_message, _response
from agents.settings import DEFAULT_SETTINGS, AgentSettings
from agents.stage_core import (
    Cancel,
    ChipsReady,
    Halt,
    Resume,
    StageCore,
    Submit,
)
from agents.status_codes import MESSAGE_LIMIT, status_of
from agents.streams import StreamGate
from agents.text import clip, quote
from agents.virtual_pipeline import SimReplica, SimStage, TokenOut, stage_seconds
from placement.profiles import ChipProfile
from protos import admin_pb2, agent_pb2
from security.identity import AGENT_SERVICE, CONTROL_PLANE, check_call
from security.tls import peer_identity, status_code
from shardformat.address import SHARD_ID_ALGORITHM
from shardformat.codec import parse_header
from shardformat.manifest import Manifest, manifest_of_metadata

if TYPE_CHECKING:
    from agents.fleet import Fleet

log = logging.getLogger("lockstep.fleet")


# --- virtual SRAM --------------------------------------------------------------------------


class VirtualArena:
    """A chip's SRAM as accounting only (the `SramArena` interface `agents.chips` uses)."""

    def __init__(self, chip: int, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"chip {chip}: SRAM capacity must be positive, got {capacity}")
        self.chip = chip
        self.capacity = capacity
        self._accounted = 0

    @property
    def accounted(self) -> int:
        return self._accounted

    @property
    def free(self) -> int:
        return self.capacity - self._accounted

    def reserve(self, label: str, accounted: int, size: int) -> Block:
        if size < 0 or accounted < size:
            raise ValueError(
                f"a block accounts at least the bytes it stores ({accounted} < {size})"
            )
        if accounted > self.free:
            raise ArenaExhausted(self.chip, label, accounted, self.free, self.capacity)
        self._accounted += accounted
        return Block(label, accounted, size, -1, memoryview(bytearray(size)))

    def free_block(self, block: Block) -> None:
        if block.freed:
            return
        block.freed = True
        self._accounted -= block.accounted
        block.view = memoryview(b"")

    def largest_free_span(self) -> int:
        return self.free


def make_virtual_chips(count: int, sram_bytes: int) -> list[Chip]:
    if count < 1:
        raise ValueError(f"a node needs at least one chip, got {count}")
    return [Chip(i, VirtualArena(i, sram_bytes)) for i in range(count)]  # type: ignore[arg-type]


class VirtualReceiver:
    """A load's receiver (`agents.chips.Receiver`): the bounds and digests of
    `agents.loader.ShardReceiver`, hashing inline."""

    def __init__(self, header: ShardHeader, target: memoryview) -> None:
        self.header = header
        self.bytes_loaded = 0
        self._target = target
        algorithms = dict.fromkeys((SHARD_ID_ALGORITHM, header.algorithm))
        self._hashes: dict[str, Any] = {a: new_hash(a) for a in algorithms}

    def write(self, payload: memoryview) -> None:
        start, end = self.bytes_loaded, self.bytes_loaded + len(payload)
        if end > self.header.size_bytes:
            raise InvalidArgument(
                f"chip {self.header.chip}: {self.header.label} declared {self.header.size_bytes}"
                f" bytes but the stream carries more (at least {end})"
            )
        if len(payload) > MAX_CHUNK_BYTES:
            raise InvalidArgument(f"chunk of {len(payload)} bytes exceeds {MAX_CHUNK_BYTES}")
        self._target[start:end] = payload
        for h in self._hashes.values():
            h.update(payload)
        self.bytes_loaded = end

    def finish(self) -> str:
        header = self.header
        if self.bytes_loaded != header.size_bytes:
            raise InvalidArgument(
                f"chip {header.chip}: {header.label} declared {header.size_bytes} bytes, "
                f"the stream ended after {self.bytes_loaded}"
            )
        expected = {SHARD_ID_ALGORITHM: header.shard_id, header.algorithm: header.digest}
        for algorithm, digest in expected.items():
            actual = self._hashes[algorithm].hexdigest()
            if actual != digest:
                what = "the shard id" if algorithm == SHARD_ID_ALGORITHM else "the header's"
                raise DataLoss(
                    f"chip {header.chip}: {header.label} failed verification: {algorithm} of "
                    f"the received bytes is {actual}, {what} is {digest}; nothing was committed"
                )
        return str(expected[header.algorithm])

    def close(self) -> None:
        self._target = memoryview(b"")


# --- the servicer --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    """What a virtual node keeps of a held shard's manifest: the fields ConfigureReplica
    checks and the stage's time from the cost model (a parsed 405B manifest is large, and
    1,305 nodes hold 3,736 of them)."""

    stage: int
    stages: int
    max_batch: int
    max_context: int
    tp_rank: int
    tp_size: int
    vocab_size: int
    hidden_size: int
    seconds: float


_INFOS: dict[tuple[str, str], ShardInfo] = {}  # (shard id, profile) -> info, shared by nodes


def shard_info(shard_id: str, manifest: Manifest, profile: ChipProfile) -> ShardInfo:
    key = (shard_id, profile.name)
    info = _INFOS.get(key)
    if info is None:
        info = _INFOS[key] = ShardInfo(
            manifest.stage,
            manifest.stages,
            manifest.max_batch,
            manifest.max_context,
            manifest.tp_rank,
            manifest.tp_size,
            manifest.config.vocab_size,
            manifest.config.hidden_size,
            stage_seconds(manifest, profile),
        )
    return info


def _rpc(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Authorize the call (the METHOD_ROLES table), then map exceptions to statuses naming
    the node, as `agents.server._rpc` does."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: VirtualNode, request: Any, context: grpc.aio.ServicerContext) -> Any:
        refusal = check_call(f"/{AGENT_SERVICE}/{name}", peer_identity(context))
        if refusal is not None:
            await context.abort(status_code(refusal), f"node {self.name}: {refusal.message}")
        try:
            return await method(self, request, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code, message = status_of(exc)
        log.info("%s %s failed: %s %s", self.name, name, code.name, message)
        await context.abort(code, f"node {self.name}: {message}")

    return wrapper


@dataclass
class _Hosted:
    """This node's part of a replica: its stages and the chips it bound."""

    sim: SimReplica
    stages: list[int]
    chips: dict[int, tuple[int, str]]  # chip index -> (stage, chip name)


class _StageView:
    """What `agents.canary` reads of a stage runner."""

    def __init__(self, core: StageCore) -> None:
        self.core = core

    def output_digests(self, ticks: list[int]) -> tuple[Any, list[bytes | None]]:
        m = self.core.machine
        status = agent_pb2.PipelineStatus(epoch=m.epoch, phase=self.core.phase)
        return status, m.output_digests(ticks)


@dataclass(eq=False)
class VirtualNode:
    """One virtual node: its chips, its replicas' stages, its server and registration."""

    fleet: Fleet
    name: str
    rack: str
    slot: int
    profile: ChipProfile
    chips: list[Chip]
    identity: str
    settings: AgentSettings = DEFAULT_SETTINGS
    address: str = ""
    server: grpc.aio.Server | None = None
    registration: asyncio.Task[None] | None = None
    manifests: dict[str, ShardInfo] = field(default_factory=dict)
    hosted: dict[tuple[str, int], _Hosted] = field(default_factory=dict)
    alive: bool = True
    beats: int = 0
    gate: StreamGate = field(init=False)

    def __post_init__(self) -> None:
        self.gate = StreamGate(
            self.settings.max_streams,
            self.settings.max_streams_per_peer,
            reserved=frozenset({CONTROL_PLANE}),
        )

    # --- gRPC plumbing ------------------------------------------------------------------------

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )

        a = agent_pb2
        methods = {
            "LoadShard": grpc.stream_unary_rpc_method_handler(
                self.LoadShard,
                request_deserializer=None,
                response_serializer=a.LoadShardResponse.SerializeToString,
            ),
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate,
                request_deserializer=a.GenerateRequest.FromString,
                response_serializer=a.GenerateResponse.SerializeToString,
            ),
            "UnloadShard": unary(self.UnloadShard, a.UnloadShardRequest, a.UnloadShardResponse),
            "Status": unary(self.Status, a.StatusRequest, a.StatusResponse),
            "Execute": unary(self.Execute, a.ExecuteRequest, a.ExecuteResponse),
            "MarkChipFailed": unary(
                self.MarkChipFailed, a.MarkChipFailedRequest, a.MarkChipFailedResponse
            ),
            "ConfigureReplica": unary(
                self.ConfigureReplica, a.ConfigureReplicaRequest, a.ConfigureReplicaResponse
            ),
            "StartEpoch": unary(self.StartEpoch, a.StartEpochRequest, a.StartEpochResponse),
            "Halt": unary(self.Halt, a.HaltRequest, a.HaltResponse),
            "RemoveReplica": unary(
                self.RemoveReplica, a.RemoveReplicaRequest, a.RemoveReplicaResponse
            ),
            "LinkPing": unary(self.LinkPing, a.LinkPingRequest, a.LinkPingResponse),
            "StageDigests": unary(self.StageDigests, a.StageDigestsRequest, a.StageDigestsResponse),
            "InjectFault": unary(self.InjectFault, a.InjectFaultRequest, a.InjectFaultResponse),
        }
        return grpc.method_handlers_generic_handler(AGENT_SERVICE, methods)

    def _chip(self, index: int) -> Chip:
        if not 0 <= index < len(self.chips):
            raise InvalidArgument(f"chip {index} does not exist (chips 0..{len(self.chips) - 1})")
        return self.chips[index]

    # --- loads ----------------------------------------------------------------------------------

    @_rpc
    async def LoadShard(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> agent_pb2.LoadShardResponse:
        peer = peer_identity(context) or "unknown"
        self.gate.enter(peer, "LoadShard")
        try:
            return await self._load(requests)
        finally:
            self.gate.leave(peer)

    async def _next(self, requests: AsyncIterator[bytes], what: str) -> bytes | None:
        timeout = self.settings.load_idle_timeout
        try:
            async with asyncio.timeout(timeout):
                return await anext(requests, None)
        except TimeoutError:
            raise DeadlineExceeded(f"{what} within {timeout} s") from None

    async def _load(self, requests: AsyncIterator[bytes]) -> agent_pb2.LoadShardResponse:
        started = time.perf_counter()
        first = await self._next(requests, "no LoadShard header")
        if first is None:
            raise InvalidArgument("empty LoadShard stream: the first message must be the header")
        header = validate_header(parse_header_message(first), len(self.chips))
        chip = self.chips[header.chip]
        flight = chip.begin_load(header, VirtualReceiver, lambda message: None)
        if isinstance(flight, HeldEntry):
            return _response(header, flight, started, already=True)
        committed = False
        try:
            receiver: VirtualReceiver = flight.receiver
            while (message := await self._next(requests, f"{header.label}: no data")) is not None:
                if chip.failed_reason is not None:
                    chip.check_healthy("finish loading " + header.label)
                receiver.write(chunk_payload(message))
            digest = receiver.finish()
            _check_blob(header, flight.block.view)
            manifest = manifest_of_metadata(parse_header(flight.block.view).metadata)
            entry = chip.commit(flight, digest)
            committed = True
        finally:
            if not committed:
                chip.abort(flight)
        if manifest is not None:
            self.manifests[header.shard_id] = shard_info(header.shard_id, manifest, self.profile)
        return _response(header, entry, started, already=False)

    # --- unload, status, chip failure ---------------------------------------------------------

    @_rpc
    async def UnloadShard(
        self, request: agent_pb2.UnloadShardRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.UnloadShardResponse:
        entry = self._chip(request.chip).unload(request.shard_id)
        self._forget(request.shard_id)
        return agent_pb2.UnloadShardResponse(freed_bytes=entry.header.reserved_bytes)

    def _forget(self, shard_id: str) -> None:
        if not any(shard_id in c.held for c in self.chips):
            self.manifests.pop(shard_id, None)

    @_rpc
    async def Status(
        self, request: agent_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.StatusResponse:
        return self.status()

    def status(self) -> agent_pb2.StatusResponse:
        chips = []
        for chip in self.chips:
            message = _chip_message(chip.snapshot())
            message.pipelines.extend(self._pipelines(chip.index))
            chips.append(message)
        return agent_pb2.StatusResponse(node=self.name, profile=self.profile.name, chips=chips)

    def _pipelines(self, index: int) -> list[agent_pb2.PipelineStatus]:
        out = []
        for (deployment, replica), hosted in sorted(self.hosted.items()):
            if index not in hosted.chips:
                continue
            stage, _ = hosted.chips[index]
            st = hosted.sim.by_stage.get(stage)
            if st is None:
                continue
            m = st.core.machine
            out.append(
                agent_pb2.PipelineStatus(
                    deployment=deployment,
                    replica=replica,
                    stage=stage,
                    epoch=m.epoch,
                    tick=st.core.last_tick,
                    chain_head=m.chain,
                    phase=st.core.phase,
                    error=clip(st.core.error, MESSAGE_LIMIT),
                )
            )
        return out

    @_rpc
    async def MarkChipFailed(
        self, request: agent_pb2.MarkChipFailedRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.MarkChipFailedResponse:
        chip = self._chip(request.chip)
        if request.recover:
            snap, lost = chip.recover(), list[str]()
        else:
            reason = clip(request.reason or "marked failed", self.settings.text_limit)
            lost, snap = chip.fail(reason)
            for shard_id in lost:
                self._forget(shard_id)
            self._stop_stages_on(chip.index, f"chip {chip.index} failed: {reason}")
        return agent_pb2.MarkChipFailedResponse(chip=_chip_message(snap), shards_lost=lost)

    def _stop_stages_on(self, index: int, reason: str) -> None:
        """A failed chip stops its stage (a real stage fails its next step there)."""
        from agents.stage_core import Fail

        for hosted in self.hosted.values():
            if index in hosted.chips:
                hosted.sim.apply(hosted.chips[index][0], Fail(reason))

    @_rpc
    async def Execute(
        self, request: agent_pb2.ExecuteRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ExecuteResponse:
        chip = self._chip(request.chip)
        if len(request.activation) > self.settings.max_execute_bytes:
            raise InvalidArgument(
                f"Execute activation of {len(request.activation)} bytes exceeds "
                f"{self.settings.max_execute_bytes}"
            )
        entry = chip.entry_for(request.shard_id, f"execute shard {request.shard_id[:12]}")
        chip.program(entry)  # a virtual shard: FAILED_PRECONDITION, as on a real agent
        raise FailedPrecondition(
            f"chip {chip.index}: {entry.header.label}: a simulated-fleet node runs no kernels"
        )

    @_rpc
    async def LinkPing(
        self, request: agent_pb2.LinkPingRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.LinkPingResponse:
        raise FailedPrecondition("a simulated-fleet node has no links (frames pass in memory)")

    @_rpc
    async def StageDigests(
        self, request: agent_pb2.StageDigestsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.StageDigestsResponse:
        return canary.stage_digests(self, request, self.settings)  # type: ignore[arg-type]

    @_rpc
    async def InjectFault(
        self, request: agent_pb2.InjectFaultRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.InjectFaultResponse:
        canary.inject_fault(self, request, self.settings)  # type: ignore[arg-type]
        return agent_pb2.InjectFaultResponse()

    def stages(self, deployment: str, replica: int) -> list[tuple[int, Any, list[str]]]:
        """(stage, runner view, chip names) as `agents.replicas.ReplicaHost.stages`."""
        hosted = self._hosted(deployment, replica)
        out = []
        for stage in sorted(hosted.stages):
            st = hosted.sim.by_stage.get(stage)
            if st is not None:
                out.append((stage, _StageView(st.core), list(st.chip_names)))
        return out

    def _hosted(self, deployment: str, replica: int) -> _Hosted:
        """The hosted replica, or NOT_FOUND (an empty name: INVALID_ARGUMENT), as the real
        agent (`agents.replicas.replica_not_here`)."""
        hosted = self.hosted.get((deployment, replica))
        if hosted is None:
            raise replica_not_here(deployment, replica)
        return hosted

    # --- the pipeline -----------------------------------------------------------------------

    @_rpc
    async def ConfigureReplica(
        self, request: agent_pb2.ConfigureReplicaRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ConfigureReplicaResponse:
        return agent_pb2.ConfigureReplicaResponse(chips_ready=self.configure(request))

    def configure(self, req: agent_pb2.ConfigureReplicaRequest) -> list[str]:
        ReplicaHost._check_request(self, req)  # type: ignore[arg-type]  # the same bounds
        key = (req.deployment, req.replica)
        old = self.hosted.get(key)
        if old is not None and not self._superseded(old, req):
            raise AlreadyExists(
                f"deployment {quote(req.deployment)} replica {req.replica} is "
                "already configured at this epoch or a newer one (RemoveReplica first)"
            )
        if old is not None:  # an older epoch: replaced, as `ReplicaHost.configure` does
            self.remove(*key)
        owner = owner_label(req.deployment, req.replica)
        schedule = Schedule(req.stages, req.max_batch)
        bound: list[Chip] = []
        stages: list[SimStage] = []
        chips: dict[int, tuple[int, str]] = {}
        vocab = 0
        try:
            for index in sorted({c for a in req.assignments for c in a.chips}):
                self.chips[index].bind(owner)
                bound.append(self.chips[index])
            replica_chips = frozenset(req.replica_chips)  # one set for all its stages here
            for a in req.assignments:
                manifest, shard_id = self._stage_manifest(req, a)
                vocab = manifest.vocab_size
                stages.append(self._sim_stage(req, a, schedule, manifest, shard_id, replica_chips))
                chips |= {c: (a.stage, n) for c, n in zip(a.chips, a.chip_names, strict=True)}
            sim = self.fleet.replica_for(req, self.profile, vocab)
        except BaseException:
            for chip in bound:
                chip.release(owner)
            raise
        for st in stages:
            sim.add(st)
        self.hosted[key] = _Hosted(sim, [st.core.stage for st in stages], chips)
        return [name for a in req.assignments for name in a.chip_names]

    @staticmethod
    def _superseded(hosted: _Hosted, req: agent_pb2.ConfigureReplicaRequest) -> bool:
        """`agents.replicas.superseded` for the stages hosted here."""
        return all(
            st.core.machine.epoch < req.epoch
            for stage in hosted.stages
            if (st := hosted.sim.by_stage.get(stage)) is not None
        )

    def _stage_manifest(
        self, req: agent_pb2.ConfigureReplicaRequest, a: agent_pb2.StageAssignment
    ) -> tuple[ShardInfo, str]:
        """The checks `agents.replicas.ReplicaHost._stepper` makes, on the shards' manifests;
        the manifest and shard id of the stage's TP rank 0."""
        found: list[tuple[ShardInfo, str]] = []
        for index, shard_id, name in zip(a.chips, a.shard_ids, a.chip_names, strict=True):
            chip = self.chips[index]
            chip.check_healthy(f"run stage {a.stage}")
            if shard_id not in chip.held:
                raise NotFound(
                    f"chip {index} ({quote(name)}) does not hold shard {quote(shard_id, 64)}"
                )
            manifest = self.manifests.get(shard_id)
            if manifest is None:
                raise FailedPrecondition(
                    f"chip {index} ({quote(name)}): shard {shard_id[:12]} has no manifest"
                )
            if manifest.stages != req.stages:
                raise FailedPrecondition(
                    f"chip {index} ({quote(name)}): shard {shard_id[:12]} is stage "
                    f"{manifest.stage} of a {manifest.stages}-stage pipeline; asked to run it "
                    f"in one of {req.stages} stages"
                )
            if (manifest.stage, manifest.max_batch, manifest.max_context) != (
                a.stage,
                req.max_batch,
                req.max_context,
            ):
                raise FailedPrecondition(
                    f"chip {index} ({quote(name)}): shard {shard_id[:12]} is stage "
                    f"{manifest.stage} for maxBatch {manifest.max_batch}, maxContext "
                    f"{manifest.max_context}; asked to run stage {a.stage} with "
                    f"{req.max_batch}/{req.max_context}"
                )
            found.append((manifest, shard_id))
        first = min(found, key=lambda pair: pair[0].tp_rank)
        if len(found) != first[0].tp_size:
            raise FailedPrecondition(
                f"stage {a.stage} is {first[0].tp_size}-way tensor-parallel: "
                "assign all its ranks' chips (a TP group runs inside one agent)"
            )
        return first

    def _sim_stage(
        self,
        req: agent_pb2.ConfigureReplicaRequest,
        a: agent_pb2.StageAssignment,
        schedule: Schedule,
        manifest: ShardInfo,
        shard_id: str,
        replica_chips: frozenset[str],
    ) -> SimStage:
        if a.downstream_address and a.downstream_address not in self.fleet.by_address:
            raise FailedPrecondition(
                f"stage {a.stage}: downstream agent {quote(a.downstream_address)} is not a node "
                "of this fleet process (a timing-only replica passes frames in memory)"
            )
        journal = None
        if a.stage == 0:
            eos = {req.eos_token_id} if req.HasField("eos_token_id") else set()
            queue_limit = req.queue_limit or self.settings.queue_factor * req.max_batch
            journal = Journal(req.max_batch, req.max_context, queue_limit, eos)
        core = StageCore(
            label=f"{req.deployment}/replica-{req.replica}/stage-{a.stage} "
            f"(chip {', '.join(a.chip_names)})",
            stage=a.stage,
            schedule=schedule,
            window=req.window or self.settings.window,
            chips=replica_chips,
            journal=journal,
            vocab_size=manifest.vocab_size,
            epoch=req.epoch,
            chain_log_limit=self.settings.chain_log_limit,
        )
        return SimStage(
            core=core,
            node=self.name,
            identity=self.identity,
            address=self.address,
            rack=self.rack,
            shard_id=shard_id,
            chip_names=tuple(a.chip_names),
            chips=tuple(a.chips),
            seconds=manifest.seconds,
            hop_bytes=manifest.hidden_size * 4,
            downstream_address=a.downstream_address,
            upstream_identity=a.upstream_identity,
        )

    @_rpc
    async def StartEpoch(
        self, request: agent_pb2.StartEpochRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.StartEpochResponse:
        hosted = self._hosted(request.deployment, request.replica)
        running = True
        ready = frozenset(request.ready_chips)  # one set for all its stages here
        for stage in hosted.stages:
            st = hosted.sim.by_stage.get(stage)
            if st is None:
                continue
            if request.epoch > st.core.machine.epoch:
                hosted.sim.apply(stage, Resume(request.epoch, request.tick))
            hosted.sim.apply(stage, ChipsReady(ready, request.epoch))
            running = running and st.core.running and st.core.machine.epoch == request.epoch
        return agent_pb2.StartEpochResponse(running=running)

    @_rpc
    async def Halt(
        self, request: agent_pb2.HaltRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.HaltResponse:
        hosted = self._hosted(request.deployment, request.replica)
        last = -1
        for stage in hosted.stages:
            st = hosted.sim.by_stage.get(stage)
            if st is not None:
                hosted.sim.apply(stage, Halt())
                last = max(last, st.core.last_tick)
        return agent_pb2.HaltResponse(last_tick=last)

    @_rpc
    async def RemoveReplica(
        self, request: agent_pb2.RemoveReplicaRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RemoveReplicaResponse:
        self._hosted(request.deployment, request.replica)
        self.remove(request.deployment, request.replica)
        return agent_pb2.RemoveReplicaResponse()

    def remove(self, deployment: str, replica: int, reason: str | None = None) -> None:
        hosted = self.hosted.pop((deployment, replica))
        hosted.sim.remove_node(self.name, reason)
        owner = owner_label(deployment, replica)
        for index in hosted.chips:
            self.chips[index].release(owner)

    # --- Generate ---------------------------------------------------------------------------

    @_rpc
    async def Generate(
        self, request: agent_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        peer = peer_identity(context) or "unknown"
        self.gate.enter(peer, "Generate")
        try:
            await self._generate(request, context)
        finally:
            self.gate.leave(peer)

    async def _generate(
        self, req: agent_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        hosted = self._hosted(req.deployment, req.replica)
        head = hosted.sim.by_stage.get(0) if 0 in hosted.stages else None
        if head is None:
            raise InvalidArgument(
                f"this agent does not host stage 0 of {quote(req.deployment)} replica "
                f"{req.replica}: send Generate to the agent that does"
            )
        if req.prompt_text:
            raise InvalidArgument(
                "this model has no tokenizer (timing-only stages produce synthetic token ids): "
                "send prompt_ids (token ids)"
            )
        resume = resume_tokens_of(req)
        sim = hosted.sim
        submit = Submit(
            req.request_id,
            (*(int(t) for t in req.prompt_ids), *resume),
            req.max_tokens - len(resume),
            Sampling(req.temperature, req.seed),
        )
        sim.apply(0, submit)  # Stopped, JournalError, QueueFull: agents.status_codes
        stream = sim.open_stream(req.request_id)
        finished = False
        await context.send_initial_metadata((("lockstep-admitted", "1"),))
        timeout = context.time_remaining()
        if req.deadline_ms:
            timeout = (
                req.deadline_ms / 1e3 if timeout is None else min(timeout, req.deadline_ms / 1e3)
            )
        try:
            async with asyncio.timeout(timeout):
                while not finished:
                    out: TokenOut = await stream.get()
                    if out.error is not None:
                        code = (
                            grpc.StatusCode.CANCELLED if out.cancelled else grpc.StatusCode.ABORTED
                        )
                        text = out.error if out.cancelled else f"the pipeline stopped: {out.error}"
                        finished = True
                        await context.abort(code, clip(text, MESSAGE_LIMIT))
                    assert out.event is not None
                    finished = out.event.finished
                    await context.write(
                        agent_pb2.GenerateResponse(
                            request_id=req.request_id,
                            token=out.event.token,
                            index=out.event.index + len(resume),
                            finished=out.event.finished,
                            logits=out.logits if req.return_logits else b"",
                            tick=out.tick,
                        )
                    )
        except TimeoutError:
            finished = True
            self._cancel(sim, req.request_id)
            raise DeadlineExceeded(f"request {quote(req.request_id)} passed its deadline") from None
        finally:
            if not finished:  # the client went away
                self._cancel(sim, req.request_id)

    @staticmethod
    def _cancel(sim: SimReplica, request_id: str) -> None:
        sim.streams.pop(request_id, None)
        with contextlib.suppress(Exception):
            sim.apply(0, Cancel(request_id))

    # --- registration -----------------------------------------------------------------------

    def registered_chips(self) -> list[admin_pb2.RegisteredChip]:
        return [
            admin_pb2.RegisteredChip(
                index=c.index,
                sram_bytes=c.arena.capacity,
                failed=c.failed_reason is not None,
                reason=(c.failed_reason or "")[:200],
            )
            for c in self.chips
        ]

    def token_counters(self) -> list[admin_pb2.TokenCounter]:
        return [
            admin_pb2.TokenCounter(deployment=d, replica=r, generated=h.sim.tokens)
            for (d, r), h in sorted(self.hosted.items())
            if 0 in h.stages and h.sim.tokens
        ]
