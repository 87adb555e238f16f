"""The pure reconciler, step by step, against the simulated world of `core_world`."""

from __future__ import annotations

from dataclasses import replace

import pytest
from core_world import World, make_nodes, phases, target

from orchestrator.core import (
    Chip,
    ChipHealth,
    Compile,
    ConditionStatus,
    ConditionType,
    Configure,
    CoreSettings,
    HeldShard,
    Load,
    MarkNodeNotReady,
    NodeState,
    Phase,
    Place,
    RemoveReplica,
    SetPhase,
    Unload,
    cluster_topology,
    loading_progress,
    node_state,
    reconcile,
    replica_plan,
)
from placement.topology import ChipState


def world(racks: int = 2, nodes: int = 3) -> World:
    return World(make_nodes(racks, nodes))


def test_fresh_deployment_walks_every_phase_to_ready() -> None:
    w = world()
    w.targets["a"] = target("a", replicas=2)
    w.run()
    assert phases(w.events, "a") == ["Placing", "Compiling", "Loading", "Synchronizing", "Ready"]
    st = w.status("a")
    assert (st.phase, st.ready_replicas, st.observed_generation) == (Phase.READY, 2, 1)
    for kind in (ConditionType.PLACED, ConditionType.LOADED, ConditionType.SYNCHRONIZED):
        cond = st.condition(kind)
        assert cond is not None and cond.status is ConditionStatus.TRUE, cond
    ready = st.condition(ConditionType.READY)
    degraded = st.condition(ConditionType.DEGRADED)
    assert ready is not None and ready.status is ConditionStatus.TRUE
    assert degraded is not None and degraded.status is ConditionStatus.FALSE
    assert loading_progress("a", w.observed())[0] == loading_progress("a", w.observed())[1] > 0
    # Idempotent: at the fixed point another pass (later) decides nothing.
    assert reconcile(list(w.targets.values()), w.observed(), w.now + 1.0) == []


def test_condition_transition_time_kept_when_only_the_message_changes() -> None:
    w = world()
    w.targets["a"] = target("a")
    w.step()  # placed
    placed = w.status("a").condition(ConditionType.PLACED)
    assert placed is not None and placed.status is ConditionStatus.TRUE
    w.run()
    after = w.status("a").condition(ConditionType.PLACED)
    assert after is not None and after.last_transition_time == placed.last_transition_time


def test_scale_up_and_down_never_touch_the_other_replicas() -> None:
    w = world()
    w.targets["a"] = target("a", replicas=1)
    w.run()
    first = w.replicas[("a", 0)]
    w.log.clear()
    w.targets["a"] = target("a", replicas=3, generation=2)
    while w.step():
        assert w.running(w.replicas[("a", 0)]), "replica 0 stopped serving while scaling up"
    assert w.status("a").phase is Phase.READY and w.serving("a") == 3
    touching_0 = [
        a
        for a in w.log
        if (getattr(a, "replica", None) == 0 and not isinstance(a, SetPhase))
        or (isinstance(a, Load | Unload) and a.chip in first.chips)
    ]
    assert touching_0 == []
    assert w.replicas[("a", 0)] == first
    w.log.clear()
    w.targets["a"] = target("a", replicas=1, generation=3)
    w.run()
    removed = {a.replica for a in w.log if isinstance(a, RemoveReplica)}
    assert removed == {1, 2}
    assert set(w.replicas) == {("a", 0)} and w.replicas[("a", 0)] == first
    # Their SRAM is free again: only replica 0's shards are held.
    assert {h.chip for h in w.held.values()} == set(first.chips)


def test_precision_change_replaces_replicas_one_at_a_time_in_a_tight_cluster() -> None:
    # 2 nodes of 3 working chips: two fp16 replicas (3 chips each) leave no chip free, so
    # the rollout cannot surge and must replace in place.
    nodes = make_nodes(2, 1)
    for name, node in nodes.items():
        chips = (*node.chips[:3], Chip(3, node.chips[3].sram_bytes, ChipHealth.FAILED))
        nodes[name] = replace(node, chips=chips)
    w = World(nodes)
    w.targets["a"] = target("a", replicas=2)
    w.run()
    old_chips = w.chips_of("a")
    assert old_chips == 6
    w.targets["a"] = target("a", replicas=2, precision="int8", generation=2)
    new_template = w.targets["a"].template
    for _ in range(80):
        actions = w.step()
        # Never twice the chips: never more than the deployment held (there is no more).
        assert w.chips_of("a") <= old_chips
        assert w.serving("a") >= 1, "a rollout must keep a replica serving"
        if not actions:
            break
    assert w.status("a").phase is Phase.READY
    assert {r.template for r in w.replicas.values()} == {new_template}
    assert w.serving("a") == 2


