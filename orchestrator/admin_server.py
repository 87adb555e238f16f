"""The control plane's gRPC servers: the admin API for people, the node registry for agents.

Two ports, because they authenticate differently and gRPC Python cannot make a client
certificate optional on one port:

* **Admin** (`lockstep.admin.v1.Admin`): TLS with the control plane's certificate from the
  cluster CA; callers present `authorization: Bearer TOKEN` from the tokens file (lines
  `TOKEN ROLE [NAME]`, role `admin` or `viewer`). No or an unknown token: UNAUTHENTICATED; a
  viewer calling a write (Apply, Delete, Cordon, Uncordon, Drain) or Verify (it may fence
  chips): PERMISSION_DENIED. A viewer
  may Generate (it changes no state). Health checking and reflection are open.
* **NodeRegistry** (`Register`, `HeartbeatStream`): mutual TLS; only agent certificates, and
  the node is the certificate's, never the message's. It is served by a `grpc.aio` server on
  its own event loop (`orchestrator.registry_server`: one long-lived heartbeat stream per agent
  without a thread per stream); heartbeats only land in the controller's buffer (batched into
  the store once per pass).

An apply that changes something and a delete request each write an event (`Applied`,
`DeleteRequested`), so `describe`/`events`/`Watch` show who-asked-what before the reconciler
acts (an identical apply writes nothing).

Every error is a gRPC status with a message a person can act on: INVALID_ARGUMENT for a bad
file (every field named, nothing stored), NOT_FOUND, FAILED_PRECONDITION (apply during a
delete; drain before failover exists), UNAVAILABLE when no replica is Ready to generate.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator.controller import Controller, GrpcAgentGateway
from orchestrator.core import (
    Chip,
    ChipHealth,
    Node,
    Observed,
    Replica,
    chip_id,
    cluster_topology,
    loading_progress,
    node_state,
)
from orchestrator.deployments import plan_request_from_spec, store_deployment
from orchestrator.registry_server import RegistryServer
from orchestrator.safe_yaml import clip
from orchestrator.spec import SpecError, parse_deployment
from orchestrator.state_files import ROLES as ROLES  # re-exported
from orchestrator.state_files import Principal
from orchestrator.state_files import TokenError as TokenError
from orchestrator.state_files import load_tokens as load_tokens
from orchestrator.store import Conflict, ControlStore, DeploymentRecord
from orchestrator.throughput import TokenRates
from orchestrator.verify import Verifier, VerifyError
from placement.errors import InputError, Unplaceable
from placement.planner import make_plan
from placement.profiles import ChipProfile
from protos import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from security.certs import Credentials
from security.identity import AGENT_PREFIX, check_node_name, role_of
from security.tls import peer_identity

log = logging.getLogger("lockstep.admin")

ADMIN_SERVICE = "lockstep.admin.v1.Admin"
WRITE_METHODS = frozenset({"Apply", "Delete", "Cordon", "Uncordon", "Drain", "Verify"})
MAX_MESSAGE_BYTES = 2 << 20
ERROR_DETAILS_LIMIT = 2000  # characters of an error message (see `_abort`)
MAX_NODE_CHIPS = 1024
MAX_SLOT = 1023  # slots of a rack are 0..MAX_SLOT (the topology has one entry per slot)
MAX_CHIP_SRAM = 1 << 40
MAX_WATCHES = 16  # open Watch streams (each holds a server worker thread)
GENERATE_TIMEOUT = 300.0  # seconds, when the client sets no deadline
# Failover of a Generate stream (`AdminService.Generate`): how long the gateway waits for a
# pipeline that serves again, how often it looks, how many times one request may resume.
FAILOVER_WAIT = 30.0
RESUME_POLL = 0.02
MAX_RESUMES = 8
RESUMABLE = frozenset(
    {
        grpc.StatusCode.ABORTED,  # a stage of the pipeline stopped, or it was removed
        grpc.StatusCode.UNAVAILABLE,  # the stage-0 agent is gone
        grpc.StatusCode.FAILED_PRECONDITION,  # a stopped pipeline refuses new requests
        grpc.StatusCode.NOT_FOUND,  # the replica is no longer configured there
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


class TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Bearer-token authentication and role check for the Admin service."""

    def __init__(self, tokens: dict[str, Principal]) -> None:
        self.tokens = tokens

    def _principal(self, metadata: Any) -> Principal | None:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    return None
                for known, principal in self.tokens.items():
                    if hmac.compare_digest(known.encode(), token.strip().encode()):
                        return principal
        return None

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(f"/{ADMIN_SERVICE}/"):
            return handler
        name = method.rsplit("/", 1)[1]
        principal = self._principal(details.invocation_metadata)
        refusal: tuple[grpc.StatusCode, str] | None = None
        if principal is None:
            refusal = (
                grpc.StatusCode.UNAUTHENTICATED,
                "send 'authorization: Bearer TOKEN' with a token from the control plane's "
                "tokens file (lpuctl --token or LOCKSTEP_TOKEN)",
            )
        elif name in WRITE_METHODS and principal.role != "admin":
            refusal = (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.name} has role {principal.role}: {name} needs role admin",
            )
        if refusal is None:
            return handler
        code, message = refusal

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            _abort(context, code, message)

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                deny, handler.request_deserializer, handler.response_serializer
            )
        return grpc.unary_stream_rpc_method_handler(
            deny, handler.request_deserializer, handler.response_serializer
        )


