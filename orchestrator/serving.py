"""Bring a compiled replica up on its agents: load, configure, pass the barrier, start epoch 0.

The control-plane half of the lockstep pipeline (the agents' half is `agents.replicas`), and
the one bring-up path of the project: the control plane, the tests and the benchmarks all call
`bring_up_replica`, or its steps one by one where they need to stop in between —

1. `load_shards`: every shard of the replica onto its chip, in parallel across agents (one
   thread per agent: loads to the same agent share its CPU, so they go one after another),
   skipping the shards a chip already holds (one `Status` per agent first; an agent that
   holds the shard also answers "already loaded" after the header, so a race costs nothing).
   Blobs stream from the shard store file by file (`orchestrator.agent_client.load_file`).
2. `configure_requests` → `configure_replica`: one `ConfigureReplica` per agent (stages, TP
   groups, downstream addresses — empty when the next stage is on the same agent, which then
   links the two in process — and the identities of each stage's neighbours plus the
   replica's link secret), collecting every chip's ready confirmation;
3. `start_epoch`: the full set of confirmations to each agent's `StartEpoch` (the start
   barrier: no stage runs tick 0 before every chip of the replica confirmed).

Agents are reached on channels the caller owns (`orchestrator.agent_client.dial`: mutual TLS
as the control plane, or plaintext under `--insecure`), keyed by agent address; `nodes` maps
each address to its node name, from which the agents' certificate identities are derived. A
failed step raises `BringUpError` naming the step, the agent and the gRPC status; what was
loaded or configured before stays (loads are idempotent, and the caller — the reconciler —
decides whether to retry or `remove_replica`).
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from orchestrator.agent_client import load_file
from orchestrator.compiler import ShardRef
from placement.plan import Plan
from protos import agent_pb2, agent_pb2_grpc
from protos.load_stream import DEFAULT_CHUNK_BYTES
from security.identity import LINK_SECRET_BYTES, agent_identity

_T = TypeVar("_T")


@dataclass(frozen=True)
class BringUpOptions:
    """How a replica is brought up. `link_secret` None draws a fresh random one;
    `digest_algorithm` "sha256" adds an audit digest to the BLAKE3 proof of every load;
    `max_parallel_agents` bounds the agents loaded at once (one thread each)."""

    window: int = 2
    epoch: int = 0
    tick: int = 0
    queue_limit: int = 0
    jitter_ms: float = 0.0
    jitter_seed: int = 0
    link_secret: bytes | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    digest_algorithm: str = "blake3"
    max_parallel_agents: int = 32
    rpc_timeout: float = 60.0
    load_timeout: float = 300.0
    # agent_pb2.LinkTransport of the replica's links (0: each agent's --link-transport).
    link_transport: int = 0


DEFAULT_BRING_UP = BringUpOptions()


@dataclass(frozen=True)
class ShardLoad:
    """What happened to one shard: `held` when the chip had it before (nothing sent),
    `already_loaded` when the agent said so after the header, else `bytes_loaded` moved;
    `reserved_bytes` is the SRAM the chip accounts for it (the plan's budget for the chip)."""

    address: str
    chip: int
    shard_id: str
    label: str
    held: bool
    already_loaded: bool
    bytes_loaded: int
    reserved_bytes: int


@dataclass(frozen=True)
class ReplicaUp:
    """A replica that runs: its configuration per agent address, loads and ready chips."""

    deployment: str
    replica: int
    epoch: int
    requests: dict[str, agent_pb2.ConfigureReplicaRequest]
    loads: tuple[ShardLoad, ...]
    ready_chips: tuple[str, ...]

    @property
    def addresses(self) -> list[str]:
        """The agents the replica runs on."""
        return list(self.requests)

    @property
    def link_secret(self) -> bytes:
        return bytes(next(iter(self.requests.values())).link_secret)


@dataclass
class BringUpError(Exception):
    """A step of a bring-up failed on one agent (`code` None: not a gRPC failure)."""

    step: str  # "load" | "configure" | "start"
    address: str
    code: grpc.StatusCode | None
    details: str
    done: list[str] = field(default_factory=list)  # agents the step succeeded on before

    def __str__(self) -> str:
        code = self.code.name if self.code is not None else "error"
        return f"{self.step} on agent {self.address} failed ({code}): {self.details}"


def _failure(step: str, address: str, exc: Exception, done: Sequence[str] = ()) -> BringUpError:
    if isinstance(exc, grpc.RpcError):
        error = BringUpError(step, address, exc.code(), str(exc.details()), list(done))
    else:
        error = BringUpError(step, address, None, f"{type(exc).__name__}: {exc}", list(done))
    error.__cause__ = exc
    return error


def replica_refs(refs: Sequence[ShardRef], replica: int) -> list[ShardRef]:
    """The shards of one replica, in stage and TP-rank order."""
    return sorted(
        (r for r in refs if r.binding.replica == replica),
        key=lambda r: (r.binding.stage, r.binding.tp_rank),
    )


def configure_requests(
    plan: Plan,
    refs: Sequence[ShardRef],
    where: Mapping[str, tuple[str, int]],
    *,
    replica: int = 0,
    deployment: str | None = None,
    window: int = 2,
    epoch: int = 0,
    queue_limit: int = 0,
    jitter_ms: float = 0.0,
    jitter_seed: int = 0,
    nodes: Mapping[str, str] | None = None,
    link_secret: bytes | None = None,
    link_transport: int = 0,
) -> dict[str, agent_pb2.ConfigureReplicaRequest]:
    """One request per agent address; `where` maps each plan chip id to (address, index).

    `deployment` overrides the plan's name (a second replica set of the same shards).
    `nodes` maps each agent address to its node name: every stage then names the identity of
    its remote upstream agent (the only one whose Link it accepts) and downstream agent (whose
    certificate its link checks); without it agents with mutual TLS refuse every link. The
    replica's link secret is random (`secrets.token_bytes`) unless `link_secret` is given."""
    secret = secrets.token_bytes(LINK_SECRET_BYTES) if link_secret is None else link_secret

    def identity(address: str) -> str:
        return agent_identity(nodes[address]) if nodes is not None and address in nodes else ""

    mine = replica_refs(refs, replica)
    if not mine:
        raise ValueError(f"no shard of replica {replica} among the {len(refs)} refs")
    stages = mine[0].binding.stages
    by_stage: dict[int, list[ShardRef]] = defaultdict(list)
    for ref in mine:
        by_stage[ref.binding.stage].append(ref)
    home = {}
    for stage, group in by_stage.items():
        addresses = {where[r.chip][0] for r in group}
        if len(addresses) != 1:
            raise ValueError(f"stage {stage}'s TP group spans agents {sorted(addresses)}")
        home[stage] = addresses.pop()
    requests: dict[str, agent_pb2.ConfigureReplicaRequest] = {}
    chips = [r.chip for r in mine]  # once: every agent's request names all 1,868 at full size
    for stage in range(stages):
        address = home[stage]
        request = requests.setdefault(
            address,
            agent_pb2.ConfigureReplicaRequest(
                deployment=deployment or plan.deployment,
                replica=replica,
                stages=stages,
                max_batch=plan.max_batch,
                max_context=plan.max_context,
                window=window,
                epoch=epoch,
                replica_chips=chips,
                queue_limit=queue_limit,
                jitter_ms=jitter_ms,
                jitter_seed=jitter_seed,
                link_secret=secret,
                link_transport=link_transport,
            ),
        )
        down = home[(stage + 1) % stages]
        up = home[(stage - 1) % stages]
        request.assignments.append(
            agent_pb2.StageAssignment(
                stage=stage,
                chips=[where[r.chip][1] for r in by_stage[stage]],
                shard_ids=[r.shard_id for r in by_stage[stage]],
                chip_names=[r.chip for r in by_stage[stage]],
                downstream_address="" if down == address else down,
                upstream_identity="" if up == address else identity(up),
                downstream_identity="" if down == address else identity(down),
            )
        )
    return requests


def load_shards(
    refs: Sequence[ShardRef],
    where: Mapping[str, tuple[str, int]],
    channels: Mapping[str, grpc.Channel],
    *,
    replica: int = 0,
    options: BringUpOptions = DEFAULT_BRING_UP,
) -> list[ShardLoad]:
    """Load every shard of `replica` onto the chip `where` names, in parallel across agents,
    skipping the shards a chip already holds. Raises `BringUpError` (step "load") for the
    first agent that failed, after every agent's loads have ended."""
    mine = replica_refs(refs, replica)
    by_agent: dict[str, list[tuple[int, ShardRef, int]]] = defaultdict(list)
    for index, ref in enumerate(mine):
        if ref.chip not in where:
            raise ValueError(f"{ref.label}: chip {ref.chip} has no agent in `where`")
        address, chip = where[ref.chip]
        if address not in channels:
            raise ValueError(f"{ref.label}: no channel to agent {address}")
        by_agent[address].append((index, ref, chip))

    def load_agent(address: str) -> list[tuple[int, ShardLoad]]:
        channel = channels[address]
        status = agent_pb2_grpc.AgentStub(channel).Status(
            agent_pb2.StatusRequest(), timeout=options.rpc_timeout
        )
        held = {c.chip: {s.shard_id: s.reserved_bytes for s in c.shards} for c in status.chips}
        done = []
        for index, ref, chip in by_agent[address]:
            reserved = held.get(chip, {}).get(ref.shard_id)
            if reserved is not None:
                load = ShardLoad(address, chip, ref.shard_id, ref.label, True, False, 0, reserved)
                done.append((index, load))
                continue
            reply = load_file(
                channel,
                ref.path,
                chip,
                shard_id=ref.shard_id,
                virtual=ref.virtual,
                chunk_bytes=options.chunk_bytes,
                algorithm=options.digest_algorithm,
                timeout=options.load_timeout,
            )
            moved = 0 if reply.already_loaded else reply.bytes_received
            load = ShardLoad(
                address,
                chip,
                ref.shard_id,
                ref.label,
                False,
                reply.already_loaded,
                moved,
                reply.reserved_bytes,
            )
            done.append((index, load))
        return done

    if not by_agent:
        return []
    results: list[tuple[int, ShardLoad]] = []
    failures: list[BringUpError] = []
    workers = max(1, min(len(by_agent), options.max_parallel_agents))
    with futures.ThreadPoolExecutor(workers, thread_name_prefix="load") as pool:
        jobs = {pool.submit(load_agent, address): address for address in by_agent}
        for job in futures.as_completed(jobs):
            try:
                results += job.result()
            except Exception as exc:
                failures.append(_failure("load", jobs[job], exc))
    if failures:
        first = min(failures, key=lambda f: list(by_agent).index(f.address))
        first.done = [a for a in by_agent if a not in {f.address for f in failures}]
        raise first
    return [load for _, load in sorted(results, key=lambda pair: pair[0])]


FAN_OUT = 32  # agents asked at once by configure_replica / start_epoch


def fan_out(
    step: str,
    addresses: Sequence[str],
    call: Callable[[str], _T],
    *,
    workers: int = FAN_OUT,
) -> dict[str, _T]:
    """`call(address)` for every address, up to `workers` at once (a 405B replica spans 233
    agents: one after another, Configure and StartEpoch alone took seconds). The results by
    address; on failure, `BringUpError` (`step`) for the first failed address in order, naming
    the agents the step succeeded on."""
    if len(addresses) <= 1 or workers <= 1:
        jobs = {a: _settle(call, a) for a in addresses}
    else:
        with futures.ThreadPoolExecutor(min(workers, len(addresses))) as pool:
            running = {a: pool.submit(_settle, call, a) for a in addresses}
            jobs = {a: f.result() for a, f in running.items()}
    return settled_all(step, jobs)


def settled_all(step: str, answers: Mapping[str, _T | Exception]) -> dict[str, _T]:
    """The answers of one step on many agents (in address order), unless one failed: then
    `BringUpError` (`step`) for the first failed address, naming the agents it succeeded on."""
    failed = [(a, r) for a, r in answers.items() if isinstance(r, Exception)]
    if failed:
        address, exc = failed[0]
        done = [a for a, r in answers.items() if not isinstance(r, Exception)]
        raise _failure(step, address, exc, done) from exc
    return {a: r for a, r in answers.items() if not isinstance(r, Exception)}


def _settle(call: Callable[[str], _T], address: str) -> _T | grpc.RpcError:
    try:
        return call(address)
    except grpc.RpcError as exc:
        return exc


def configure_replica(
    channels: Mapping[str, grpc.Channel],
    requests: Mapping[str, agent_pb2.ConfigureReplicaRequest],
    *,
    timeout: float = DEFAULT_BRING_UP.rpc_timeout,
) -> list[str]:
    """Send each agent its `ConfigureReplica` (in parallel, `fan_out`); every chip's ready
    confirmation, in request order. The replica is then bound but its barrier is closed:
    nothing runs until `start_epoch`."""

    def configure(address: str) -> agent_pb2.ConfigureReplicaResponse:
        reply: agent_pb2.ConfigureReplicaResponse = agent_pb2_grpc.AgentStub(
            channels[address]
        ).ConfigureReplica(requests[address], timeout=timeout)
        return reply

    replies = fan_out("configure", list(requests), configure)
    return [chip for address in requests for chip in replies[address].chips_ready]


def start_request(
    requests: Mapping[str, agent_pb2.ConfigureReplicaRequest],
    ready_chips: Sequence[str],
    *,
    tick: int = 0,
) -> agent_pb2.StartEpochRequest:
    """The one `StartEpoch` every agent of a configured replica gets: its epoch at `tick`,
    with every chip's confirmation."""
    first = next(iter(requests.values()))
    return agent_pb2.StartEpochRequest(
        deployment=first.deployment,
        replica=first.replica,
        epoch=first.epoch,
        tick=tick,
        ready_chips=ready_chips,
    )


def start_epoch(
    channels: Mapping[str, grpc.Channel],
    requests: Mapping[str, agent_pb2.ConfigureReplicaRequest],
    ready_chips: Sequence[str],
    *,
    tick: int = 0,
    timeout: float = DEFAULT_BRING_UP.rpc_timeout,
) -> None:
    """Open the start barrier on every agent of the replica (in parallel, `fan_out`) with
    every chip's confirmation: the epoch configured in `requests` starts at `tick`."""
    request = start_request(requests, ready_chips, tick=tick)

    def start(address: str) -> None:
        agent_pb2_grpc.AgentStub(channels[address]).StartEpoch(request, timeout=timeout)

    fan_out("start", list(requests), start)


def bring_up_replica(
    plan: Plan,
    refs: Sequence[ShardRef],
    where: Mapping[str, tuple[str, int]],
    channels: Mapping[str, grpc.Channel],
    *,
    nodes: Mapping[str, str] | None = None,
    replica: int = 0,
    deployment: str | None = None,
    options: BringUpOptions = DEFAULT_BRING_UP,
) -> ReplicaUp:
    """Load, configure and start one replica of `plan` — the one bring-up path.

    `refs` are the compiled shards (`orchestrator.compiler.compile_plan`), `where` maps each
    plan chip id to (agent address, chip index), `channels` each agent address to a channel
    (`agent_client.dial`), `nodes` each address to its node name (needed with mutual TLS: a
    stage accepts a Link only from its upstream's identity). `deployment` overrides the
    plan's name (a second replica set of the same shards). Raises `BringUpError`."""
    loads = load_shards(refs, where, channels, replica=replica, options=options)
    requests = configure_requests(
        plan,
        refs,
        where,
        replica=replica,
        deployment=deployment,
        window=options.window,
        epoch=options.epoch,
        queue_limit=options.queue_limit,
        jitter_ms=options.jitter_ms,
        jitter_seed=options.jitter_seed,
        nodes=nodes,
        link_secret=options.link_secret,
        link_transport=options.link_transport,
    )
    ready = configure_replica(channels, requests, timeout=options.rpc_timeout)
    start_epoch(channels, requests, ready, tick=options.tick, timeout=options.rpc_timeout)
    first = next(iter(requests.values()))
    return ReplicaUp(first.deployment, replica, options.epoch, requests, tuple(loads), tuple(ready))


def remove_replica(
    channels: Mapping[str, grpc.Channel],
    deployment: str,
    addresses: Sequence[str],
    *,
    replica: int = 0,
    timeout: float = DEFAULT_BRING_UP.rpc_timeout,
) -> None:
    """Remove a replica from each of `addresses` (its chips are released; shards stay held)."""
    request = agent_pb2.RemoveReplicaRequest(deployment=deployment, replica=replica)
    for address in addresses:
        try:
            agent_pb2_grpc.AgentStub(channels[address]).RemoveReplica(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise _failure("remove", address, exc) from exc
