"""Incremental failover in the pure reconciler (`_Pass.failover`), against `core_world`.

A replica that loses chips — a node gone silent, an agent reported dead (its chips marked
failed), a chip its agent reports failed — moves only the stages on those chips (`MoveStages`),
onto the same node first, then the same rack, then other racks; only the moved stages' shards
load; the replica resynchronizes at a new epoch; the other replicas are untouched. Restarts are
budgeted with exponential backoff; with no chip to move to, the whole replica is replaced
(the safe fallback) or, when that does not fit either, the deployment stays Degraded saying why.
"""

from __future__ import annotations

from dataclasses import replace

from core_world import World, make_nodes, phases, target

from orchestrator.core import (
    Chip,
    ChipHealth,
    Configure,
    Load,
    MoveStages,
    Phase,
    Place,
    PlanDrain,
    RemoveReplica,
    StartEpoch,
    Unload,
)


def fail_chip(w: World, chip: str, reason: str = "ECC storm") -> None:
    node_name, _, index = chip.rpartition("/chip-")
    node = w.nodes[node_name]
    chips = tuple(
        replace(c, health=ChipHealth.FAILED, reason=reason) if c.index == int(index) else c
        for c in node.chips
    )
    w.nodes[node_name] = replace(node, chips=chips)


def kill_node(w: World, node_name: str) -> None:
    """What the control plane records when the runtime reports the agent dead."""
    node = w.nodes[node_name]
    chips = tuple(Chip(c.index, c.sram_bytes, ChipHealth.FAILED, "agent died") for c in node.chips)
    w.nodes[node_name] = replace(node, chips=chips)


def node_of(chip: str) -> str:
    return chip.rpartition("/chip-")[0]


def ready_world(replicas: int = 2, racks: int = 2, nodes: int = 3, **kw: object) -> World:
    w = World(make_nodes(racks, nodes))
    w.targets["a"] = target("a", replicas=replicas, spread="rack", **kw)  # type: ignore[arg-type]
    w.run()
    assert w.status("a").phase is Phase.READY
    w.log.clear()
    w.events.clear()
    return w


def test_a_failed_chip_moves_only_its_stage_within_its_node() -> None:
    w = ready_world()
    r0, r1 = w.replicas[("a", 0)], w.replicas[("a", 1)]
    victim = r0.stages[1].chips[0]
    fail_chip(w, victim)
    w.step()
    (move,) = [a for a in w.log if isinstance(a, MoveStages)]
    assert move.moves[0][0] == 1 and move.moves[0][1] == (victim,)
    (new_chip,) = move.moves[0][2]
    assert node_of(new_chip) == node_of(victim)  # same node first
    st = w.status("a")
    assert st.phase is Phase.DEGRADED and st.reason == "FailingOver" and victim in st.message
    w.run()
    assert w.status("a").phase is Phase.READY
    after = w.replicas[("a", 0)]
    assert [s.chips for s in after.stages] == [
        (new_chip,) if s.index == 1 else s.chips for s in r0.stages
    ]
    assert after.epoch == r0.epoch + 1 and after.restarts == 1
    # Only the moved stage's shard loads (the same blob, on the new chip); the failed chip's
    # copy is unloaded; the replica is configured and started at its new epoch only.
    loads = [(a.chip, a.shard_id) for a in w.log if isinstance(a, Load)]
    assert loads == [(new_chip, r0.shard_for(victim).shard_id)]  # type: ignore[union-attr]
    unloads = [a.chip for a in w.log if isinstance(a, Unload)]
    assert unloads == [victim]
    assert [(a.replica, a.epoch) for a in w.log if isinstance(a, Configure)] == [(0, 1)]
    assert [(a.replica, a.epoch) for a in w.log if isinstance(a, StartEpoch)] == [(0, 1)]
    assert w.replicas[("a", 1)] == r1  # the other replica was not touched
    assert not any(isinstance(a, (RemoveReplica, Place)) for a in w.log)
    reasons = [e.reason for e in w.events if e.deployment == "a"]
    assert reasons.index("StagesMoved") < reasons.index("Degraded") < reasons.index("Ready")
    assert phases(w.events, "a") == ["Degraded", "Ready"]


