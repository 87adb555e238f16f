"""An agent hosted inside another process: start the gRPC server, return it, do not block.

`agents.main.run_agent` owns its process: it installs signal handlers, prints the
`listening on HOST:PORT` line and blocks until SIGTERM. A Ray actor cannot do any of that (its
worker process belongs to Ray, signal handlers belong to Ray's main thread, and the actor must
answer calls while it serves), so the Ray runtime starts the agent here instead, by module name
(`importlib.import_module("agents.hosted")`: the orchestrator never imports agent code), and
keeps the returned server until it is told to stop or its process dies.

With `control_plane` it also registers with the control plane and heartbeats, exactly as
`run_agent --control-plane` does (`agents.registration.start_registration`): a Ray-restarted
agent registers again by itself, and `HostedAgent.stop` stops heartbeating before the server.

This is the agent's one start-up path — `run_agent` (the `lpuctl agent` process) calls it too and
adds only the signal handling, the `listening on` line and the wait: certificates from `certs`
(`ensure_agent`), malloc tuning, BLAS pinned before numpy is imported, the service, its server,
metrics, registration. Bad input raises `HostedAgentError` with the message `lpuctl agent`
prints and the exit code it exits with, so an actor's creation fails with a cause a person can
act on.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agents.main import default_certs_dir, is_loopback_listen, pin_blas, tune_malloc
from agents.settings import DEFAULT_SETTINGS, AgentSettings
from placement.errors import InputError
from placement.profiles import get_profile
from security.identity import agent_identity

if TYPE_CHECKING:
    from agents.registration import Registration
    from agents.server import AgentServer

log = logging.getLogger("lockstep.agent")


class HostedAgentError(RuntimeError):
    """The agent cannot start: bad input (`exit_code` 2: profile, certificates, flags) or a
    port that cannot be bound (`exit_code` 1); `lpuctl agent` exits with that code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class HostedAgent:
    """A serving agent: its node, bound `HOST:PORT`, certificate identity and server."""

    node: str
    address: str
    identity: str
    server: AgentServer
    registration: Registration | None = None

    def stop(self, grace: float = 5.0) -> None:
        """Graceful stop: heartbeats end first (the control plane then marks the node
        NotReady instead of sending it work), then health NOT_SERVING, in-flight calls get
        `grace` seconds."""
        if self.registration is not None:
            self.registration.stop()
        self.server.stop(grace)


def start_agent(
    node: str,
    chips: int,
    profile: str,
    listen: str,
    *,
    sram_bytes: int | None = None,
    settings: AgentSettings = DEFAULT_SETTINGS,
    certs: str | None = None,
    insecure: bool = False,
    control_plane: str | None = None,
    rack: str | None = None,
    slot: int | None = None,
    heartbeat_interval: float | None = None,
    metrics_port: int | None = 0,
) -> HostedAgent:
    """Start serving `node`'s chips on `listen` (port 0: any free port) and return at once.

    The arguments mean what they mean for `agents.main.run_agent`; mutual TLS with the node's
    certificate from `certs` unless `insecure` (loopback only, warned on stderr).
    `control_plane` (HOST:PORT of its NodeRegistry) starts registration and heartbeats every
    `heartbeat_interval` seconds (default `settings.heartbeat_interval`); `rack` and `slot`
    default to what the node's name says. `metrics_port`: Prometheus /metrics as for
    `run_agent` (0 any free port, None none), advertised in `Status`.
    """
    try:
        capacity = sram_bytes or get_profile(profile).sram_bytes
    except InputError as exc:
        raise HostedAgentError(f"agent {node}: {exc}") from None
    if heartbeat_interval is not None:
        if not 0 < heartbeat_interval < 1e6:
            raise HostedAgentError(
                f"agent {node}: heartbeat interval must be positive, got {heartbeat_interval}"
            )
        settings = dataclasses.replace(settings, heartbeat_interval=heartbeat_interval)
    if control_plane is not None:
        from agents.registration import rack_slot_for

        try:
            rack, slot = rack_slot_for(node, rack, slot)
        except ValueError as exc:
            raise HostedAgentError(f"agent {node}: {exc}") from None
    creds = None
    directory: str | None = None
    if insecure:
        if not is_loopback_listen(listen):
            raise HostedAgentError(
                f"agent {node}: --insecure is refused on {listen}: plaintext is allowed only on "
                "a loopback address (127.0.0.1, ::1, localhost)"
            )
        print(
            f"agent {node}: WARNING: --insecure: plaintext gRPC with NO authentication; any "
            "local process can drive this agent. Never use outside a development machine.",
            file=sys.stderr,
        )
    else:
        from security.certs import CertError, ensure_agent

        directory = certs or default_certs_dir()
        try:
            creds = ensure_agent(directory, node)
        except (CertError, ValueError, OSError) as exc:
            raise HostedAgentError(f"agent {node}: certificates in {directory}: {exc}") from None
    tune_malloc()
    pin_blas(settings.blas_threads)
    from agents.server import AgentService, start_server  # numpy and gRPC: after the pin
    from security.tls import server_credentials

    try:
        service = AgentService(node, profile, chips, capacity, settings=settings, tls=creds)
    except ValueError as exc:
        raise HostedAgentError(f"agent {node}: {exc}") from None
    try:
        server = start_server(
            service, listen, credentials=None if creds is None else server_credentials(creds)
        )
    except (OSError, RuntimeError) as exc:
        service.close()
        raise HostedAgentError(f"agent {node}: cannot listen on {listen}: {exc}", 1) from None
    if metrics_port is not None:
        from agents.metrics import attach_metrics, metrics_host

        try:
            bound = attach_metrics(server, listen, metrics_port, directory)
        except OSError as exc:
            server.stop(0)
            raise HostedAgentError(
                f"agent {node}: cannot serve metrics on port {metrics_port}: {exc}", 1
            ) from None
        scheme = "http" if insecure else "https"
        log.info("metrics on %s://%s:%d/metrics", scheme, metrics_host(listen), bound)
    host = listen.rsplit(":", 1)[0]
    address = f"{host}:{server.port}"
    log.info("node %s: %d chips x %d bytes SRAM (profile %s)", node, chips, capacity, profile)
    registration = None
    if control_plane is not None:
        from agents.registration import start_registration

        assert rack is not None and slot is not None
        registration = start_registration(
            control_plane,
            creds,
            service,
            node=node,
            rack=rack,
            slot=slot,
            address=address,
            profile=profile,
            interval=settings.heartbeat_interval,
        )
    return HostedAgent(node, address, agent_identity(node), server, registration)
