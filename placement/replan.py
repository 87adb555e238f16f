"""Incremental re-plan: move only the stages that lost a chip, onto spares nearby.

Failover calls this. The op ranges of every stage stay as they are (the shards already compiled
for them stay valid); only chips change, so only the moved stages reload. For each failed chip
that a stage holds, the replacement is searched in locality order:

1. the same node (a free or spare chip there keeps the TP group inside the node),
2. the same rack, 3. other racks, nearest index first;

within each class the deployment's reserved spares come before chips marked `spare` in the
topology, which come before plain free chips. A TP group that cannot be completed inside its own
node moves as a whole to a node with `tp` available chips (same rack first). Chips held by any
stage of the plan, and used, cordoned or failed chips, are never candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

from placement.errors import Unplaceable
from placement.plan import Plan
from placement.planner import prediction_for, stage_refs
from placement.topology import ChipRef, ChipState, Topology


@dataclass(frozen=True)
class Move:
    replica: int
    stage: int
    from_chips: tuple[str, ...]
    to_chips: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "replica": self.replica,
            "stage": self.stage,
            "from": list(self.from_chips),
            "to": list(self.to_chips),
        }


@dataclass(frozen=True)
class Replan:
    plan: Plan
    moves: tuple[Move, ...]


class _Pool:
    """Which chips may take over work, ranked by kind (reserved spare, spare, free)."""

    def __init__(self, plan: Plan, topology: Topology, failed: set[ChipRef]) -> None:
        self.topology = topology
        self.failed = failed
        self.occupied = {ref for stage in plan.stages for ref in stage_refs(stage, topology)}
        self.reserved = [topology.parse_chip(c) for c in plan.spares]
        self.reserved_set = set(self.reserved)

    def rank(self, ref: ChipRef) -> int | None:
        """0 reserved spare, 1 topology spare, 2 free; None if not available."""
        if ref in self.occupied or ref in self.failed:
            return None
        state = self.topology.state(ref)
        if ref in self.reserved_set and state in (ChipState.FREE, ChipState.SPARE):
            return 0
        if state is ChipState.SPARE:
            return 1
        if state is ChipState.FREE:
            return 2
        return None

    def take(self, ref: ChipRef) -> None:
        self.occupied.add(ref)
        self.reserved_set.discard(ref)


def replan_failed(plan: Plan, topology: Topology, failed_chips: Iterable[str]) -> Replan:
    """A new plan with the stages on `failed_chips` moved; raises `Unplaceable` if impossible."""
    failed = {topology.parse_chip(c, field="failed chip") for c in failed_chips}
    pool = _Pool(plan, topology, failed)
    stages = list(plan.stages)
    moves: list[Move] = []
    for i, stage in enumerate(stages):
        refs = list(stage_refs(stage, topology))
        if not any(r in failed for r in refs):
            continue
        new_refs = _replace_in_node(pool, refs) or _move_group(pool, refs)
        if new_refs is None:
            raise Unplaceable(
                f"no spare or free chips left for replica {stage.replica} stage {stage.index} "
                f"(needs {len(refs)} chip(s) in one node)"
            )
        for ref in new_refs:
            pool.take(ref)
        new_ids = tuple(topology.chip_id(r) for r in new_refs)
        moves.append(Move(stage.replica, stage.index, stage.chips, new_ids))
        stages[i] = replace(stage, chips=new_ids, refs=tuple(new_refs))
    if not moves:
        spares = tuple(s for s in plan.spares if topology.parse_chip(s) not in failed)
        return Replan(replace(plan, spares=spares), ())
    spares = tuple(
        topology.chip_id(r) for r in pool.reserved if r in pool.reserved_set and r not in failed
    )
    moved = replace(plan, stages=tuple(stages), spares=spares)
    moved = replace(
        moved,
        predicted=prediction_for(moved, topology),
        notes=(*plan.notes, *(_describe(m) for m in moves)),
    )
    return Replan(moved, tuple(moves))


def _describe(move: Move) -> str:
    return (
        f"re-planned: replica {move.replica} stage {move.stage} moved "
        f"{', '.join(move.from_chips)} -> {', '.join(move.to_chips)}"
    )


def _replace_in_node(pool: _Pool, refs: Sequence[ChipRef]) -> list[ChipRef] | None:
    """Swap each failed chip of the group for an available chip of the same node."""
    failed_refs = [r for r in refs if r in pool.failed]
    node = refs[0]
    candidates = _ranked(pool, pool.topology.node_chips(node.rack, node.node))
    if len(candidates) < len(failed_refs):
        if len(refs) > 1:
            return None
        return _single_chip_elsewhere(pool, node)
    replacement = iter(candidates)
    return [next(replacement) if r in pool.failed else r for r in refs]


def _single_chip_elsewhere(pool: _Pool, near: ChipRef) -> list[ChipRef] | None:
    for rack in _racks_by_distance(pool.topology, near.rack):
        chips = (
            ref
            for node in range(pool.topology.nodes_per_rack[rack])
            for ref in pool.topology.node_chips(rack, node)
        )
        ranked = _ranked(pool, chips)
        if ranked:
            return [ranked[0]]
    return None


def _move_group(pool: _Pool, refs: Sequence[ChipRef]) -> list[ChipRef] | None:
    """Move a whole TP group to the best node with enough available chips."""
    tp = len(refs)
    near = refs[0]
    for rack in _racks_by_distance(pool.topology, near.rack):
        best: tuple[int, list[ChipRef]] | None = None
        for node in range(pool.topology.nodes_per_rack[rack]):
            if (rack, node) == (near.rack, near.node):
                continue
            ranked = _ranked(pool, pool.topology.node_chips(rack, node))
            if len(ranked) >= tp:
                group = ranked[:tp]
                score = max(_rank_of(pool, r) for r in group)
                if best is None or score < best[0]:
                    best = (score, group)
        if best is not None:
            return best[1]
    return None


def _rank_of(pool: _Pool, ref: ChipRef) -> int:
    rank = pool.rank(ref)
    assert rank is not None
    return rank


def _ranked(pool: _Pool, chips: Iterable[ChipRef]) -> list[ChipRef]:
    scored = [(rank, ref) for ref in chips if (rank := pool.rank(ref)) is not None]
    return [ref for _, ref in sorted(scored)]


def _racks_by_distance(topology: Topology, rack: int) -> Iterator[int]:
    """The rack itself, then the others by index distance (ties: lower index first)."""
    count = len(topology.rack_names)
    return iter(sorted(range(count), key=lambda r: (abs(r - rack), r)))
