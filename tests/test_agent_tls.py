"""Mutual TLS and authorization on agent processes: certificates refused at the handshake,
admin RPCs only from the control plane, Link streams only from the configured upstream agent
with the replica's secret — and a concurrently served replica untouched by every refusal.

Two agents serve tiny-llama in two stages (stage 0 on n0, stage 1 on n1), so each stage has a
remote upstream: n0 feeds stage 1 on n1, n1 feeds stage 0 on n0.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agent_helpers import ROOT, AgentCluster, AgentProcess, credentials, tiny_request
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agents.executor import ReferenceExecutor
from agents.interconnect import EXCHANGE, frame_checksum, target_metadata
from orchestrator.agent_client import channel_options
from orchestrator.compiler import compile_plan
from orchestrator.serving import BringUpOptions, bring_up_replica
from orchestrator.weights import SeededWeights
from placement.models import MODEL_PRESETS
from placement.planner import make_plan
from placement.topology import preset_topology
from protos import agent_pb2, agent_pb2_grpc, interconnect_pb2
from security import certs
from security.identity import CONTROL_PLANE, agent_identity
from security.tls import link_metadata, open_channel

TINY = MODEL_PRESETS["tiny-llama"]
SEED = 3
DEPLOYMENT = "sec"
SECRET = bytes(range(100, 132))
PROMPT = (5, 17, 1024, 3)


@dataclass
class Ring:
    agents: list[AgentProcess]
    expected: tuple[int, ...]

    def served_tokens(self) -> tuple[int, ...]:
        replies = self.agents[0].stub.Generate(
            agent_pb2.GenerateRequest(
                deployment=DEPLOYMENT, request_id="probe", prompt_ids=PROMPT, max_tokens=4
            ),
            timeout=60,
        )
        return tuple(r.token for r in replies)


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory, agent_cluster: AgentCluster) -> Ring:
    plan = make_plan(tiny_request(DEPLOYMENT, stages=2), preset_topology(1, "dev-whole-ops"))
    refs = compile_plan(plan, TINY, SEED, tmp_path_factory.mktemp("store"))
    agents = [agent_cluster.start(f"n{i}", extra=["--sram-bytes", "64MiB"]) for i in range(2)]
    where = {r.chip: (agents[r.binding.stage].address, 0) for r in refs}
    up = bring_up_replica(
        plan,
        refs,
        where,
        agent_cluster.channels(),
        nodes=agent_cluster.nodes(),
        options=BringUpOptions(link_secret=SECRET),
    )
    ups = {a.stage: a.upstream_identity for r in up.requests.values() for a in r.assignments}
    assert ups == {0: agent_identity("n1"), 1: agent_identity("n0")}
    reference = ReferenceExecutor(
        TINY, SeededWeights(TINY, SEED, "F16"), max_batch=4, max_context=64
    )
    expected = reference.generate(PROMPT, 4).tokens
    ring = Ring(agents, expected)
    assert ring.served_tokens() == expected
    return ring


def status_as(agent: AgentProcess, channel: grpc.Channel) -> agent_pb2.StatusResponse:
    with channel:
        return agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.StatusRequest(), timeout=10)


def refused_status(agent: AgentProcess, channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        status_as(agent, channel)
    return info.value


def foreign_cluster(tmp_path: Path) -> Path:
    directory = tmp_path / "other"
    certs.init_cluster(directory)
    return directory


def test_a_certificate_from_another_ca_fails_the_handshake(ring: Ring, tmp_path: Path) -> None:
    agent = ring.agents[0]
    other = certs.load_control_plane(foreign_cluster(tmp_path))
    error = refused_status(agent, open_channel(agent.address, other, peer=agent.identity))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert agent.status().chips[0].shards  # still serving, still holding its shard


def test_an_expired_certificate_fails_the_handshake(
    ring: Ring, tmp_path: Path, session_certs: Path
) -> None:
    """Same CA, control-plane identity, expired yesterday."""
    directory = tmp_path / "expired"
    directory.mkdir()
    for name in ("ca.crt", "ca.key"):
        shutil.copy(session_certs / name, directory / name)
    certs.issue(directory, CONTROL_PLANE, days=-1)
    expired = certs.load_control_plane(directory)
    cert = x509.load_pem_x509_certificate(expired.cert_pem)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    agent = ring.agents[0]
    error = refused_status(agent, open_channel(agent.address, expired, peer=agent.identity))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_no_client_certificate_or_plaintext_fails(ring: Ring, session_certs: Path) -> None:
    agent = ring.agents[0]
    ca_only = grpc.ssl_channel_credentials(root_certificates=credentials(session_certs).ca_pem)
    anonymous = grpc.secure_channel(
        agent.address, ca_only, options=[("grpc.ssl_target_name_override", "n0.agent.lockstep")]
    )
    assert refused_status(agent, anonymous).code() == grpc.StatusCode.UNAVAILABLE
    plaintext = grpc.insecure_channel(agent.address)
    assert refused_status(agent, plaintext).code() == grpc.StatusCode.UNAVAILABLE


def test_the_agent_certificate_is_checked_against_the_dialled_node(ring: Ring) -> None:
    """The control plane dialling n0's address but expecting n1 refuses n0's certificate."""
    wrong = ring.agents[0].dial(node="n1")
    assert refused_status(ring.agents[0], wrong).code() == grpc.StatusCode.UNAVAILABLE


def _admin_calls() -> list[tuple[str, Callable[[agent_pb2_grpc.AgentStub], object]]]:
    empty = {"timeout": 10}
    return [
        ("LoadShard", lambda s: s.LoadShard(iter([]), **empty)),
        ("UnloadShard", lambda s: s.UnloadShard(agent_pb2.UnloadShardRequest(), **empty)),
        ("Execute", lambda s: s.Execute(agent_pb2.ExecuteRequest(), **empty)),
        ("MarkChipFailed", lambda s: s.MarkChipFailed(agent_pb2.MarkChipFailedRequest(), **empty)),
        (
            "ConfigureReplica",
            lambda s: s.ConfigureReplica(agent_pb2.ConfigureReplicaRequest(), **empty),
        ),
        ("StartEpoch", lambda s: s.StartEpoch(agent_pb2.StartEpochRequest(), **empty)),
        ("Halt", lambda s: s.Halt(agent_pb2.HaltRequest(deployment=DEPLOYMENT), **empty)),
        (
            "RemoveReplica",
            lambda s: s.RemoveReplica(
                agent_pb2.RemoveReplicaRequest(deployment=DEPLOYMENT), **empty
            ),
        ),
        (
            "Generate",
            lambda s: list(
                s.Generate(
                    agent_pb2.GenerateRequest(
                        deployment=DEPLOYMENT, request_id="x", prompt_ids=[1], max_tokens=1
                    ),
                    **empty,
                )
            ),
        ),
        ("LinkPing", lambda s: s.LinkPing(agent_pb2.LinkPingRequest(), **empty)),
    ]


@pytest.mark.parametrize("identity", [agent_identity("n1"), agent_identity("n7")])
def test_an_agent_certificate_may_not_call_admin_rpcs(ring: Ring, identity: str) -> None:
    """Halt, RemoveReplica and Generate would all have changed the served replica."""
    agent = ring.agents[0]
    before = agent.status()
    with agent.dial(identity=identity) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        for method, call in _admin_calls():
            with pytest.raises(grpc.RpcError) as info:
                call(stub)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, method
            details = str(info.value.details())
            assert identity in details and f"Agent/{method}" in details, details
        # Status (and health) are open to every agent of the cluster.
        assert len(stub.Status(agent_pb2.StatusRequest(), timeout=10).chips) == 8
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    after = agent.status()
    assert [c.sram_used_bytes for c in after.chips] == [c.sram_used_bytes for c in before.chips]
    assert after.chips[0].pipelines[0].error == ""
    assert ring.served_tokens() == ring.expected


def test_the_control_plane_certificate_may_call_admin_rpcs(ring: Ring) -> None:
    agent = ring.agents[0]
    with pytest.raises(grpc.RpcError) as info:  # reaches the handler: a real answer
        agent.stub.UnloadShard(agent_pb2.UnloadShardRequest(chip=5, shard_id="0" * 64), timeout=10)
    assert info.value.code() not in (
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert agent.status().chips[0].shards


def _link(
    target: AgentProcess, identity: str, stage: int, metadata: tuple[tuple[str, str], ...]
) -> grpc.RpcError:
    frame = interconnect_pb2.LinkFrame(
        deployment=DEPLOYMENT, to_stage=stage, epoch=0, tick=10**6, slot=-1, payload=b"x"
    )
    frame.checksum = frame_checksum(frame)
    with target.dial(identity=identity) as channel:
        exchange = channel.stream_stream(
            EXCHANGE,
            request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
            response_deserializer=interconnect_pb2.LinkAck.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(exchange(iter([frame]), timeout=30, metadata=metadata))
    return info.value


@pytest.mark.parametrize(
    ("identity", "secret", "code", "words"),
    [
        # n1's own certificate, valid and from the cluster CA, but not stage 1's upstream.
        (agent_identity("n1"), SECRET, grpc.StatusCode.PERMISSION_DENIED, "configured upstream"),
        (agent_identity("n5"), SECRET, grpc.StatusCode.PERMISSION_DENIED, "configured upstream"),
        (CONTROL_PLANE, SECRET, grpc.StatusCode.PERMISSION_DENIED, "may not call"),
        # The configured upstream's certificate without the replica's secret.
        (agent_identity("n0"), None, grpc.StatusCode.UNAUTHENTICATED, "link secret"),
        (agent_identity("n0"), b"\x00" * 32, grpc.StatusCode.PERMISSION_DENIED, "secret"),
    ],
)
def test_a_link_is_accepted_only_from_the_configured_upstream_with_the_secret(
    ring: Ring, identity: str, secret: bytes | None, code: grpc.StatusCode, words: str
) -> None:
    target = ring.agents[1]  # stage 1, fed by n0
    metadata = (
        *target_metadata(DEPLOYMENT, 0, 1, time.time_ns()),
        *(link_metadata(secret) if secret else ()),
    )
    error = _link(target, identity, 1, metadata)
    assert error.code() == code, error.details()
    assert words in str(error.details())
    pipeline = target.status().chips[0].pipelines[0]
    assert pipeline.error == "" and pipeline.phase != "failed"
    assert ring.served_tokens() == ring.expected


def _run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agents.main", "--node", "solo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_insecure_on_a_non_loopback_address_exits_2(listen: str) -> None:
    done = _run_agent("--listen", listen, "--insecure")
    assert done.returncode == 2
    assert "--insecure is refused" in done.stderr and listen in done.stderr
    assert done.stdout == ""


def test_insecure_and_certs_are_exclusive(tmp_path: Path) -> None:
    done = _run_agent("--insecure", "--certs", str(tmp_path))
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


def test_an_insecure_agent_on_loopback_warns_and_serves_plaintext(
    fresh_agent_cluster: AgentCluster,
) -> None:
    agent = fresh_agent_cluster.start("plain", chips=1, insecure=True)
    assert "WARNING: --insecure" in agent.stderr()
    assert len(agent.status().chips) == 1
    with grpc.insecure_channel(agent.address, options=channel_options()) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        assert stub.Status(agent_pb2.StatusRequest(), timeout=10).chips


def test_an_agent_creates_the_ca_and_its_certificate_on_first_start(
    tmp_path: Path, fresh_agent_cluster: AgentCluster
) -> None:
    directory = tmp_path / "fresh"
    agent = fresh_agent_cluster.start("first", chips=1, extra=["--certs", str(directory)])
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((directory / "agents" / "first.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (directory / "ca.key").stat().st_mode & 0o077 == 0
    # The control plane of that cluster (issued from the new CA) is accepted.
    certs.issue(directory, CONTROL_PLANE)
    cp = certs.load_control_plane(directory)
    channel = open_channel(agent.address, cp, peer=agent.identity, options=channel_options())
    assert len(status_as(agent, channel).chips) == 1
    # The session's control plane is of another cluster.
    assert refused_status(agent, agent.channel).code() == grpc.StatusCode.UNAVAILABLE
