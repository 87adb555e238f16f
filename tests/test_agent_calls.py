"""The control plane's bulk path to agents (`orchestrator.agent_calls`): loads and rounds of
unary calls as coroutines on one event loop, against real agent processes."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_helpers import AgentCluster, credentials, make_shard, make_virtual_shard, shard_id

from orchestrator.agent_calls import AgentCalls
from protos import agent_pb2


@pytest.fixture
def calls(session_certs: Path) -> Iterator[AgentCalls]:
    bulk = AgentCalls(credentials(session_certs), fan_out=2)
    try:
        yield bulk
    finally:
        bulk.close()


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed


def test_loads_stream_from_the_store_and_are_checked_by_the_agent(
    agent_cluster: AgentCluster, calls: AgentCalls, tmp_path: Path
) -> None:
    agent = agent_cluster.start("calls/node-0", chips=3)
    real, virtual = make_shard(3 << 19, seed=1), make_virtual_shard(1 << 20, seed=2)  # 2 chunks
    paths = []
    for name, blob in (("real", real), ("virtual", virtual)):
        path = tmp_path / name
        path.write_bytes(blob)
        paths.append(path)
    loads = [
        calls.load(agent.address, agent.node, chip, path, shard_id(blob), timeout=30)
        for chip, (path, blob) in enumerate(zip(paths, (real, virtual), strict=True))
    ]
    replies = [f.result(timeout=60) for f in loads]
    assert [r.bytes_received for r in replies] == [len(real), len(virtual)]
    held = {c.chip: [s.shard_id for s in c.shards] for c in agent.status().chips}
    assert held == {0: [shard_id(real)], 1: [shard_id(virtual)], 2: []}
    # a blob whose bytes are not its name: the agent refuses it (DATA_LOSS), nothing held
    bad = tmp_path / "bad"
    bad.write_bytes(real[:-1] + bytes([real[-1] ^ 1]))
    refused = calls.load(agent.address, agent.node, 2, bad, shard_id(real), timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        refused.result(timeout=60)
    assert info.value.code() is grpc.StatusCode.DATA_LOSS
    assert not agent.status().chips[2].shards
    # refused at its header while its chunks are still going out (no room on a 2 MiB chip):
    # the agent's own status and reason come back, not a transport error
    big = make_shard(3 << 20, seed=3)
    path = tmp_path / "big"
    path.write_bytes(big)
    early = calls.load(agent.address, agent.node, 2, path, shard_id(big), timeout=30)
    with pytest.raises(grpc.RpcError) as info:
        early.result(timeout=60)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "SRAM" in str(info.value.details())


def test_a_round_answers_per_agent_and_a_failed_agent_does_not_stop_the_others(
    agent_cluster: AgentCluster, calls: AgentCalls
) -> None:
    agents = [agent_cluster.start(f"calls/node-{i}", chips=1) for i in (1, 2, 3)]
    nodes = {a.address: a.node for a in agents}
    gone = _closed_port()
    nodes[gone] = "calls/node-9"
    requests = dict.fromkeys(nodes, agent_pb2.StatusRequest())
    answers = calls.call_all("Status", requests, nodes, timeout=10).result(timeout=60)
    assert [answers[a.address].node for a in agents] == [a.node for a in agents]
    assert isinstance(answers[gone], grpc.RpcError)
    assert answers[gone].code() is grpc.StatusCode.UNAVAILABLE
    # the agent's own refusal comes back as its error, per address
    stop = agent_pb2.StartEpochRequest(deployment="nobody", epoch=1)
    refused = calls.call_all("StartEpoch", {agents[0].address: stop}, nodes, 10).result(60)
    assert refused[agents[0].address].code() is grpc.StatusCode.NOT_FOUND


def test_an_agent_is_checked_against_the_node_it_is_called_as(
    agent_cluster: AgentCluster, calls: AgentCalls
) -> None:
    agent = agent_cluster.start("calls/node-4", chips=1)
    wrong = {agent.address: "calls/node-5"}  # another node's name for the same address
    answers = calls.call_all(
        "Status", {agent.address: agent_pb2.StatusRequest()}, wrong, timeout=10
    ).result(timeout=60)
    assert isinstance(answers[agent.address], grpc.RpcError)  # its certificate names node-4
    assert answers[agent.address].code() is grpc.StatusCode.UNAVAILABLE


def test_closed_calls_take_no_more_work(session_certs: Path, tmp_path: Path) -> None:
    bulk = AgentCalls(credentials(session_certs))
    bulk.close()
    bulk.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        bulk.call_all("Status", {}, {}, timeout=1)
    with pytest.raises(RuntimeError, match="closed"):
        bulk.load("127.0.0.1:1", "n", 0, tmp_path / "x", "0" * 64, timeout=1)
