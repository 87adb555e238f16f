"""The control plane's domain model: desired state, observed state, phases and conditions.

Everything here is a frozen dataclass or an enum, and nothing reads a clock, a file or a socket:
times are plain floats (unix seconds) handed in by the caller, so the reconciler
(`orchestrator.core.reconcile`) is a pure function of these values and can be tested with
generated states and a fake clock.

Desired and observed state are kept apart, as Ray Serve's `deployment_state.py` keeps target
and current state apart:

* **Desired** (`DeploymentTarget`): what a user applied — the deployment's name, its
  generation (bumped by the store whenever the stored spec changes, never on an identical
  apply) and the planning-relevant part of the spec as the planner's own `PlanRequest`, plus
  whether a delete was requested.
* **Observed** (`Observed`): what the control plane knows of the world — registered nodes with
  their chips and last heartbeat, the shards agents report held (committed or in flight), the
  replicas the control plane placed (chips, compiled shards, epochs, failures) and every
  deployment's last written status.

Decisions recorded in this model:

* **Chip ids** are the planner's (`rack-0/node-3/chip-5`): a node registers with its rack and
  its *slot* in the rack, so a plan's chip ids stay valid whatever order nodes register in,
  and a node's name (`rack-0/node-3` by default) is its certificate identity's suffix.
* **A replica is the unit of placement.** Each replica records its own stages and chips, so
  scaling up or down and replacing replicas one at a time never touch the other replicas.
* **A replica's template** (`DeploymentTarget.template`) is a digest of what its shards depend
  on (model, precision, context, batch, parallelism). Replicas with another template are
  replaced one at a time; a change of replicas count or of placement preferences (spread,
  spares, racks) changes no template, so it leaves running replicas alone (new preferences
  apply to replicas placed afterwards).
* **Node state** is derived: `NotReady` when the last heartbeat is older than the timeout
  (whatever was recorded), else `Cordoned` when cordoned, else `Ready`. Cordon and liveness
  are kept as two facts because a cordoned node that dies must still be noticed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from placement.plan import StagePlan
from placement.planner import PlanRequest
from placement.profiles import ChipProfile


class Phase(StrEnum):
    """A deployment's phase (DESIGN.md, "Flow of one deployment"), in the order of the flow."""

    PENDING = "Pending"
    PLACING = "Placing"
    COMPILING = "Compiling"
    LOADING = "Loading"
    SYNCHRONIZING = "Synchronizing"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"
    DELETING = "Deleting"


# The phases a healthy deployment walks through, in order: the phase of a deployment whose
# replicas are at different steps is the earliest step any of them is at.
PROGRESS_ORDER: tuple[Phase, ...] = (
    Phase.PENDING,
    Phase.PLACING,
    Phase.COMPILING,
    Phase.LOADING,
    Phase.SYNCHRONIZING,
    Phase.READY,
)


class ConditionType(StrEnum):
    PLACED = "Placed"
    LOADED = "Loaded"
    SYNCHRONIZED = "Synchronized"
    READY = "Ready"
    DEGRADED = "Degraded"
    # Set by the silent-data-corruption canary (orchestrator.verify), never by the reconciler.
    VERIFIED = "Verified"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


@dataclass(frozen=True)
class Condition:
    """One status condition, Kubernetes style.

    `last_transition_time` changes only when `status` changes (a new reason or message alone
    keeps it), so `kubectl describe` shows how long a condition has held.
    """

    type: ConditionType
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: float
    observed_generation: int


class NodeState(StrEnum):
    READY = "Ready"
    NOT_READY = "NotReady"
    CORDONED = "Cordoned"


class ChipHealth(StrEnum):
    HEALTHY = "Healthy"
    FAILED = "Failed"


@dataclass(frozen=True)
class Chip:
    """One chip of a node as its agent registered and last reported it."""

    index: int
    sram_bytes: int
    health: ChipHealth = ChipHealth.HEALTHY
    reason: str = ""


def node_name(rack: str, slot: int) -> str:
    """The default node name: `rack-0/node-3`, the agent identity's suffix."""
    return f"{rack}/node-{slot}"


def chip_id(rack: str, slot: int, index: int) -> str:
    """The planner's chip id for chip `index` of the node in `slot` of `rack`."""
    return f"{rack}/node-{slot}/chip-{index}"


@dataclass(frozen=True)
class Node:
    """A registered node: where it is (rack, slot), how to reach it, its chips, its liveness.

    `ready` is the *recorded* state (what the last `MarkNodeReady`/`MarkNodeNotReady` wrote);
    the reconciler compares it with the state the heartbeat implies and emits a transition.
    """

    name: str
    rack: str
    slot: int
    address: str
    identity: str
    chips: tuple[Chip, ...]
    last_heartbeat: float
    ready: bool = True
    cordoned: bool = False
    draining: bool = False

    def chip_id(self, index: int) -> str:
        return chip_id(self.rack, self.slot, index)


@dataclass(frozen=True)
class HeldShard:
    """A shard an agent reports on a chip: committed (held) or a load still in flight."""

    chip: str  # chip id
    shard_id: str
    reserved_bytes: int
    bytes_loaded: int
    bytes_total: int
    committed: bool


@dataclass(frozen=True)
class ShardAssignment:
    """A compiled shard assigned to one chip of a replica (the result of `Compile`)."""

    chip: str
    shard_id: str
    size_bytes: int


