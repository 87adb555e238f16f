"""`agents.hosted.start_agent` with a control plane: it registers and heartbeats exactly like
`run_agent --control-plane` (one shared `start_registration`), and `HostedAgent.stop` ends the
heartbeats. The control plane here is a fake NodeRegistry over mutual TLS that records calls."""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from agent_helpers import wait_for

from agents.hosted import HostedAgentError, start_agent
from protos import admin_pb2, admin_pb2_grpc
from security import certs as certs_mod
from security.tls import server_credentials


class FakeRegistry(admin_pb2_grpc.NodeRegistryServicer):
    def __init__(self) -> None:
        self.registered: list[admin_pb2.RegisterRequest] = []
        self.heartbeats = 0
        self.lock = threading.Lock()

    def Register(self, request: admin_pb2.RegisterRequest, context: Any) -> Any:
        with self.lock:
            self.registered.append(request)
        return admin_pb2.RegisterResponse()

    def HeartbeatStream(self, requests: Any, context: Any) -> Any:
        for _ in requests:
            with self.lock:
                self.heartbeats += 1
        return admin_pb2.HeartbeatStreamResponse()


def test_a_hosted_agent_registers_heartbeats_and_stops(session_certs: Path) -> None:
    fake = FakeRegistry()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_NodeRegistryServicer_to_server(fake, server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(certs_mod.load_control_plane(session_certs))
    )
    server.start()
    agent = start_agent(
        "hosted-a",
        2,
        "dev",
        "127.0.0.1:0",
        certs=str(session_certs),
        control_plane=f"127.0.0.1:{port}",
        rack="rack-3",
        slot=5,
        heartbeat_interval=0.05,
    )
    try:
        wait_for(lambda: fake.heartbeats >= 3, timeout=20, what="heartbeats")
        [request] = fake.registered
        assert (request.node, request.rack, request.slot) == ("hosted-a", "rack-3", 5)
        assert request.address == agent.address and len(request.chips) == 2
    finally:
        agent.stop(0.5)
    # the heartbeat thread has ended (stop joins it), so nothing heartbeats for a dead server
    assert agent.registration is not None and not agent.registration._thread.is_alive()
    server.stop(0)


def test_a_hosted_agent_needs_its_rack_and_slot(session_certs: Path) -> None:
    with pytest.raises(HostedAgentError, match="pass --rack and --slot"):
        start_agent(
            "hosted-b", 1, "dev", "127.0.0.1:0", certs=str(session_certs), control_plane="x:1"
        )
    with pytest.raises(HostedAgentError, match="heartbeat interval must be positive"):
        start_agent("rack-0/node-0", 1, "dev", "127.0.0.1:0", heartbeat_interval=0)
