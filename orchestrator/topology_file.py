"""Topology YAML files and the embedded default topology.

The file is read with the same hardened YAML loader as deployment files (size cap, no aliases,
no custom tags, duplicate keys refused, line numbers kept), then handed to the pure
`placement.topology.topology_from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.safe_yaml import load_yaml_file
from placement.topology import Topology, preset_topology, topology_from_dict


@dataclass(frozen=True)
class DefaultTopology:
    """The embedded default: a small `dev` cluster that runs on one machine."""

    racks: int = 2
    profile: str = "dev"

    def build(self) -> Topology:
        return preset_topology(self.racks, self.profile)

    def describe(self) -> str:
        return f"{self.racks} racks of the {self.profile!r} profile"


DEFAULT_TOPOLOGY = DefaultTopology()


def load_topology_file(path: str) -> Topology:
    document = load_yaml_file(path, "topology file")
    return topology_from_dict(document.data, source=path, lines=document.dotted_lines())