@dataclass(frozen=True)
class Replica:
    """One replica the control plane placed, and how far its bring-up got.

    `shards` is empty until the replica's shards are compiled. `epoch` is the epoch the
    replica must run at (bumped by a resynchronization); `configured_epoch` / `running_epoch`
    say which epoch `ConfigureReplica` / `StartEpoch` last succeeded for. `failures` counts
    failed steps since the replica last became ready, for the restart budget and backoff.
    `removing` is set by `RemoveReplica`: the replica keeps its chips (so nothing else is
    placed on them) until its shards are unloaded, then `ForgetReplica` drops it.
    `restarts` counts the incremental failovers (`MoveStages`) of the replica's current
    streak — each within `CoreSettings.restart_window` of the one before — and
    `last_restart_time` is when the last one was decided: the restart budget
    (`failover.maxRestarts`) and its exponential backoff (`failover.backoffSeconds`) read them.
    Every failover is also a `StagesMoved` event (the history). `next_stages` is set while
    the replica is drained off a node: the stages it will switch to once their new chips
    hold their shards (make before break; empty otherwise).
    """

    deployment: str
    index: int
    generation: int
    template: str
    stages: tuple[StagePlan, ...]
    spares: tuple[str, ...] = ()
    shards: tuple[ShardAssignment, ...] = ()
    epoch: int = 0
    configured_epoch: int | None = None
    running_epoch: int | None = None
    failures: int = 0
    last_failure_time: float | None = None
    last_error: str = ""
    removing: bool = False
    restarts: int = 0
    last_restart_time: float | None = None
    next_stages: tuple[StagePlan, ...] = ()

    @property
    def chips(self) -> tuple[str, ...]:
        return tuple(chip for stage in self.stages for chip in stage.chips)

    def shard_for(self, chip: str) -> ShardAssignment | None:
        return self.shard_map().get(chip)

    def shard_map(self) -> dict[str, ShardAssignment]:
        """Chip id -> its compiled shard (a 405B replica has thousands of chips: one dict,
        built once per replica, instead of a scan per chip)."""
        cached: dict[str, ShardAssignment] | None = self.__dict__.get("_shard_map")
        if cached is None:
            cached = {s.chip: s for s in self.shards}
            object.__setattr__(self, "_shard_map", cached)
        return cached


@dataclass(frozen=True)
class DeploymentStatus:
    """The status last written for a deployment (what `get`/`describe` show)."""

    phase: Phase = Phase.PENDING
    reason: str = ""
    message: str = ""
    ready_replicas: int = 0
    observed_generation: int = 0
    conditions: tuple[Condition, ...] = ()

    def condition(self, kind: ConditionType) -> Condition | None:
        for cond in self.conditions:
            if cond.type is kind:
                return cond
        return None


@dataclass(frozen=True)
class DeploymentTarget:
    """The desired state of one deployment.

    Build it from a validated spec with `orchestrator.deployments.plan_request_from_spec`;
    the reconciler never reads files. `request.name` must equal `name`.
    """

    name: str
    generation: int
    request: PlanRequest
    max_restarts: int = 5
    backoff_seconds: float = 1.0
    deleting: bool = False

    @property
    def template(self) -> str:
        """Digest of everything a replica's shards depend on (see the module docstring)."""
        req = self.request
        raw = {
            "model": req.model.to_dict(),
            "precision": req.precision,
            "maxContext": req.max_context,
            "maxBatch": req.max_batch,
            "tensorParallel": req.tensor_parallel,
            "pipelineStages": req.pipeline_stages,
        }
        text = json.dumps(raw, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CoreSettings:
    """Every tunable of the reconciler, in one object (kopf keeps its settings the same way).

    `heartbeat_timeout`: agents heartbeat every `heartbeat_interval` (0.5 s); a node whose last
    heartbeat is older than the timeout (five missed beats) is NotReady. Five, not one or two,
    because a busy control plane handling 1,305 nodes in batches may process a beat late.
    `backoff_max` caps the exponential retry delay of a replica's failing step.
    `restart_window`: a replica's failovers count toward `failover.maxRestarts` (and its
    backoff) only while each comes within this many seconds of the one before — a replica
    that served that long without losing a chip starts a fresh streak, as Kubernetes resets
    a crash-looping container's backoff after ten minutes of running.
    """

    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 2.5
    backoff_max: float = 60.0
    restart_window: float = 600.0

    def __post_init__(self) -> None:
        if not self.heartbeat_interval > 0:
            raise ValueError("CoreSettings.heartbeat_interval must be positive")
        if not self.heartbeat_timeout > self.heartbeat_interval:
            raise ValueError("CoreSettings.heartbeat_timeout must exceed heartbeat_interval")
        if self.backoff_max < 0:
            raise ValueError("CoreSettings.backoff_max must not be negative")
        if not self.restart_window > 0:
            raise ValueError("CoreSettings.restart_window must be positive")


@dataclass(frozen=True)
class Observed:
    """What the control plane knows of the world at one moment.

    `profile` is the cluster's hardware profile (chips per node, SRAM per chip, link speeds);
    placement plans against it. `held` lists every shard agents reported, committed or in
    flight. `statuses` maps a deployment name to its last written status (absent: Pending).
    """

    profile: ChipProfile
    nodes: tuple[Node, ...] = ()
    held: tuple[HeldShard, ...] = ()
    replicas: tuple[Replica, ...] = ()
    statuses: Mapping[str, DeploymentStatus] = field(default_factory=dict)

    def status(self, name: str) -> DeploymentStatus:
        return self.statuses.get(name, DeploymentStatus())


def node_state(node: Node, now: float, settings: CoreSettings) -> NodeState:
    """The state a node is in at `now`: heartbeat age first, then cordon (see the docstring)."""
    if not node_alive(node, now, settings):
        return NodeState.NOT_READY
    return NodeState.CORDONED if node.cordoned else NodeState.READY


def node_alive(node: Node, now: float, settings: CoreSettings) -> bool:
    """Whether the node's last heartbeat is recent enough at `now`."""
    return now - node.last_heartbeat <= settings.heartbeat_timeout
