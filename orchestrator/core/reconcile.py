"""The reconciler: desired state, observed state and a time in; a list of actions out.

`reconcile(desired, observed, now)` never raises on purpose, never reads a clock and never
acts: like Ray Serve's `deployment_state.py` it compares target with current state and returns
decisions, and the controller executes them through its ports (store, agent gateway, runtime).
It holds no memory between calls — everything it needs is in `Observed` — so a control plane
restarted from its store decides exactly what the old one would have.

One pass, in order:

1. **Nodes**: a node whose heartbeat is older than `CoreSettings.heartbeat_timeout` becomes
   NotReady (`MarkNodeNotReady`), one heard from again Ready.
2. **Deployments**, by name. For each:

   * Replicas marked removing are drained: their shards are unloaded from live chips, then the
     replica is forgotten. Until then their chips stay taken.
   * A delete removes every replica, then (nothing left) `DeleteDeployment`.
   * **Failover.** A replica with a chip that failed (its agent reported it, or the control
     plane fenced it) or on a node that is gone (heartbeats lost; the runtime reported the
     agent dead, which marks its chips failed at once) moves only the stages on those chips
     (`MoveStages`, see `_Pass.failover`): the incremental re-plan of `placement.replan`
     picks replacements on the same node, then the same rack, then other racks (reserved
     spares first); the moved stages' shards (the same blobs: a shard holds no placement)
     load onto the new chips, and the whole replica resynchronizes at a new epoch. Each
     move is one restart of the replica: at most `failover.maxRestarts` in a streak (moves
     each within `CoreSettings.restart_window`, 10 min, of the one before), the n-th of a
     streak not before `backoffSeconds` × 2^(n−2) after the one before (the first at once);
     past the budget the replica is Failed and kept as it is. Only when no chip can take a
     lost stage is the whole replica removed and a new one placed (the safe fallback), if
     one fits; if not, it waits for chips (reason NoSpare) and moves when some appear. The
     deployment is Degraded meanwhile (reason FailingOver, BackOff, ReplicaLost or NoSpare;
     events StagesMoved, Degraded, Ready).
   * **Scaling**: too many replicas of the current template → remove the excess, replicas
     not yet ready first, then the highest index; too few → place the missing ones (all in
     one plan, so a fresh deployment gets exactly the plan `lpuctl plan` shows; if they do
     not all fit, as many as fit one at a time). Other replicas are never touched.
   * **Rolling replacement** (model, precision, context, batch or parallelism changed: the
     replica's template differs): one replica at a time. While a new replica is not yet
     ready, nothing else moves. Then, if a new replica fits beside the old ones, it is placed
     (a surge of one replica, only when the chips are free); if not, one old replica is removed
     first and the new one placed in its chips — so a rollout never *needs* more chips than
     the deployment holds. When a new replica is ready, an old one is removed.
   * **Bring-up** of each replica, one step per pass: Compile → Load (every chip whose shard is
     not committed and not in flight, when the chip's free SRAM holds it) → Configure →
     StartEpoch. A replica that was configured or running and finds a shard missing (its
     agent restarted) moves to a new epoch (`BumpEpoch`) and comes back through the same
     steps: a pipeline never resumes an epoch some of its chips forgot. A failed step
     (recorded by the controller as `failures`) is retried after an exponential backoff
     (`backoffSeconds` × 2^(failures−1), capped); past `maxRestarts` failures the
     deployment is Failed.
   * **Placement** plans against free chips only (`orchestrator.core.cluster`): chips of any
     replica, holding any shard, cordoned, failed or on NotReady nodes are excluded, and spares
     are kept. With `spread: rack` a new replica avoids the racks the deployment's other
     replicas use. A deployment that cannot be placed stays Pending with the planner's numbers
     in its status and one Warning event `Unplaceable` with those numbers (again only when
     the generation or the numbers change, never once per pass); the others are reconciled
     as usual.
   * **Delete** of a deployment ends with an event `Deleted`, also for one never placed.
   * **Status**: phase, ready replicas and the conditions are computed and written only when
     they change; every phase change and condition status change is an event.

3. **Garbage**: a committed shard on a live chip that no replica claims is unloaded.

Phases: Deleting; Failed (maxRestarts exhausted, or the spec cannot be planned on this
cluster's hardware at all); Ready (spec.replicas replicas of the current spec running); Degraded
(at least one replica serves, but fewer than spec.replicas of the current spec — scaling up, a
rollout, a lost replica, an unplaceable replica); Pending (nothing placed and nothing fits);
otherwise the earliest step any replica is at (Placing, Compiling, Loading, Synchronizing).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace

from orchestrator.core.actions import (
    Action,
    BumpEpoch,
    Compile,
    Configure,
    DeleteDeployment,
    ForgetReplica,
    Load,
    MarkNodeNotReady,
    MarkNodeReady,
    MoveStages,
    Place,
    PlacedReplica,
    PlanDrain,
    RecordEvent,
    RemoveReplica,
    SetCondition,
    SetPhase,
    StartEpoch,
    Unload,
)
from orchestrator.core.cluster import ClusterView
from orchestrator.core.model import (
    PROGRESS_ORDER,
    ChipHealth,
    Condition,
    ConditionStatus,
    ConditionType,
    CoreSettings,
    DeploymentStatus,
    DeploymentTarget,
    HeldShard,
    Observed,
    Phase,
    Replica,
)
from placement.cost import Prediction
from placement.errors import InputError, Unplaceable
from placement.plan import Plan, StagePlan
from placement.planner import make_plan
from placement.replan import Replan, replan_failed

DEFAULT_SETTINGS = CoreSettings()

NORMAL = "Normal"
WARNING = "Warning"


def reconcile(
    desired: Sequence[DeploymentTarget],
    observed: Observed,
    now: float,
    settings: CoreSettings = DEFAULT_SETTINGS,
    *,
    frozen: Collection[str] = (),
) -> list[Action]:
    """The actions that move `observed` toward `desired` at time `now` (module docstring).

    Replicas of a deployment missing from `desired` are orphans and get removed — unless the
    deployment is named in `frozen`: a stored deployment whose spec cannot be read right now
    (`orchestrator.targets.Unreadable`) keeps serving untouched instead of being torn down.
    """
    run = _Pass(observed, now, settings)
    actions = run.nodes()
    names = set(frozen)
    for target in sorted(desired, key=lambda t: t.name):
        names.add(target.name)
        actions += run.deployment(target)
    for name in sorted({r.deployment for r in observed.replicas} - names):
        actions += run.orphan(name)
    actions += run.garbage()
    return actions


def replica_plan(replica: Replica, target: DeploymentTarget, profile_name: str) -> Plan:
    """A one-replica `Plan` of `replica`'s stages, for the shard compiler.

    The compiler checks that replicas 0..n-1 each tile the model, so the stages are
    renumbered to replica 0: the caller sets the replica index back on the chip bindings.
    """
    stages = tuple(replace(s, replica=0) for s in replica.stages)
    req = target.request
    return Plan(
        deployment=target.name,
        model=req.model.name,
        precision=req.precision,
        profile=profile_name,
        max_context=req.max_context,
        max_batch=req.max_batch,
        replicas=1,
        tensor_parallel=len(stages[0].chips) if stages else 0,
        pipeline_stages=len(stages),
        stages=stages,
        spares=replica.spares,
        chips_used=len(replica.chips),
        chips_lower_bound=0,
        sram_bytes_needed=sum(s.sram_bytes_per_chip * len(s.chips) for s in stages),
        predicted=Prediction(0.0, 0.0, 0.0, 0.0),
        notes=(f"replica {replica.index} of {target.name}",),
    )


def loading_progress(deployment: str, observed: Observed) -> tuple[int, int]:
    """(bytes loaded, bytes in all) of the deployment's compiled shards on their chips.

    Committed shards count in full, loads in flight by their progress; what `describe` and
    the progress bars show.
    """
    held: dict[tuple[str, str], HeldShard] = {(h.chip, h.shard_id): h for h in observed.held}
    loaded = total = 0
    for replica in observed.replicas:
        if replica.deployment != deployment or replica.removing:
            continue
        for shard in replica.shards:
            total += shard.size_bytes
            h = held.get((shard.chip, shard.shard_id))
            if h is not None:
                loaded += shard.size_bytes if h.committed else min(h.bytes_loaded, shard.size_bytes)
    return loaded, total


@dataclass
class _Step:
    """Where one replica is, and what to do next for it."""

    phase: Phase
    actions: list[Action] = field(default_factory=list)
    problem: tuple[str, str] | None = None  # (reason, message) of something blocking it
    exhausted: str | None = None  # the restart budget is spent: why
    loaded_chips: int = 0
    chips: int = 0


def _with_chips_of(replica: Replica, moved: Replan) -> tuple[StagePlan, ...]:
    """The replica's stages on the chips of `moved` (its re-plan, which numbers the replica
    0): every other field, the replica index included, stays the replica's."""
    by_index = {s.index: s for s in moved.plan.stages}
    return tuple(
        replace(s, chips=by_index[s.index].chips, refs=by_index[s.index].refs)
        for s in replica.stages
    )


