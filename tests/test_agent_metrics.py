"""An agent process's Prometheus metrics, scraped over TLS after a load and a Generate.

tiny-llama in two stages on one agent (chips 0 and 1), five tokens generated; then a link
frame the agent must refuse and one stream over the per-peer bound. The scrape verifies the
agent's own certificate (its DNS name, the cluster CA) and every value is checked against
what the agent did.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_helpers import AgentCluster, AgentProcess, scrape, tiny_request, wait_for
from agent_helpers import parse_metrics as parse

from agents.interconnect import EXCHANGE
from agents.settings import DEFAULT_SETTINGS
from orchestrator.compiler import ShardRef, compile_plan
from orchestrator.serving import bring_up_replica
from placement.models import MODEL_PRESETS
from placement.planner import make_plan
from placement.topology import preset_topology
from protos import agent_pb2, interconnect_pb2
from security.identity import agent_identity

TINY = MODEL_PRESETS["tiny-llama"]
DEPLOYMENT = "metered"
SRAM = 64 << 20


class Silent:
    """A request iterator that sends nothing until `release` is set."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def __iter__(self) -> Iterator[interconnect_pb2.LinkFrame]:
        self.release.wait(60)
        return
        yield interconnect_pb2.LinkFrame()


def exchange(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    return channel.stream_stream(
        EXCHANGE,
        request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
        response_deserializer=interconnect_pb2.LinkAck.FromString,
    )


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, agent_cluster: AgentCluster
) -> tuple[AgentProcess, list[ShardRef]]:
    plan = make_plan(tiny_request(DEPLOYMENT, stages=2), preset_topology(1, "dev-whole-ops"))
    refs = compile_plan(plan, TINY, 3, tmp_path_factory.mktemp("store"))
    agent = agent_cluster.start("metered-0", chips=2, extra=["--sram-bytes", "64MiB"])
    where = {r.chip: (agent.address, r.binding.stage) for r in refs}
    channels = {agent.address: agent.channel}
    bring_up_replica(plan, refs, where, channels, nodes={agent.address: agent.node})
    request = agent_pb2.GenerateRequest(
        deployment=DEPLOYMENT, request_id="r", prompt_ids=[5, 17, 3], max_tokens=5
    )
    assert len(list(agent.stub.Generate(request, timeout=60))) == 5
    return agent, refs


def test_metrics_count_loads_sram_ticks_and_tokens(
    served: tuple[AgentProcess, list[ShardRef]], session_certs: Path
) -> None:
    agent, refs = served
    m = scrape(agent, session_certs)
    assert m[("lockstep_agent_info", (agent.node, "dev"))] == 1
    status = agent.status()
    for chip in (0, 1):
        key = (str(chip),)
        (ref,) = [r for r in refs if r.binding.stage == chip]
        assert m[("lockstep_agent_sram_capacity_bytes", key)] == SRAM
        assert m[("lockstep_agent_sram_used_bytes", key)] == status.chips[chip].sram_used_bytes > 0
        assert m[("lockstep_agent_shards_held", key)] == 1
        assert m[("lockstep_agent_chip_healthy", key)] == 1
        assert m[("lockstep_agent_loaded_bytes_total", key)] == ref.size_bytes
        assert m[("lockstep_agent_shard_loads_total", key)] == 1
    assert m[("lockstep_agent_tokens_generated_total", (DEPLOYMENT, "0"))] == 5
    # Every stage ran the prompt and the decode ticks (a bubble or two at the ends).
    for stage in ("0", "1"):
        assert m[("lockstep_agent_stage_ticks_total", (DEPLOYMENT, "0", stage))] >= 5
    # Both stages on one agent: no framed link connection, none refused (every reason shown;
    # tests/test_hostile.py sees them move).
    assert m[("lockstep_agent_framed_link_connections_open", ())] == 0
    for reason in ("max_connections", "max_connections_per_peer", "tls_handshake", "hello"):
        assert m[("lockstep_agent_framed_link_connections_refused_total", (reason,))] == 0


def test_metrics_count_rejected_frames_and_refused_streams(
    served: tuple[AgentProcess, list[ShardRef]], session_certs: Path
) -> None:
    agent, _ = served
    rogue = agent.dial(identity=agent_identity("rogue"))
    release = threading.Event()
    calls = []
    try:
        # A stage frame on a stream that names no stage: refused, the stream ends.
        with pytest.raises(grpc.RpcError) as info:
            list(exchange(rogue)(iter([interconnect_pb2.LinkFrame(tick=1)]), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # One stream over the per-peer bound is refused at admission.
        for _ in range(DEFAULT_SETTINGS.max_streams_per_peer + 1):
            calls.append(exchange(rogue)(iter(Silent(release)), timeout=60))
        (refused,) = wait_for(
            lambda: [c for c in calls if c.done()], what="one refused stream", timeout=30
        )
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release.set()
        for call in calls:
            call.cancel()
        rogue.close()
    m = scrape(agent, session_certs)
    assert m[("lockstep_agent_link_frames_rejected_total", ("INVALID_ARGUMENT",))] == 1
    assert m[("lockstep_agent_streams_refused_total", ("Exchange",))] == 1


def test_plaintext_is_not_served(served: tuple[AgentProcess, list[ShardRef]]) -> None:
    agent, _ = served
    port = agent.status().metrics_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        try:
            reply = raw.recv(4096)
        except ConnectionResetError:
            reply = b""
    assert b"lockstep_agent" not in reply


def test_metrics_port_off_and_insecure(agent_cluster: AgentCluster) -> None:
    off = agent_cluster.start("metered-off", chips=1, extra=["--metrics-port", "off"])
    assert off.status().metrics_port == 0
    plain = agent_cluster.start("metered-plain", chips=1, insecure=True)
    port = plain.status().metrics_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
    m = parse(reply.partition(b"\r\n\r\n")[2].decode())
    assert m[("lockstep_agent_sram_capacity_bytes", ("0",))] > 0


def test_a_bad_metrics_port_is_refused(agent_cluster: AgentCluster) -> None:
    with pytest.raises(AssertionError, match="metrics-port"):
        agent_cluster.start("metered-bad", chips=1, extra=["--metrics-port", "http"])
