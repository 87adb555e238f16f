"""`lpuctl top`'s report and table from admin API messages, without a server."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main
from orchestrator.lpuctl_top import DEPLOYMENT_HEADER, NODE_HEADER, render_top, top_report
from orchestrator.throughput import TokenRates
from protos import admin_pb2

MIB = 1 << 20


def _node(
    name: str, state: str, used: list[int], failed: int = -1, tokens: float = 0.0
) -> admin_pb2.NodeInfo:
    rack, slot = name.split("/")[0], int(name[-1])
    node = admin_pb2.NodeInfo(
        name=name, state=state, rack=rack, slot=slot, tokens_per_second=tokens
    )
    for i, u in enumerate(used):
        node.chips.add(
            id=f"{name}/chip-{i}",
            node=name,
            index=i,
            sram_bytes=2 * MIB,
            sram_used_bytes=u,
            health="Failed" if i == failed else "Healthy",
        )
    return node


def _deployment(
    name: str, phase: str, ready: int, chips: list[list[str]], tokens: float = 0.0
) -> admin_pb2.Deployment:
    d = admin_pb2.Deployment(
        name=name,
        phase=phase,
        ready_replicas=ready,
        replicas=len(chips),
        tokens_per_second=tokens,
    )
    for i, replica in enumerate(chips):
        d.replica_info.add(index=i, chips=replica)
    return d


NODES = [
    _node("rack-0/node-0", "Ready", [MIB, MIB, 0, 0], tokens=30.25),
    _node("rack-1/node-0", "Ready", [MIB // 2, 0, 0, 0], failed=3, tokens=12.0),
    _node("rack-1/node-1", "NotReady", [0, 0, 0, 0]),
]
DEPLOYMENTS = [
    _deployment(
        "tiny",
        "Ready",
        2,
        [["rack-0/node-0/chip-0", "rack-0/node-0/chip-1"], ["rack-1/node-0/chip-0"]],
        tokens=42.25,
    ),
    _deployment("big", "Pending", 0, []),
]


def test_report_sums_sram_per_node_and_per_deployment() -> None:
    report = top_report(NODES, DEPLOYMENTS)
    by_node = {n.name: n for n in report.nodes}
    assert by_node["rack-0/node-0"].sram_used == 2 * MIB
    assert by_node["rack-0/node-0"].sram == 8 * MIB
    assert by_node["rack-1/node-0"].chips == {"Healthy": 3, "Failed": 1}
    assert by_node["rack-0/node-0"].deployments == ("tiny",)
    assert by_node["rack-1/node-1"].deployments == ()
    tiny, big = {d.name: d for d in report.deployments}["tiny"], report.deployments[0]
    assert (tiny.chips, tiny.sram_used, tiny.nodes, tiny.ready) == (3, 2 * MIB + MIB // 2, 2, 2)
    assert (big.name, big.chips, big.sram_used) == ("big", 0, 0)  # sorted by name
    assert tiny.tokens_per_second == 42.25 and big.tokens_per_second == 0.0
    assert by_node["rack-0/node-0"].tokens_per_second == 30.25


def test_rendered_tables_line_up_and_summarize() -> None:
    text = render_top(top_report(NODES, DEPLOYMENTS))
    lines = text.splitlines()
    assert lines[0] == (
        "nodes: 1 NotReady, 2 Ready   chips: 1 Failed, 11 Healthy   "
        "SRAM: 2.50Mi/24.00Mi (10%)   deployments: 1 Pending, 1 Ready   tokens/s: 42.2"
    )
    assert lines[2].split() == [
        "NODE",
        "STATE",
        "CHIPS",
        "SRAM",
        "USED",
        "SRAM",
        "SRAM%",
        "TOKENS/S",
        "DEPLOYMENTS",
    ]
    row = lines[3]
    assert row.split() == [
        "rack-0/node-0",
        "Ready",
        "4",
        "Healthy",
        "2.00Mi",
        "8.00Mi",
        "25%",
        "30.2",
        "tiny",
    ]
    # columns line up: every cell of a column starts where its header does
    start = lines[2].index("SRAM USED")
    assert all(
        line[start:].startswith(("SRAM USED", "2.00Mi", "0.50Mi", "0.00Mi")) for line in lines[2:5]
    )
    assert lines[6] == ""  # the nodes' table (header and 3 rows), then a blank line
    deployments = lines[7:]
    assert deployments[0].split() == [h for c in DEPLOYMENT_HEADER for h in c.split()]
    assert deployments[1].split() == ["big", "Pending", "0/0", "0.0", "0", "0.00Mi", "0"]
    assert deployments[2].split() == ["tiny", "Ready", "2/2", "42.2", "3", "2.50Mi", "2"]
    assert len(NODE_HEADER) == 8


def test_no_deployments_says_so() -> None:
    text = render_top(top_report(NODES[:1], []))
    assert text.splitlines()[-1] == "No deployments."
    assert "deployments: none" in text.splitlines()[0]


def test_top_without_a_control_plane_fails_with_why(
    tmp_path: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("LOCKSTEP_SERVER", "LOCKSTEP_TOKEN", "LOCKSTEP_CA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code = main(["top", "--state-dir", str(tmp_path), "-o", "json"])
    assert code == 1
    assert "no control plane" in capsys.readouterr().err


def test_json_output_is_the_report() -> None:
    report = top_report(NODES, DEPLOYMENTS)
    doc = json.loads(json.dumps(report.to_dict()))
    assert [d["name"] for d in doc["deployments"]] == ["big", "tiny"]
    assert doc["nodes"][1]["chips"] == {"Healthy": 3, "Failed": 1}
    assert doc["nodes"][1]["tokens_per_second"] == 12.0
    assert doc["deployments"][1]["tokens_per_second"] == 42.25


def test_token_rates_from_counters() -> None:
    """Counters in, tokens a second out: over the window, summed per node and deployment; a
    counter that goes down (agent restart) starts afresh; silence reads 0 after the window."""
    rates = TokenRates(window=5.0)
    for step in range(11):  # 0.5 s apart: 20 tokens a second on node a, 5 on node b
        t = 100.0 + step * 0.5
        rates.observe("a", [("tiny", 0, 1000 + 10 * step)], t)
        rates.observe("b", [("tiny", 1, 50 + int(2.5 * step)), ("other", 0, 7)], t)
    assert rates.by_node(105.0) == pytest.approx({"a": 20.0, "b": 5.0})
    assert rates.by_deployment(105.0) == pytest.approx({"tiny": 25.0, "other": 0.0})
    rates.observe("a", [("tiny", 0, 3)], 105.5)  # restarted: no negative rate
    assert rates.by_node(105.5)["a"] == 0.0
    rates.observe("a", [("tiny", 0, 13)], 106.0)
    assert rates.by_node(106.0)["a"] == pytest.approx(20.0)
    assert rates.by_node(120.0) == {}  # nothing heard for longer than the window