def _describe_moves(moves: Iterable[tuple[int, tuple[str, ...], tuple[str, ...]]]) -> str:
    return "; ".join(f"stage {i} {', '.join(frm)} -> {', '.join(to)}" for i, frm, to in moves)


@dataclass
class _Failover:
    """What `_Pass.failover` decided for a replica that lost chips: its actions, the step it
    shows this pass (None: the replica is removed and replaced), and a problem for status."""

    actions: list[Action] = field(default_factory=list)
    step: _Step | None = None
    problem: tuple[str, str] | None = None


@dataclass
class _Placement:
    replicas: list[PlacedReplica] = field(default_factory=list)
    plan: Plan | None = None
    unplaceable: str | None = None
    invalid: str | None = None


class _Pass:
    """One reconcile pass: lookups over the observed state and what was decided so far."""

    def __init__(self, observed: Observed, now: float, settings: CoreSettings) -> None:
        self.observed = observed
        self.now = now
        self.settings = settings
        self.view = ClusterView(observed, now, settings)
        self.held: dict[str, list[HeldShard]] = defaultdict(list)
        for h in observed.held:
            self.held[h.chip].append(h)
        self.claimed = {(s.chip, s.shard_id) for r in observed.replicas for s in r.shards}
        self.unloading: set[tuple[str, str]] = set()
        self.reserving: dict[str, int] = defaultdict(int)  # chip -> bytes of loads decided now

    def event(
        self,
        reason: str,
        message: str,
        *,
        deployment: str | None = None,
        node: str | None = None,
        kind: str = NORMAL,
    ) -> RecordEvent:
        return RecordEvent(deployment, node, kind, reason, message, self.now)

    # --- nodes ----------------------------------------------------------------------------

    def nodes(self) -> list[Action]:
        actions: list[Action] = []
        timeout = self.settings.heartbeat_timeout
        for node in sorted(self.observed.nodes, key=lambda n: n.name):
            alive = node.name in self.view.alive
            if node.ready and not alive:
                why = (
                    f"no heartbeat for {self.now - node.last_heartbeat:.1f}s (timeout {timeout:g}s)"
                )
                actions.append(MarkNodeNotReady(node.name, why))
                actions.append(self.event("NodeNotReady", why, node=node.name, kind=WARNING))
            elif not node.ready and alive:
                actions.append(MarkNodeReady(node.name))
                actions.append(self.event("NodeReady", "heartbeats resumed", node=node.name))
        return actions

    # --- removal --------------------------------------------------------------------------

    def unloads(self, replica: Replica) -> list[Action]:
        """Unload the replica's committed shards from its live chips."""
        actions: list[Action] = []
        for shard in replica.shards:
            loc = self.view.chips.get(shard.chip)
            if loc is None or loc.node.name not in self.view.alive:
                continue  # gone with its node; an agent that comes back reports what it holds
            for h in self.held.get(shard.chip, ()):
                key = (h.chip, h.shard_id)
                if h.shard_id == shard.shard_id and h.committed and key not in self.unloading:
                    self.unloading.add(key)
                    actions.append(
                        Unload(loc.node.name, loc.node.address, h.chip, loc.chip.index, h.shard_id)
                    )
        return actions

    def remove(self, replica: Replica, reason: str, message: str) -> list[Action]:
        kind = WARNING if reason == "ReplicaLost" else NORMAL
        return [
            RemoveReplica(replica.deployment, replica.index, reason, message),
            *self.unloads(replica),
            self.event(reason, message, deployment=replica.deployment, kind=kind),
        ]

    def drain_removed(self, replica: Replica) -> list[Action]:
        """A removing replica: unload what is left on live chips, or forget it."""
        actions = self.unloads(replica)
        if actions:
            return actions
        for shard in replica.shards:
            loc = self.view.chips.get(shard.chip)
            if loc is None or loc.node.name not in self.view.alive:
                continue
            if any(h.shard_id == shard.shard_id for h in self.held.get(shard.chip, ())):
                return []  # a load still in flight: unload it once it commits or aborts
        return [ForgetReplica(replica.deployment, replica.index)]

    def orphan(self, name: str) -> list[Action]:
        """Replicas of a deployment the store no longer has: remove them."""
        actions: list[Action] = []
        for replica in sorted(self.mine(name), key=lambda r: r.index):
            if replica.removing:
                actions += self.drain_removed(replica)
            else:
                actions += self.remove(replica, "Orphaned", f"deployment {name} no longer exists")
        return actions

    def garbage(self) -> list[Action]:
        """Unload committed shards on live chips that no replica claims."""
        actions: list[Action] = []
        claimed = self.claimed
        stray = [
            h for h in self.observed.held if h.committed and (h.chip, h.shard_id) not in claimed
        ]
        for h in sorted(stray, key=lambda h: (h.chip, h.shard_id)):
            key = (h.chip, h.shard_id)
            if key in self.unloading:
                continue
            loc = self.view.chips.get(h.chip)
            if loc is None or loc.node.name not in self.view.alive:
                continue
            if all(c.health is ChipHealth.FAILED for c in loc.node.chips):
                continue  # its agent died (the runtime said so): the call could only fail
            self.unloading.add(key)
            actions.append(
                Unload(loc.node.name, loc.node.address, h.chip, loc.chip.index, h.shard_id)
            )
        return actions

    # --- one deployment -------------------------------------------------------------------

    def mine(self, name: str) -> list[Replica]:
        return [r for r in self.observed.replicas if r.deployment == name]

    def deployment(self, target: DeploymentTarget) -> list[Action]:
        name = target.name
        status = self.observed.status(name)
        mine = sorted(self.mine(name), key=lambda r: r.index)
        actions: list[Action] = []
        for replica in mine:
            if replica.removing:
                actions += self.drain_removed(replica)
        active = [r for r in mine if not r.removing]
        if target.deleting:
            for replica in active:
                actions += self.remove(replica, "Deleting", f"deleting deployment {name}")
            if not mine:
                # An event even for a deployment that never held a chip: `events` shows that
                # the delete went through (the store keeps events after the deployment goes).
                actions.append(
                    self.event(
                        "Deleted",
                        f"deployment {name} deleted (generation {target.generation})",
                        deployment=name,
                    )
                )
                actions.append(DeleteDeployment(name))
                return actions
            message = f"{len(mine)} replica(s) left to remove"
            actions += self.write_status(
                target,
                status,
                Phase.DELETING,
                "Deleting",
                message,
                0,
                {ConditionType.READY: (ConditionStatus.FALSE, "Deleting", message)},
            )
            return actions

        problems: list[tuple[str, str]] = []
        lost: list[Replica] = []
        held_back: dict[int, _Step] = {}
        for replica in active:
            bad = [c for c in replica.chips if not self.view.healthy(c)]
            if not bad:
                continue
            outcome = self.failover(target, replica, bad)
            actions += outcome.actions
            if outcome.problem is not None:
                problems.append(outcome.problem)
            if outcome.step is not None:
                held_back[replica.index] = outcome.step
            else:
                lost.append(replica)
        active = [r for r in active if r not in lost]

        steps = {
            r.index: held_back[r.index] if r.index in held_back else self.step(target, r)
            for r in active
        }

        def ready(r: Replica) -> bool:
            return steps[r.index].phase is Phase.READY

        def removal_order(rs: Iterable[Replica]) -> list[Replica]:
            return sorted(rs, key=lambda r: (ready(r), -r.index))

        template = target.template
        want = target.request.replicas
        up = [r for r in active if r.template == template]
        old = [r for r in active if r.template != template]
        settling = any(not ready(r) for r in up)
        removed: list[Replica] = []
        if len(up) > want:
            removed = removal_order(up)[: len(up) - want] + old
        elif old and not settling and len(up) + len(old) > want:
            removed = removal_order(old)[: len(up) + len(old) - want]
        for replica in removed:
            reason = "Replaced" if replica.template != template else "ScaledDown"
            actions += self.remove(
                replica, reason, f"removing replica {replica.index} ({reason.lower()})"
            )
        kept = [r for r in active if r not in removed]
        kept_old = [r for r in kept if r.template != template]
        missing = want - len(kept)
        placement = _Placement()
        if missing > 0:
            placement = self.place(target, kept, missing)
        elif kept_old and not settling and not removed:
            placement = self.place(target, kept, 1)
            if not placement.replicas and placement.invalid is None:
                victim = removal_order(kept_old)[0]
                message = (
                    f"no free chips for a replica of generation {target.generation} beside the "
                    f"old ones; replacing replica {victim.index} in place"
                )
                actions += self.remove(victim, "Replaced", message)
                kept.remove(victim)
                kept_old.remove(victim)
                placement = _Placement()
        if placement.unplaceable is not None:
            problems.append(("Unplaceable", placement.unplaceable))
        waiting = [detail for reason, detail in problems if reason == "NoSpare"]
        if waiting and placement.unplaceable is None:
            # A replica waiting for chips to move to is unplaced work: condition Placed is
            # False (Unplaceable, with the re-plan's numbers) and one Warning event says so.
            placement.unplaceable = waiting[0]
        if placement.replicas and placement.plan is not None:
            placed = tuple(placement.replicas)
            actions.append(Place(name, target.generation, template, placed, placement.plan))
            chips = sum(len(s.chips) for p in placed for s in p.stages)
            indices = ", ".join(str(p.index) for p in placed)
            actions.append(
                self.event(
                    "Placed",
                    f"replica(s) {indices} placed on {chips} chips "
                    f"({placement.plan.pipeline_stages} stages x tensorParallel "
                    f"{placement.plan.tensor_parallel})",
                    deployment=name,
                )
            )
        for replica in kept:
            step = steps[replica.index]
            actions += step.actions
            if step.problem is not None:
                problems.append(step.problem)
            if replica.index not in held_back:
                actions += self.drain(target, replica, step)

        actions += self.phase(target, status, kept, steps, placement, problems)
        return actions

    # --- failover -------------------------------------------------------------------------

    def failover(self, target: DeploymentTarget, replica: Replica, bad: list[str]) -> _Failover:
        """A replica with chips failed or on a node that is gone (module docstring, failover).

        In order: past the restart budget the replica is Failed and stays as it is (its
        history is in its events and `restarts`); inside the backoff after its last restart
        it waits (Degraded, reason BackOff; not while it is still recovering from its last
        move: a second loss then is the same incident); else the incremental re-plan
        (`placement.replan.replan_failed`: same node, then same rack, then other racks;
        reserved spares first) moves only the stages on the lost chips (`MoveStages`); when
        no such move exists (no spare or free chip can take a stage), the whole replica is
        removed and a new one placed — the safe fallback — when a new one fits; when it does
        not either, the replica is kept as it is and waits (Degraded, reason NoSpare, retried
        every pass: a restarted agent's chips, an uncordoned node or a repaired chip let it
        move), and the other replicas keep serving.
        """
        name = target.name
        shown = f"{', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}"
        what = f"replica {replica.index} lost {len(bad)} chip(s) ({shown}): {self.why_lost(bad)}"
        chips = len(replica.chips)
        streak = replica.restarts
        last = replica.last_restart_time
        if last is not None and self.now - last >= self.settings.restart_window:
            streak = 0  # served long enough since the last failover: a fresh budget
        if streak >= target.max_restarts:
            why = (
                f"{what}; its restart budget is spent ({streak} of maxRestarts "
                f"{target.max_restarts} used within {self.settings.restart_window:g}s of each "
                "other)"
            )
            return _Failover(step=_Step(Phase.FAILED, exhausted=why, chips=chips))
        # A loss while the replica is still coming back from its last move (it has not run
        # its new epoch yet) is the same incident: it moves at once (and counts). Backoff is
        # for a replica that came back, ran, and lost chips again.
        recovering = replica.running_epoch != replica.epoch
        if streak and last is not None and not recovering:
            delay = min(target.backoff_seconds * 2 ** (streak - 1), self.settings.backoff_max)
            if self.now < last + delay:
                problem = (
                    "BackOff",
                    f"{what}; moving its stages {delay:g}s after its last restart "
                    f"({streak} of {target.max_restarts} restarts used)",
                )
                return _Failover(step=_Step(Phase.LOADING, chips=chips), problem=problem)
        plan = replica_plan(replica, target, self.view.profile.name)
        try:
            moved = replan_failed(plan, self.view.topology, bad)
        except (Unplaceable, InputError) as exc:
            if self.whole_replica_fits(target, replica):
                message = f"{what}; no incremental move ({exc}): placing a new replica"
                return _Failover(
                    actions=self.remove(replica, "ReplicaLost", message),
                    problem=("ReplicaLost", message),
                )
            message = (
                f"{what}; no spare or free chip can take its stages ({exc}), nor a new "
                "replica fit: waiting for chips (the other replicas keep serving)"
            )
            return _Failover(step=_Step(Phase.PENDING, chips=chips), problem=("NoSpare", message))
        stages = _with_chips_of(replica, moved)
        moves = tuple((m.stage, m.from_chips, m.to_chips) for m in moved.moves)
        detail = _describe_moves(moves)
        restarts = streak + 1
        reason = f"{what}; moving {detail} (restart {restarts} of {target.max_restarts})"
        epoch = max(replica.epoch, replica.configured_epoch or 0, replica.running_epoch or 0) + 1
        self.view.occupy([replace(replica, stages=stages)])
        action = MoveStages(name, replica.index, stages, moves, epoch, restarts, reason)
        event = self.event("StagesMoved", reason, deployment=name, kind=WARNING)
        # The moved shards load in this pass, after the move is recorded (the next pass would
        # decide the same loads; at 3,736 chips a pass is a good part of a failover).
        step = _Step(Phase.LOADING, chips=chips)
        chip_map = action.chip_map()
        shards = tuple(replace(s, chip=chip_map.get(s.chip, s.chip)) for s in replica.shards)
        moved_replica = replace(replica, stages=stages, shards=shards, epoch=epoch)
        for chip in chip_map.values():
            if moved_replica.shard_for(chip) is not None:
                self.load(moved_replica, chip, step)
        return _Failover(actions=[action, event], step=step, problem=("FailingOver", reason))

    def whole_replica_fits(self, target: DeploymentTarget, replica: Replica) -> bool:
        """Whether a new replica could be placed now (the fallback when no stage can move
        on its own): honours `spread: rack` against the deployment's other replicas."""
        req = target.request
        racks = req.racks
        if req.spread == "rack":
            others = [
                r for r in self.mine(target.name) if r.index != replica.index and not r.removing
            ]
            taken = {chip.split("/", 1)[0] for r in others for chip in r.chips}
            pool = racks if racks is not None else self.view.rack_names
            racks = tuple(r for r in pool if r not in taken)
            if not racks:
                return False
        try:
            make_plan(replace(req, replicas=1, racks=racks), self.view.topology)
        except (Unplaceable, InputError):
            return False
        return True

    # --- drain ----------------------------------------------------------------------------

    def drain(self, target: DeploymentTarget, replica: Replica, step: _Step) -> list[Action]:
        """Move a replica's stages off draining nodes, make before break.

        A serving replica with chips on a draining node gets a plan (`PlanDrain`: the same
        incremental re-plan as failover, the draining chips standing for lost ones). While it
        keeps serving, the new chips are loaded with the moved stages' shards (claimed, so
        never taken for garbage); once they all hold them, `MoveStages(drain=True)` switches
        the replica over at a new epoch (Configure + StartEpoch; the gateway resumes the
        requests in flight, so none fails) and the old chips' shards become garbage,
        unloaded. No restart is counted. A plan whose new chips fail meanwhile is dropped and
        made again; a replica that cannot be moved (no room) keeps serving where it is.
        """
        name = target.name
        if replica.next_stages:
            nxt = replica.next_stages
            moves = tuple(
                (a.index, a.chips, b.chips)
                for a, b in zip(replica.stages, nxt, strict=False)
                if a.chips != b.chips
            )
            new = [c for _, _, to in moves for c in to]
            if len(nxt) != len(replica.stages) or not all(self.view.healthy(c) for c in new):
                why = "its new chips are no longer usable; planning again"
                return [
                    PlanDrain(name, replica.index, (), why),
                    self.event(
                        "DrainReplanned", f"replica {replica.index}: {why}", deployment=name
                    ),
                ]
            chip_map = {o: n for _, frm, to in moves for o, n in zip(frm, to, strict=True)}
            shards = tuple(
                replace(sh, chip=chip_map[sh.chip]) for sh in replica.shards if sh.chip in chip_map
            )
            for sh in shards:
                self.claimed.add((sh.chip, sh.shard_id))
            moved = replace(replica, stages=nxt, shards=shards)
            loading = _Step(step.phase)
            committed = 0
            for chip in new:
                shard = moved.shard_for(chip)
                if shard is None:
                    return []  # not compiled yet: wait
                held = self.held.get(chip, ())
                if any(h.shard_id == shard.shard_id and h.committed for h in held):
                    committed += 1
                else:
                    self.load(moved, chip, loading)
            if committed < len(new):
                return loading.actions
            epoch = (
                max(replica.epoch, replica.configured_epoch or 0, replica.running_epoch or 0) + 1
            )
            detail = _describe_moves(moves)
            why = f"drain: replica {replica.index} switches over at epoch {epoch}: {detail}"
            return [
                MoveStages(
                    name, replica.index, nxt, moves, epoch, replica.restarts, why, drain=True
                ),
                self.event("StagesDrained", why, deployment=name),
            ]
        draining = [
            c
            for c in replica.chips
            if (loc := self.view.chips.get(c)) is not None and loc.node.draining
        ]
        if not draining or step.phase is not Phase.READY or not replica.shards:
            return []
        plan = replica_plan(replica, target, self.view.profile.name)
        try:
            moved_plan = replan_failed(plan, self.view.topology, draining)
        except (Unplaceable, InputError):
            return []  # nowhere to go: it keeps serving here (lpuctl drain reports it)
        nxt = _with_chips_of(replica, moved_plan)
        self.view.occupy([replace(replica, stages=nxt)])
        detail = _describe_moves((m.stage, m.from_chips, m.to_chips) for m in moved_plan.moves)
        why = f"drain: replica {replica.index} loads its stages onto spares first: {detail}"
        return [
            PlanDrain(name, replica.index, nxt, why),
            self.event("DrainStarted", why, deployment=name),
        ]

    def why_lost(self, bad: list[str]) -> str:
        """Why the chips are lost, for the event: a failed chip's reason, or its node gone."""
        reasons = []
        for chip in bad:
            loc = self.view.chips.get(chip)
            if loc is None:
                why = "its node is not registered"
            elif loc.node.name not in self.view.alive:
                why = f"node {loc.node.name} is NotReady (no heartbeat)"
            else:
                why = f"chip failed: {loc.chip.reason or 'reported failed by its agent'}"
            if why not in reasons:
                reasons.append(why)
        return "; ".join(reasons)

    # --- placement ------------------------------------------------------------------------

    def place(self, target: DeploymentTarget, kept: list[Replica], count: int) -> _Placement:
        req = target.request
        out = _Placement()
        racks = req.racks
        if not self.view.rack_names:
            out.unplaceable = "no nodes have registered with the control plane"
            return out
        if req.spread == "rack":
            taken = {chip.split("/", 1)[0] for r in kept for chip in r.chips}
            pool = racks if racks is not None else self.view.rack_names
            racks = tuple(r for r in pool if r not in taken)
            if not racks:
                out.unplaceable = (
                    f"spread: rack puts every replica on racks of its own, and the "
                    f"{len(kept)} replica(s) already placed use all {len(pool)} allowed rack(s)"
                )
                return out
        plan = None
        for n in dict.fromkeys((count, 1)):
            try:
                plan = make_plan(replace(req, replicas=n, racks=racks), self.view.topology)
            except Unplaceable as exc:
                out.unplaceable = out.unplaceable or str(exc)
                continue
            except InputError as exc:
                out.invalid = str(exc)
                return out
            break
        if plan is None:
            return out
        if plan.replicas < count and out.unplaceable is not None:
            out.unplaceable = f"{count - plan.replicas} of {count} replica(s): {out.unplaceable}"
        used = {r.index for r in self.mine(target.name)}
        free = (i for i in range(len(used) + plan.replicas + 1) if i not in used)
        indices = [next(free) for _ in range(plan.replicas)]
        stages = tuple(replace(s, replica=indices[s.replica]) for s in plan.stages)
        out.plan = replace(plan, stages=stages)
        for index in indices:
            mine = tuple(s for s in stages if s.replica == index)
            out.replicas.append(PlacedReplica(index, mine, plan.spares))
        self.view.occupy(
            Replica(target.name, p.index, target.generation, "", p.stages, p.spares)
            for p in out.replicas
        )
        return out

    # --- one replica ----------------------------------------------------------------------

    def step(self, target: DeploymentTarget, replica: Replica) -> _Step:
        chips = replica.chips
        if replica.failures > target.max_restarts:
            return _Step(
                Phase.FAILED,
                exhausted=(
                    f"replica {replica.index} failed {replica.failures} times "
                    f"(maxRestarts {target.max_restarts}): {replica.last_error}"
                ),
                chips=len(chips),
            )
        committed = {
            c
            for c in chips
            if (shard := replica.shard_for(c)) is not None
            and any(h.shard_id == shard.shard_id and h.committed for h in self.held.get(c, ()))
        }
        step = _Step(Phase.COMPILING, loaded_chips=len(committed), chips=len(chips))
        if replica.failures and replica.last_failure_time is not None:
            delay = min(
                target.backoff_seconds * 2 ** (replica.failures - 1), self.settings.backoff_max
            )
            if self.now < replica.last_failure_time + delay:
                step.phase = self.progress_phase(replica, committed)
                step.problem = (
                    "BackOff",
                    f"replica {replica.index} failed ({replica.last_error}); retrying "
                    f"{delay:g}s after the failure ({replica.failures} of "
                    f"{target.max_restarts} restarts used)",
                )
                return step
        if not replica.shards or any(replica.shard_for(c) is None for c in chips):
            plan = replica_plan(replica, target, self.view.profile.name)
            step.actions.append(Compile(target.name, target.generation, replica.index, plan))
            return step
        if len(committed) < len(chips):
            step.phase = Phase.LOADING
            if replica.epoch in (replica.configured_epoch, replica.running_epoch):
                lost = len(chips) - len(committed)
                why = f"{lost} chip(s) lost their shard; reloading, then epoch {replica.epoch + 1}"
                step.actions.append(BumpEpoch(target.name, replica.index, replica.epoch + 1, why))
                step.actions.append(
                    self.event(
                        "Resynchronizing",
                        f"replica {replica.index}: {why}",
                        deployment=target.name,
                        kind=WARNING,
                    )
                )
            for chip in chips:
                if chip not in committed:
                    self.load(replica, chip, step)
            return step
        step.phase = Phase.SYNCHRONIZING
        if replica.configured_epoch != replica.epoch:
            # Configure, then StartEpoch in the same pass: they run in order and a failed
            # Configure stops the rest, so the second needs no pass of its own (at 3,736
            # chips a pass is a tenth of a second or more, and a failover waits for it).
            step.actions.append(Configure(target.name, replica.index, replica.epoch, chips))
            step.actions.append(StartEpoch(target.name, replica.index, replica.epoch))
        elif replica.running_epoch != replica.epoch:
            step.actions.append(StartEpoch(target.name, replica.index, replica.epoch))
        else:
            step.phase = Phase.READY
        return step

    def progress_phase(self, replica: Replica, committed: set[str]) -> Phase:
        if not replica.shards:
            return Phase.COMPILING
        if len(committed) < len(replica.chips):
            return Phase.LOADING
        if replica.running_epoch == replica.epoch == replica.configured_epoch:
            return Phase.READY
        return Phase.SYNCHRONIZING

    def load(self, replica: Replica, chip: str, step: _Step) -> None:
        shard = replica.shard_for(chip)
        loc = self.view.chips.get(chip)
        assert shard is not None and loc is not None  # compiled, and healthy (not lost)
        held = self.held.get(chip, ())
        if any(h.shard_id == shard.shard_id for h in held):
            return  # in flight
        others = sum(h.reserved_bytes for h in held)
        free = loc.chip.sram_bytes - others - self.reserving[chip]
        if shard.size_bytes > free:
            step.problem = (
                "InsufficientSRAM",
                f"chip {chip} has {free:,} bytes of SRAM free, its shard needs "
                f"{shard.size_bytes:,} (waiting for other shards to be unloaded)",
            )
            return
        self.reserving[chip] += shard.size_bytes
        step.actions.append(
            Load(
                replica.deployment,
                replica.index,
                loc.node.name,
                loc.node.address,
                chip,
                loc.chip.index,
                shard.shard_id,
                shard.size_bytes,
            )
        )

    # --- status ---------------------------------------------------------------------------

    def phase(
        self,
        target: DeploymentTarget,
        status: DeploymentStatus,
        kept: list[Replica],
        steps: dict[int, _Step],
        placement: _Placement,
        problems: list[tuple[str, str]],
    ) -> list[Action]:
        want = target.request.replicas
        template = target.template
        serving = sum(1 for r in kept if steps[r.index].phase is Phase.READY)
        ready_up = sum(
            1 for r in kept if r.template == template and steps[r.index].phase is Phase.READY
        )
        placed_now = len(placement.replicas)
        exhausted = [s.exhausted for r in kept if (s := steps[r.index]).exhausted]
        old = any(r.template != template for r in kept)
        summary = f"{ready_up} of {want} replica(s) of generation {target.generation} ready"
        if placement.invalid is not None:
            phase, reason, message = Phase.FAILED, "InvalidForCluster", placement.invalid
        elif exhausted:
            phase, reason, message = Phase.FAILED, "RestartsExhausted", exhausted[0]
        elif ready_up == want and not old and not placed_now and len(kept) == want:
            phase, reason, message = Phase.READY, "Ready", summary
        elif serving:
            phase = Phase.DEGRADED
            if problems:
                reason, detail = problems[0]
                message = f"{summary}; {detail}"
            else:
                reason = "RollingUpdate" if old else "ReplicasNotReady"
                message = summary
        elif not kept and not placed_now and placement.unplaceable is not None:
            phase, reason, message = Phase.PENDING, "Unplaceable", placement.unplaceable
        else:
            candidates = [
                steps[r.index].phase for r in kept if steps[r.index].phase is not Phase.READY
            ]
            candidates += [Phase.PLACING] * placed_now
            if placement.unplaceable is not None:
                candidates.append(Phase.PENDING)
            phase = min(candidates, key=PROGRESS_ORDER.index, default=Phase.PENDING)
            reason = phase.value
            message = summary
            if problems:
                reason, detail = problems[0]
                message = f"{summary}; {detail}"

        chips = sum(steps[r.index].chips for r in kept) + sum(
            len(s.chips) for p in placement.replicas for s in p.stages
        )
        loaded = sum(steps[r.index].loaded_chips for r in kept)
        placed_count = len(kept) + placed_now
        conditions: dict[ConditionType, tuple[ConditionStatus, str, str]] = {}
        if placed_count >= want and placement.unplaceable is None:
            conditions[ConditionType.PLACED] = (
                ConditionStatus.TRUE,
                "Placed",
                f"{placed_count} replica(s) on {chips} chips",
            )
        elif placement.unplaceable is not None:
            conditions[ConditionType.PLACED] = (
                ConditionStatus.FALSE,
                "Unplaceable",
                placement.unplaceable,
            )
        else:
            conditions[ConditionType.PLACED] = (
                ConditionStatus.FALSE,
                "Placing",
                f"{placed_count} of {want} replica(s) placed",
            )
        all_loaded = chips > 0 and loaded == chips and not placed_now
        conditions[ConditionType.LOADED] = (
            ConditionStatus.TRUE if all_loaded else ConditionStatus.FALSE,
            "Loaded" if all_loaded else "Loading",
            f"{loaded} of {chips} chips hold their shard",
        )
        synced = bool(kept) and serving == len(kept) and not placed_now
        conditions[ConditionType.SYNCHRONIZED] = (
            ConditionStatus.TRUE if synced else ConditionStatus.FALSE,
            "Synchronized" if synced else "NotSynchronized",
            f"{serving} of {len(kept) + placed_now} replica(s) running their epoch",
        )
        conditions[ConditionType.READY] = (
            ConditionStatus.TRUE if phase is Phase.READY else ConditionStatus.FALSE,
            reason,
            message,
        )
        conditions[ConditionType.DEGRADED] = (
            ConditionStatus.TRUE if phase is Phase.DEGRADED else ConditionStatus.FALSE,
            reason if phase is Phase.DEGRADED else "NotDegraded",
            message if phase is Phase.DEGRADED else "",
        )
        actions = self.unplaceable_event(target, status, placement)
        actions += self.write_status(target, status, phase, reason, message, serving, conditions)
        return actions

    def unplaceable_event(
        self, target: DeploymentTarget, status: DeploymentStatus, placement: _Placement
    ) -> list[Action]:
        """A Warning event with the planner's numbers when a replica cannot be placed.

        Once per generation and per change of the planner's message, not once per pass: the
        stored Placed condition already carries the last message, so the pure core compares
        against it instead of remembering anything (an unplaceable deployment is re-planned
        on every pass, and an event each time would bury every other event).
        """
        why = placement.unplaceable
        if why is None:
            return []
        before = status.condition(ConditionType.PLACED)
        if (
            before is not None
            and before.reason == "Unplaceable"
            and before.message == why
            and before.observed_generation == target.generation
        ):
            return []
        return [self.event("Unplaceable", why, deployment=target.name, kind=WARNING)]

    def write_status(
        self,
        target: DeploymentTarget,
        status: DeploymentStatus,
        phase: Phase,
        reason: str,
        message: str,
        ready_replicas: int,
        conditions: dict[ConditionType, tuple[ConditionStatus, str, str]],
    ) -> list[Action]:
        """SetPhase / SetCondition for what changed, and an event for every transition."""
        name = target.name
        actions: list[Action] = []
        new = (phase, reason, message, ready_replicas, target.generation)
        old = (
            status.phase,
            status.reason,
            status.message,
            status.ready_replicas,
            status.observed_generation,
        )
        if new != old:
            actions.append(
                SetPhase(name, phase, reason, message, ready_replicas, target.generation)
            )
        if phase is not status.phase:
            kind = WARNING if phase in (Phase.FAILED, Phase.DEGRADED) else NORMAL
            actions.append(
                self.event(
                    phase.value,
                    f"{status.phase.value} -> {phase.value}: {message}",
                    deployment=name,
                    kind=kind,
                )
            )
        for kind_, (cstatus, creason, cmessage) in conditions.items():
            before = status.condition(kind_)
            if (
                before is not None
                and before.status is cstatus
                and before.reason == creason
                and before.message == cmessage
                and before.observed_generation == target.generation
            ):
                continue
            changed = before is None or before.status is not cstatus
            when = self.now if changed or before is None else before.last_transition_time
            cond = Condition(kind_, cstatus, creason, cmessage, when, target.generation)
            actions.append(SetCondition(name, cond))
            if before is not None and before.status is not cstatus:
                actions.append(
                    self.event(
                        f"{kind_.value}{cstatus.value}",
                        f"condition {kind_.value} is now {cstatus.value}: {creason}",
                        deployment=name,
                    )
                )
        return actions
