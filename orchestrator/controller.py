"""The controller: the loop that executes the reconciler's decisions through small ports.

Each pass reads the desired state (`store.deployments()`, checked again by
`orchestrator.targets`) and the observed state (`store.observed(profile)`), calls the pure
`reconcile(desired, observed, now)` with the clock port's time, and executes the returned
actions: store-only ones with `store.record`, the others through the agent gateway (gRPC with
the control plane's mTLS identity) and the compiler port. It runs on a timer (the heartbeat
interval) and whenever something happens (`wake()`: an apply, a delete, a registration), and
a pass that did something is followed at once by another, so a deployment walks
Compiling → Loading → Synchronizing → Ready as fast as the agents answer.

Decisions:

* **One thread, no thread per node.** Heartbeats arrive on the registry's event loop and only
  land in a `HeartbeatBuffer` (a dict under a lock); the controller flushes the buffer into
  the store in one batched transaction every tick (`TICK_SECONDS`, 0.1 s: what the store
  shows lags a beat by about that) — 1,305 nodes beating once a second are ten small
  `executemany` a second (about 5 ms of CPU in all), not 1,305 transactions.
* **A full pass only when something changed.** Each tick flushes the heartbeats, then asks
  the pure `PassGate` (`orchestrator.core.passes`) whether a full pass is due: the store's
  revision moved (heartbeats do not move it), a node's liveness flipped, a deployment is on
  its way somewhere (its timers run), the controller has work of its own (a node to ask, a
  stopped pipeline, loads in flight), something woke it, or `FULL_EVERY` seconds passed.
  Passes not woken stay a heartbeat interval apart, as before (work in progress and failing
  actions are retried no faster). At 1,305 idle nodes a full pass costs about a tenth of a
  second of CPU; a tick, a few milliseconds.
* **What a chip holds comes from the agent, asked by the controller only.** After the
  controller loaded or unloaded on a node, and when a node (re)registers, it asks that agent
  for `Status` and writes the answer with `report_held`. Heartbeats carry liveness and chip
  health but not held shards: a heartbeat sent before a load finished but handled after it
  would otherwise overwrite the fresh report and make the reconciler think a running replica
  lost a shard (and bump its epoch).
* **Order and failure.** Actions of one deployment run in the returned order; the first
  failure stops that deployment's remaining actions for this pass (the next pass decides
  again), records the failure on the replica (the reconciler's backoff and restart budget
  read it) and writes a Warning event. Actions whose `key` is in flight are skipped.
* **Loads run beside the pass, bounded.** A `Load` is handed to the gateway, which streams it as a
  coroutine on its agent-call event loop (`orchestrator.agent_calls`: no thread per load, at most
  `MAX_LOADS_IN_FLIGHT` streaming at once, each with a deadline from its size,
  `GrpcAgentGateway.load_timeout`); at most `LOADS_PER_NODE` large blobs per node are in flight (the
  rest wait for a later pass; virtual shards of a few kB do not count). When a node's last load ends
  (or one fails), a pool thread asks that agent's `Status` once and writes it, records a failure on
  the replica like any failed step, and wakes the controller. While loads are in flight the store
  changes their reports make do not start passes of their own (`PassGate.due(loading=True)`): at
  3,736 chips a pass per second between them was over a third of the control plane's CPU. An agent
  that hangs delays only its own chips until their deadlines: the pass goes on, other deployments
  load, configure and start. The other calls to agents stay in the pass: they are short
  (`rpc_timeout`), and a replica's `Configure` and `StartEpoch` go to all its agents at once (one
  round each).
* **Configure replaces.** An agent running the replica at an older epoch replaces it on
  `ConfigureReplica` (a failover is one round of calls); one that refuses (ALREADY_EXISTS: the
  same epoch of an older incarnation, after a control-plane restart) first removes it and is
  asked again. `Configure` and `StartEpoch` run in the same pass.
* **Adoption after a restart** (`resume`, before the first pass): every stored node gets a
  heartbeat "now" and its agent is asked for `Status` before anything is decided, so the
  shards it still holds count as committed (by shard id) and are not loaded again, and a
  replica the store says runs is left alone when its agents run it at that epoch, else moved
  to a new one (`orchestrator.adoption`).
* **Compiled shards** are content-addressed in the shard store; the controller keeps each
  replica's `ShardRef`s in memory for `Configure`, and after a restart recompiles the
  replica's one-replica plan (`replica_plan`) — a lookup of blobs already built.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import grpc

from orchestrator.adoption import unadoptable
from orchestrator.agent_calls import AgentCalls
from orchestrator.agent_client import declared_bytes_of, dial
from orchestrator.compiler import ShardRef, compile_plan
from orchestrator.core import (
    Action,
    BumpEpoch,
    ChipHealth,
    Compile,
    Configure,
    CoreSettings,
    DeploymentTarget,
    HeldShard,
    Load,
    MoveStages,
    Node,
    Phase,
    RecordEvent,
    RemoveReplica,
    Replica,
    SetPhase,
    ShardAssignment,
    StartEpoch,
    Unload,
    chip_id,
    node_alive,
    reconcile,
    replica_plan,
)
from orchestrator.core.passes import PassGate, settled
from orchestrator.deployments import model_for_spec
from orchestrator.metrics import PassStats
from orchestrator.serving import configure_requests, settled_all, start_request
from orchestrator.shard_store import ShardStore, StoreError
from orchestrator.spec import DeploymentSpec, SpecError, deployment_from_manifest
from orchestrator.store import ControlStore, NotFound
from orchestrator.targets import target_from_spec
from orchestrator.weights import tiny_text_spec
from placement.plan import Plan
from placement.profiles import ChipProfile
from protos import agent_pb2, agent_pb2_grpc
from security.certs import Credentials

log = logging.getLogger("lockstep.controller")

LOAD_WORKERS = 8
LOADS_PER_NODE = 2
TICK_SECONDS = 0.1  # heartbeats into the store, and the full-pass check (at most this apart)
# Blobs smaller than this (virtual shards: a manifest of a few kB) do not count against
# LOADS_PER_NODE: the limit shares a node's bandwidth and CPU among large streams, and holding
# back 8 tiny loads per node for 4 passes made a 3,736-chip bring-up wait on passes.
SMALL_LOAD_BYTES = 1 << 20
SLOW_ACTION_SECONDS = 0.1  # an action that takes longer is logged with its time
SLOW_PASS_SECONDS = 0.25  # and a pass

Clock = Callable[[], float]

# A pipeline the gateway saw stop is resynchronized this long after the report, unless a
# dead agent or a failed chip explains it first (then its stages move instead).
STOP_GRACE = 1.0


# --- ports -------------------------------------------------------------------------------------


class AgentGateway(Protocol):
    """Everything the controller says to agents (the gRPC adapter is `GrpcAgentGateway`)."""

    def channel(self, address: str, node: str) -> grpc.Channel: ...
    def status(self, address: str, node: str) -> agent_pb2.StatusResponse: ...
    def load(
        self, address: str, node: str, chip: int, path: Path, shard_id: str
    ) -> Future[object]: ...
    def unload(self, address: str, node: str, chip: int, shard_id: str) -> None: ...
    def remove_replica(self, address: str, node: str, deployment: str, replica: int) -> None: ...
    def configure(
        self, requests: Mapping[str, agent_pb2.ConfigureReplicaRequest], nodes: Mapping[str, str]
    ) -> list[str]: ...
    def start(
        self,
        requests: Mapping[str, agent_pb2.ConfigureReplicaRequest],
        ready: Sequence[str],
        nodes: Mapping[str, str],
    ) -> None: ...
    def close(self) -> None: ...


class Compiler(Protocol):
    """Compiles a one-replica plan of a deployment into the shard store."""

    store_dir: Path

    def compile(self, plan: Plan, spec: DeploymentSpec) -> list[ShardRef]: ...


# --- adapters ----------------------------------------------------------------------------------


class GrpcAgentGateway:
    """Agents over gRPC, mutual TLS as the control plane (plaintext when `credentials` is None,
    `--insecure`). One channel per agent, kept for the process's life (re-dialled when an
    agent moves to a new address)."""

    def __init__(
        self,
        credentials: Credentials | None,
        *,
        rpc_timeout: float = 30.0,
        min_load_bytes_per_second: float = 8 << 20,
    ) -> None:
        self.credentials = credentials
        self.rpc_timeout = rpc_timeout
        self.min_load_bytes_per_second = min_load_bytes_per_second
        self._channels: dict[str, tuple[str, grpc.Channel]] = {}
        self._lock = threading.Lock()
        self.calls = AgentCalls(credentials)

    def channel(self, address: str, node: str) -> grpc.Channel:
        with self._lock:
            known = self._channels.get(node)
            if known is not None and known[0] == address:
                return known[1]
            if known is not None:
                known[1].close()
            channel = dial(address, self.credentials, node)
            self._channels[node] = (address, channel)
            return channel

    def _stub(self, address: str, node: str) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(self.channel(address, node))

    def status(self, address: str, node: str) -> agent_pb2.StatusResponse:
        reply: agent_pb2.StatusResponse = self._stub(address, node).Status(
            agent_pb2.StatusRequest(), timeout=self.rpc_timeout
        )
        return reply

    def load_timeout(self, size_bytes: int) -> float:
        """A load's deadline: `rpc_timeout` plus its bytes at the slowest rate we accept."""
        return self.rpc_timeout + size_bytes / self.min_load_bytes_per_second

    def load(self, address: str, node: str, chip: int, path: Path, shard_id: str) -> Future[object]:
        """Start streaming the blob at `path` onto `chip` (`AgentCalls.load`: a coroutine on
        the gateway's event loop, no thread per load); the future ends with the load."""
        timeout = self.load_timeout(path.stat().st_size)
        future: Future[object] = self.calls.load(address, node, chip, path, shard_id, timeout)
        return future

    def unload(self, address: str, node: str, chip: int, shard_id: str) -> None:
        self._stub(address, node).UnloadShard(
            agent_pb2.UnloadShardRequest(chip=chip, shard_id=shard_id), timeout=self.rpc_timeout
        )

    def remove_replica(self, address: str, node: str, deployment: str, replica: int) -> None:
        self._stub(address, node).RemoveReplica(
            agent_pb2.RemoveReplicaRequest(deployment=deployment, replica=replica),
            timeout=self.rpc_timeout,
        )

    def configure(
        self, requests: Mapping[str, agent_pb2.ConfigureReplicaRequest], nodes: Mapping[str, str]
    ) -> list[str]:
        """`ConfigureReplica` on each agent (address -> request, `nodes` address -> node
        name), all at once (`AgentCalls.call_all`); every chip's confirmation. An agent that
        runs the replica at an older epoch replaces it (a failover: one round of calls); one
        that answers ALREADY_EXISTS (the same epoch of an older incarnation, after a restart
        of the control plane) removes it first and is asked again. The first failed agent
        raises `BringUpError`."""
        replies = self._call_all("ConfigureReplica", requests, nodes)
        taken = [
            address
            for address, reply in replies.items()
            if isinstance(reply, grpc.RpcError) and reply.code() is grpc.StatusCode.ALREADY_EXISTS
        ]
        if taken:
            first = next(iter(requests.values()))
            remove = agent_pb2.RemoveReplicaRequest(
                deployment=first.deployment, replica=first.replica
            )
            self._on_all("configure", "RemoveReplica", dict.fromkeys(taken, remove), nodes)
            again = {a: requests[a] for a in taken}
            replies |= self._call_all("ConfigureReplica", again, nodes)
        done = settled_all("configure", replies)
        return [chip for address in requests for chip in done[address].chips_ready]

    def start(
        self,
        requests: Mapping[str, agent_pb2.ConfigureReplicaRequest],
        ready: Sequence[str],
        nodes: Mapping[str, str],
    ) -> None:
        """`StartEpoch` on each agent with every chip's confirmation (the start barrier)."""
        request = start_request(requests, ready)
        self._on_all("start", "StartEpoch", dict.fromkeys(requests, request), nodes)

    def _on_all(
        self, step: str, method: str, requests: Mapping[str, object], nodes: Mapping[str, str]
    ) -> dict[str, Any]:
        """`method` on every agent; their answers, or `BringUpError` for the first failed."""
        return settled_all(step, self._call_all(method, requests, nodes))

    def _call_all(
        self, method: str, requests: Mapping[str, object], nodes: Mapping[str, str]
    ) -> dict[str, Any]:
        started = time.perf_counter()
        answers = self.calls.call_all(method, requests, nodes, self.rpc_timeout).result()
        took = time.perf_counter() - started
        if took >= SLOW_ACTION_SECONDS:
            log.info("%s on %d agents took %.2f s", method, len(requests), took)
        return answers

    def close(self) -> None:
        with self._lock:
            for _, channel in self._channels.values():
                channel.close()
            self._channels.clear()
        self.calls.close()


