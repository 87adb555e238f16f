"""The simulated fleet end to end: `lpuctl up --runtime fleet` with six virtual nodes of the
`groq-rack` profile in one fleet process, a real control plane, mutual TLS.

Checked: every virtual node registers and heartbeats; a small preset too large to hold here
(llama-3.2-1b int8: virtual shards) is placed, loaded into virtual SRAM (the declared bytes
reserved, the blob a manifest), synchronized and Ready; timing-only Generate streams
deterministic tokens; two replicas fed the same request have equal hash chains stage by stage;
a killed virtual node is detected, its stages move, the deployment is Ready again and
generates the same tokens; the fleet's endpoints refuse what a real agent refuses, with the
same codes (another node's identity, an agent calling a control-plane method, bad headers,
oversize, bad digests, bad ConfigureReplica fields, text prompts); `lpuctl down` leaves no
process (checked by `running_cluster`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_helpers import wait_for
from test_control_plane import Cluster, running_cluster

from orchestrator.agent_client import blob_manifest, dial, make_header, send_load
from orchestrator.fleet_runtime import send_control, socket_path
from protos import admin_pb2, agent_pb2, agent_pb2_grpc
from protos.load_stream import frame_chunk, load_messages
from security import certs as certs_mod
from security.identity import agent_identity
from security.tls import open_channel

SMALL = """\
apiVersion: lpu.lockstep.dev/v1alpha1
kind: LPUDeployment
metadata: {name: small}
spec:
  model: {preset: llama-3.2-1b}
  precision: int8
  replicas: 2
"""
PROMPT = [11, 22, 33, 44]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("fleet") / "state"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCKSTEP_FLEET_TIME_SCALE", "0")
        with running_cluster(
            state,
            "--runtime",
            "fleet",
            "--profile",
            "groq-rack",
            "--racks",
            "2",
            "--nodes-per-rack",
            "3",
        ) as cluster:
            yield cluster


def _nodes(cluster: Cluster) -> dict[str, admin_pb2.NodeInfo]:
    reply = cluster.stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=cluster.admin)
    return {n.name: n for n in reply.nodes}


def _ready(cluster: Cluster, name: str = "small") -> bool:
    d = cluster.stub.Get(admin_pb2.GetRequest(name=name), metadata=cluster.admin)
    return d.phase == "Ready" and d.ready_replicas == 2


def _channel(cluster: Cluster, node: admin_pb2.NodeInfo) -> grpc.Channel:
    creds = certs_mod.load_control_plane(cluster.paths.certs)
    return dial(node.address, creds, node.name)


def _agent(cluster: Cluster, node: admin_pb2.NodeInfo) -> agent_pb2_grpc.AgentStub:
    return agent_pb2_grpc.AgentStub(_channel(cluster, node))


def _pipelines(cluster: Cluster) -> dict[tuple[int, int], agent_pb2.PipelineStatus]:
    """(replica, stage) -> the stage's status, from every node's agent."""
    out = {}
    for node in _nodes(cluster).values():
        for chip in _agent(cluster, node).Status(agent_pb2.StatusRequest(), timeout=30).chips:
            for p in chip.pipelines:
                out[(p.replica, p.stage)] = p
    return out


def _generate(cluster: Cluster) -> tuple[list[int], int]:
    """A request through the control plane's gateway: its tokens and the replica that served."""
    responses = list(
        cluster.stub.Generate(
            admin_pb2.GenerateRequest(deployment="small", prompt_ids=PROMPT, max_tokens=6),
            metadata=cluster.admin,
            timeout=120,
        )
    )
    return [r.token for r in responses], responses[0].replica


def test_every_virtual_node_registers_in_one_process(fleet: Cluster) -> None:
    nodes = _nodes(fleet)
    assert len(nodes) == 6
    wait_for(lambda: all(n.state == "Ready" for n in _nodes(fleet).values()), timeout=60)
    assert len(fleet.endpoint["agent_pids"]) == 1  # type: ignore[arg-type]
    addresses = {n.address for n in nodes.values()}
    assert len(addresses) == 6  # one port (one certificate) per virtual node


def test_virtual_deployment_ready_and_timing_only_generate(fleet: Cluster) -> None:
    path = fleet.state.parent / "small.yaml"
    path.write_text(SMALL)
    out = fleet.lpuctl("apply", "-f", str(path), "--wait", "--timeout", "150")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _ready(fleet)
    held = [
        s
        for node in _nodes(fleet).values()
        for chip in _agent(fleet, node).Status(agent_pb2.StatusRequest(), timeout=30).chips
        for s in chip.shards
    ]
    assert held and all(s.virtual for s in held)
    assert all(s.reserved_bytes > 100 * s.size_bytes for s in held)  # declared, not stored
    first, replica = _generate(fleet)
    assert len(first) == 6
    second, other = _generate(fleet)  # round robin: the other replica
    assert second == first and other != replica  # the same synthetic tokens