# --- the admin API -----------------------------------------------------------------------------


class AdminService(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: ControlStore,
        controller: Controller,
        profile: ChipProfile,
        gateway: GrpcAgentGateway,
        clock: Callable[[], float] = time.time,
        *,
        rates: TokenRates | None = None,
    ) -> None:
        self.store = store
        self.controller = controller
        self.profile = profile
        self.gateway = gateway
        self.clock = clock
        self.rates = rates or TokenRates()
        self._turn = itertools.count()
        self._stopping = threading.Event()
        self._watches = threading.BoundedSemaphore(MAX_WATCHES)
        self.verifier = Verifier(store, gateway, controller.wake, clock=clock)

    def stop_streams(self) -> None:
        self._stopping.set()

    # deployments

    def Apply(self, request: admin_pb2.ApplyRequest, context: grpc.ServicerContext) -> Any:
        spec = _parse(request.yaml, request.source, context)
        try:
            result = store_deployment(self.store, spec, self.clock(), self.controller.wake)
        except Conflict as exc:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return admin_pb2.ApplyResponse(
            name=result.name,
            generation=result.generation,
            created=result.created,
            changed=result.changed,
        )

    def Get(self, request: admin_pb2.GetRequest, context: grpc.ServicerContext) -> Any:
        record = self.store.deployment(request.name)
        if record is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no deployment named {request.name!r}")
        return self._deployment(record, detail=True)

    def List(self, request: admin_pb2.ListRequest, context: grpc.ServicerContext) -> Any:
        return admin_pb2.ListResponse(
            deployments=[self._deployment(r, detail=False) for r in self.store.deployments()]
        )

    def Delete(self, request: admin_pb2.DeleteRequest, context: grpc.ServicerContext) -> Any:
        if not self.store.mark_deleting(request.name, self.clock()):
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no deployment named {request.name!r}")
        self.store.add_event(
            self.clock(), "Normal", "DeleteRequested", "deletion requested", deployment=request.name
        )
        self.controller.wake()
        return admin_pb2.DeleteResponse(name=request.name)

    def _deployment(self, record: DeploymentRecord, *, detail: bool) -> admin_pb2.Deployment:
        status = record.status
        replicas = self.store.replicas(record.name)
        out = admin_pb2.Deployment(
            name=record.name,
            generation=record.generation,
            manifest_json=json.dumps(record.manifest, sort_keys=True),
            phase=status.phase.value,
            reason=status.reason,
            message=status.message,
            ready_replicas=status.ready_replicas,
            replicas=int(record.manifest.get("spec", {}).get("replicas", 0)),
            observed_generation=status.observed_generation,
            deleting=record.deleting,
            created=record.created,
            tokens_per_second=self.rates.by_deployment(self.clock()).get(record.name, 0.0),
        )
        for c in status.conditions:
            out.conditions.add(
                type=c.type.value,
                status=c.status.value,
                reason=c.reason,
                message=c.message,
                last_transition_time=c.last_transition_time,
                observed_generation=c.observed_generation,
            )
        for r in replicas:
            out.replica_info.add(
                index=r.index,
                generation=r.generation,
                chips=list(r.chips),
                epoch=r.epoch,
                running=r.running_epoch == r.epoch and not r.removing,
                removing=r.removing,
                failures=r.failures,
                last_error=r.last_error,
                stages=len(r.stages),
                restarts=r.restarts,
                draining_to=[c for s in r.next_stages for c in s.chips if c not in r.chips],
            )
        if detail:
            # the deployment's replicas and what agents hold: not every node and chip
            seen = Observed(self.profile, held=tuple(self.store.held()), replicas=tuple(replicas))
            loaded, total = loading_progress(record.name, seen)
            out.bytes_loaded, out.bytes_total = loaded, total
            plans = self.store.plans(record.name)
            if plans:
                out.plan_json = json.dumps(plans[-1], sort_keys=True)
        return out

    # events

    def Events(self, request: admin_pb2.EventsRequest, context: grpc.ServicerContext) -> Any:
        events = self.store.events(
            request.deployment or None, after=request.after_id, limit=request.limit or 1000
        )
        return admin_pb2.EventsResponse(events=[_event(e) for e in events])

    def Watch(
        self, request: admin_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[admin_pb2.Event]:
        if not self._watches.acquire(blocking=False):
            _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_WATCHES} Watch streams are open already; try again later",
            )
        try:
            after = request.after_id
            while context.is_active() and not self._stopping.is_set():
                for event in self.store.events(request.deployment or None, after=after):
                    after = event.id
                    yield _event(event)
                self._stopping.wait(0.2)
        finally:
            self._watches.release()

    # nodes and chips

    def _nodes(self, nodes: Sequence[Node], now: float) -> list[admin_pb2.NodeInfo]:
        """`NodeInfo` of `nodes`: one read of the held shards and one of the token rates for
        all of them (at 1,305 nodes a query and a rate computation per node were most of a
        ListNodes)."""
        held: dict[str, list[str]] = {}
        used: dict[str, int] = {}
        shards = self.store.held(nodes[0].name) if len(nodes) == 1 else self.store.held()
        for h in shards:
            held.setdefault(h.chip, []).append(h.shard_id)
            used[h.chip] = used.get(h.chip, 0) + h.reserved_bytes
        rates = self.rates.by_node(now)
        settings = self.controller.settings
        out = []
        for node in nodes:
            info = admin_pb2.NodeInfo(
                name=node.name,
                rack=node.rack,
                slot=node.slot,
                address=node.address,
                identity=node.identity,
                state=node_state(node, now, settings).value,
                heartbeat_age_seconds=max(0.0, now - node.last_heartbeat),
                tokens_per_second=rates.get(node.name, 0.0),
            )
            for chip in node.chips:
                cid = chip_id(node.rack, node.slot, chip.index)
                info.chips.append(_chip(node.name, cid, chip, used.get(cid, 0), held.get(cid, [])))
            out.append(info)
        return out

    def ListNodes(self, request: admin_pb2.ListNodesRequest, context: grpc.ServicerContext) -> Any:
        return admin_pb2.ListNodesResponse(nodes=self._nodes(self.store.nodes(), self.clock()))

    def GetNode(self, request: admin_pb2.GetNodeRequest, context: grpc.ServicerContext) -> Any:
        node = self.store.node(request.name)
        if node is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no node named {request.name!r}")
        return self._nodes([node], self.clock())[0]

    def ListChips(self, request: admin_pb2.ListChipsRequest, context: grpc.ServicerContext) -> Any:
        if request.node:
            node = self.store.node(request.node)
            if node is None:
                _abort(context, grpc.StatusCode.NOT_FOUND, f"no node named {request.node!r}")
            nodes = [node]
        else:
            nodes = self.store.nodes()
        chips = [c for info in self._nodes(nodes, self.clock()) for c in info.chips]
        return admin_pb2.ListChipsResponse(chips=chips)

    def _cordon(self, name: str, cordoned: bool, context: grpc.ServicerContext) -> Any:
        node = self.store.node(name)
        if node is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no node named {name!r}")
        self.store.set_cordoned(name, cordoned)
        self.store.add_event(
            self.clock(), "Normal", "Cordoned" if cordoned else "Uncordoned", name, node=name
        )
        self.controller.wake()
        return self.GetNode(admin_pb2.GetNodeRequest(name=name), context)

    def Cordon(self, request: admin_pb2.NodeRequest, context: grpc.ServicerContext) -> Any:
        return self._cordon(request.name, True, context)

    def Uncordon(self, request: admin_pb2.NodeRequest, context: grpc.ServicerContext) -> Any:
        return self._cordon(request.name, False, context)

    def Drain(self, request: admin_pb2.NodeRequest, context: grpc.ServicerContext) -> Any:
        """Cordon the node and move what runs there off it, make before break: the
        reconciler loads each affected stage onto a spare while the replica serves, switches
        the replica over at a new epoch (the gateway resumes requests in flight), then
        unloads the node's shards (`orchestrator.core.reconcile` `_Pass.drain`). Returns at
        once; the node is drained when its chips hold nothing (`lpuctl drain` waits for
        that). Uncordon ends the drain."""
        if self.store.node(request.name) is None:
            _abort(context, grpc.StatusCode.NOT_FOUND, f"no node named {request.name!r}")
        self.store.set_cordoned(request.name, True, draining=True)
        self.store.add_event(self.clock(), "Normal", "Draining", request.name, node=request.name)
        self.controller.wake()
        return self.GetNode(admin_pb2.GetNodeRequest(name=request.name), context)

    def Topology(self, request: admin_pb2.TopologyRequest, context: grpc.ServicerContext) -> Any:
        topology = self._topology()
        return admin_pb2.TopologyResponse(
            profile=self.profile.name,
            racks=list(topology.rack_names),
            nodes_per_rack=list(topology.nodes_per_rack),
            topology_json=json.dumps(topology.to_dict(), sort_keys=True),
        )

    def _topology(self) -> Any:
        observed = self.store.observed(self.profile)
        return cluster_topology(observed, self.clock(), self.controller.settings)

    def Plan(self, request: admin_pb2.PlanRequest, context: grpc.ServicerContext) -> Any:
        spec = _parse(request.yaml, request.source, context)
        if not self.store.nodes():
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "no node has registered yet")
        try:
            plan = make_plan(plan_request_from_spec(spec), self._topology())
        except Unplaceable as exc:
            return admin_pb2.PlanResponse(fits=False, reason=str(exc))
        except InputError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return admin_pb2.PlanResponse(fits=True, plan_json=json.dumps(plan.to_dict()))

    # serving

    def Generate(
        self, request: admin_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[admin_pb2.GenerateResponse]:
        """The Generate gateway, which also makes a request survive a failover.

        It keeps what a stage-0 journal keeps — the prompt (ids or text), the sampling
        parameters, and every token already delivered to the client — so when the pipeline
        serving the request fails (its stage-0 stream ends ABORTED / UNAVAILABLE /
        FAILED_PRECONDITION / NOT_FOUND / INTERNAL: a stage stopped, an agent died, the
        replica was halted for a move), it re-submits the request with `resume_tokens` =
        the delivered tokens to a pipeline that serves again, and the client's stream
        continues: the agent prefills prompt + delivered tokens and samples at the same
        positions, so no token is lost, repeated or changed. Where it resumes: the same
        replica once Ready at a newer epoch, else any Ready replica of the deployment with
        the same stage layout (same op ranges and tensor-parallel width: bit-identical
        outputs by the lockstep contract) — whichever serves first. It waits for one up to
        `FAILOVER_WAIT` seconds (or the client's deadline), at most `MAX_RESUMES` times; past
        that the stream ends UNAVAILABLE (retryable) naming the failure. The first attempt
        does not wait: no Ready replica is UNAVAILABLE at once, as before. A replica removed
        under a request (a rolling replacement or a scale-down: the controller marks it
        removing in the store before it drops the stages) is one more such failure: before
        any token was delivered the request starts afresh on any Ready replica; after some,
        only a replica with the same layout takes it over.
        """
        record = self.store.deployment(request.deployment)
        if record is None:
            _abort(
                context, grpc.StatusCode.NOT_FOUND, f"no deployment named {request.deployment!r}"
            )
        remaining = context.time_remaining()
        budget = remaining if remaining is not None and 0 < remaining < GENERATE_TIMEOUT else None
        deadline = time.monotonic() + (budget if budget is not None else GENERATE_TIMEOUT)
        delivered: list[int] = []
        resumed = 0
        failed: dict[int, int] = {}  # replica index -> the epoch it failed at
        layout: str | None = None
        last_error = ""
        while True:
            picked = self._pick_replica(request.deployment, failed, layout if delivered else None)
            if picked is None and (resumed == 0 or time.monotonic() >= deadline):
                phase = record.status.phase.value
                if resumed:
                    why = f"no replica served again within {FAILOVER_WAIT:g}s after a failure"
                    _abort(context, grpc.StatusCode.UNAVAILABLE, f"{why}: {last_error}")
                _abort(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    f"deployment {request.deployment} has no Ready replica (phase "
                    f"{phase}); wait for it: lpuctl get deployments",
                )
            if picked is None:
                if not context.is_active():
                    return
                time.sleep(RESUME_POLL)
                continue
            replica, node = picked
            layout = _layout(replica)
            forward = agent_pb2.GenerateRequest(
                deployment=request.deployment,
                replica=replica.index,
                request_id=uuid.uuid4().hex,
                prompt_ids=list(request.prompt_ids),
                prompt_text=request.prompt_text,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                seed=request.seed,
                deadline_ms=request.deadline_ms,
                resume_tokens=delivered,
            )
            stub = agent_pb2_grpc.AgentStub(self.gateway.channel(node.address, node.name))
            left = max(0.1, deadline - time.monotonic())
            calls = stub.Generate(forward, timeout=left)
            context.add_callback(calls.cancel)
            try:
                for reply in calls:
                    delivered.append(reply.token)
                    yield admin_pb2.GenerateResponse(
                        token=reply.token,
                        index=reply.index,
                        finished=reply.finished,
                        text=reply.text,
                        replica=replica.index,
                        resumed=resumed,
                    )
                return
            except grpc.RpcError as exc:
                code = exc.code()
                last_error = f"replica {replica.index} on {node.name}: {exc.details()}"
                retry = _resumable(calls, exc) and context.is_active()
                if not retry or resumed >= MAX_RESUMES:
                    if retry or code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                        code = grpc.StatusCode.UNAVAILABLE  # retryable: the client may retry
                    _abort(context, code, last_error)
                log.info("request on %s resumes after: %s", last_error, code.name)
                failed[replica.index] = replica.epoch
                self.controller.pipeline_stopped(
                    request.deployment, replica.index, replica.epoch, f"{code.name}: {last_error}"
                )
                if resumed == 0:
                    deadline = min(deadline, time.monotonic() + FAILOVER_WAIT)
                resumed += 1

    def _pick_replica(
        self, deployment: str, failed: dict[int, int], layout: str | None
    ) -> tuple[Replica, Node] | None:
        """A Ready replica to (re)submit to, and its stage-0 node (see `Generate`): round
        robin at first; after a failure the same replica at a newer epoch, else one with the
        same layout."""
        ready = [
            r
            for r in self.store.replicas(deployment)
            if r.running_epoch == r.epoch
            and not r.removing
            and r.stages
            and r.epoch > failed.get(r.index, -1)
            and (layout is None or _layout(r) == layout)
        ]
        if not ready:
            return None
        if not failed:
            replica = ready[next(self._turn) % len(ready)]
        else:
            same = [r for r in ready if r.index in failed]
            replica = (same or ready)[0]
        first = replica.stages[0].chips[0]
        for n in self.store.nodes():
            if any(chip_id(n.rack, n.slot, c.index) == first for c in n.chips):
                return replica, n
        return None

    def Verify(self, request: admin_pb2.VerifyRequest, context: grpc.ServicerContext) -> Any:
        try:
            report = self.verifier.verify(request.deployment)
        except VerifyError as exc:
            _abort(context, exc.code, str(exc))
        return report.to_proto()


def _resumable(call: Any, exc: grpc.RpcError) -> bool:
    """Whether a failed stage-0 stream is a pipeline failure the gateway resumes, rather than
    the request's own fault. Once the agent admitted the request (the `lockstep-admitted`
    header) every code in `RESUMABLE` is the pipeline's; before, only a gone agent, a stopped
    pipeline, or a replica no longer configured there (NOT_FOUND) is — a bad prompt stays
    INVALID_ARGUMENT, and is not resumed."""
    code = exc.code()
    if code not in RESUMABLE:
        return False
    try:
        admitted = any(k == "lockstep-admitted" for k, _ in call.initial_metadata() or ())
    except grpc.RpcError:
        admitted = False
    if admitted or code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED):
        return True
    return code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


