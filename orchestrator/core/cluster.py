"""The live cluster as the planner sees it: a `Topology` built from registered nodes.

The planner (`placement`) plans against a `Topology` of racks, nodes and chips in states; this
module builds one from `Observed` at a moment `now`, so the same pure planner serves `lpuctl
plan` against a file and the control plane against the agents that registered.

Rules (each keeps a chip out of new placements for a reason):

* Racks are ordered by name, and a rack has as many node slots as its highest registered slot
  plus one. A slot no node registered for counts as failed: its chips do not exist.
* A node whose heartbeat is too old (NotReady): all its chips failed, whatever they report.
* A cordoned node: its chips cordoned (kept out of new placements; what runs there stays).
  A draining node likewise (and what runs there moves off it).
* A chip the agent reports failed, a chip index the node did not register, or a chip with
  less SRAM than the profile the planner sizes stages for: failed (a smaller chip would be
  overfilled by a plan made for the profile).
* A chip in any replica's stages (or the stages a drain will switch it to), or holding any
  shard (even one no replica claims, until
  it is unloaded): used. This is what makes double-booking impossible.
* A chip a replica keeps as a spare: spare (the mapper never places on spares, and another
  deployment may share them as spares).

Chip indices beyond the profile's `chips_per_node` are ignored: the planner's nodes are uniform.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.core.model import (
    Chip,
    ChipHealth,
    CoreSettings,
    Node,
    Observed,
    Replica,
    node_alive,
)
from placement.topology import ChipRef, ChipState, Topology


@dataclass(frozen=True)
class ChipLocation:
    """Where a chip id lives: its node, the chip as registered, and the planner's ref."""

    node: Node
    chip: Chip
    ref: ChipRef


class ClusterView:
    """Lookups over one `Observed` at one `now`: chips by id, liveness, the topology."""

    def __init__(self, observed: Observed, now: float, settings: CoreSettings) -> None:
        self.observed = observed
        self.profile = observed.profile
        self.alive = {n.name for n in observed.nodes if node_alive(n, now, settings)}
        racks: dict[str, list[Node]] = defaultdict(list)
        for node in observed.nodes:
            racks[node.rack].append(node)
        self.rack_names = tuple(sorted(racks))
        self.nodes_per_rack = tuple(max(n.slot for n in racks[r]) + 1 for r in self.rack_names)
        rack_index = {name: i for i, name in enumerate(self.rack_names)}
        self.chips: dict[str, ChipLocation] = {}
        states: dict[ChipRef, ChipState] = {}
        present: set[tuple[int, int]] = set()
        cpn = self.profile.chips_per_node
        for node in observed.nodes:
            rack = rack_index[node.rack]
            present.add((rack, node.slot))
            registered = {c.index: c for c in node.chips if 0 <= c.index < cpn}
            for index in range(cpn):
                ref = ChipRef(rack, node.slot, index)
                chip = registered.get(index)
                if chip is not None:
                    self.chips[node.chip_id(index)] = ChipLocation(node, chip, ref)
                state = _base_state(node, chip, node.name in self.alive, self.profile.sram_bytes)
                if state is not ChipState.FREE:
                    states[ref] = state
        for rack, count in enumerate(self.nodes_per_rack):
            for slot in range(count):
                if (rack, slot) not in present:
                    for index in range(cpn):
                        states[ChipRef(rack, slot, index)] = ChipState.FAILED
        self._base = Topology(self.profile, self.rack_names, self.nodes_per_rack, states)
        self.topology = self._base
        self.occupy(observed.replicas)
        self.mark_used(h.chip for h in observed.held)

    def healthy(self, chip: str) -> bool:
        """Whether a replica may keep running on `chip`: known, healthy, its node alive."""
        loc = self.chips.get(chip)
        return (
            loc is not None
            and loc.chip.health is ChipHealth.HEALTHY
            and loc.node.name in self.alive
        )

    def occupy(self, replicas: Iterable[Replica]) -> None:
        """Mark the replicas' chips used and their spares spare, in the working topology."""
        updates: dict[ChipRef, ChipState] = {}
        spares: list[str] = []
        for replica in replicas:
            for chip in (*replica.chips, *(c for s in replica.next_stages for c in s.chips)):
                loc = self.chips.get(chip)
                if loc is not None and self.topology.state(loc.ref) is not ChipState.FAILED:
                    updates[loc.ref] = ChipState.USED
            spares.extend(replica.spares)
        self.topology = self.topology.with_states(updates)
        spare_updates = {}
        for chip in spares:
            loc = self.chips.get(chip)
            if loc is not None and self.topology.state(loc.ref) is ChipState.FREE:
                spare_updates[loc.ref] = ChipState.SPARE
        self.topology = self.topology.with_states(spare_updates)

    def mark_used(self, chips: Iterable[str]) -> None:
        updates = {}
        for chip in chips:
            loc = self.chips.get(chip)
            if loc is not None and self.topology.state(loc.ref) in (
                ChipState.FREE,
                ChipState.SPARE,
            ):
                updates[loc.ref] = ChipState.USED
        self.topology = self.topology.with_states(updates)


def _base_state(node: Node, chip: Chip | None, alive: bool, profile_sram: int) -> ChipState:
    if not alive or chip is None or chip.health is ChipHealth.FAILED:
        return ChipState.FAILED
    if chip.sram_bytes < profile_sram:
        return ChipState.FAILED
    if node.cordoned or node.draining:
        return ChipState.CORDONED
    return ChipState.FREE


def cluster_topology(observed: Observed, now: float, settings: CoreSettings) -> Topology:
    """The topology new placements plan against at `now` (see the module docstring)."""
    return ClusterView(observed, now, settings).topology
