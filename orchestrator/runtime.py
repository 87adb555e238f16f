"""The runtime port: how the control plane gets agent processes for the nodes of a cluster.

Two adapters implement it: a process runtime (one `python -m agents.main` subprocess per node,
for tests and machines without Ray) and the Ray runtime (each agent a detached, named Ray actor
pinned to its host, restarted by Ray; actor death is a failure signal beside heartbeats). The
control plane never imports the agent's code: both start it by module name.

The port is deliberately small: start agents for node specs, learn their addresses, hear about
deaths, stop. Registration and heartbeats travel over gRPC from the agents themselves, so the
control plane's view of a node does not depend on which runtime started it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class NodeSpec:
    """One simulated or real LPU host: its name (`rack-0/node-3`), rack, slot in the rack,
    chip count, chip profile and optional SRAM override per chip."""

    name: str
    rack: str
    slot: int
    chips: int
    profile: str
    sram_bytes: int | None = None


@dataclass(frozen=True)
class AgentHandle:
    """A started agent: its node, the address it serves on and its certificate identity."""

    node: str
    address: str
    identity: str


class Runtime(Protocol):
    """Starts and watches the agent of every node (see the module docstring)."""

    def start_agents(self, nodes: Sequence[NodeSpec]) -> list[AgentHandle]:
        """Start one agent per node (idempotent for nodes already running); their handles."""
        ...

    def dead_agents(self) -> list[str]:
        """Nodes whose agent died since the last call (non-blocking); a restarted agent
        registers again over gRPC by itself."""
        ...

    def stop(self) -> None:
        """Stop every agent this runtime started and reap it."""
        ...
