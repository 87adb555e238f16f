"""Incremental re-plan: only affected stages move, nearest spares first."""

from __future__ import annotations

import pytest

from placement.errors import Unplaceable
from placement.models import model_preset
from placement.planner import PlanRequest, make_plan
from placement.replan import replan_failed
from placement.topology import ChipState, preset_topology


def tiny_plan(**kw: object):  # type: ignore[no-untyped-def]
    topo = preset_topology(2, "dev")
    req: dict[str, object] = dict(
        name="d",
        model=model_preset("tiny-llama"),
        precision="fp16",
        replicas=2,
        max_context=256,
        max_batch=4,
    )
    req.update(kw)
    return topo, make_plan(PlanRequest(**req), topo)  # type: ignore[arg-type]


def test_only_the_stage_on_the_failed_chip_moves() -> None:
    topo, plan = tiny_plan()
    victim = plan.stages[3]
    result = replan_failed(plan, topo, [victim.chips[0]])
    assert len(result.moves) == 1
    move = result.moves[0]
    assert (move.replica, move.stage) == (victim.replica, victim.index)
    for old, new in zip(plan.stages, result.plan.stages, strict=True):
        if old is victim:
            assert new.chips != old.chips and new.first == old.first and new.last == old.last
        else:
            assert new.chips == old.chips
    assert victim.chips[0] not in result.plan.chips()


def test_same_node_free_chip_comes_first() -> None:
    # replica 0 of tiny-llama takes 12 chips: node-0 full, node-1 half used -> node-1 has free
    topo, plan = tiny_plan()
    on_node1 = next(s for s in plan.replica_stages(0) if "/node-1/" in s.chips[0])
    result = replan_failed(plan, topo, [on_node1.chips[0]])
    assert result.moves[0].to_chips[0].startswith("rack-0/node-1/")


def test_then_same_rack_spare_node() -> None:
    topo, plan = tiny_plan()
    on_node0 = plan.replica_stages(0)[0]
    result = replan_failed(plan, topo, [on_node0.chips[0]])
    # node-0 is full, so the same rack it is; there the reserved spare node comes before the
    # free chips of node-1
    target = result.moves[0].to_chips[0]
    assert target.startswith("rack-0/node-2/")
    assert target not in result.plan.spares


def test_spares_consumed_and_then_elsewhere() -> None:
    topo, plan = tiny_plan(replicas=1, spares_per_rack=1)
    # fill every free chip of rack-0 except the spare node, then fail a chip
    holders = set(plan.chips())
    busy = {
        ref: ChipState.USED
        for rack, node in topo.iter_nodes()
        for ref in topo.node_chips(rack, node)
        if rack == 0 and node != 2 and topo.chip_id(ref) not in holders
    }
    topo = topo.with_states(busy)
    result = replan_failed(plan, topo, [plan.stages[0].chips[0]])
    target = result.moves[0].to_chips[0]
    assert target.startswith("rack-0/node-2/"), "the reserved spare node of the same rack"
    assert target not in result.plan.spares
    assert len(result.plan.spares) == len(plan.spares) - 1


def test_tp_group_moves_whole_when_node_is_full() -> None:
    topo, plan = tiny_plan(replicas=1, tensor_parallel=4, spares_per_rack=1)
    stage = plan.stages[0]
    node = stage.chips[0].rsplit("/", 1)[0]
    # make the rest of that node busy so no in-node replacement exists
    busy = {
        ref: ChipState.USED
        for ref in topo.node_chips(*topo.parse_chip(stage.chips[0])[:2])
        if topo.chip_id(ref) not in plan.chips()
    }
    topo = topo.with_states(busy)
    result = replan_failed(plan, topo, [stage.chips[1]])
    new = result.moves[0].to_chips
    assert len(new) == 4 and len({c.rsplit("/", 1)[0] for c in new}) == 1
    assert not new[0].startswith(node + "/")


def test_failure_of_an_unused_chip_moves_nothing() -> None:
    topo, plan = tiny_plan()
    spare = plan.spares[0]
    result = replan_failed(plan, topo, [spare])
    assert result.moves == ()
    assert spare not in result.plan.spares


def test_no_capacity_left_is_unplaceable() -> None:
    topo, plan = tiny_plan(replicas=1, spares_per_rack=0)
    others = {
        ref: ChipState.USED
        for rack, node in topo.iter_nodes()
        for ref in topo.node_chips(rack, node)
        if topo.chip_id(ref) not in plan.chips()
    }
    topo = topo.with_states(others)
    with pytest.raises(Unplaceable, match="no spare or free chips"):
        replan_failed(plan, topo, [plan.stages[0].chips[0]])


def test_replan_is_deterministic_and_updates_prediction() -> None:
    topo, plan = tiny_plan()
    chip = plan.stages[0].chips[0]
    a = replan_failed(plan, topo, [chip]).plan.to_dict(timing=False)
    b = replan_failed(plan, topo, [chip]).plan.to_dict(timing=False)
    assert a == b
    # the moved stage now sits across a node boundary from its neighbours: more hop time
    assert a["predicted"]["latencyMsPerToken"] > plan.predicted.latency_ms_per_token