def test_precision_change_surges_one_replica_when_there_is_room() -> None:
    w = World(make_nodes(3, 2))
    w.targets["a"] = target("a", replicas=2)
    w.run()
    w.targets["a"] = target("a", replicas=2, precision="int8", generation=2)
    peak_serving = []
    for _ in range(80):
        actions = w.step()
        peak_serving.append(w.serving("a"))
        if not actions:
            break
    # With room for a surge replica, two replicas serve on every pass of the rollout.
    assert min(peak_serving) >= 2
    assert w.status("a").phase is Phase.READY


def test_unplaceable_deployment_stays_pending_with_numbers_others_serve() -> None:
    w = World(make_nodes(1, 2))  # 8 chips
    w.targets["big"] = target("big", replicas=5)  # 15 chips
    w.targets["small"] = target("small", replicas=1)
    w.run()
    big, small = w.status("big"), w.status("small")
    assert small.phase is Phase.READY
    # As many as fit are placed one at a time; the rest wait with the planner's numbers.
    assert big.phase in (Phase.DEGRADED, Phase.PENDING)
    placed = big.condition(ConditionType.PLACED)
    assert placed is not None and placed.status is ConditionStatus.FALSE
    assert placed.reason == "Unplaceable" and "chips" in placed.message and "free" in placed.message


def test_nothing_fits_is_pending_and_stores_nothing() -> None:
    nodes = make_nodes(1, 1)
    node = nodes["rack-0/node-0"]
    failed = tuple(Chip(i, c.sram_bytes, ChipHealth.FAILED) for i, c in enumerate(node.chips))
    nodes[node.name] = replace(node, chips=(*node.chips[:2], *failed[2:]))
    w = World(nodes)
    w.targets["big"] = target("big", replicas=1)  # 3 chips, 2 healthy
    w.run()
    st = w.status("big")
    assert st.phase is Phase.PENDING and st.reason == "Unplaceable"
    assert "needs" in st.message and w.replicas == {}


def unplaceable_events(w: World, name: str) -> list[str]:
    return [e.message for e in w.events if e.deployment == name and e.reason == "Unplaceable"]


def test_unplaceable_is_one_warning_event_with_numbers_not_one_per_pass() -> None:
    w = World(make_nodes(1, 1))  # 4 chips
    w.targets["big"] = target("big", replicas=2)  # 6 chips: one replica fits, the other not
    w.run()
    events = [e for e in w.events if e.deployment == "big" and e.reason == "Unplaceable"]
    # One event per distinct message: "1 of 2 replica(s): needs 6 chips ... 4 free" when
    # planning both, then "needs 3 chips ... 1 free" once the first replica holds its chips.
    assert [e.message for e in events] == [
        "1 of 2 replica(s): needs 6 chips (2 replica(s) x 3 stages x tensorParallel 1), "
        "4 free in 1 racks",
        "needs 3 chips (1 replica(s) x 3 stages x tensorParallel 1), 1 free in 1 racks",
    ]
    assert all(e.kind == "Warning" for e in events)
    placed = w.status("big").condition(ConditionType.PLACED)
    assert placed is not None and placed.message == events[-1].message
    # Further passes re-plan and fail the same way, and record nothing more.
    for _ in range(5):
        assert w.step() == []
    assert len(unplaceable_events(w, "big")) == 2
    # A new generation that still does not fit the same way says so again, once.
    w.targets["big"] = target("big", replicas=2, generation=2)
    w.run()
    assert unplaceable_events(w, "big")[2:] == [events[-1].message]
    # Room appears (a second node registers): the numbers change, then it is placed; a
    # placeable deployment records no further Unplaceable event.
    w.nodes.update(make_nodes(1, 3, now=w.now))
    w.targets["big"] = target("big", replicas=2, generation=3)
    w.run()
    assert len(unplaceable_events(w, "big")) == 3
    assert w.status("big").phase is Phase.READY


