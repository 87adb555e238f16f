"""Register this agent with the control plane and heartbeat to it (`--control-plane ADDR`).

The agent dials the control plane's `NodeRegistry` with its own certificate (mutual TLS): the
control plane takes the node's name from that certificate, never from the message, so an agent
can register only itself. One daemon thread per agent process: `Register` (rack, slot, chips,
SRAM per chip, the address it serves on), then one long-lived `HeartbeatStream` carrying a
beat every `interval` seconds (0.5 s by default, `AgentSettings.heartbeat_interval`) with the
failed chips; the first beat names the node. gRPC reads the beats from a generator on its own
thread, so an agent holds two threads for this whatever the interval.

When the stream ends — the control plane does not know the node (it restarted with a fresh
store: FAILED_PRECONDITION), it went away, a newer stream replaced this one, or any error — the
thread registers again and opens a new stream, after a jittered backoff that starts at half
the interval and doubles up to `MAX_BACKOFF` seconds. The cap is short on purpose: the
control plane counts a node NotReady after its heartbeat timeout (2.5 s by default), and its
restart gives every node a fresh beat, so an agent must be back well inside that. The channel's
own reconnect backoff is capped the same way (gRPC's default grows to two minutes), and the
channel pings a quiet connection so a vanished control plane ends the stream.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from protos import admin_pb2, admin_pb2_grpc, agent_pb2
from security.certs import Credentials
from security.identity import CONTROL_PLANE
from security.tls import open_channel

log = logging.getLogger("lockstep.agent.registration")

MAX_BACKOFF = 1.0  # seconds (see the module docstring)
MAX_REASON = 200  # characters of a failed chip's reason in a beat

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
        ("grpc.min_reconnect_backoff_ms", min(200, ceiling)),
        ("grpc.max_reconnect_backoff_ms", ceiling),
        ("grpc.keepalive_time_ms", 10000),  # a half-open stream to a vanished peer is noticed
        ("grpc.keepalive_timeout_ms", 5000),
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
        tokens: Callable[[], list[tuple[str, int, int]]] = list,
    ) -> None:
        self.node = node
        self.request = admin_pb2.RegisterRequest(
            node=node, rack=rack, slot=slot, address=address, profile=profile
        )
        self.status = status
        self.tokens = tokens
        self.interval = interval
        self.channel = open_channel(
            control_plane, credentials, peer=CONTROL_PLANE, options=reconnect_options(interval)
        )
        self.stub = admin_pb2_grpc.NodeRegistryStub(self.channel)
        self.registered = threading.Event()
        self.streams = 0  # heartbeat streams opened (a test and a log read it)
        self._call: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registration", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(5.0)
        self.channel.close()

    def _chips(self) -> list[admin_pb2.RegisteredChip]:
        return [
            admin_pb2.RegisteredChip(
                index=c.chip,
                sram_bytes=c.sram_capacity_bytes,
                failed=c.health == agent_pb2.CHIP_HEALTH_FAILED,
                reason=c.failure_reason[:MAX_REASON],
            )
            for c in self.status().chips
        ]

    def _beats(self) -> Iterator[admin_pb2.HeartbeatRequest]:
        """The stream's beats, one every interval until `stop` (gRPC's thread iterates)."""
        node = self.node
        while not self._stop.is_set():
            yield admin_pb2.HeartbeatRequest(
                chips=[c for c in self._chips() if c.failed],
                node=node,
                tokens=[
                    admin_pb2.TokenCounter(deployment=d, replica=r, generated=n)
                    for d, r, n in self.tokens()
                ],
            )
            node = ""  # the first beat names the node; the certificate says it anyway
            if self._stop.wait(self.interval):
                return

    def _run(self) -> None:
        timeout = max(5.0, self.interval * 4)
        failures = 0
        while not self._stop.is_set():
            try:
                request = admin_pb2.RegisterRequest()
                request.CopyFrom(self.request)
                request.chips.extend(self._chips())
                self.stub.Register(request, timeout=timeout)
                if not self.registered.is_set():
                    log.info("node %s: registered with the control plane", self.node)
                self.registered.set()
                failures = 0
                self._call = self.stub.HeartbeatStream.future(self._beats())
                self.streams += 1
                if self._stop.is_set():  # stop() may have run before _call was set
                    self._call.cancel()
                self._call.result()
            except grpc.RpcError as exc:
                if not self._stop.is_set():
                    log.warning(
                        "node %s: control plane: %s: %s", self.node, exc.code().name, exc.details()
                    )
            except grpc.FutureCancelledError:
                pass
            failures += 1
            backoff = min(MAX_BACKOFF, self.interval * 2 ** (failures - 1) / 2)
            self._stop.wait(backoff * random.uniform(0.5, 1.0))


def token_counters(
    stages: Iterable[tuple[str, int, int, int, int]],
) -> list[tuple[str, int, int]]:
    """(deployment, replica, tokens streamed) of every replica with a stage here that
    streams tokens (stage 0), from `ReplicaHost.stage_counters()` rows."""
    totals: dict[tuple[str, int], int] = {}
    for deployment, replica, _stage, _ticks, tokens in stages:
        if tokens:
            totals[(deployment, replica)] = totals.get((deployment, replica), 0) + tokens
    return [(d, r, n) for (d, r), n in sorted(totals.items())]


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
        tokens=lambda: token_counters(service.replicas.stage_counters()),
    )
    registration.start()
    return registration