def test_a_dead_agent_moves_every_stage_it_held_to_another_node() -> None:
    w = ready_world()
    r0 = w.replicas[("a", 0)]
    dead = node_of(r0.stages[0].chips[0])
    kill_node(w, dead)
    first = w.step()  # the move and the moved shards' loads, in one pass
    [moving] = [a for a in first if isinstance(a, MoveStages)]
    loads = [a for a in first if isinstance(a, Load)]
    assert sorted(a.chip for a in loads) == sorted(moving.chip_map().values())
    assert first.index(moving) < min(first.index(a) for a in loads)
    w.run()
    assert w.status("a").phase is Phase.READY
    after = w.replicas[("a", 0)]
    for before, now in zip(r0.stages, after.stages, strict=True):
        if node_of(before.chips[0]) == dead:
            assert node_of(now.chips[0]) != dead
            # same rack first: the spread keeps replica 0 in its rack
            assert now.chips[0].split("/")[0] == before.chips[0].split("/")[0]
        else:
            assert now.chips == before.chips
    (move,) = [a for a in w.log if isinstance(a, MoveStages)]
    assert "agent died" in move.reason
    # the dead agent is not asked to unload what it held (the call could only fail, every
    # pass, until its heartbeats time out): a node whose every chip failed gets no Unload
    assert not [a for a in w.log if isinstance(a, Unload) and a.node == dead]


def test_two_nodes_of_one_replica_lost_at_once_move_in_one_step() -> None:
    w = ready_world(replicas=1, racks=1, nodes=4, tensor_parallel=1)
    r0 = w.replicas[("a", 0)]
    used = sorted({node_of(c) for c in r0.chips})
    if len(used) < 2:  # the replica fits one node: fail two of its chips instead
        for chip in r0.chips[:2]:
            fail_chip(w, chip)
        lost = set(r0.chips[:2])
    else:
        for n in used[:2]:
            w.silent.add(n)
        w.now += 3.0
        lost = {c for c in r0.chips if node_of(c) in used[:2]}
    w.run()
    moves = [a for a in w.log if isinstance(a, MoveStages)]
    assert len(moves) == 1
    assert {c for _, frm, _ in moves[0].moves for c in frm} == lost
    assert w.status("a").phase is Phase.READY
    assert not lost & set(w.replicas[("a", 0)].chips)


def test_restarts_back_off_exponentially_and_the_budget_fails_the_replica() -> None:
    w = ready_world(replicas=1, max_restarts=2)
    w.targets["a"] = replace(w.targets["a"], backoff_seconds=2.0)
    fail_chip(w, w.replicas[("a", 0)].chips[0])
    w.run()
    first = w.replicas[("a", 0)]
    assert first.restarts == 1 and w.status("a").phase is Phase.READY
    # A second loss right after the first: it waits backoffSeconds after the last restart.
    fail_chip(w, first.chips[-1])
    w.step()
    assert not any(isinstance(a, MoveStages) for a in w.log[-20:])
    st = w.status("a")
    assert st.reason == "BackOff" and "restarts used" in st.message
    w.now = first.last_restart_time + 2.0  # type: ignore[operator]
    w.run()
    second = w.replicas[("a", 0)]
    assert second.restarts == 2 and w.status("a").phase is Phase.READY
    # The budget (2) is spent: a third loss fails the deployment; the replica and its
    # history stay as they are.
    fail_chip(w, second.chips[0])
    w.now += 100.0
    w.run()
    st = w.status("a")
    assert st.phase is Phase.FAILED and st.reason == "RestartsExhausted"
    assert "maxRestarts 2" in st.message
    assert w.replicas[("a", 0)].restarts == 2
    assert [e.reason for e in w.events].count("StagesMoved") == 2


def test_a_replica_that_served_a_restart_window_gets_a_fresh_budget() -> None:
    w = ready_world(replicas=1, max_restarts=1)
    fail_chip(w, w.replicas[("a", 0)].chips[0])
    w.run()
    first = w.replicas[("a", 0)]
    assert first.restarts == 1 and w.status("a").phase is Phase.READY
    w.now += w.settings.restart_window  # served ten minutes without a loss
    fail_chip(w, first.chips[-1])
    w.run()
    assert w.status("a").phase is Phase.READY
    assert w.replicas[("a", 0)].restarts == 1  # a new streak of one
    assert [e.reason for e in w.events].count("StagesMoved") == 2


def test_no_chip_to_move_to_waits_degraded_with_the_reason_then_moves() -> None:
    # One rack of two nodes: 2 replicas of 3 chips in 8 chips, 2 left free — then failed.
    w = World(make_nodes(1, 2))
    w.targets["a"] = target("a", replicas=2, spread="none")
    w.run()
    assert w.status("a").phase is Phase.READY
    r0, r1 = w.replicas[("a", 0)], w.replicas[("a", 1)]
    taken = set(r0.chips) | set(r1.chips)
    free = [f"{n}/chip-{c.index}" for n, node in w.nodes.items() for c in node.chips]
    free = [c for c in free if c not in taken]
    for chip in free:
        fail_chip(w, chip, "burnt")
    fail_chip(w, r0.chips[0])
    w.log.clear()
    w.run()
    st = w.status("a")
    assert st.phase is Phase.DEGRADED and st.ready_replicas == 1
    assert st.reason == "NoSpare" and r0.chips[0] in st.message and "waiting" in st.message
    assert not any(isinstance(a, (RemoveReplica, MoveStages, Place)) for a in w.log)
    assert w.replicas[("a", 0)] == r0  # kept as it was, nothing torn down
    assert w.replicas[("a", 1)] == r1  # the other replica keeps serving
    # A chip comes back (repaired, or a restarted agent's): the stage moves there.
    node_name, _, index = free[0].rpartition("/chip-")
    node = w.nodes[node_name]
    w.nodes[node_name] = replace(
        node,
        chips=tuple(
            replace(c, health=ChipHealth.HEALTHY, reason="") if c.index == int(index) else c
            for c in node.chips
        ),
    )
    w.run()
    assert w.status("a").phase is Phase.READY
    assert free[0] in w.replicas[("a", 0)].chips