@dataclass
class ShardCompiler:
    """`compile_plan` into a shard store directory. Weights: the spec's checkpoint, else
    seeded weights (`seed`); the `tiny-llama` preset carries its tokenizer, so text works."""

    store_dir: Path
    seed: int = 0

    def compile(self, plan: Plan, spec: DeploymentSpec) -> list[ShardRef]:
        cfg = model_for_spec(spec)
        source: int | str = spec.checkpoint_path or self.seed
        text = None
        if spec.checkpoint_path is None and spec.model_preset == "tiny-llama":
            text = tiny_text_spec()
        try:
            return compile_plan(plan, cfg, source, self.store_dir, text=text)
        except OSError as exc:  # a full disk, a quota: say where, for the deployment's events
            if isinstance(exc, FileNotFoundError) and spec.checkpoint_path is not None:
                raise  # a checkpoint gone is not the store's fault
            raise StoreError(
                f"writing the shard store {self.store_dir}: {exc.strerror or exc} "
                f"(errno {exc.errno}); nothing half-written is kept, the compile is retried"
            ) from exc


class HeartbeatBuffer:
    """Heartbeats received since the last flush: node -> latest time (see the docstring)."""

    def __init__(self) -> None:
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, node: str, when: float) -> None:
        with self._lock:
            if when > self._beats.get(node, 0.0):
                self._beats[node] = when

    def drain(self) -> list[tuple[str, float]]:
        with self._lock:
            beats, self._beats = self._beats, {}
        return list(beats.items())


