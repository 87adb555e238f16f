"""Silent-data-corruption detection end to end: `lpuctl up --allow-fault-injection` (a
control-plane process and six agent processes), tiny-llama with 2 replicas.

A clean `lpuctl verify` exits 0 (and records the replicas' agreed per-stage digests); a bit
flipped in one stage's output of one replica (InjectFault, only accepted by agents started
with the flag) makes the next `lpuctl verify` exit 1 naming the replica, stage, chip and tick;
the chip is failed in the store and on its agent, events and the `Verified` condition say
so, the control plane brings the deployment back to Ready on other chips, and verify passes
again. The admin API refuses Verify to a viewer and for an unknown deployment.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import grpc
import pytest
from agent_helpers import wait_for
from test_control_plane import EXAMPLE, Cluster, running_cluster

from orchestrator.agent_client import dial
from protos import admin_pb2, agent_pb2, agent_pb2_grpc
from security import certs as certs_mod

NAME = "tiny-llama"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("lockstep-verify")
    with running_cluster(state, "--allow-fault-injection") as made:
        run = made.lpuctl("apply", "-f", str(EXAMPLE), "--wait", "--timeout", "150")
        assert run.returncode == 0, run.stdout + run.stderr
        yield made


def verify(cluster: Cluster) -> subprocess.CompletedProcess[str]:
    return cluster.lpuctl("verify", NAME)


def ready(cluster: Cluster) -> bool:
    got = cluster.stub.Get(admin_pb2.GetRequest(name=NAME), metadata=cluster.viewer, timeout=10)
    return got.phase == "Ready" and got.ready_replicas == 2


def condition(cluster: Cluster, kind: str) -> admin_pb2.Condition | None:
    got = cluster.stub.Get(admin_pb2.GetRequest(name=NAME), metadata=cluster.viewer, timeout=10)
    return next((c for c in got.conditions if c.type == kind), None)


def stage_of(cluster: Cluster, replica: int, stage: int) -> tuple[str, str, str, int]:
    """(agent address, node, chip name, last tick) of a replica's stage, from the agents."""
    creds = certs_mod.load_control_plane(cluster.paths.certs)
    nodes = cluster.stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=cluster.viewer).nodes
    for node in nodes:
        channel = dial(node.address, creds, node.name)
        try:
            status = agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.StatusRequest(), timeout=10)
        finally:
            channel.close()
        for chip in status.chips:
            for p in chip.pipelines:
                if (p.deployment, p.replica, p.stage) == (NAME, replica, stage):
                    return node.address, node.name, f"{node.name}/chip-{chip.chip}", p.tick
    raise AssertionError(f"no agent runs replica {replica} stage {stage}")


def test_a_clean_verify_passes(cluster: Cluster) -> None:
    run = verify(cluster)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "canary matched: 2 of 2 Ready replica(s)" in run.stdout
    verified = condition(cluster, "Verified")
    assert verified is not None and (verified.status, verified.reason) == ("True", "CanaryMatched")
    as_json = cluster.lpuctl("verify", NAME, "-o", "json")
    report = json.loads(as_json.stdout)
    assert report["passed"] is True and sorted(report["replicas"]) == [0, 1]


def test_verify_is_refused_to_a_viewer_and_for_an_unknown_deployment(cluster: Cluster) -> None:
    with pytest.raises(grpc.RpcError) as denied:
        cluster.stub.Verify(
            admin_pb2.VerifyRequest(deployment=NAME), metadata=cluster.viewer, timeout=30
        )
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as missing:
        cluster.stub.Verify(
            admin_pb2.VerifyRequest(deployment="nope"), metadata=cluster.admin, timeout=30
        )
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as anonymous:
        cluster.stub.Verify(admin_pb2.VerifyRequest(deployment=NAME), timeout=30)
    assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
    for name in ("", "x" * 100_000, "../tiny-llama", "tiny-llama\x00"):
        with pytest.raises(grpc.RpcError) as odd:
            cluster.stub.Verify(
                admin_pb2.VerifyRequest(deployment=name), metadata=cluster.admin, timeout=30
            )
        assert odd.value.code() is grpc.StatusCode.NOT_FOUND
        assert len(odd.value.details() or "") < 2000
    run = cluster.lpuctl("verify", "nope")
    assert run.returncode == 1 and "NOT_FOUND" in run.stderr