def _layout(replica: Replica) -> str:
    """What makes two replicas' outputs bit-identical: each stage's op range and TP width."""
    return json.dumps(
        [[s.to_dict()["opRange"], len(s.chips)] for s in replica.stages], sort_keys=True
    )


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """`context.abort` (it raises; typed so the checker knows it does not return), with the
    message clipped to `ERROR_DETAILS_LIMIT` characters: it may quote a caller's names, and
    details travel in a header, which gRPC limits (a 100 kB name would turn a NOT_FOUND into
    RESOURCE_EXHAUSTED)."""
    context.abort(code, clip(message, ERROR_DETAILS_LIMIT))
    raise AssertionError("unreachable: context.abort raises")


def _parse(text: str, source: str, context: grpc.ServicerContext) -> Any:
    try:
        return parse_deployment(text, source=source or "<apply>")
    except SpecError as exc:
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _event(e: Any) -> admin_pb2.Event:
    return admin_pb2.Event(
        id=e.id,
        time=e.time,
        deployment=e.deployment or "",
        node=e.node or "",
        kind=e.kind,
        reason=e.reason,
        message=e.message,
    )


def _chip(node: str, cid: str, chip: Chip, used: int, shards: list[str]) -> admin_pb2.ChipInfo:
    return admin_pb2.ChipInfo(
        id=cid,
        node=node,
        index=chip.index,
        sram_bytes=chip.sram_bytes,
        health=chip.health.value,
        reason=chip.reason,
        sram_used_bytes=used,
        shards=shards,
    )