# --- the controller ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PassResult:
    """What one pass did: the actions executed, the ones that failed (with why)."""

    executed: tuple[Action, ...]
    failed: tuple[tuple[Action, str], ...]

    @property
    def progressed(self) -> bool:
        return bool(self.executed)


class Controller:
    """Runs reconcile passes and executes their actions (see the module docstring)."""

    def __init__(
        self,
        store: ControlStore,
        gateway: AgentGateway,
        compiler: Compiler,
        profile: ChipProfile,
        *,
        clock: Clock = time.time,
        settings: CoreSettings | None = None,
    ) -> None:
        self.store = store
        self.gateway = gateway
        self.compiler = compiler
        self.profile = profile
        self.clock = clock
        self.settings = settings or CoreSettings()
        self.heartbeats = HeartbeatBuffer()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refresh: set[str] = set()
        self._adopting: set[str] = set()
        self._refresh_lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._loads = ThreadPoolExecutor(LOAD_WORKERS, thread_name_prefix="load")
        self._loading: dict[str, str] = {}  # Load key -> node, under _load_lock
        self._large: dict[str, str] = {}  # of those, the loads LOADS_PER_NODE counts
        self._large_per_node: dict[str, int] = {}
        self._finished: set[str] = set()  # loads ended since this pass read the store
        self._per_node: dict[str, int] = {}  # loads running per node
        # Loads that ended on a node with others still running: its Status is asked once,
        # when the last of them ends (a node's 8 chips: one Status and one write, not 8);
        # until then they are neither offered again nor counted as done.
        self._unreported: dict[str, set[str]] = {}
        self._reporting: dict[str, str] = {}  # ended loads whose node is being asked now
        self._node_locks: dict[str, threading.Lock] = {}  # one Status report at a time
        self._load_lock = threading.Lock()
        self._stopped: dict[tuple[str, int, int], tuple[float, str]] = {}
        self._refs: dict[tuple[str, int], tuple[Plan, list[ShardRef]]] = {}
        # (deployment, replica, epoch) -> what Configure sent, the chips' confirmations and
        # the agents' node names: StartEpoch (the same pass) needs all three
        self._configured: dict[
            tuple[str, int, int],
            tuple[dict[str, agent_pb2.ConfigureReplicaRequest], list[str], dict[str, str]],
        ] = {}
        self.passes = 0  # started
        self.passes_done = 0
        self.ticks = 0
        self.pass_reasons: Counter[str] = Counter()  # why the loop ran its full passes
        self._last_pass = float("-inf")
        self.gate = PassGate()
        self.stats = PassStats()
        self.last_error = ""

    # --- events from the servers -------------------------------------------------------------

    def wake(self) -> None:
        """Run a pass soon (an apply, a delete, a registration)."""
        self._wake.set()

    def node_registered(self, node: str) -> None:
        """A node (re)registered: ask its agent what it holds before deciding about it."""
        with self._refresh_lock:
            self._refresh.add(node)
        self.wake()

    # --- the loop ----------------------------------------------------------------------------

    def start(self) -> None:
        """Resume from the store (`resume`), then start the loop."""
        self.resume()
        self._thread = threading.Thread(target=self._run, name="controller", daemon=True)
        self._thread.start()

    def resume(self) -> None:
        """Before the first pass. Every node already in the store gets one heartbeat "now":
        after a control-plane restart a node has a full heartbeat timeout to be heard from
        again before it counts as NotReady (the control plane's downtime is not the node's
        fault, and its replicas are adopted instead of torn down and placed anew). And every
        stored node's agent is asked for its `Status` before the first decision: what it still
        holds and runs is adopted (`orchestrator.adoption`), not trusted from the store."""
        names = [n.name for n in self.store.nodes()]
        self.store.heartbeat([(name, self.clock()) for name in names])
        with self._refresh_lock:
            self._refresh.update(names)
            self._adopting.update(names)

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop. Loads in flight are not waited for: closing the gateway's channels
        cancels them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._loads.shutdown(wait=False, cancel_futures=True)

    def loads_in_flight(self) -> dict[str, str]:
        """Load key -> node of the loads running now or whose result is not in the store yet
        (their node's `Status` not written)."""
        with self._load_lock:
            waiting = {key: node for node, keys in self._unreported.items() for key in keys}
            return self._loading | self._reporting | waiting

    def _run(self) -> None:
        woken = True
        every = min(TICK_SECONDS, self.settings.heartbeat_interval)
        while not self._stop.is_set():
            try:
                result = self.tick(woken=woken)
                # A pass that handed out loads waits for them: thousands of loads (a
                # 3,736-chip deployment) would otherwise run a full pass per finished load,
                # back to back, and starve the loads of CPU, and a failover's pass that moved
                # stages and started their loads would be followed by one that finds them
                # still in flight. The last load to end (or a failed one) wakes it.
                progressed = (
                    result is not None
                    and result.progressed
                    and not result.failed
                    and not (
                        any(isinstance(a, Load) for a in result.executed) and self.loads_in_flight()
                    )
                )
            except Exception as exc:  # the loop must survive a bad pass; the next one retries
                log.exception("reconcile pass failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                progressed = False
            woken = progressed or self._wake.wait(every)
            self._wake.clear()

    def tick(self, *, woken: bool = False) -> PassResult | None:
        """Flush the heartbeats; then a full pass if one is due, else None. `woken` (a wake,
        or the last pass made progress) runs one at once; otherwise passes stay at least
        `heartbeat_interval` apart, as when the loop ran one per interval (a failing action
        is retried no faster), and run only when the `PassGate` says one is due."""
        self.ticks += 1
        self._flush()
        now = self.clock()
        if not woken and now - self._last_pass < self.settings.heartbeat_interval:
            return None
        with self._refresh_lock:
            own = bool(self._refresh or self._stopped)
        loading = bool(self.loads_in_flight())
        why = self.gate.due(
            self.store.revision(), now, self.settings, woken=woken or own, loading=loading
        )
        if why is None:
            return None
        self.pass_reasons["liveness" if why.startswith("node ") else why] += 1
        return self.run_pass(why)

    def _flush(self) -> None:
        beats = self.heartbeats.drain()
        if beats:
            self.store.heartbeat(beats)
            self.gate.beats(beats)

    def run_pass(self, why: str = "asked") -> PassResult:
        """One pass: flush heartbeats, refresh nodes, reconcile, execute. `why`: for the log."""
        started = time.perf_counter()
        result = self._pass()
        took = time.perf_counter() - started
        self.passes_done += 1
        self.stats.record(took, len(result.failed))
        if took >= SLOW_PASS_SECONDS:
            kinds = Counter(type(a).__name__ for a in result.executed)
            log.info(
                "pass %d (%s) took %.2f s: %s",
                self.passes,
                why,
                took,
                ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "nothing to do",
            )
        return result

    def _pass(self) -> PassResult:
        self.passes += 1
        self._last_pass = self.clock()
        with self._load_lock:  # loads that end from now on may be missing from what we read
            self._finished.clear()
        self._flush()
        with self._refresh_lock:
            refresh, self._refresh = self._refresh, set()
        nodes = {n.name: n for n in self.store.nodes()} if refresh else {}
        for name in sorted(refresh):
            if name in nodes:
                try:
                    status = self._refresh_node(nodes[name])
                except grpc.RpcError as exc:  # its heartbeats stop; the timeout decides
                    log.warning("status of node %s: %s", name, _describe(exc))
                    self._retry_adoption(nodes[name])
                    continue
                if name in self._adopting:
                    self._adopt(nodes[name], status)
        self._resync_stopped(self.clock())
        revision = self.store.revision()  # before the reads: any write after it means "again"
        specs, targets, frozen = self._desired()
        now = self.clock()
        observed = self.store.observed(self.profile)
        nodes = {n.name: n for n in observed.nodes}
        actions = reconcile(targets, observed, now, self.settings, frozen=frozen)
        quiet = settled(s.phase for s in observed.statuses.values())
        self.gate.full_pass(revision, now, observed.nodes, quiet)
        return self._execute(actions, specs, {t.name: t for t in targets}, nodes, now)

    def _desired(self) -> tuple[dict[str, DeploymentSpec], list[DeploymentTarget], set[str]]:
        specs: dict[str, DeploymentSpec] = {}
        targets: list[DeploymentTarget] = []
        frozen: set[str] = set()
        now = self.clock()
        for record in self.store.deployments():
            try:
                spec = deployment_from_manifest(
                    record.manifest, source=f"stored deployment {record.name}"
                )
            except SpecError as exc:
                frozen.add(record.name)
                if record.status.phase is not Phase.FAILED:
                    self.store.record(
                        SetPhase(
                            record.name,
                            Phase.FAILED,
                            "InvalidSpec",
                            str(exc)[:500],
                            record.status.ready_replicas,
                            record.generation,
                        ),
                        now,
                    )
                continue
            specs[record.name] = spec
            targets.append(target_from_spec(spec, record.generation, deleting=record.deleting))
        return specs, targets, frozen

    def _execute(
        self,
        actions: Sequence[Action],
        specs: Mapping[str, DeploymentSpec],
        targets: Mapping[str, DeploymentTarget],
        nodes: Mapping[str, Node],
        now: float,
    ) -> PassResult:
        executed: list[Action] = []
        failed: list[tuple[Action, str]] = []
        stopped: set[str] = set()
        touched: set[str] = set()
        for action in actions:
            group = getattr(action, "deployment", None) or ""
            if group and group in stopped:
                continue
            if action.key in self._in_flight:
                continue
            if isinstance(action, Load):
                if self._submit_load(action):
                    executed.append(action)
                continue
            self._in_flight.add(action.key)
            started = time.perf_counter()
            try:
                self._do(action, specs, targets, nodes, now, touched)
            except Exception as exc:
                why = _describe(exc)
                failed.append((action, why))
                log.warning("%s failed: %s", action.key, why)
                if group:
                    stopped.add(group)
                self._record_failure(action, why, now)
            else:
                executed.append(action)
                took = time.perf_counter() - started
                if took >= SLOW_ACTION_SECONDS:
                    log.info("%s took %.2f s", action.key, took)
            finally:
                self._in_flight.discard(action.key)
        for name in sorted(touched):
            if name in nodes:
                try:
                    self._refresh_node(nodes[name])
                except grpc.RpcError as exc:
                    log.warning("status of node %s: %s", name, _describe(exc))
        return PassResult(tuple(executed), tuple(failed))

    @functools.cached_property
    def _shard_store(self) -> ShardStore:
        """The compiler's shard store, opened once (opening makes its directories)."""
        return ShardStore(self.compiler.store_dir)

    def _submit_load(self, action: Load) -> bool:
        """Hand a load to the pool unless it runs already, ended after this pass read the
        store (its result may be missing from what the reconciler saw), or its node has
        `LOADS_PER_NODE` running (the next pass offers it again)."""
        try:
            size = self._shard_store.blob_path(action.shard_id).stat().st_size
        except OSError:
            size = SMALL_LOAD_BYTES  # let the load itself fail and say why
        large = size >= SMALL_LOAD_BYTES
        with self._load_lock:
            if action.key in self._loading or action.key in self._finished:
                return False
            if action.key in self._unreported.get(action.node, ()) or action.key in self._reporting:
                return False
            if large and self._large_per_node.get(action.node, 0) >= LOADS_PER_NODE:
                return False
            self._loading[action.key] = action.node
            self._per_node[action.node] = self._per_node.get(action.node, 0) + 1
            if large:
                self._large[action.key] = action.node
                self._large_per_node[action.node] = self._large_per_node.get(action.node, 0) + 1
        try:
            path = self._shard_store.blob_path(action.shard_id)
            future = self.gateway.load(
                action.address, action.node, action.chip_index, path, action.shard_id
            )
        except RuntimeError:  # stopping: the gateway takes no more work
            with self._load_lock:
                self._release_load(action.key)
            return False
        except Exception as exc:  # a blob gone from the store: it ends as a failed load
            future = Future()
            future.set_exception(exc)
        future.add_done_callback(functools.partial(self._load_ended, action))
        return True

    def _release_load(self, key: str) -> None:
        """Forget a load that ended (call with `_load_lock` held)."""
        owner = self._loading.pop(key, None)
        if owner is not None:
            self._per_node[owner] -= 1
            if not self._per_node[owner]:
                del self._per_node[owner]
        node = self._large.pop(key, None)
        if node is not None:
            self._large_per_node[node] -= 1
            if not self._large_per_node[node]:
                del self._large_per_node[node]

    def _load_ended(self, action: Load, future: Future[object]) -> None:
        """A load's future finished (on the gateway's event loop: nothing here blocks). Its
        node's `Status` is asked, on a pool thread, once its last load ended or when one
        failed (`_after_load`); until then the key stays unreported."""
        error: BaseException | None
        try:
            error = future.exception()
        except CancelledError as exc:  # the gateway closed under a stopping controller
            error = exc
        with self._load_lock:
            large = action.key in self._large
            self._release_load(action.key)
            waiting = self._unreported.setdefault(action.node, set())
            waiting.add(action.key)
            if error is None and action.node in self._per_node:
                if large:  # its node's slot is free: the next pass offers a waiting blob
                    self.wake()
                return
            del self._unreported[action.node]
            self._reporting |= dict.fromkeys(waiting, action.node)
        with contextlib.suppress(RuntimeError):  # stopping: the pool takes no more work
            self._loads.submit(self._after_load, action, error, waiting)

    def _after_load(self, action: Load, error: BaseException | None, waiting: set[str]) -> None:
        """On a pool thread: record a failed load, write what the node now holds, release
        the node's ended loads to the reconciler, wake the loop (see the module docstring)."""
        if error is not None:
            why = _describe(error)
            log.warning("%s failed: %s", action.key, why)
            self.stats.action_failed()
            self._record_failure(action, why, self.clock())
            if isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.DATA_LOSS:
                try:
                    self._replace_corrupt_blob(action)
                except Exception:  # the next pass retries the load; it ends up here again
                    log.exception("checking the store's copy of %s", action.shard_id)
        try:
            node = self.store.node(action.node)
            if node is not None and node.address == action.address:
                self._refresh_node(node)
        except grpc.RpcError as exc:
            log.warning("status of node %s: %s", action.node, _describe(exc))
        except Exception:  # a store closed under a stopping controller
            log.exception("after %s", action.key)
        finally:
            with self._load_lock:
                for key in waiting:
                    del self._reporting[key]
                self._finished.update(waiting)
                last = not self._loading
            if last or error is not None:  # see `_run`: one pass per batch of loads
                self.wake()

    def _replace_corrupt_blob(self, action: Load) -> None:
        """The agent refused a load as corrupt (DATA_LOSS). If the store's own copy no longer
        hashes to its id (a bad disk, a stray write), every retry would stream the same bad
        bytes and fail forever: remove the blob and recompile the replica, which writes it
        again from the checkpoint (content-addressed: the same id), and the next pass loads
        it. A good copy means the bytes broke on the way: the next pass retries as usual."""
        store = self._shard_store
        if store.verify(action.shard_id):
            return
        store.remove(action.shard_id)
        self.store.add_event(
            self.clock(),
            "Warning",
            "ShardCorrupt",
            f"shard {action.shard_id} in the shard store failed its BLAKE3 check (node "
            f"{action.node} refused it with DATA_LOSS): removed, recompiling replica "
            f"{action.replica} of {action.deployment}",
            deployment=action.deployment,
            node=action.node,
        )
        record = self.store.deployment(action.deployment)
        if record is None:
            return
        spec = deployment_from_manifest(record.manifest, source=f"stored deployment {record.name}")
        target = target_from_spec(spec, record.generation, deleting=record.deleting)
        self._refs.pop((action.deployment, action.replica), None)
        _, refs = self._compiled(target, action.replica)
        if not any(r.shard_id == action.shard_id for r in refs):
            log.warning("recompiling %s gave other shard ids", action.deployment)

    def _record_failure(self, action: Action, why: str, now: float) -> None:
        deployment = getattr(action, "deployment", None)
        replica = getattr(action, "replica", None)
        try:
            if deployment is not None and replica is not None:
                self.store.record_replica_failure(deployment, replica, why[:500], now)
            self.store.add_event(
                now,
                "Warning",
                "ActionFailed",
                f"{action.key}: {why}"[:1000],
                deployment=deployment,
                node=getattr(action, "node", None),
            )
        except NotFound:
            pass  # the replica was forgotten meanwhile

    # --- one action --------------------------------------------------------------------------

    def _do(
        self,
        action: Action,
        specs: Mapping[str, DeploymentSpec],
        targets: Mapping[str, DeploymentTarget],
        nodes: Mapping[str, Node],
        now: float,
        touched: set[str],
    ) -> None:
        if isinstance(action, Compile):
            self._compile(action, specs[action.deployment])
        elif isinstance(action, Unload):
            touched.add(action.node)
            try:
                self.gateway.unload(action.address, action.node, action.chip_index, action.shard_id)
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.NOT_FOUND:
                    raise  # NOT_FOUND: already gone (a report older than the agent's restart)
        elif isinstance(action, Configure):
            self._configure(action, targets[action.deployment], nodes)
        elif isinstance(action, StartEpoch):
            self._start(action, targets[action.deployment], nodes)
        elif isinstance(action, RemoveReplica):
            self.store.record(action, now)  # removing first: Generate stops choosing it
            self._remove(action, nodes)
        elif isinstance(action, MoveStages):
            self.store.record(action, now)
            self._move(action, nodes)
        elif not self.store.record(action, now):
            raise RuntimeError(f"no executor for {type(action).__name__}")

    def _compile(self, action: Compile, spec: DeploymentSpec) -> None:
        refs = self.compiler.compile(action.plan, spec)
        refs = [replace(r, binding=replace(r.binding, replica=action.replica)) for r in refs]
        shards = [
            ShardAssignment(r.chip, r.shard_id, max(r.size_bytes, declared_bytes_of(r.path)))
            for r in refs
        ]
        try:
            self.store.set_replica_shards(action.deployment, action.replica, shards)
        except NotFound:
            return  # the replica was forgotten while it compiled
        self._refs[(action.deployment, action.replica)] = (action.plan, refs)

    def _replica(self, deployment: str, index: int) -> Replica:
        for replica in self.store.replicas(deployment):
            if replica.index == index:
                return replica
        raise NotFound(f"deployment {deployment} has no replica {index}")

    def _compiled(self, target: DeploymentTarget, index: int) -> tuple[Plan, list[ShardRef]]:
        known = self._refs.get((target.name, index))
        if known is None:  # after a restart: a lookup of blobs already built
            replica = self._replica(target.name, index)
            plan = replica_plan(replica, target, self.profile.name)
            spec = deployment_from_manifest(
                self._manifest(target.name), source=f"stored deployment {target.name}"
            )
            refs = [
                replace(r, binding=replace(r.binding, replica=index))
                for r in self.compiler.compile(plan, spec)
            ]
            known = (plan, refs)
            self._refs[(target.name, index)] = known
        return known

    def _manifest(self, name: str) -> dict[str, object]:
        record = self.store.deployment(name)
        if record is None:
            raise NotFound(f"no deployment named {name}")
        return record.manifest

    def _where(
        self, refs: Iterable[ShardRef], nodes: Mapping[str, Node]
    ) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
        by_chip: dict[str, tuple[Node, int]] = {}
        for node in nodes.values():
            for chip in node.chips:
                by_chip[chip_id(node.rack, node.slot, chip.index)] = (node, chip.index)
        where: dict[str, tuple[str, int]] = {}
        names: dict[str, str] = {}
        for ref in refs:
            if ref.chip not in by_chip:
                raise NotFound(f"chip {ref.chip} belongs to no registered node")
            node, index = by_chip[ref.chip]
            where[ref.chip] = (node.address, index)
            names[node.address] = node.name
        return where, names

    def _configure(
        self, action: Configure, target: DeploymentTarget, nodes: Mapping[str, Node]
    ) -> None:
        plan, refs = self._compiled(target, action.replica)
        where, names = self._where(refs, nodes)
        requests = configure_requests(
            plan,
            refs,
            where,
            replica=action.replica,
            deployment=action.deployment,
            epoch=action.epoch,
            nodes=names,
        )
        ready = self.gateway.configure(requests, names)
        self._configured[(action.deployment, action.replica, action.epoch)] = (
            requests,
            ready,
            names,
        )
        self.store.set_replica_epochs(action.deployment, action.replica, configured=action.epoch)

    def _start(
        self, action: StartEpoch, target: DeploymentTarget, nodes: Mapping[str, Node]
    ) -> None:
        key = (action.deployment, action.replica, action.epoch)
        if key not in self._configured:  # restarted between Configure and StartEpoch
            self._configure(
                Configure(action.deployment, action.replica, action.epoch, ()), target, nodes
            )
        requests, ready, names = self._configured.pop(key)
        self.gateway.start(requests, ready, names)
        self.store.set_replica_epochs(action.deployment, action.replica, running=action.epoch)

    def _remove(self, action: RemoveReplica, nodes: Mapping[str, Node]) -> None:
        """Drop the replica's stages on every reachable agent it ran on."""
        self._refs.pop((action.deployment, action.replica), None)
        for key in [k for k in self._configured if k[:2] == (action.deployment, action.replica)]:
            del self._configured[key]
        try:
            replica = self._replica(action.deployment, action.replica)
        except NotFound:
            return
        chips = set(replica.chips)
        for node in nodes.values():
            if not any(chip_id(node.rack, node.slot, c.index) in chips for c in node.chips):
                continue
            try:
                self.gateway.remove_replica(
                    node.address, node.name, action.deployment, action.replica
                )
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
                log.info("remove replica on %s: %s", node.name, _describe(exc))

    def _move(self, action: MoveStages, nodes: Mapping[str, Node]) -> None:
        """After an incremental failover is recorded: move the replica's cached compiled
        bindings onto the new chips (`moved_refs`; the blobs do not change) and halt
        the replica on the live agents of the chips it left (a chip reported failed on a
        node that still runs): nothing keeps serving on, or binding, a chip that is out.
        Best effort — the agents of a dead node are gone, and Configure removes the old
        epoch's pipeline from every agent the replica keeps."""
        known = self._refs.pop((action.deployment, action.replica), None)
        if known is not None:
            self._refs[(action.deployment, action.replica)] = moved_refs(known, action)
        for key in [k for k in self._configured if k[:2] == (action.deployment, action.replica)]:
            del self._configured[key]
        left = set(action.chip_map())
        now = self.clock()
        for node in nodes.values():
            if not any(chip_id(node.rack, node.slot, c.index) in left for c in node.chips):
                continue
            if not node_alive(node, now, self.settings):
                continue  # silent: an RPC would wait out its timeout; see _refresh_node
            try:
                self.gateway.remove_replica(
                    node.address, node.name, action.deployment, action.replica
                )
            except grpc.RpcError as exc:
                log.info("halting the moved replica on %s: %s", node.name, _describe(exc))

    def agent_died(self, node: str, why: str) -> bool:
        """The runtime saw the node's agent die (a process exit, a Ray actor's death): mark
        its chips failed now — a faster signal than the heartbeat timeout — so the next pass
        moves the stages they held onto spares (`MoveStages`) instead of waiting for the
        agent to come back. A restarted agent registers again with healthy, empty chips,
        which become spares. False when the node is not known."""
        known = self.store.node(node)
        if known is None:
            return False
        try:
            with self.store.transaction():  # all at once: a pass reading some would move
                for chip in known.chips:  # those stages now and the others at a second epoch
                    self.store.set_chip_health(node, chip.index, ChipHealth.FAILED, why)
        except NotFound:
            return False
        # Ask the agent at the next pass: dead, the call fails and the chips stay failed; but
        # a runtime that reports a death late (after the restarted agent registered again)
        # must not leave a live agent's chips failed — its Status puts their health back.
        self.node_registered(node)
        return True

    def wait_passes(self, count: int, timeout: float) -> bool:
        """Wake the loop and wait until `count` passes that started after this call have
        completed (a pass already running may have read the store before the caller's
        change); False at the timeout."""
        target = self.passes + count  # `passes` counts the passes started
        deadline = time.monotonic() + timeout
        while self.passes_done < target:
            if self.passes < target:
                self.wake()
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            time.sleep(0.01)
        return True

    # --- agents' reports ---------------------------------------------------------------------

    def _adopt(self, node: Node, status: agent_pb2.StatusResponse) -> None:
        """After a restart, the first `Status` of a stored node: its agent answered (a
        heartbeat), replicas it does not run as the store says move to a new epoch, and a load
        the dead control plane left in flight is asked about again next pass, until the agent
        has aborted it (nothing else would refresh the node, and the reconciler waits for a
        load in flight)."""
        now = self.clock()
        self.heartbeats.add(node.name, now)
        for bump in unadoptable(node, status, self.store.replicas()):
            self.store.record(bump, now)
            self.store.add_event(
                now, "Warning", "Resynchronizing", bump.reason, deployment=bump.deployment
            )
        with self._refresh_lock:
            if any(chip.loads for chip in status.chips):
                self._refresh.add(node.name)
            else:
                self._adopting.discard(node.name)

    def _retry_adoption(self, node: Node) -> None:
        """A stored node's agent did not answer its first `Status` after a restart: ask again
        next pass while the node counts as Ready (until then the store's last report stands
        in for it); once the heartbeat timeout marks it NotReady, its replicas are lost anyway
        and a new agent of the node registers afresh."""
        with self._refresh_lock:
            if node.name not in self._adopting:
                return
            if node.ready:
                self._refresh.add(node.name)
            else:
                self._adopting.discard(node.name)

    def _remove_stale_pipelines(self, node: Node, status: agent_pb2.StatusResponse) -> None:
        if not any(chip.pipelines for chip in status.chips):
            return
        for deployment, index in stale_pipelines(node, status, self.store.replica_chips()):
            log.info("removing stale pipeline %s/%d on %s", deployment, index, node.name)
            try:
                self.gateway.remove_replica(node.address, node.name, deployment, index)
            except grpc.RpcError as exc:
                log.info("stale pipeline on %s: %s", node.name, _describe(exc))

    def pipeline_stopped(self, deployment: str, replica: int, epoch: int, why: str) -> None:
        """The gateway saw a replica's pipeline stop while serving (a broken or stalled link,
        a stage that failed) at `epoch`. Applied by the loop (`_resync_stopped`) once
        `STOP_GRACE` has passed, so that a dead agent or a failed chip — which move stages —
        is noticed first and the replica is not resynchronized twice."""
        with self._refresh_lock:
            self._stopped.setdefault((deployment, replica, epoch), (self.clock(), why))
        self.wake()

    def _resync_stopped(self, now: float) -> None:
        """Resynchronize, at a new epoch on the same chips, each reported replica that is
        still at the epoch that stopped and whose chips are all healthy (`BumpEpoch`; the
        next passes Configure and StartEpoch it: the links are opened anew)."""
        with self._refresh_lock:
            due = {k: v for k, v in self._stopped.items() if now - v[0] >= STOP_GRACE}
            for key in due:
                del self._stopped[key]
        if not due:
            return
        observed = self.store.observed(self.profile)
        healthy = {
            n.chip_id(c.index)
            for n in observed.nodes
            if node_alive(n, now, self.settings)
            for c in n.chips
            if c.health is ChipHealth.HEALTHY
        }
        for (deployment, index, epoch), (_, why) in sorted(due.items()):
            replica = next(
                (
                    r
                    for r in observed.replicas
                    if (r.deployment, r.index) == (deployment, index) and not r.removing
                ),
                None,
            )
            if replica is None or replica.epoch != epoch or replica.running_epoch != epoch:
                continue  # moved, resynchronized or removed meanwhile
            if not set(replica.chips) <= healthy:
                continue  # the reconciler moves its stages
            message = f"replica {index}: its pipeline stopped ({why}); epoch {epoch + 1}"
            self.store.record(BumpEpoch(deployment, index, epoch + 1, message), now)
            self.store.add_event(
                now, "Warning", "Resynchronizing", message[:1000], deployment=deployment
            )

    def _refresh_node(self, node: Node) -> agent_pb2.StatusResponse:
        """Write what the node's agent holds and its chips' health (its `Status`). One at a
        time per node (the pass and the load workers both ask): a report is written in the
        order it was asked, so an older one never overwrites a newer."""
        with self._refresh_lock:
            lock = self._node_locks.setdefault(node.name, threading.Lock())
        with lock:
            return self._write_status(node)

    def _write_status(self, node: Node) -> agent_pb2.StatusResponse:
        status = self.gateway.status(node.address, node.name)
        self.store.report_held(node.name, held_from_status(node, status))
        self._remove_stale_pipelines(node, status)
        known = {c.index: c for c in node.chips}
        for chip in status.chips:
            health = (
                ChipHealth.FAILED
                if chip.health == agent_pb2.CHIP_HEALTH_FAILED
                else ChipHealth.HEALTHY
            )
            before = known.get(chip.chip)
            if before is not None and before.health is not health:
                self.store.set_chip_health(node.name, chip.chip, health, chip.failure_reason)
        return status


def moved_refs(
    known: tuple[Plan, list[ShardRef]], action: MoveStages
) -> tuple[Plan, list[ShardRef]]:
    """A replica's compiled plan and shard refs with the moved chips renamed (`action`): the
    blobs hold no placement, so only the bindings change — each moved chip's own id, and
    every chip id in the bindings that name it (TP group, upstream, downstream). Saves a
    recompile (a lookup, but it rebuilds every chip's program) on the failover path."""
    plan, refs = known
    chip_map = action.chip_map()

    def rename(chips: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(chip_map.get(c, c) for c in chips)

    stages = tuple(replace(s, chips=rename(s.chips), refs=()) for s in plan.stages)
    moved = [
        replace(
            r,
            chip=chip_map.get(r.chip, r.chip),
            binding=replace(
                r.binding,
                chip=chip_map.get(r.binding.chip, r.binding.chip),
                tp_group=rename(r.binding.tp_group),
                upstream=rename(r.binding.upstream),
                downstream=rename(r.binding.downstream),
            ),
        )
        for r in refs
    ]
    return replace(plan, stages=stages), moved


def stale_pipelines(
    node: Node,
    status: agent_pb2.StatusResponse,
    replicas: Mapping[tuple[str, int], Collection[str]],
) -> list[tuple[str, int]]:
    """(deployment, replica) pipelines an agent still runs although the replica no longer
    has a chip on its node — the replica moved away (failover) while the node was silent, or
    was forgotten. They would keep the chips bound (a later Configure there is refused) and
    their shards referenced."""
    mine = {chip_id(node.rack, node.slot, c.index) for c in node.chips}
    wanted = {key for key, chips in replicas.items() if not mine.isdisjoint(chips)}
    found = {(p.deployment, p.replica) for chip in status.chips for p in chip.pipelines}
    return sorted(found - wanted)


def held_from_status(node: Node, status: agent_pb2.StatusResponse) -> list[HeldShard]:
    """An agent's `Status` as the reconciler's held shards (committed and in flight)."""
    held: list[HeldShard] = []
    for chip in status.chips:
        cid = chip_id(node.rack, node.slot, chip.chip)
        for shard in chip.shards:
            held.append(
                HeldShard(
                    cid,
                    shard.shard_id,
                    shard.reserved_bytes,
                    shard.size_bytes,
                    shard.size_bytes,
                    True,
                )
            )
        for load in chip.loads:
            held.append(
                HeldShard(
                    cid,
                    load.shard_id,
                    load.reserved_bytes,
                    load.bytes_loaded,
                    load.bytes_total,
                    False,
                )
            )
    return held


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def events_of(actions: Iterable[Action]) -> list[RecordEvent]:
    """The events among `actions` (for logs and tests)."""
    return [a for a in actions if isinstance(a, RecordEvent)]


__all__ = [
    "AgentGateway",
    "Compiler",
    "Controller",
    "GrpcAgentGateway",
    "HeartbeatBuffer",
    "PassResult",
    "ShardCompiler",
    "held_from_status",
    "moved_refs",
    "stale_pipelines",
]
