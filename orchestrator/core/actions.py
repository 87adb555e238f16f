"""The actions the reconciler decides on; the controller executes them through its ports.

Every action is a frozen dataclass with a `key`: two actions with the same key do the same
thing, so a controller that runs actions asynchronously (a load takes seconds) skips an action
whose key is already in flight instead of starting it twice — the reconciler itself keeps no
memory of what it asked for last time, and simply asks again until the observed state shows it
done. After a control-plane restart nothing is in flight, and asking again is safe: compiling
is a lookup for shards already built, a load of a shard the chip holds answers "already
loaded", and the status actions write values, not deltas.

Order matters within one returned list: for one replica, `RemoveReplica` comes before the
`Unload`s of its shards (the agent drops the pipeline stages, then frees the chips); a
controller executes the actions of one deployment in order and stops that deployment's
remaining actions at the first failure (the next reconcile decides again).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.core.model import Condition, Phase
from placement.plan import Plan, StagePlan


@dataclass(frozen=True)
class PlacedReplica:
    """One replica of a `Place`: its index in the deployment, its stages and spare chips."""

    index: int
    stages: tuple[StagePlan, ...]
    spares: tuple[str, ...]


@dataclass(frozen=True)
class Place:
    """Record new replicas on the chips the planner chose (store: replicas and the plan)."""

    deployment: str
    generation: int
    template: str
    replicas: tuple[PlacedReplica, ...]
    plan: Plan  # the planner's output, replica numbers already the deployment's indices

    @property
    def key(self) -> str:
        return f"place/{self.deployment}/{','.join(str(r.index) for r in self.replicas)}"


@dataclass(frozen=True)
class Compile:
    """Compile the shards of one replica (`plan` holds exactly that replica's stages)."""

    deployment: str
    generation: int
    replica: int
    plan: Plan

    @property
    def key(self) -> str:
        return f"compile/{self.deployment}/{self.replica}"


@dataclass(frozen=True)
class Load:
    """Stream one shard into one chip's SRAM (the agent verifies and commits atomically)."""

    deployment: str
    replica: int
    node: str
    address: str
    chip: str  # chip id
    chip_index: int  # the chip's index on its node
    shard_id: str
    size_bytes: int

    @property
    def key(self) -> str:
        return f"load/{self.chip}/{self.shard_id}"


@dataclass(frozen=True)
class Unload:
    """Free a shard from a chip (a stale one, or one of a removed replica)."""

    node: str
    address: str
    chip: str
    chip_index: int
    shard_id: str

    @property
    def key(self) -> str:
        return f"unload/{self.chip}/{self.shard_id}"


@dataclass(frozen=True)
class Configure:
    """Bind a replica's loaded shards to its pipeline stages (`ConfigureReplica` per agent)."""

    deployment: str
    replica: int
    epoch: int
    chips: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"configure/{self.deployment}/{self.replica}/{self.epoch}"


@dataclass(frozen=True)
class StartEpoch:
    """Pass the start barrier: every chip of the replica starts `epoch` at tick 0."""

    deployment: str
    replica: int
    epoch: int

    @property
    def key(self) -> str:
        return f"start/{self.deployment}/{self.replica}/{self.epoch}"


@dataclass(frozen=True)
class BumpEpoch:
    """A replica that ran (or was configured) lost a shard — an agent restarted, a chip came
    back empty: once reloaded it must resynchronize at a new epoch, never resume the old one.
    Store-only: the next passes reload, Configure and StartEpoch at `epoch`."""

    deployment: str
    replica: int
    epoch: int
    reason: str

    @property
    def key(self) -> str:
        return f"epoch/{self.deployment}/{self.replica}/{self.epoch}"


@dataclass(frozen=True)
class MoveStages:
    """Incremental failover of one replica: only the stages on lost chips move.

    Store-only. `stages` is the replica's whole new stage list (the moved stages on their new
    chips, every other stage as it was); the shard of each moved chip is bound to the chip
    that replaces it (a blob holds no placement, so the same shard id serves the new chip
    and nothing is recompiled). The replica's target epoch becomes `epoch`: the next passes
    load the moved stages' shards onto the new chips, Configure every agent of the replica at
    `epoch` and StartEpoch — the replica resynchronizes; stages that did not move keep their
    chips and shards. `restarts` is the replica's restart count after this move (the budget
    `failover.maxRestarts` and the backoff read it). `moves` are (stage, from chips, to chips).
    """

    deployment: str
    replica: int
    stages: tuple[StagePlan, ...]
    moves: tuple[tuple[int, tuple[str, ...], tuple[str, ...]], ...]
    epoch: int
    restarts: int
    reason: str
    drain: bool = False  # a planned switch-over (drain), not a failure: no restart counted

    @property
    def key(self) -> str:
        return f"move/{self.deployment}/{self.replica}/{self.epoch}"

    def chip_map(self) -> dict[str, str]:
        """Old chip id -> new chip id, for every chip of a moved stage."""
        return {old: new for _, frm, to in self.moves for old, new in zip(frm, to, strict=True)}


@dataclass(frozen=True)
class PlanDrain:
    """Store-only: the stages a replica will switch to to leave a draining node (`stages`;
    empty: abandon the plan). The new chips are loaded while the replica keeps serving; a
    `MoveStages` with `drain=True` switches over once they all hold their shards."""

    deployment: str
    replica: int
    stages: tuple[StagePlan, ...]
    reason: str

    @property
    def key(self) -> str:
        return f"drain/{self.deployment}/{self.replica}/{len(self.stages)}"


@dataclass(frozen=True)
class RemoveReplica:
    """Drop a replica's stages on its agents (if reachable) and mark it removing.

    The replica keeps its chips until its shards are unloaded (`Unload`s follow in the same
    list; `ForgetReplica` comes once none is left), so no chip is reused while it still holds
    the old shard."""

    deployment: str
    replica: int
    reason: str
    message: str

    @property
    def key(self) -> str:
        return f"remove/{self.deployment}/{self.replica}"


@dataclass(frozen=True)
class ForgetReplica:
    """The removed replica's shards are gone from every live chip: drop its record."""

    deployment: str
    replica: int

    @property
    def key(self) -> str:
        return f"forget/{self.deployment}/{self.replica}"


@dataclass(frozen=True)
class SetPhase:
    """Write a deployment's phase (with why) and its count of ready replicas."""

    deployment: str
    phase: Phase
    reason: str
    message: str
    ready_replicas: int
    observed_generation: int

    @property
    def key(self) -> str:
        return f"phase/{self.deployment}"


@dataclass(frozen=True)
class SetCondition:
    deployment: str
    condition: Condition

    @property
    def key(self) -> str:
        return f"condition/{self.deployment}/{self.condition.type.value}"


@dataclass(frozen=True)
class RecordEvent:
    """An event for `describe` / `events`: kind is Normal or Warning, as in Kubernetes."""

    deployment: str | None
    node: str | None
    kind: str
    reason: str
    message: str
    time: float

    @property
    def key(self) -> str:
        return f"event/{self.deployment}/{self.node}/{self.reason}/{self.time}/{self.message}"


@dataclass(frozen=True)
class MarkNodeNotReady:
    node: str
    reason: str

    @property
    def key(self) -> str:
        return f"node-not-ready/{self.node}"


@dataclass(frozen=True)
class MarkNodeReady:
    node: str

    @property
    def key(self) -> str:
        return f"node-ready/{self.node}"


@dataclass(frozen=True)
class DeleteDeployment:
    """The deployment was deleted and nothing of it is left on any chip: forget it."""

    deployment: str

    @property
    def key(self) -> str:
        return f"delete/{self.deployment}"


Action = (
    Place
    | Compile
    | Load
    | Unload
    | Configure
    | StartEpoch
    | BumpEpoch
    | MoveStages
    | PlanDrain
    | RemoveReplica
    | ForgetReplica
    | SetPhase
    | SetCondition
    | RecordEvent
    | MarkNodeNotReady
    | MarkNodeReady
    | DeleteDeployment
)