def test_hash_chains_equal_across_replicas(fleet: Cluster) -> None:
    wait_for(lambda: _ready(fleet), timeout=60)
    pipes = _pipelines(fleet)
    stages = sorted(s for r, s in pipes if r == 0)
    assert stages and stages == sorted(s for r, s in pipes if r == 1)

    def settled() -> bool:
        p = _pipelines(fleet)
        return all(p[(0, s)].tick == p[(1, s)].tick for s in stages)

    wait_for(settled, timeout=60)  # both replicas served g1 / g2 and went idle
    pipes = _pipelines(fleet)
    for stage in stages:
        a, b = pipes[(0, stage)], pipes[(1, stage)]
        assert a.tick > 0 and a.phase == "running"
        assert a.chain_head == b.chain_head, f"stage {stage} diverged"


def test_killed_virtual_node_moves_and_is_ready_again(fleet: Cluster) -> None:
    before, _ = _generate(fleet)
    stage0 = next(
        name
        for name, node in _nodes(fleet).items()
        for chip in _agent(fleet, node).Status(agent_pb2.StatusRequest(), timeout=30).chips
        for p in chip.pipelines
        if p.replica == 0 and p.stage == 0
    )
    answer = send_control(socket_path(fleet.state), {"op": "kill", "node": stage0})
    assert answer == {"ok": True}
    wait_for(
        lambda: any(
            e.reason == "AgentDied"
            for e in fleet.stub.Events(admin_pb2.EventsRequest(), metadata=fleet.admin).events
        ),
        timeout=30,
    )
    wait_for(lambda: _ready(fleet), timeout=90)
    wait_for(lambda: _nodes(fleet)[stage0].state == "Ready", timeout=60)  # restarted, empty
    assert _generate(fleet)[0] == before


# --- hostile input at a virtual node's endpoint --------------------------------------------


def _node_stub(fleet: Cluster, identity: str, *, expect: str) -> agent_pb2_grpc.AgentStub:
    """A stub to node `expect`'s port, presenting `identity`'s certificate."""
    node = _nodes(fleet)[expect]
    creds = certs_mod.load(fleet.paths.certs, identity)
    return agent_pb2_grpc.AgentStub(open_channel(node.address, creds, peer=agent_identity(expect)))


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


def test_another_nodes_identity_is_refused_by_the_handshake(fleet: Cluster) -> None:
    names = sorted(_nodes(fleet))
    node = _nodes(fleet)[names[0]]
    creds = certs_mod.load_control_plane(fleet.paths.certs)
    wrong = agent_pb2_grpc.AgentStub(dial(node.address, creds, names[1]))  # expects names[1]
    code = _code(lambda: wrong.Status(agent_pb2.StatusRequest(), timeout=10))
    assert code is grpc.StatusCode.UNAVAILABLE


def test_an_agent_may_not_call_control_plane_methods(fleet: Cluster) -> None:
    names = sorted(_nodes(fleet))
    peer = _node_stub(fleet, agent_identity(names[1]), expect=names[0])
    assert peer.Status(agent_pb2.StatusRequest(), timeout=10).node == names[0]  # allowed
    for call in (
        lambda: peer.UnloadShard(agent_pb2.UnloadShardRequest(chip=0, shard_id="0" * 64)),
        lambda: peer.ConfigureReplica(agent_pb2.ConfigureReplicaRequest(deployment="x")),
        lambda: peer.MarkChipFailed(agent_pb2.MarkChipFailedRequest(chip=0)),
    ):
        assert _code(lambda c=call: c()) is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[misc]


def _spare(fleet: Cluster) -> grpc.Channel:
    """A channel (as the control plane) to a node that holds nothing."""
    node = next(i for _, i in sorted(_nodes(fleet).items()) if not any(c.shards for c in i.chips))
    return _channel(fleet, node)