# --- the node registry -------------------------------------------------------------------------


class RegistryService(admin_pb2_grpc.NodeRegistryServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: ControlStore,
        controller: Controller,
        clock: Callable[[], float] = time.time,
        *,
        rates: TokenRates | None = None,
    ) -> None:
        self.store = store
        self.controller = controller
        self.clock = clock
        self.rates = rates or TokenRates()
        self._known = {n.name for n in store.nodes()}
        self._failed: dict[str, frozenset[int]] = {}
        self._lock = threading.Lock()

    def node_of(self, context: grpc.ServicerContext) -> str:
        """The caller's node, from its agent certificate (aborts for any other caller)."""
        identity = peer_identity(context)
        if identity is None or role_of(identity) is None:
            _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "the node registry needs an agent certificate",
            )
        if not identity.startswith(AGENT_PREFIX):
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity} is not an agent: only agents register",
            )
        return identity.removeprefix(AGENT_PREFIX)

    def Register(self, request: admin_pb2.RegisterRequest, context: grpc.ServicerContext) -> Any:
        node = self.node_of(context)
        if request.node and request.node != node:
            _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the certificate is node {node}'s; it cannot register {request.node[:100]!r}",
            )
        problems = []
        try:
            check_node_name(request.rack)
        except ValueError:
            problems.append(f"rack {request.rack[:80]!r} is not a valid name")
        if not request.address or len(request.address) > 256 or ":" not in request.address:
            problems.append("address must be HOST:PORT")
        if not 0 < len(request.chips) <= MAX_NODE_CHIPS:
            problems.append(f"a node has 1 to {MAX_NODE_CHIPS} chips, got {len(request.chips)}")
        if len({c.index for c in request.chips}) != len(request.chips):
            problems.append("chip indices repeat")
        if any(
            c.index >= MAX_NODE_CHIPS or not 0 < c.sram_bytes <= MAX_CHIP_SRAM
            for c in request.chips
        ):
            problems.append(
                f"chip indices must be below {MAX_NODE_CHIPS} and SRAM from 1 byte to "
                f"{MAX_CHIP_SRAM:,} bytes"
            )
        if request.slot > MAX_SLOT:
            problems.append(f"slot {request.slot} is beyond the last slot of a rack ({MAX_SLOT})")
        if problems:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        now = self.clock()
        record = Node(
            name=node,
            rack=request.rack,
            slot=request.slot,
            address=request.address,
            identity=AGENT_PREFIX + node,
            chips=tuple(
                Chip(
                    c.index,
                    c.sram_bytes,
                    ChipHealth.FAILED if c.failed else ChipHealth.HEALTHY,
                    c.reason[:200],
                )
                for c in sorted(request.chips, key=lambda c: c.index)
            ),
            last_heartbeat=now,
        )
        try:
            self.store.register_nodes([record], now)
        except Conflict as exc:
            _abort(context, grpc.StatusCode.ALREADY_EXISTS, str(exc))
        self.store.add_event(now, "Normal", "Registered", f"{node} at {request.address}", node=node)
        with self._lock:
            self._known.add(node)
            self._failed[node] = frozenset(c.index for c in request.chips if c.failed)
        self.controller.node_registered(node)
        return admin_pb2.RegisterResponse(
            node=node, heartbeat_interval=self.controller.settings.heartbeat_interval
        )

    def known(self, node: str) -> bool:
        with self._lock:
            return node in self._known

    def beat(self, node: str, beat: admin_pb2.HeartbeatRequest) -> bool:
        """One heartbeat of `node` (already authenticated): into the controller's buffer, and
        a change of its failed chips makes the controller ask the agent. False when the node is
        not known (it must register again). Cheap and non-blocking: it runs on the heartbeat
        streams' event loop (`orchestrator.registry_server`)."""
        with self._lock:
            if node not in self._known:
                return False
            before = self._failed.get(node)
            changed = False
            if beat.chips or before:  # most beats: no chip failed now, none before
                failed = frozenset(c.index for c in beat.chips if c.failed)
                changed = failed != (before or frozenset())
                if changed:
                    self._failed[node] = failed
        now = self.clock()
        self.controller.heartbeats.add(node, now)
        if beat.tokens:
            self.rates.observe(
                node,
                ((t.deployment[:200], t.replica, t.generated) for t in beat.tokens[:64]),
                now,
            )
        if changed:  # rare: the controller asks the agent and records the chips' health
            self.controller.node_registered(node)
        return True


