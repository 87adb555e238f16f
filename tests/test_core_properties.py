"""Properties of the reconciler over generated clusters and deployments (hypothesis).

Over any generated world — racks and nodes, cordoned nodes, failed chips, stray shards, a few
deployments with random sizes, precisions, spreads and spares — and any later change of the
desired state (scale, new precision, delete) or failure (a node stops heartbeating):

* no action ever double-books a chip or puts more bytes on a chip than its SRAM — also with
  chips that registered less SRAM than the profile (the simulated world of `core_world`
  asserts both on every action it applies);
* repeated reconcile reaches a fixed point (reconcile returns nothing) within a bound;
* at the fixed point every deployment is Ready, or waits with the planner's numbers
  (Unplaceable) — and a deployment alone on a cluster that fits it is Ready.
"""

from __future__ import annotations

from dataclasses import replace

from core_world import PROFILE, World, make_nodes, target
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.core import (
    Chip,
    ChipHealth,
    ConditionStatus,
    ConditionType,
    CoreSettings,
    HeldShard,
    Phase,
    cluster_topology,
    reconcile,
)
from placement.errors import Unplaceable
from placement.planner import make_plan


@st.composite
def worlds(draw: st.DrawFn) -> World:
    racks = draw(st.integers(1, 3))
    per_rack = draw(st.integers(1, 3))
    nodes = make_nodes(racks, per_rack)
    names = sorted(nodes)
    for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):
        nodes[name] = replace(nodes[name], cordoned=True)
    for name in draw(st.lists(st.sampled_from(names), max_size=3)):
        index = draw(st.integers(0, PROFILE.chips_per_node - 1))
        chips = list(nodes[name].chips)
        chips[index] = Chip(index, chips[index].sram_bytes, ChipHealth.FAILED, "generated")
        nodes[name] = replace(nodes[name], chips=tuple(chips))
    for name in draw(st.lists(st.sampled_from(names), max_size=2)):
        # A chip with less SRAM than the profile plans for (a mis-registered card): a stage
        # sized for the profile would overfill it, so it must never be placed on.
        index = draw(st.integers(0, PROFILE.chips_per_node - 1))
        chips = list(nodes[name].chips)
        chips[index] = Chip(index, draw(st.integers(1 << 20, PROFILE.sram_bytes - 1)))
        nodes[name] = replace(nodes[name], chips=tuple(chips))
    w = World(nodes)
    for i in range(draw(st.integers(0, 2))):  # stray shards a previous life left behind
        name = draw(st.sampled_from(names))
        index = draw(st.integers(0, PROFILE.chips_per_node - 1))
        chip = f"{name}/chip-{index}"
        size = draw(st.integers(1, min(4 << 20, nodes[name].chips[index].sram_bytes)))
        if any(h.chip == chip for h in w.held.values()):
            continue  # one stray per chip: together they could exceed a small chip's SRAM
        w.held[(chip, f"stray-{i}")] = HeldShard(chip, f"stray-{i}", size, size, size, True)
    count = draw(st.integers(1, 3))
    for i in range(count):
        name = f"d{i}"
        w.targets[name] = target(
            name,
            precision=draw(st.sampled_from(["fp16", "int8"])),
            replicas=draw(st.integers(1, 3)),
            spread=draw(st.sampled_from(["rack", "node", "none"])),
            spares=draw(st.integers(0, 1)),
            max_context=draw(st.sampled_from([32, 64, 256])),
        )
    return w


def settled(w: World) -> None:
    """At a fixed point: every deployment Ready, or waiting with the numbers."""
    assert reconcile(list(w.targets.values()), w.observed(), w.now) == []
    for name in w.targets:
        st_ = w.status(name)
        if st_.phase is Phase.READY:
            assert w.serving(name) == w.targets[name].request.replicas
            continue
        placed = st_.condition(ConditionType.PLACED)
        assert st_.phase in (Phase.PENDING, Phase.DEGRADED), (name, st_)
        assert placed is not None and placed.status is ConditionStatus.FALSE, (name, st_)
        assert placed.reason == "Unplaceable" and placed.message, (name, st_)


def fits_alone(w: World, name: str) -> bool:
    topo = cluster_topology(replace(w.observed(), held=(), replicas=()), w.now, CoreSettings())
    try:
        make_plan(w.targets[name].request, topo)
    except Unplaceable:
        return False
    return True


COMMON = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(worlds())
def test_converges_without_double_booking_or_overfilling(w: World) -> None:
    w.run(passes=80)
    settled(w)
    if len(w.targets) == 1 and not w.held:
        (name,) = w.targets
        if fits_alone(w, name):
            assert w.status(name).phase is Phase.READY


@COMMON
@given(
    worlds(),
    st.lists(
        st.tuples(
            st.sampled_from(["scale", "precision", "delete", "node-dies", "agent-restarts"]),
            st.integers(0, 5),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_converges_again_after_changes(w: World, changes: list[tuple[str, int]]) -> None:
    w.run(passes=80)
    for kind, n in changes:
        names = sorted(w.targets)
        if kind == "agent-restarts":  # alive, but every chip of the node comes back empty
            node = sorted(w.nodes)[n % len(w.nodes)]
            w.held = {k: h for k, h in w.held.items() if not h.chip.startswith(node + "/")}
        elif kind == "node-dies":
            node = sorted(w.nodes)[n % len(w.nodes)]
            w.silent.add(node)
            w.now += 5.0
        elif names:
            name = names[n % len(names)]
            t = w.targets[name]
            gen = t.generation + 1
            if kind == "scale":
                t = replace(t, generation=gen, request=replace(t.request, replicas=1 + n % 3))
            elif kind == "precision":
                other = "int8" if t.request.precision == "fp16" else "fp16"
                t = replace(t, generation=gen, request=replace(t.request, precision=other))
            else:
                t = replace(t, deleting=True)
            w.targets[name] = t
        w.run(passes=120)
        settled(w)
    for name in w.targets:
        assert w.status(name).observed_generation == w.targets[name].generation
    # Nothing of a deleted deployment is left, and a replica still on a dead node's chips is
    # being removed or waits for chips to move to (its deployment says so, never Ready).
    for r in w.replicas.values():
        assert r.deployment in w.targets
        if any(c.rpartition("/chip-")[0] in w.silent for c in r.chips) and not r.removing:
            st_ = w.status(r.deployment)
            placed = st_.condition(ConditionType.PLACED)
            assert st_.phase is not Phase.READY, (r, st_)
            assert placed is not None and placed.status is ConditionStatus.FALSE, (r, st_)
            assert "waiting for chips" in st_.message + placed.message, (r, st_)