def test_a_flipped_bit_is_found_fenced_and_failed_over(cluster: Cluster) -> None:
    got = cluster.stub.Get(admin_pb2.GetRequest(name=NAME), metadata=cluster.viewer, timeout=10)
    stages = next(r.stages for r in got.replica_info if r.index == 1)
    stage = 1 if stages > 1 else 0
    address, node, chip, tick = stage_of(cluster, 1, stage)
    channel = dial(address, certs_mod.load_control_plane(cluster.paths.certs), node)
    try:
        agent_pb2_grpc.AgentStub(channel).InjectFault(
            agent_pb2.InjectFaultRequest(
                deployment=NAME, replica=1, stage=stage, from_tick=tick + 1, bit=9
            ),
            timeout=30,
        )
    finally:
        channel.close()

    run = verify(cluster)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "silent data corruption" in run.stdout
    assert f"replica 1 stage {stage} (chip {chip})" in run.stdout
    assert "at tick" in run.stdout and chip in run.stdout

    chips = cluster.stub.ListChips(admin_pb2.ListChipsRequest(), metadata=cluster.viewer).chips
    failed = {c.id: c for c in chips if c.health == "Failed"}
    assert chip in failed, sorted(failed)
    assert "silent data corruption" in failed[chip].reason
    events = cluster.stub.Events(
        admin_pb2.EventsRequest(deployment=NAME), metadata=cluster.viewer, timeout=10
    ).events
    reasons = [e.reason for e in events]
    assert "SilentDataCorruption" in reasons and "ChipFenced" in reasons
    verified = condition(cluster, "Verified")
    assert verified is not None and verified.status == "False"
    assert verified.reason == "SilentDataCorruption"

    # the chip-failure path brings the replica back on other chips; then the canary agrees
    wait_for(lambda: ready(cluster), timeout=180, interval=0.5, what="Ready 2/2 again")
    got = cluster.stub.Get(admin_pb2.GetRequest(name=NAME), metadata=cluster.viewer, timeout=10)
    assert all(chip not in r.chips for r in got.replica_info)
    again = verify(cluster)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "canary matched: 2 of 2" in again.stdout


def test_the_canary_also_runs_periodically(cluster: Cluster) -> None:
    """`spec.verification.intervalSeconds: 1`: the control plane's verification loop runs the
    canary by itself once the new generation is Ready (no lpuctl verify here)."""
    last = cluster.stub.Events(
        admin_pb2.EventsRequest(deployment=NAME, limit=1000), metadata=cluster.viewer
    ).events
    after = max(e.id for e in last)
    periodic = cluster.state / "periodic.yaml"
    periodic.write_text(EXAMPLE.read_text() + "  verification: {intervalSeconds: 1}\n")
    run = cluster.lpuctl("apply", "-f", str(periodic), "--wait", "--timeout", "150")
    assert run.returncode == 0, run.stdout + run.stderr

    def periodic_runs() -> list[admin_pb2.Event]:
        events = cluster.stub.Events(
            admin_pb2.EventsRequest(deployment=NAME, after_id=after, limit=1000),
            metadata=cluster.viewer,
        ).events
        return [e for e in events if e.reason == "CanaryMatched"]

    runs = wait_for(periodic_runs, timeout=60, interval=0.2, what="a periodic canary")
    assert "canary matched: 2 of 2 Ready replica(s)" in runs[0].message
    verified = condition(cluster, "Verified")
    assert verified is not None and verified.status == "True"