# --- wiring ------------------------------------------------------------------------------------


@dataclass
class Servers:
    admin: grpc.Server
    admin_port: int
    registry: RegistryServer
    registry_port: int
    health: health.HealthServicer
    service: AdminService

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.service.stop_streams()
        self.admin.stop(grace).wait()
        self.registry.stop(grace)


def start_servers(
    store: ControlStore,
    controller: Controller,
    gateway: GrpcAgentGateway,
    profile: ChipProfile,
    credentials: Credentials,
    tokens: dict[str, Principal],
    *,
    admin_listen: str = "127.0.0.1:0",
    registry_listen: str = "127.0.0.1:0",
    workers: int = 32,
) -> Servers:
    """Start the admin server (TLS + tokens) and the node registry (mutual TLS, `grpc.aio`)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    admin = grpc.server(
        futures.ThreadPoolExecutor(workers, thread_name_prefix="admin"),
        interceptors=[TokenInterceptor(tokens)],
        options=options,
    )
    rates = TokenRates()  # the agents' token counters (registry) as tokens/s (admin)
    service = AdminService(store, controller, profile, gateway, rates=rates)
    admin_pb2_grpc.add_AdminServicer_to_server(service, admin)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, admin)
    health_servicer.set(ADMIN_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], admin
    )
    tls = grpc.ssl_server_credentials([(credentials.key_pem, credentials.cert_pem)])
    admin_port = admin.add_secure_port(admin_listen, tls)
    if not admin_port:
        raise OSError(f"cannot listen on {admin_listen}")
    registry = RegistryServer(
        RegistryService(store, controller, rates=rates), credentials, registry_listen
    )
    registry_port = registry.start()
    admin.start()
    return Servers(admin, admin_port, registry, registry_port, health_servicer, service)
