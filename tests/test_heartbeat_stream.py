"""The node registry's heartbeat stream (`orchestrator.registry_server`): beats land in the
controller's buffer, the agent's own registration thread reconnects, and every hostile input
ends the stream with the right status while the other nodes' beats keep landing: a wrong
identity, a beat for another node, an unregistered node, a flood, an oversized beat, a
malformed beat, a stream that never sends, and a second stream of the same node."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agent_helpers import credentials, wait_for

from agents.registration import Registration
from orchestrator.admin_server import RegistryService
from orchestrator.controller import Controller, GrpcAgentGateway, ShardCompiler
from orchestrator.core import node_name
from orchestrator.core.model import Chip, ChipHealth, Node
from orchestrator.registry_server import MAX_BEAT_BYTES, RegistryServer
from orchestrator.store import Store
from placement.profiles import get_profile
from protos import admin_pb2, admin_pb2_grpc, agent_pb2
from security import certs as certs_mod
from security.identity import AGENT_PREFIX, CONTROL_PLANE, agent_identity
from security.tls import open_channel

NODES = [node_name("rack-0", i) for i in range(3)]
IDLE = 3.0
RATE = 20.0


@dataclass
class Registry:
    store: Store
    controller: Controller
    server: RegistryServer
    address: str
    certs: Path

    def channel(self, identity: str) -> grpc.Channel:
        creds = credentials(self.certs, identity)
        return open_channel(
            self.address,
            creds,
            peer=CONTROL_PLANE,
            options=[("grpc.use_local_subchannel_pool", 1)],
        )

    def stub(self, node: str) -> admin_pb2_grpc.NodeRegistryStub:
        return admin_pb2_grpc.NodeRegistryStub(self.channel(agent_identity(node)))


@pytest.fixture
def registry(session_certs: Path, tmp_path: Path) -> Iterator[Registry]:
    profile = get_profile("dev")
    store = Store(tmp_path / "store.db")
    store.register_nodes(
        [
            Node(
                name=n,
                rack="rack-0",
                slot=i,
                address=f"127.0.0.1:{20000 + i}",
                identity=AGENT_PREFIX + n,
                chips=(Chip(0, profile.sram_bytes, ChipHealth.HEALTHY, ""),),
                last_heartbeat=time.time(),
            )
            for i, n in enumerate(NODES)
        ],
        time.time(),
    )
    gateway = GrpcAgentGateway(certs_mod.load_control_plane(session_certs))
    controller = Controller(store, gateway, ShardCompiler(tmp_path / "shards"), profile)
    server = RegistryServer(
        RegistryService(store, controller),
        certs_mod.load_control_plane(session_certs),
        idle_timeout=IDLE,
        max_beats_per_second=RATE,
    )
    port = server.start()
    try:
        yield Registry(store, controller, server, f"127.0.0.1:{port}", session_certs)
    finally:
        server.stop(0.5)
        gateway.close()
        store.close()


def _paced(count: int, every: float, **fields: object) -> Iterator[admin_pb2.HeartbeatRequest]:
    for _ in range(count):
        yield admin_pb2.HeartbeatRequest(**fields)  # type: ignore[arg-type]
        time.sleep(every)


def _refusal(call: grpc.Future, timeout: float = 30.0) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call.result(timeout=timeout)
    return info.value


def _beats_of(registry: Registry) -> set[str]:
    return {node for node, _ in registry.controller.heartbeats.drain()}


def test_beats_land_in_the_buffer_and_a_clean_end_counts_them(registry: Registry) -> None:
    stub = registry.stub(NODES[0])
    reply = stub.HeartbeatStream(_paced(5, 0.01, node=NODES[0]), timeout=30)
    assert reply.beats == 5
    assert _beats_of(registry) == {NODES[0]}
    wait_for(lambda: registry.server.handlers.streams == {}, what="the stream forgotten")


def test_wrong_identity_is_refused(registry: Registry) -> None:
    as_plane = admin_pb2_grpc.NodeRegistryStub(registry.channel(CONTROL_PLANE))
    error = _refusal(as_plane.HeartbeatStream.future(_paced(1, 0), timeout=30))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    # a node's certificate beating for another node
    stub = registry.stub(NODES[0])
    error = _refusal(stub.HeartbeatStream.future(_paced(3, 0, node=NODES[1]), timeout=30))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert NODES[1] in (error.details() or "")
    # a valid agent certificate of a node that never registered
    error = _refusal(registry.stub("rack-9/node-9").HeartbeatStream.future(_paced(1, 0)))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "Register first" in (error.details() or "")
    assert _beats_of(registry) == set()


def test_a_flood_is_cut_off_and_the_others_keep_beating(registry: Registry) -> None:
    stop = threading.Event()

    def steady() -> Iterator[admin_pb2.HeartbeatRequest]:
        while not stop.is_set():
            yield admin_pb2.HeartbeatRequest()
            stop.wait(0.1)

    good = registry.stub(NODES[1]).HeartbeatStream.future(steady(), timeout=60)
    try:
        flood = registry.stub(NODES[0]).HeartbeatStream.future(
            (admin_pb2.HeartbeatRequest() for _ in range(100_000)), timeout=60
        )
        error = _refusal(flood)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "heartbeats a second" in (error.details() or "")
        registry.controller.heartbeats.drain()
        wait_for(lambda: NODES[1] in _beats_of(registry), timeout=10, what="the steady node")
        assert not good.done()
    finally:
        stop.set()
    assert good.result(timeout=30).beats > 0


def test_an_oversized_or_malformed_beat_ends_the_stream(registry: Registry) -> None:
    big = admin_pb2.HeartbeatRequest(
        chips=[admin_pb2.RegisteredChip(index=i, failed=True, reason="x" * 200) for i in range(400)]
    )
    assert big.ByteSize() > MAX_BEAT_BYTES
    error = _refusal(registry.stub(NODES[0]).HeartbeatStream.future(iter([big]), timeout=30))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{MAX_BEAT_BYTES:,} bytes" in (error.details() or "")
    # bytes that are not a HeartbeatRequest (a raw call, past the stub's serializer)
    channel = registry.channel(agent_identity(NODES[0]))
    raw = channel.stream_unary(
        "/lockstep.admin.v1.NodeRegistry/HeartbeatStream",
        request_serializer=None,
        response_deserializer=None,
    )
    error = _refusal(raw.future(iter([b"\xff\xff\xff"]), timeout=30))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert registry.store.node(NODES[0]) is not None  # nothing else changed
    assert registry.controller.heartbeats.drain() == []


def test_a_stream_that_never_sends_ends_when_idle(registry: Registry) -> None:
    hold = threading.Event()

    def silent() -> Iterator[admin_pb2.HeartbeatRequest]:
        hold.wait(60)
        yield from ()

    started = time.monotonic()
    call = registry.stub(NODES[2]).HeartbeatStream.future(silent(), timeout=60)
    try:
        error = _refusal(call)
    finally:
        hold.set()
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert IDLE * 0.9 <= time.monotonic() - started < 30
    wait_for(lambda: registry.server.handlers.streams == {}, what="the stream forgotten")


def test_a_newer_stream_replaces_the_older(registry: Registry) -> None:
    stop = threading.Event()

    def beats() -> Iterator[admin_pb2.HeartbeatRequest]:
        while not stop.is_set():
            yield admin_pb2.HeartbeatRequest()
            stop.wait(0.1)

    stub = registry.stub(NODES[0])
    old = stub.HeartbeatStream.future(beats(), timeout=60)
    try:
        wait_for(lambda: NODES[0] in registry.server.handlers.streams, what="the first stream")
        first = registry.server.handlers.streams[NODES[0]]
        new = stub.HeartbeatStream.future(beats(), timeout=60)
        error = _refusal(old)
        assert error.code() is grpc.StatusCode.ABORTED
        assert "newer heartbeat stream" in (error.details() or "")
        wait_for(
            lambda: registry.server.handlers.streams.get(NODES[0]) not in (None, first),
            what="the newer stream",
        )
        assert not new.done()
    finally:
        stop.set()
    assert new.result(timeout=30).beats > 0


def test_an_agent_registers_streams_and_reconnects(registry: Registry) -> None:
    """The agent's registration thread: Register, one stream; when the stream is ended under
    it (a newer stream of the same node replaces it) it registers again and streams on."""
    status = agent_pb2.StatusResponse(
        chips=[agent_pb2.ChipStatus(chip=0, sram_capacity_bytes=1 << 21)]
    )
    agent = Registration(
        registry.address,
        credentials(registry.certs, agent_identity(NODES[1])),
        node=NODES[1],
        rack="rack-0",
        slot=1,
        address="127.0.0.1:20001",
        profile="dev",
        status=lambda: status,
        interval=0.05,
    )
    agent.start()
    try:
        wait_for(lambda: agent.streams == 1, timeout=20, what="the agent's stream")
        wait_for(lambda: NODES[1] in _beats_of(registry), timeout=10, what="its beats")
        # a stream of the same node (a restarted agent would open one) ends the agent's
        intruder = registry.stub(NODES[1]).HeartbeatStream.future(_paced(1, 0), timeout=30)
        intruder.result(timeout=30)
        wait_for(lambda: agent.streams >= 2, timeout=20, what="the agent's new stream")
        registry.controller.heartbeats.drain()
        wait_for(lambda: NODES[1] in _beats_of(registry), timeout=10, what="beats again")
    finally:
        agent.stop()
    assert not agent._thread.is_alive()


def test_stopping_the_server_ends_the_streams_cleanly(
    registry: Registry, capfd: pytest.CaptureFixture[str]
) -> None:
    stop = threading.Event()

    def beats() -> Iterator[admin_pb2.HeartbeatRequest]:
        while not stop.is_set():
            yield admin_pb2.HeartbeatRequest()
            stop.wait(0.1)

    calls = [registry.stub(n).HeartbeatStream.future(beats(), timeout=60) for n in NODES]
    try:
        wait_for(lambda: len(registry.server.handlers.streams) == 3, what="three streams")
        registry.server.stop(2.0)
        for call in calls:
            error = _refusal(call)
            assert error.code() is grpc.StatusCode.UNAVAILABLE  # agents reconnect on it
            # ours, unless a starved machine had the server's stop cancel it before it went
            assert error.details() in ("the control plane is stopping", "Cancelling all calls")
    finally:
        stop.set()
    assert "Traceback" not in capfd.readouterr().err


def test_token_counters_are_bounded(registry: Registry) -> None:
    """A beat's token counters become rates, at most 64 of a beat, names clipped: a node
    cannot make the control plane keep more than that for it."""
    rates = registry.server.handlers.service.rates
    many = [
        admin_pb2.TokenCounter(deployment=f"{'x' * 300}-{i}", replica=0, generated=i)
        for i in range(150)  # about 46 KiB: under the beat bound
    ]

    def beats() -> Iterator[admin_pb2.HeartbeatRequest]:
        for step in range(3):
            yield admin_pb2.HeartbeatRequest(tokens=many)
            yield admin_pb2.HeartbeatRequest(
                tokens=[admin_pb2.TokenCounter(deployment="tiny", replica=0, generated=10 * step)]
            )
            time.sleep(0.3)

    assert registry.stub(NODES[0]).HeartbeatStream(beats(), timeout=30).beats == 6
    by_deployment = rates.by_deployment(time.time())
    assert len(by_deployment) <= 65 and by_deployment["tiny"] > 0
    assert max(len(name) for name in by_deployment) <= 200
