"""Mapper: put each replica's stages onto TP groups of chips.

Rules, in order:

* A TP group is `tp` healthy chips of one node (chips of a node are fully connected).
* Spares: in every rack the deployment uses, the last `sparesPerRack` nodes whose chips are all
  healthy are reserved (N+1 spare nodes, as GroqRack does); chips already marked `spare` in the
  topology are never placed on either.
* Locality: groups are laid out in topology order (rack, node, chip) and a replica takes the
  next `stages` groups, so consecutive stages share a node, then a rack; a replica crosses a
  global link only where it spills into the next rack — the fewest global hops for the
  chips it takes.
* Spread: `rack` starts every replica on a rack no earlier replica touched (replicas share no
  rack: a rack failure costs one replica), `node` on a fresh node, `none` packs tightly.
* Used, cordoned and failed chips are skipped.

Pure and deterministic: the same topology and request give the same chips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from placement.errors import Unplaceable
from placement.topology import ChipRef, ChipState, Topology

SPREADS = ("rack", "node", "none")
_HEALTHY = (ChipState.FREE, ChipState.SPARE)


@dataclass(frozen=True)
class Mapping:
    """Chips of every stage of every replica: groups[replica][stage] is a TP group."""

    groups: tuple[tuple[tuple[ChipRef, ...], ...], ...]
    spares: tuple[ChipRef, ...]


def allowed_racks(topo: Topology, racks: Sequence[str] | None) -> list[int]:
    if not racks:
        return list(range(len(topo.rack_names)))
    result = []
    for name in racks:
        index = topo.rack_index(name)
        if index is None:
            shown = ", ".join(topo.rack_names[:6]) + (", ..." if len(topo.rack_names) > 6 else "")
            raise Unplaceable(
                f"spec.placement.racks names {name!r}, which is not in the topology "
                f"({len(topo.rack_names)} racks: {shown})"
            )
        result.append(index)
    return result


def spare_nodes(topo: Topology, rack: int, count: int) -> list[int]:
    """The last `count` nodes of the rack whose chips are all healthy."""
    chosen: list[int] = []
    for node in reversed(range(topo.nodes_per_rack[rack])):
        if len(chosen) == count:
            break
        if all(topo.state(ref) in _HEALTHY for ref in topo.node_chips(rack, node)):
            chosen.append(node)
    return sorted(chosen)


def node_groups(topo: Topology, rack: int, node: int, tp: int) -> list[tuple[ChipRef, ...]]:
    free = [ref for ref in topo.node_chips(rack, node) if topo.state(ref) is ChipState.FREE]
    return [tuple(free[i : i + tp]) for i in range(0, len(free) - tp + 1, tp)]


def map_replicas(
    topo: Topology,
    *,
    stages: int,
    tp: int,
    replicas: int,
    spread: str,
    spares_per_rack: int,
    racks: Sequence[str] | None = None,
) -> Mapping:
    if spread not in SPREADS:
        raise Unplaceable(f"unknown spread {spread!r}; one of {', '.join(SPREADS)}")
    rack_order = allowed_racks(topo, racks)
    placed: list[tuple[tuple[ChipRef, ...], ...]] = []
    spares: list[ChipRef] = []
    current: list[tuple[ChipRef, ...]] = []
    last_key: tuple[int, ...] | None = None
    for rack in rack_order:
        if len(placed) == replicas:
            break
        reserved = set(spare_nodes(topo, rack, spares_per_rack))
        rack_used = False
        for node in range(topo.nodes_per_rack[rack]):
            if node in reserved:
                continue
            for group in node_groups(topo, rack, node, tp):
                if len(placed) == replicas:
                    break
                if (
                    not current
                    and last_key is not None
                    and not _fresh(spread, last_key, rack, node)
                ):
                    continue
                current.append(group)
                rack_used = True
                if len(current) == stages:
                    placed.append(tuple(current))
                    last_key = (rack, node)
                    current = []
        if rack_used:
            spares.extend(ref for node in sorted(reserved) for ref in topo.node_chips(rack, node))
    if len(placed) < replicas:
        raise Unplaceable(
            _shortfall(topo, rack_order, stages, tp, replicas, len(placed), spread, spares_per_rack)
        )
    return Mapping(tuple(placed), tuple(spares))


def _fresh(spread: str, last: tuple[int, ...], rack: int, node: int) -> bool:
    """Whether a new replica may start at (rack, node) after one that ended at `last`."""
    if spread == "rack":
        return rack != last[0]
    if spread == "node":
        return (rack, node) != last
    return True


def _shortfall(
    topo: Topology,
    rack_order: list[int],
    stages: int,
    tp: int,
    replicas: int,
    done: int,
    spread: str,
    spares_per_rack: int,
) -> str:
    need = stages * tp * replicas
    free = reserved = groups = 0
    for rack in rack_order:
        spare_set = set(spare_nodes(topo, rack, spares_per_rack))
        for node in range(topo.nodes_per_rack[rack]):
            n = sum(1 for ref in topo.node_chips(rack, node) if topo.state(ref) is ChipState.FREE)
            if node in spare_set:
                reserved += n
            else:
                free += n
                groups += n // tp
    message = (
        f"needs {need:,} chips ({replicas} replica(s) x {stages} stages x tensorParallel {tp}), "
        f"{free:,} free in {len(rack_order)} racks"
    )
    if reserved:
        message += f" (after reserving {reserved:,} spare chips, sparesPerRack {spares_per_rack})"
    if free >= need and groups < stages * replicas:
        message += (
            f"; a TP group needs {tp} free chips in one node and the free chips form only "
            f"{groups:,} such groups, {stages * replicas:,} needed"
        )
    elif free >= need:
        message += f"; only {done} of {replicas} replicas fit with spread: {spread}" + (
            " (each replica needs racks of its own)" if spread == "rack" else ""
        )
    return message