def test_never_placed_pending_deployment_records_unplaceable_then_deleted() -> None:
    w = World(make_nodes(1, 1))
    w.targets["big"] = target("big", replicas=1, tensor_parallel=8)  # wider than any node
    w.run()
    st = w.status("big")
    assert st.phase is Phase.PENDING and w.replicas == {}
    (why,) = unplaceable_events(w, "big")
    assert why == st.message
    w.targets["big"] = target("big", replicas=1, tensor_parallel=8, deleting=True)
    w.run()
    assert "big" not in w.targets
    deleted = [e for e in w.events if e.deployment == "big" and e.reason == "Deleted"]
    assert len(deleted) == 1 and "big" in deleted[0].message


def test_delete_of_a_placed_deployment_ends_with_a_deleted_event() -> None:
    w = world()
    w.targets["a"] = target("a", replicas=1)
    w.run()
    w.targets["a"] = target("a", replicas=1, deleting=True)
    w.run()
    reasons = [e.reason for e in w.events if e.deployment == "a"]
    assert reasons[-1] == "Deleted" and reasons.count("Deleted") == 1
    assert "Unplaceable" not in reasons


def test_dead_node_is_marked_not_ready_and_its_stages_moved_off_it() -> None:
    w = world(2, 3)
    w.targets["a"] = target("a", replicas=1)
    w.run()
    lost_node = w.replicas[("a", 0)].chips[0].rpartition("/chip-")[0]
    w.silent.add(lost_node)
    w.now += 3.0
    w.run()
    assert any(isinstance(a, MarkNodeNotReady) and a.node == lost_node for a in w.log)
    assert not w.nodes[lost_node].ready
    assert node_state(w.nodes[lost_node], w.now, CoreSettings()) is NodeState.NOT_READY
    assert w.status("a").phase is Phase.READY
    (replica,) = w.replicas.values()
    assert all(not c.startswith(lost_node + "/") for c in replica.chips)
    assert any(e.reason == "StagesMoved" for e in w.events)  # tests/test_core_failover.py


def test_cordoned_node_and_failed_chip_are_never_placed_on() -> None:
    nodes = make_nodes(1, 2)
    nodes["rack-0/node-0"] = replace(nodes["rack-0/node-0"], cordoned=True)
    chips = list(nodes["rack-0/node-1"].chips)
    chips[0] = Chip(0, chips[0].sram_bytes, ChipHealth.FAILED, "ecc")
    nodes["rack-0/node-1"] = replace(nodes["rack-0/node-1"], chips=tuple(chips))
    w = World(nodes)
    topo = cluster_topology(w.observed(), 0.0, CoreSettings())
    assert topo.count_states()[ChipState.FREE] == 3
    w.targets["a"] = target("a", replicas=1)
    w.run()
    assert set(w.replicas[("a", 0)].chips) == {f"rack-0/node-1/chip-{i}" for i in (1, 2, 3)}
    assert node_state(w.nodes["rack-0/node-0"], w.now, CoreSettings()) is NodeState.CORDONED


def test_delete_unloads_everything_then_forgets_the_deployment() -> None:
    w = world()
    w.targets["a"] = target("a", replicas=2)
    w.run()
    w.targets["a"] = target("a", replicas=2, deleting=True)
    w.run()
    assert "a" not in w.targets and w.replicas == {} and w.held == {}
    assert "Deleting" in phases(w.events, "a")


def test_failed_compile_backs_off_then_fails_after_max_restarts() -> None:
    w = world()
    w.fail_compiles.add("a")
    w.targets["a"] = target("a", max_restarts=2)
    # A replica backing off asks for nothing: the controller's periodic pass wakes it.
    for _ in range(40):
        w.step(0.5)
    st = w.status("a")
    assert st.phase is Phase.FAILED and st.reason == "RestartsExhausted"
    assert "weights missing" in st.message
    compiles = [a for a in w.log if isinstance(a, Compile)]
    assert len(compiles) == 3  # the first try and two restarts
    assert any(e.reason == "Failed" and e.kind == "Warning" for e in w.events)


