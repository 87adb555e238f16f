"""A simulated world for reconciler tests: applies the core's actions to plain data.

Every action takes effect at once and checks the invariants a real cluster would enforce the
hard way: `Place` never takes a chip another replica holds or a chip still holding a shard,
`Load` never puts more bytes on a chip than its SRAM, `StartEpoch` only after `Configure`.
`run` repeats reconcile → apply until reconcile returns nothing (a fixed point).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from orchestrator.core import (
    Action,
    BumpEpoch,
    Chip,
    ChipHealth,
    Compile,
    Configure,
    CoreSettings,
    DeleteDeployment,
    DeploymentStatus,
    DeploymentTarget,
    ForgetReplica,
    HeldShard,
    Load,
    MarkNodeNotReady,
    MarkNodeReady,
    MoveStages,
    Node,
    Observed,
    Phase,
    Place,
    PlanDrain,
    RecordEvent,
    RemoveReplica,
    Replica,
    SetCondition,
    SetPhase,
    ShardAssignment,
    StartEpoch,
    Unload,
    reconcile,
)
from placement.models import model_preset
from placement.planner import PlanRequest
from placement.profiles import DEV, ChipProfile

MiB = 1 << 20
# A profile where tiny-llama takes 2 (int8) or 3 (fp16) chips at context 64: small worlds.
PROFILE = dataclasses.replace(DEV, name="sim", sram_bytes=8 * MiB, chips_per_node=4)


def make_nodes(
    racks: int, nodes_per_rack: int, profile: ChipProfile = PROFILE, now: float = 0.0
) -> dict[str, Node]:
    nodes = {}
    for r in range(racks):
        for slot in range(nodes_per_rack):
            name = f"rack-{r}/node-{slot}"
            nodes[name] = Node(
                name=name,
                rack=f"rack-{r}",
                slot=slot,
                address=f"127.0.0.1:{7000 + r * 100 + slot}",
                identity=f"agent:{name}",
                chips=tuple(Chip(i, profile.sram_bytes) for i in range(profile.chips_per_node)),
                last_heartbeat=now,
            )
    return nodes


def target(
    name: str,
    *,
    generation: int = 1,
    precision: str = "fp16",
    replicas: int = 1,
    spread: str = "none",
    spares: int = 0,
    max_context: int = 64,
    deleting: bool = False,
    max_restarts: int = 5,
    tensor_parallel: int | None = None,
    racks: tuple[str, ...] | None = None,
) -> DeploymentTarget:
    return DeploymentTarget(
        name=name,
        generation=generation,
        request=PlanRequest(
            name=name,
            model=model_preset("tiny-llama"),
            precision=precision,
            replicas=replicas,
            max_context=max_context,
            max_batch=1,
            spread=spread,
            spares_per_rack=spares,
            tensor_parallel=tensor_parallel,
            racks=racks,
        ),
        max_restarts=max_restarts,
        deleting=deleting,
    )


@dataclass
class World:
    nodes: dict[str, Node]
    targets: dict[str, DeploymentTarget] = field(default_factory=dict)
    profile: ChipProfile = PROFILE
    now: float = 0.0
    settings: CoreSettings = field(default_factory=CoreSettings)
    held: dict[tuple[str, str], HeldShard] = field(default_factory=dict)
    replicas: dict[tuple[str, int], Replica] = field(default_factory=dict)
    statuses: dict[str, DeploymentStatus] = field(default_factory=dict)
    events: list[RecordEvent] = field(default_factory=list)
    log: list[Action] = field(default_factory=list)
    fail_compiles: set[str] = field(default_factory=set)  # deployments whose compile fails
    heartbeats: bool = True  # nodes beat on every pass (except those in `silent`)
    silent: set[str] = field(default_factory=set)

    # --- observation ----------------------------------------------------------------------

    def observed(self) -> Observed:
        return Observed(
            profile=self.profile,
            nodes=tuple(self.nodes.values()),
            held=tuple(self.held.values()),
            replicas=tuple(self.replicas.values()),
            statuses=dict(self.statuses),
        )

    def chip(self, chip_id: str) -> Chip:
        node_part, _, index = chip_id.rpartition("/chip-")
        return self.nodes[node_part].chips[int(index)]

    def status(self, name: str) -> DeploymentStatus:
        return self.statuses.get(name, DeploymentStatus())

    def serving(self, name: str) -> int:
        return sum(
            1
            for r in self.replicas.values()
            if r.deployment == name and not r.removing and self.running(r)
        )

    def running(self, r: Replica) -> bool:
        return (
            bool(r.shards)
            and r.running_epoch == r.epoch
            and all((s.chip, s.shard_id) in self.held for s in r.shards)
        )

    def chips_of(self, name: str) -> int:
        return sum(len(r.chips) for r in self.replicas.values() if r.deployment == name)

    # --- the loop -------------------------------------------------------------------------

    def step(self, dt: float = 0.1) -> list[Action]:
        self.now += dt
        if self.heartbeats:
            for name, node in self.nodes.items():
                if name not in self.silent:
                    self.nodes[name] = replace(node, last_heartbeat=self.now)
        actions = reconcile(list(self.targets.values()), self.observed(), self.now, self.settings)
        self.apply(actions)
        return actions

    def run(self, passes: int = 60, dt: float = 0.1) -> int:
        """Reconcile and apply until nothing is left to do; returns the passes taken."""
        for i in range(passes):
            if not self.step(dt):
                return i
        raise AssertionError(f"no fixed point after {passes} passes: {self.log[-10:]}")

    # --- actions --------------------------------------------------------------------------

    def apply(self, actions: Iterable[Action]) -> None:
        for action in actions:
            self.log.append(action)
            handler = getattr(self, f"_on_{type(action).__name__}")
            handler(action)
            self.check()

    def check(self) -> None:
        """The invariants: no chip in two replicas; no chip holds more than its SRAM."""
        owner: dict[str, tuple[str, int]] = {}
        for r in self.replicas.values():
            for chip in r.chips:
                assert chip not in owner, f"{chip} double-booked: {owner[chip]} and {r.index}"
                owner[chip] = (r.deployment, r.index)
        used: dict[str, int] = {}
        for h in self.held.values():
            used[h.chip] = used.get(h.chip, 0) + h.reserved_bytes
        for chip, nbytes in used.items():
            cap = self.chip(chip).sram_bytes
            assert nbytes <= cap, f"{chip} holds {nbytes} bytes, SRAM is {cap}"

    def _on_Place(self, a: Place) -> None:
        taken = {c for r in self.replicas.values() for c in r.chips}
        holding = {h.chip for h in self.held.values()}
        for p in a.replicas:
            for stage in p.stages:
                for chip in stage.chips:
                    assert chip not in taken, f"Place on {chip}, which a replica holds"
                    assert chip not in holding, f"Place on {chip}, which still holds a shard"
                    assert self.chip(chip).health is ChipHealth.HEALTHY
                    node = self.nodes[chip.rpartition("/chip-")[0]]
                    assert not node.cordoned, f"Place on cordoned {chip}"
                    taken.add(chip)
            key = (a.deployment, p.index)
            assert key not in self.replicas, f"replica {key} placed twice"
            self.replicas[key] = Replica(
                a.deployment, p.index, a.generation, a.template, p.stages, p.spares
            )

    def _on_Compile(self, a: Compile) -> None:
        r = self.replicas[(a.deployment, a.replica)]
        if a.deployment in self.fail_compiles:
            self.replicas[(a.deployment, a.replica)] = replace(
                r,
                failures=r.failures + 1,
                last_failure_time=self.now,
                last_error="weights missing",
            )
            return
        shards = []
        for stage in r.stages:
            for rank, chip in enumerate(stage.chips):
                size = stage.sram_bytes_per_chip * 9 // 10
                shards.append(ShardAssignment(chip, f"{r.template}-{stage.index}-{rank}", size))
        self.replicas[(a.deployment, a.replica)] = replace(r, shards=tuple(shards))

    def _on_Load(self, a: Load) -> None:
        assert a.node in self.nodes and a.chip.startswith(a.node + "/")
        assert (a.chip, a.shard_id) not in self.held, f"{a.shard_id} loaded twice on {a.chip}"
        self.held[(a.chip, a.shard_id)] = HeldShard(
            a.chip, a.shard_id, a.size_bytes, a.size_bytes, a.size_bytes, True
        )

    def _on_Unload(self, a: Unload) -> None:
        assert (a.chip, a.shard_id) in self.held
        del self.held[(a.chip, a.shard_id)]

    def _on_Configure(self, a: Configure) -> None:
        r = self.replicas[(a.deployment, a.replica)]
        assert all((s.chip, s.shard_id) in self.held for s in r.shards), "configure unloaded"
        self.replicas[(a.deployment, a.replica)] = replace(r, configured_epoch=a.epoch)

    def _on_StartEpoch(self, a: StartEpoch) -> None:
        r = self.replicas[(a.deployment, a.replica)]
        assert r.configured_epoch == a.epoch, "StartEpoch before Configure"
        self.replicas[(a.deployment, a.replica)] = replace(
            r, running_epoch=a.epoch, failures=0, last_error=""
        )

    def _on_BumpEpoch(self, a: BumpEpoch) -> None:
        r = self.replicas[(a.deployment, a.replica)]
        assert a.epoch > r.epoch
        self.replicas[(a.deployment, a.replica)] = replace(r, epoch=a.epoch)

    def _on_MoveStages(self, a: MoveStages) -> None:
        r = self.replicas[(a.deployment, a.replica)]
        assert a.epoch > r.epoch
        assert a.restarts == r.restarts if a.drain else 1 <= a.restarts <= r.restarts + 1
        if a.drain:  # make before break: every new chip already holds its shard
            for old, new in a.chip_map().items():
                shard = r.shard_for(old)
                assert shard is not None and (new, shard.shard_id) in self.held
        taken = {c for o in self.replicas.values() if o is not r for c in o.chips}
        chip_map = a.chip_map()
        for new in chip_map.values():
            assert new not in taken, f"MoveStages onto {new}, which another replica holds"
            assert self.chip(new).health is ChipHealth.HEALTHY
        shards = tuple(replace(s, chip=chip_map.get(s.chip, s.chip)) for s in r.shards)
        self.replicas[(a.deployment, a.replica)] = replace(
            r,
            stages=a.stages,
            shards=shards,
            epoch=a.epoch,
            restarts=a.restarts,
            last_restart_time=r.last_restart_time if a.drain else self.now,
            next_stages=(),
            failures=0,
            last_failure_time=None,
            last_error="",
        )

    def _on_PlanDrain(self, a: PlanDrain) -> None:
        r = self.replicas[(a.deployment, a.replica)]
        self.replicas[(a.deployment, a.replica)] = replace(r, next_stages=a.stages)

    def _on_RemoveReplica(self, a: RemoveReplica) -> None:
        r = self.replicas[(a.deployment, a.replica)]
        self.replicas[(a.deployment, a.replica)] = replace(r, removing=True, running_epoch=None)

    def _on_ForgetReplica(self, a: ForgetReplica) -> None:
        r = self.replicas.pop((a.deployment, a.replica))
        assert r.removing

    def _on_SetPhase(self, a: SetPhase) -> None:
        st = self.status(a.deployment)
        self.statuses[a.deployment] = replace(
            st,
            phase=a.phase,
            reason=a.reason,
            message=a.message,
            ready_replicas=a.ready_replicas,
            observed_generation=a.observed_generation,
        )

    def _on_SetCondition(self, a: SetCondition) -> None:
        st = self.status(a.deployment)
        others = tuple(c for c in st.conditions if c.type is not a.condition.type)
        self.statuses[a.deployment] = replace(st, conditions=(*others, a.condition))

    def _on_RecordEvent(self, a: RecordEvent) -> None:
        self.events.append(a)

    def _on_MarkNodeNotReady(self, a: MarkNodeNotReady) -> None:
        self.nodes[a.node] = replace(self.nodes[a.node], ready=False)

    def _on_MarkNodeReady(self, a: MarkNodeReady) -> None:
        self.nodes[a.node] = replace(self.nodes[a.node], ready=True)

    def _on_DeleteDeployment(self, a: DeleteDeployment) -> None:
        assert not any(r.deployment == a.deployment for r in self.replicas.values())
        self.targets.pop(a.deployment)
        self.statuses.pop(a.deployment, None)


def phases(events: Sequence[RecordEvent], name: str) -> list[str]:
    """The phase names a deployment went through, from its transition events."""
    known = {p.value for p in Phase}
    return [e.reason for e in events if e.deployment == name and e.reason in known]
