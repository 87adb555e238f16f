"""Register this agent with the control plane and heartbeat to it (`--control-plane ADDR`).

The agent dials the control plane's `NodeRegistry` with its own certificate (mutual TLS): the
control plane takes the node's name from that certificate, never from the message, so an agent
can register only itself. One daemon thread per agent process: `Register` (rack, slot, chips,
SRAM per chip, the address it serves on), then `Heartbeat` every `interval` seconds (0.5 s by
default, `AgentSettings.heartbeat_interval`) carrying the failed chips. When the control plane
answers that it does not know the node (it restarted with a fresh store, or dropped the node)
or a call fails, the thread registers again after the next interval: the agent outlives
control-plane restarts and needs no ordering at start-up.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

import grpc

from protos import admin_pb2, admin_pb2_grpc, agent_pb2
from security.certs import Credentials
from security.identity import CONTROL_PLANE
from security.tls import open_channel

log = logging.getLogger("lockstep.agent.registration")

_SLOT = re.compile(r"^(?P<rack>.+)/node-(?P<slot>\d+)$")


def rack_and_slot(node: str) -> tuple[str, int]:
    """`rack-0/node-3` → ("rack-0", 3): the default naming (`orchestrator.core.node_name`).
    Other names need `--rack` and `--slot`; ValueError says so."""
    match = _SLOT.match(node)
    if match is None:
        raise ValueError(
            f"cannot tell the rack and slot of node {node!r} from its name (expected "
            "RACK/node-SLOT, e.g. rack-0/node-3): pass --rack and --slot"
        )
    return match["rack"], int(match["slot"])


def reconnect_options(interval: float) -> list[tuple[str, int]]:
    """Channel options that retry a lost control plane at least every two heartbeat
    intervals. gRPC's default reconnect backoff grows to two minutes: a control plane back
    after a crash would not hear from its agents for that long, and its heartbeat timeout
    would declare their nodes dead and tear down the replicas they still serve."""
    ceiling = max(200, int(interval * 2000))
    return [
        ("grpc.initial_reconnect_backoff_ms", min(200, ceiling)),
        ("grpc.max_reconnect_backoff_ms", ceiling),
    ]


class Registration:
    """The registration and heartbeat thread of one agent (see the module docstring)."""

    def __init__(
        self,
        control_plane: str,
        credentials: Credentials | None,
        *,
        node: str,
        rack: str,
        slot: int,
        address: str,
        profile: str,
        status: Callable[[], agent_pb2.StatusResponse],
        interval: float = 0.5,
    ) -> None:
        self.node = node
        self.request = admin_pb2.RegisterRequest(
            node=node, rack=rack, slot=slot, address=address, profile=profile
        )
        self.status = status
        self.interval = interval
        self.channel = open_channel(
            control_plane, credentials, peer=CONTROL_PLANE, options=reconnect_options(interval)
        )
        self.stub = admin_pb2_grpc.NodeRegistryStub(self.channel)
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registration", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.channel.close()

    def _chips(self) -> list[admin_pb2.RegisteredChip]:
        return [
            admin_pb2.RegisteredChip(
                index=c.chip,
                sram_bytes=c.sram_capacity_bytes,
                failed=c.health == agent_pb2.CHIP_HEALTH_FAILED,
                reason=c.failure_reason,
            )
            for c in self.status().chips
        ]

    def _run(self) -> None:
        known = False
        timeout = max(5.0, self.interval * 4)
        while not self._stop.is_set():
            try:
                if not known:
                    request = admin_pb2.RegisterRequest()
                    request.CopyFrom(self.request)
                    request.chips.extend(self._chips())
                    self.stub.Register(request, timeout=timeout)
                    known = True
                    self.registered.set()
                    log.info("node %s: registered with the control plane", self.node)
                else:
                    failed = [c for c in self._chips() if c.failed]
                    reply = self.stub.Heartbeat(
                        admin_pb2.HeartbeatRequest(chips=failed), timeout=timeout
                    )
                    known = reply.known
            except grpc.RpcError as exc:
                if known or not self.registered.is_set():
                    log.warning(
                        "node %s: control plane: %s: %s", self.node, exc.code().name, exc.details()
                    )
                known = False
            self._stop.wait(self.interval)


def rack_slot_for(node: str, rack: str | None, slot: int | None) -> tuple[str, int]:
    """The rack and slot an agent registers with: the given ones, else what the node's name
    says (`rack_and_slot`); ValueError when neither tells."""
    if rack is not None and slot is not None:
        return rack, slot
    named_rack, named_slot = rack_and_slot(node)
    return (named_rack if rack is None else rack), (named_slot if slot is None else slot)


def start_registration(
    control_plane: str,
    credentials: Credentials | None,
    service: Any,
    *,
    node: str,
    rack: str,
    slot: int,
    address: str,
    profile: str,
    interval: float,
) -> Registration:
    """Register `service`'s node with the control plane and heartbeat from now on: the one way
    both hosts of an agent (`agents.main.run_agent`, `agents.hosted.start_agent`) do it.
    `service` is the `AgentService` whose Status reports the chips."""
    registration = Registration(
        control_plane,
        credentials,
        node=node,
        rack=rack,
        slot=slot,
        address=address,
        profile=profile,
        status=lambda: service.Status(agent_pb2.StatusRequest(), None),
        interval=interval,
    )
    registration.start()
    return registration