def test_backoff_delays_the_retry() -> None:
    w = world()
    w.fail_compiles.add("a")
    w.targets["a"] = target("a")
    w.step()  # place
    w.step()  # compile fails at t
    failed_at = w.now
    # Within backoffSeconds (1 s) no new compile.
    for _ in range(5):
        actions = w.step(0.1)
        assert not any(isinstance(a, Compile) for a in actions)
    assert w.status("a").reason == "BackOff"
    w.fail_compiles.clear()
    w.now = failed_at + 1.0
    w.run()
    assert w.status("a").phase is Phase.READY


def test_restart_adopts_loaded_replicas_and_collects_stray_shards() -> None:
    w = world()
    w.targets["a"] = target("a")
    w.run()
    # A stray shard no replica claims, on a free chip; and a "restarted" control plane.
    w.held[("rack-1/node-2/chip-0", "stray")] = HeldShard(
        "rack-1/node-2/chip-0", "stray", 1000, 1000, 1000, True
    )
    actions = reconcile(list(w.targets.values()), w.observed(), w.now)
    assert actions == [
        Unload(
            "rack-1/node-2", w.nodes["rack-1/node-2"].address, "rack-1/node-2/chip-0", 0, "stray"
        )
    ]


def test_a_load_in_flight_is_not_started_again() -> None:
    w = world()
    w.targets["a"] = target("a")
    for _ in range(2):
        w.step()  # place, compile
    r = w.replicas[("a", 0)]
    s = r.shards[0]
    w.held[(s.chip, s.shard_id)] = HeldShard(
        s.chip, s.shard_id, s.size_bytes, 10, s.size_bytes, False
    )
    actions = reconcile(list(w.targets.values()), w.observed(), w.now)
    loads = [a for a in actions if isinstance(a, Load)]
    assert {a.chip for a in loads} == set(r.chips) - {s.chip}
    assert loading_progress("a", w.observed()) == (10, sum(x.size_bytes for x in r.shards))


def test_sram_too_small_waits_instead_of_overfilling() -> None:
    w = world()
    w.targets["a"] = target("a")
    for _ in range(2):
        w.step()
    r = w.replicas[("a", 0)]
    chip = r.chips[0]
    # Something else (not yet unloaded) fills the chip.
    w.held[(chip, "other")] = HeldShard(chip, "other", 8 << 20, 8 << 20, 8 << 20, False)
    actions = reconcile(list(w.targets.values()), w.observed(), w.now)
    assert not any(isinstance(a, Load) and a.chip == chip for a in actions)
    assert any(isinstance(a, SetPhase) and a.reason == "InsufficientSRAM" for a in actions)


def test_spread_rack_places_replicas_on_racks_of_their_own() -> None:
    w = world(3, 2)
    w.targets["a"] = target("a", replicas=3, spread="rack")
    w.run()
    racks = [{c.split("/")[0] for c in r.chips} for r in w.replicas.values()]
    assert all(len(rs) == 1 for rs in racks) and len(set.union(*racks)) == 3
    # A fourth replica has no rack of its own left: unplaceable, the three keep serving.
    w.targets["a"] = target("a", replicas=4, spread="rack", generation=2)
    w.run()
    st = w.status("a")
    assert st.phase is Phase.DEGRADED and st.reason == "Unplaceable"
    assert st.ready_replicas == 3


def test_spares_are_kept_free_across_deployments() -> None:
    w = world(1, 3)
    w.targets["a"] = target("a", spares=1)
    w.run()
    spares = set(w.replicas[("a", 0)].spares)
    assert spares == {f"rack-0/node-2/chip-{i}" for i in range(4)}
    w.targets["b"] = target("b", replicas=2)  # 6 chips: only 5 free outside the spare node
    w.run()
    held_b = {c for r in w.replicas.values() if r.deployment == "b" for c in r.chips}
    assert not held_b & spares


def test_invalid_for_the_cluster_is_failed() -> None:
    w = world()
    w.targets["a"] = target("a", tensor_parallel=3)
    w.run()
    st = w.status("a")
    assert st.phase is Phase.FAILED and st.reason == "InvalidForCluster"
    assert "tensorParallel" in st.message


