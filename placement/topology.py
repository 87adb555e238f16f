"""Cluster topology: racks of nodes of chips, each chip in one state.

Every node of a topology has the profile's `chips_per_node` chips; racks may differ in node
count. Chip ids read `rack-0/node-3/chip-5`. Only chips that are not free are stored, so the
largest published system (145 racks, 10,440 chips) costs a few dictionaries, not 10k objects.

Links are implied by the profile's three link classes: chips of one node are fully connected
(`node_link`), nodes of a rack are joined by `rack_link`, racks by `global_link`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from placement.errors import InputError, field_path
from placement.profiles import ChipProfile, get_profile, profile_from_dict


class ChipState(StrEnum):
    FREE = "free"
    USED = "used"  # held by another deployment
    CORDONED = "cordoned"  # kept out of new placements by an operator
    FAILED = "failed"
    SPARE = "spare"  # reserved as a spare


class ChipRef(NamedTuple):
    """Indices of a chip: rack, node within the rack, chip within the node."""

    rack: int
    node: int
    chip: int


class HopClass(StrEnum):
    SAME_CHIP = "chip"
    NODE = "node"
    RACK = "rack"
    GLOBAL = "global"


MAX_RACKS = 4096
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CHIP_ID_RE = re.compile(r"^(?P<rack>[^/]+)/node-(?P<node>\d+)(?:/chip-(?P<chip>\d+))?$")


@dataclass(frozen=True)
class Topology:
    profile: ChipProfile
    rack_names: tuple[str, ...]
    nodes_per_rack: tuple[int, ...]
    states: Mapping[ChipRef, ChipState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rack_index", {n: i for i, n in enumerate(self.rack_names)})

    # --- naming ---------------------------------------------------------------------------

    def chip_id(self, ref: ChipRef) -> str:
        return f"{self.rack_names[ref.rack]}/node-{ref.node}/chip-{ref.chip}"

    def rack_index(self, name: str) -> int | None:
        index: dict[str, int] = self._rack_index  # type: ignore[attr-defined]
        return index.get(name)

    def parse_id(self, text: str, *, field: str = "chip") -> tuple[ChipRef, bool]:
        """Parse a chip id, or a node id (then `chip` is 0 and the flag is True)."""
        match = _CHIP_ID_RE.match(text)
        if not match:
            raise InputError(
                f"{text!r} is not a chip id like rack-0/node-3/chip-5 or a node id like "
                "rack-0/node-3",
                field=field,
            )
        rack = self.rack_index(match["rack"])
        if rack is None:
            raise InputError(f"{text!r}: no rack named {match['rack']!r}", field=field)
        node = int(match["node"])
        if node >= self.nodes_per_rack[rack]:
            raise InputError(
                f"{text!r}: rack {match['rack']} has nodes 0..{self.nodes_per_rack[rack] - 1}",
                field=field,
            )
        if match["chip"] is None:
            return ChipRef(rack, node, 0), True
        chip = int(match["chip"])
        if chip >= self.profile.chips_per_node:
            raise InputError(
                f"{text!r}: nodes have chips 0..{self.profile.chips_per_node - 1}", field=field
            )
        return ChipRef(rack, node, chip), False

    def parse_chip(self, text: str, *, field: str = "chip") -> ChipRef:
        fast = self._parse_chip_fast(text)
        if fast is not None:
            return fast
        ref, is_node = self.parse_id(text, field=field)
        if is_node:
            raise InputError(f"{text!r} names a node, not a chip", field=field)
        return ref

    def _parse_chip_fast(self, text: str) -> ChipRef | None:
        """Plans hold thousands of chip ids: skip the regex for well-formed ones."""
        parts = text.split("/")
        if len(parts) != 3 or not parts[1].startswith("node-") or not parts[2].startswith("chip-"):
            return None
        rack = self.rack_index(parts[0])
        node_s, chip_s = parts[1][5:], parts[2][5:]
        if rack is None or not node_s.isdigit() or not chip_s.isdigit():
            return None
        node, chip = int(node_s), int(chip_s)
        if node >= self.nodes_per_rack[rack] or chip >= self.profile.chips_per_node:
            return None
        return ChipRef(rack, node, chip)

    # --- queries --------------------------------------------------------------------------

    @property
    def chip_count(self) -> int:
        return sum(self.nodes_per_rack) * self.profile.chips_per_node

    def state(self, ref: ChipRef) -> ChipState:
        return self.states.get(ref, ChipState.FREE)

    def node_chips(self, rack: int, node: int) -> Iterator[ChipRef]:
        for chip in range(self.profile.chips_per_node):
            yield ChipRef(rack, node, chip)

    def iter_nodes(self) -> Iterator[tuple[int, int]]:
        for rack, count in enumerate(self.nodes_per_rack):
            for node in range(count):
                yield rack, node

    def count_states(self) -> dict[ChipState, int]:
        counts = {s: 0 for s in ChipState}
        for st in self.states.values():
            counts[st] += 1
        counts[ChipState.FREE] = self.chip_count - sum(
            n for s, n in counts.items() if s is not ChipState.FREE
        )
        return counts

    def with_states(self, updates: Mapping[ChipRef, ChipState]) -> Topology:
        """A copy with some chips in new states (free chips are not stored)."""
        states = dict(self.states)
        for ref, st in updates.items():
            if st is ChipState.FREE:
                states.pop(ref, None)
            else:
                states[ref] = st
        return Topology(self.profile, self.rack_names, self.nodes_per_rack, states)

    def hop_class(self, a: ChipRef, b: ChipRef) -> HopClass:
        if a == b:
            return HopClass.SAME_CHIP
        if a.rack != b.rack:
            return HopClass.GLOBAL
        if a.node != b.node:
            return HopClass.RACK
        return HopClass.NODE

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "racks": [
                {"name": n, "nodes": c}
                for n, c in zip(self.rack_names, self.nodes_per_rack, strict=True)
            ],
            "chips": {self.chip_id(r): s.value for r, s in sorted(self.states.items())},
        }


def preset_topology(racks: int, profile: ChipProfile | str) -> Topology:
    """`racks` full racks of a profile, every chip free."""
    prof = get_profile(profile, field="--profile") if isinstance(profile, str) else profile
    if isinstance(racks, bool) or not isinstance(racks, int) or not 1 <= racks <= MAX_RACKS:
        raise InputError(
            f"must be a whole number from 1 to {MAX_RACKS}, got {racks!r}", field="--racks"
        )
    return Topology(
        profile=prof,
        rack_names=tuple(f"rack-{i}" for i in range(racks)),
        nodes_per_rack=(prof.nodes_per_rack,) * racks,
    )


_TOPOLOGY_KEYS = ("apiVersion", "kind", "profile", "racks", "chips")


def topology_from_dict(
    raw: Any, *, source: str, lines: Mapping[str, int] | None = None
) -> Topology:
    """Topology from a YAML document.

    ```yaml
    kind: Topology              # optional, with apiVersion lpu.lockstep.dev/v1alpha1
    profile: dev                # a preset name, or a mapping (see profiles.profile_from_dict)
    racks: 2                    # a count, or a list of {name: rack-a, nodes: 3}
    chips:                      # optional states of chips or whole nodes
      rack-0/node-1/chip-3: failed
      rack-0/node-2: cordoned
    ```
    `lines` maps dotted field paths to line numbers so errors can point into the file.
    """
    lines = lines or {}

    def fail(message: str, path: str) -> InputError:
        return InputError(message, source=source, field=path, line=lines.get(path))

    if not isinstance(raw, dict):
        raise fail("a topology file must be a mapping", "")
    for key in raw:
        if key not in _TOPOLOGY_KEYS:
            raise fail(f"unknown field {key!r}; known: {', '.join(_TOPOLOGY_KEYS)}", str(key))
    if raw.get("kind", "Topology") != "Topology":
        raise fail("must be Topology", "kind")
    if "profile" not in raw:
        raise fail("required field is missing (a preset name or a mapping)", "profile")
    prof_raw = raw["profile"]
    try:
        if isinstance(prof_raw, str):
            profile = get_profile(prof_raw, field="profile")
        else:
            profile = profile_from_dict(prof_raw, source=source)
    except InputError as exc:
        raise fail(exc.message, exc.field or "profile") from None
    names, counts = _racks_from_raw(raw.get("racks"), profile, fail)
    topo = Topology(profile, names, counts)
    chips_raw = raw.get("chips") or {}
    if not isinstance(chips_raw, dict):
        raise fail("must be a mapping of chip or node id to state", "chips")
    updates: dict[ChipRef, ChipState] = {}
    for key, value in chips_raw.items():
        path = field_path(("chips", str(key)))
        try:
            state = ChipState(value)
        except ValueError:
            raise fail(
                f"state must be one of {', '.join(s.value for s in ChipState)}, got {value!r}",
                path,
            ) from None
        try:
            ref, is_node = topo.parse_id(str(key), field=path)
        except InputError as exc:
            raise fail(exc.message, path) from None
        targets: Iterable[ChipRef] = topo.node_chips(ref.rack, ref.node) if is_node else [ref]
        for target in targets:
            updates[target] = state
    return topo.with_states(updates)


def _racks_from_raw(
    raw: Any, profile: ChipProfile, fail: Any
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if raw is None:
        raise fail("required field is missing (a count or a list of racks)", "racks")
    if isinstance(raw, int) and not isinstance(raw, bool):
        if not 1 <= raw <= MAX_RACKS:
            raise fail(f"must be from 1 to {MAX_RACKS}, got {raw}", "racks")
        return tuple(f"rack-{i}" for i in range(raw)), (profile.nodes_per_rack,) * raw
    if not isinstance(raw, list) or not raw:
        raise fail("must be a rack count or a non-empty list of racks", "racks")
    if len(raw) > MAX_RACKS:
        raise fail(f"at most {MAX_RACKS} racks", "racks")
    names: list[str] = []
    counts: list[int] = []
    for i, item in enumerate(raw):
        path = f"racks[{i}]"
        if not isinstance(item, dict) or set(item) - {"name", "nodes"}:
            raise fail("each rack is a mapping with name and nodes", path)
        name = item.get("name", f"rack-{i}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 63:
            raise fail(
                f"rack name must be lowercase letters, digits and '-', got {name!r}", f"{path}.name"
            )
        if name in names:
            raise fail(f"duplicate rack name {name!r}", f"{path}.name")
        nodes = item.get("nodes", profile.nodes_per_rack)
        if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= 1024:
            raise fail(f"must be a whole number from 1 to 1024, got {nodes!r}", f"{path}.nodes")
        names.append(name)
        counts.append(nodes)
    return tuple(names), tuple(counts)