def test_drain_loads_the_new_chips_first_then_switches_over_then_unloads() -> None:
    w = ready_world()
    r0, r1 = w.replicas[("a", 0)], w.replicas[("a", 1)]
    node = node_of(r0.stages[-1].chips[0])
    w.nodes[node] = replace(w.nodes[node], cordoned=True, draining=True)
    w.step()
    (plan,) = [a for a in w.log if isinstance(a, PlanDrain)]
    moved = {c for s in r0.stages for c in s.chips if node_of(c) == node}
    new = {c for s in plan.stages for c in s.chips} - set(r0.chips)
    assert len(new) == len(moved) and not any(node_of(c) == node for c in new)
    w.step()  # the new chips load while the replica keeps serving on the old ones
    loads = [a for a in w.log if isinstance(a, Load)]
    assert {a.chip for a in loads} == new
    assert w.status("a").phase is Phase.READY and w.serving("a") == 2
    assert not any(isinstance(a, (MoveStages, Unload)) for a in w.log)
    w.run()
    (switch,) = [a for a in w.log if isinstance(a, MoveStages)]
    assert switch.drain and set(switch.chip_map()) == moved
    # the switch came after every load, the unloads of the old chips after the switch
    order = [type(a) for a in w.log if isinstance(a, (Load, MoveStages, Unload))]
    assert order.index(MoveStages) > max(i for i, t in enumerate(order) if t is Load)
    unloads = [a.chip for a in w.log if isinstance(a, Unload)]
    assert set(unloads) == moved
    after = w.replicas[("a", 0)]
    assert not any(node_of(c) == node for c in after.chips)
    assert after.restarts == 0 and after.next_stages == ()  # a drain is not a restart
    assert w.status("a").phase is Phase.READY
    assert w.replicas[("a", 1)] == r1
    assert not any(h.chip.startswith(node + "/") for h in w.held.values())
    reasons = [e.reason for e in w.events]
    assert reasons.index("DrainStarted") < reasons.index("StagesDrained")


def test_a_drain_whose_new_chip_fails_is_planned_again() -> None:
    w = ready_world()
    r0 = w.replicas[("a", 0)]
    node = node_of(r0.stages[-1].chips[0])
    w.nodes[node] = replace(w.nodes[node], cordoned=True, draining=True)
    w.step()
    first = w.replicas[("a", 0)].next_stages
    new = next(c for s in first for c in s.chips if c not in r0.chips)
    fail_chip(w, new)
    w.run()
    after = w.replicas[("a", 0)]
    assert new not in after.chips and not any(node_of(c) == node for c in after.chips)
    assert "DrainReplanned" in [e.reason for e in w.events]
    assert w.status("a").phase is Phase.READY


def test_a_second_loss_while_recovering_moves_at_once_and_counts() -> None:
    w = ready_world(replicas=1)
    w.targets["a"] = replace(w.targets["a"], backoff_seconds=30.0)
    r0 = w.replicas[("a", 0)]
    fail_chip(w, r0.chips[0])
    w.step()  # the first move is decided; the replica is not running its new epoch yet
    moving = w.replicas[("a", 0)]
    assert moving.restarts == 1 and moving.running_epoch != moving.epoch
    fail_chip(w, r0.chips[-1])
    w.run()  # no 30 s backoff: the same incident
    after = w.replicas[("a", 0)]
    assert after.restarts == 2 and w.status("a").phase is Phase.READY
    assert r0.chips[0] not in after.chips and r0.chips[-1] not in after.chips


def test_a_node_lost_while_the_replica_loads_moves_its_stages_too() -> None:
    w = World(make_nodes(2, 3))
    w.targets["a"] = target("a", replicas=1)
    while not any(isinstance(a, Load) for a in w.log):  # placed, compiled, loading
        w.step()
    r0 = w.replicas[("a", 0)]
    dead = node_of(r0.chips[-1])
    kill_node(w, dead)
    w.run()
    after = w.replicas[("a", 0)]
    assert w.status("a").phase is Phase.READY
    assert not any(node_of(c) == dead for c in after.chips)
    assert [(s.index, s.first, s.last) for s in after.stages] == [
        (s.index, s.first, s.last) for s in r0.stages
    ]