def test_orphaned_replicas_are_removed() -> None:
    w = world()
    w.targets["a"] = target("a")
    w.run()
    del w.targets["a"]
    w.run()
    assert w.replicas == {} and w.held == {}


def test_a_replica_that_lost_a_shard_resynchronizes_at_a_new_epoch() -> None:
    w = world()
    w.targets["a"] = target("a", replicas=2)
    w.run()
    r0 = w.replicas[("a", 0)]
    gone = r0.shards[1]
    del w.held[(gone.chip, gone.shard_id)]  # its agent restarted: the chip came back empty
    w.log.clear()
    w.step()
    assert w.status("a").phase is Phase.DEGRADED and w.status("a").ready_replicas == 1
    w.run()
    assert w.status("a").phase is Phase.READY
    assert w.replicas[("a", 0)].epoch == 1 and w.replicas[("a", 1)].epoch == 0
    loads = [a for a in w.log if isinstance(a, Load)]
    assert [(a.chip, a.shard_id) for a in loads] == [(gone.chip, gone.shard_id)]
    configures = [(a.replica, a.epoch) for a in w.log if isinstance(a, Configure)]
    assert configures == [(0, 1)]


def test_frozen_deployments_keep_their_replicas() -> None:
    w = world()
    w.targets["a"] = target("a")
    w.run()
    held = dict(w.held)
    # The stored spec of "a" cannot be read right now: it is frozen, not an orphan.
    assert reconcile([], w.observed(), w.now, frozen={"a"}) == []
    assert w.held == held


def test_node_comes_back_ready() -> None:
    w = world(1, 2)
    w.silent.add("rack-0/node-0")
    w.now = 5.0
    w.step()
    assert not w.nodes["rack-0/node-0"].ready
    w.silent.clear()
    w.step()
    assert w.nodes["rack-0/node-0"].ready
    assert [e.reason for e in w.events] == ["NodeNotReady", "NodeReady"]


def test_configure_follows_loads_and_carries_the_epoch() -> None:
    w = world()
    w.targets["a"] = target("a")
    w.run()
    configures = [a for a in w.log if isinstance(a, Configure)]
    assert len(configures) == 1 and configures[0].epoch == 0
    assert configures[0].chips == w.replicas[("a", 0)].chips
    places = [a for a in w.log if isinstance(a, Place)]
    assert len(places) == 1 and places[0].generation == 1


def test_replica_plan_is_a_one_replica_plan_the_compiler_accepts() -> None:
    from orchestrator.compiler import check_plan

    w = world()
    w.targets["a"] = target("a", replicas=2)
    w.run()
    t = w.targets["a"]
    plan = replica_plan(w.replicas[("a", 1)], t, "sim")
    assert plan.replicas == 1 and all(s.replica == 0 for s in plan.stages)
    check_plan(plan, t.request.model)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        CoreSettings(heartbeat_interval=1.0, heartbeat_timeout=0.5)


def test_a_pass_over_1305_nodes_is_quick() -> None:
    """The largest published system (145 racks of 9 nodes, groq-rack chips) with two
    deployments serving: the steady-state pass the controller runs every heartbeat period."""
    import time

    from orchestrator.core import DeploymentTarget
    from placement.models import model_preset
    from placement.planner import PlanRequest
    from placement.profiles import GROQ_RACK

    w = World(make_nodes(145, 9, GROQ_RACK), profile=GROQ_RACK)
    for name, preset, replicas in (("l70", "llama-2-70b", 2), ("l8", "llama-3-8b", 4)):
        request = PlanRequest(
            name=name, model=model_preset(preset), precision="int8", replicas=replicas
        )
        w.targets[name] = DeploymentTarget(name, 1, request)
    w.run(passes=30)
    assert all(w.status(n).phase is Phase.READY for n in w.targets)
    observed = w.observed()
    start = time.perf_counter()
    assert reconcile(list(w.targets.values()), observed, w.now) == []
    seconds = time.perf_counter() - start
    chips = sum(len(r.chips) for r in w.replicas.values())
    print(f"\nsteady reconcile pass, 1,305 nodes, {chips} chips in use: {seconds * 1e3:.0f} ms")
    assert seconds < 2.0
