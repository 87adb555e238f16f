"""`lpuctl top`: what the cluster's SRAM and chips are doing, per node and per deployment.

Like `kubectl top`, a snapshot from two admin calls (ListNodes, List): per node its state,
chips by health, SRAM reserved by the shards its agents hold against its capacity, and the
tokens a second of the replicas whose token stream (stage 0) it serves; per deployment its
phase, ready replicas, tokens a second over all its replicas, the chips its replicas hold and
the SRAM on them. Tokens a second are the control plane's rates over the last 5 s, from the
token counters agents send with their heartbeats (`orchestrator.throughput`).

The table building (`top_report`) is a pure function of the two responses, tested without a
server; `cmd_top` fetches and prints.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.lpuctl_commands import EXIT_OK

NODE_HEADER = ("NODE", "STATE", "CHIPS", "SRAM USED", "SRAM", "SRAM%", "TOKENS/S", "DEPLOYMENTS")
DEPLOYMENT_HEADER = ("DEPLOYMENT", "PHASE", "READY", "TOKENS/S", "CHIPS", "SRAM USED", "NODES")


@dataclass(frozen=True)
class NodeTop:
    name: str
    state: str
    chips: dict[str, int]  # health -> count
    sram_used: int
    sram: int
    deployments: tuple[str, ...]
    tokens_per_second: float = 0.0


@dataclass(frozen=True)
class DeploymentTop:
    name: str
    phase: str
    ready: int
    replicas: int
    chips: int
    sram_used: int
    nodes: int
    tokens_per_second: float = 0.0


@dataclass(frozen=True)
class TopReport:
    nodes: tuple[NodeTop, ...]
    deployments: tuple[DeploymentTop, ...]

    def summary(self) -> str:
        """One line: nodes by state, chips by health, SRAM in all, deployments by phase."""
        states = Counter(n.state for n in self.nodes)
        health: Counter[str] = Counter()
        for n in self.nodes:
            health.update(n.chips)
        used, total = sum(n.sram_used for n in self.nodes), sum(n.sram for n in self.nodes)
        phases = Counter(d.phase for d in self.deployments)
        tokens = sum(d.tokens_per_second for d in self.deployments)
        return (
            f"nodes: {_counts(states)}   chips: {_counts(health)}   "
            f"SRAM: {_mib(used)}/{_mib(total)} ({_pct(used, total)})   "
            f"deployments: {_counts(phases)}   tokens/s: {_rate(tokens)}"
        )

    def node_rows(self) -> list[list[str]]:
        return [
            [
                n.name,
                n.state,
                " ".join(f"{count} {health}" for health, count in sorted(n.chips.items())) or "0",
                _mib(n.sram_used),
                _mib(n.sram),
                _pct(n.sram_used, n.sram),
                _rate(n.tokens_per_second),
                ",".join(n.deployments) or "-",
            ]
            for n in self.nodes
        ]

    def deployment_rows(self) -> list[list[str]]:
        return [
            [
                d.name,
                d.phase,
                f"{d.ready}/{d.replicas}",
                _rate(d.tokens_per_second),
                str(d.chips),
                _mib(d.sram_used),
                str(d.nodes),
            ]
            for d in self.deployments
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [asdict(n) for n in self.nodes],
            "deployments": [asdict(d) for d in self.deployments],
        }


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{count} {key}" for key, count in sorted(counter.items())) or "none"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f}Mi"


def _rate(per_second: float) -> str:
    return f"{per_second:.1f}"


def _pct(used: int, total: int) -> str:
    return f"{100 * used / total:.0f}%" if total else "-"


def top_report(nodes: Sequence[Any], deployments: Sequence[Any]) -> TopReport:
    """Build the report from `NodeInfo`s and `Deployment`s (admin API messages, or anything
    with the same fields). A deployment's SRAM is what its replicas' chips hold; the chips a
    deployment is on come from its replicas, so a chip shared by two deployments counts for
    both (the store never double-books one, see the reconciler's properties)."""
    chip_node: dict[str, str] = {}
    chip_used: dict[str, int] = {}
    for n in nodes:
        for c in n.chips:
            chip_node[c.id] = n.name
            chip_used[c.id] = c.sram_used_bytes
    on_node: dict[str, set[str]] = {}
    rows = []
    for d in sorted(deployments, key=lambda d: d.name):
        chips = {c for r in d.replica_info for c in r.chips}
        hosts = {chip_node[c] for c in chips if c in chip_node}
        for host in hosts:
            on_node.setdefault(host, set()).add(d.name)
        rows.append(
            DeploymentTop(
                name=d.name,
                phase=d.phase,
                ready=d.ready_replicas,
                replicas=d.replicas,
                chips=len(chips),
                sram_used=sum(chip_used.get(c, 0) for c in chips),
                nodes=len(hosts),
                tokens_per_second=d.tokens_per_second,
            )
        )
    node_rows = tuple(
        NodeTop(
            name=n.name,
            state=n.state,
            chips=dict(Counter(c.health for c in n.chips)),
            sram_used=sum(c.sram_used_bytes for c in n.chips),
            sram=sum(c.sram_bytes for c in n.chips),
            deployments=tuple(sorted(on_node.get(n.name, ()))),
            tokens_per_second=n.tokens_per_second,
        )
        for n in sorted(nodes, key=lambda n: n.name)
    )
    return TopReport(node_rows, tuple(rows))


def render_top(report: TopReport) -> str:
    """The kubectl-like text: the summary, the nodes' table, the deployments' table."""
    lines = [report.summary(), ""]
    lines += _table(NODE_HEADER, report.node_rows())
    if report.deployments:
        lines += ["", *_table(DEPLOYMENT_HEADER, report.deployment_rows())]
    else:
        lines += ["", "No deployments."]
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def cmd_top(args: argparse.Namespace) -> int:
    from orchestrator.lpuctl_cluster import call, connect
    from protos import admin_pb2

    client = connect(args)
    nodes = call(client, "ListNodes", admin_pb2.ListNodesRequest()).nodes
    deployments = call(client, "List", admin_pb2.ListRequest()).deployments
    report = top_report(nodes, deployments)
    if args.output == "json":
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        print(render_top(report))
    return EXIT_OK