def test_loads_are_bounded_and_verified_like_a_real_agent(fleet: Cluster) -> None:
    channel = _spare(fleet)
    stub = agent_pb2_grpc.AgentStub(channel)
    path = next((fleet.paths.shards / "blake3").iterdir())
    blob, declared = path.read_bytes(), blob_manifest(path).declared_bytes
    good = make_header(blob, 0, virtual=True, declared_bytes=declared)

    def header(**fields: object) -> agent_pb2.LoadShardHeader:
        h = agent_pb2.LoadShardHeader()
        h.CopyFrom(good)
        for key, value in fields.items():
            setattr(h, key, value)
        return h

    def load(h: agent_pb2.LoadShardHeader, data: bytes = blob) -> grpc.StatusCode:
        return _code(lambda: send_load(channel, load_messages(h, data, 1 << 20), timeout=30))

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert load(header(shard_id="not-hex")) is invalid
    assert load(header(chip=99)) is invalid
    assert load(header(size_bytes=len(blob) + 5)) is invalid  # the stream ends short
    assert load(header(virtual=False)) is invalid  # the manifest says virtual
    assert load(header(declared_bytes=declared - 1)) is invalid  # less than the manifest
    assert load(header(declared_bytes=1 << 40)) is grpc.StatusCode.RESOURCE_EXHAUSTED
    corrupt = bytearray(blob)
    corrupt[-1] ^= 1
    assert load(good, bytes(corrupt)) is grpc.StatusCode.DATA_LOSS
    big = [load_messages(good, blob, 1 << 20)[0], frame_chunk(bytes(6 << 20))]
    assert _code(lambda: send_load(channel, big, timeout=30)) is grpc.StatusCode.RESOURCE_EXHAUSTED
    status = stub.Status(agent_pb2.StatusRequest(), timeout=10)
    assert all(not c.shards and not c.loads and c.sram_used_bytes == 0 for c in status.chips)
    # and a good one still loads, reserving the declared bytes
    reply = send_load(channel, load_messages(good, blob, 1 << 20), timeout=30)
    assert reply.reserved_bytes == declared
    unload = agent_pb2.UnloadShardRequest(chip=0, shard_id=good.shard_id)
    assert stub.UnloadShard(unload, timeout=10).freed_bytes == declared


def test_bad_pipeline_requests_get_a_real_agents_codes(fleet: Cluster) -> None:
    stub = agent_pb2_grpc.AgentStub(_spare(fleet))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    base = dict(deployment="d", replica=0, stages=1, max_batch=1, max_context=8, window=1)
    one = agent_pb2.StageAssignment(stage=0, chips=[0], shard_ids=["0" * 64], chip_names=["c"])
    cases = [
        agent_pb2.ConfigureReplicaRequest(**{**base, "deployment": ""}, assignments=[one]),
        agent_pb2.ConfigureReplicaRequest(**{**base, "window": 10**6}, assignments=[one]),
        agent_pb2.ConfigureReplicaRequest(**base),  # no assignments
        agent_pb2.ConfigureReplicaRequest(**base, assignments=[one]),  # c not in replica_chips
    ]
    for request in cases:
        assert _code(lambda r=request: stub.ConfigureReplica(r, timeout=10)) is invalid  # type: ignore[misc]
    unheld = agent_pb2.ConfigureReplicaRequest(**base, assignments=[one], replica_chips=["c"])
    assert _code(lambda: stub.ConfigureReplica(unheld, timeout=10)) is grpc.StatusCode.NOT_FOUND
    # A replica not configured here: NOT_FOUND, as on a real agent; an empty name is invalid.
    missing = grpc.StatusCode.NOT_FOUND
    start = agent_pb2.StartEpochRequest(deployment="nope", replica=0, epoch=1)
    assert _code(lambda: stub.StartEpoch(start, timeout=10)) is missing
    halt = agent_pb2.HaltRequest(deployment="nope", replica=3)
    assert _code(lambda: stub.Halt(halt, timeout=10)) is missing
    remove = agent_pb2.RemoveReplicaRequest(deployment="nope")
    assert _code(lambda: stub.RemoveReplica(remove, timeout=10)) is missing
    digests = agent_pb2.StageDigestsRequest(deployment="nope", period=4, count=1)
    assert _code(lambda: stub.StageDigests(digests, timeout=10)) is missing
    for empty in (
        lambda: stub.StartEpoch(agent_pb2.StartEpochRequest(epoch=1), timeout=10),
        lambda: stub.Halt(agent_pb2.HaltRequest(), timeout=10),
        lambda: stub.RemoveReplica(agent_pb2.RemoveReplicaRequest(), timeout=10),
    ):
        assert _code(empty) is invalid
    text = agent_pb2.GenerateRequest(deployment="nope", prompt_text="hi", max_tokens=1)
    assert _code(lambda: list(stub.Generate(text, timeout=10))) is missing
    execute = agent_pb2.ExecuteRequest(chip=0, shard_id="0" * 64)
    assert _code(lambda: stub.Execute(execute, timeout=10)) is grpc.StatusCode.NOT_FOUND
    inject = agent_pb2.InjectFaultRequest(deployment="small")
    assert (
        _code(lambda: stub.InjectFault(inject, timeout=10)) is grpc.StatusCode.FAILED_PRECONDITION
    )


def test_the_fleet_stops_with_its_control_plane(fleet: Cluster) -> None:
    pid = int(fleet.endpoint["agent_pids"][0])  # type: ignore[index]
    assert Path(f"/proc/{pid}").exists()
    path = socket_path(fleet.state)
    assert os.stat(path).st_mode & 0o077 == 0  # only its user may kill
    assert "error" in send_control(path, {"op": "reboot"})
    assert "error" in send_control(path, {"no-op": 1})
    assert send_control(path, {"op": "kill", "node": "rack-9/node-9"}) == {"ok": False}
