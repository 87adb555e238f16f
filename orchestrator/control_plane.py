"""The embedded control plane as one process: store, controller, servers and the agents.

`python -m orchestrator.control_plane --state DIR` (what `lpuctl up` starts, detached):

    DIR/store.db        the SQLite store (WAL)
    DIR/certs/          the cluster CA, the control plane's and the agents' certificates
    DIR/tokens          bearer tokens (`TOKEN ROLE NAME`): one admin, one viewer
    DIR/shards/         the shard store (content-addressed blobs)
    DIR/logs/           the control plane's and every agent's log
    DIR/endpoint.json   written once serving: admin and registry addresses, pid, profile
    DIR/ports.json      the admin, registry and metrics ports, kept across restarts
    DIR/agents.json     the process runtime's agents (pid, start time, address, command)

The admin, registry and metrics ports listen on `--listen HOST` (default 127.0.0.1: this
machine only). Agents on other hosts (`--ray-address`) need a routable address: listen on one
(or on 0.0.0.0), and the address given to the runtimes and written to endpoint.json is
`--advertise HOST`, by default the listen host or, for a wildcard, this host's address on its
default route. The control plane's certificate names both hosts in its SANs (re-issued when
they change), so a client may also verify it by address.

Agents start through a runtime adapter chosen by name (`--runtime process|ray`, and with
`--ray-address ADDR` one agent per LPU host of an existing Ray cluster;
`orchestrator.ray_runtime` is imported only when asked for). On SIGTERM or SIGINT the process
stops the controller and the servers, stops and reaps every agent, removes endpoint.json and
exits 0. Agents that die are restarted (`ControlPlane._supervise`).

**Surviving its own crash.** A control plane killed with SIGKILL leaves its agents running and
serving. Started again on the same state directory (`lpuctl up`), it binds the ports it had
(`ports.json`, so the agents' registration loops reach it at the address they were given and
clients at the one they knew; a port taken meanwhile falls back to any free one, and then the
process runtime replaces its agents instead of adopting them), adopts the agents still running
(`ProcessRuntime`'s `agents.json`; with `--ray-address`, Ray's detached named actors by name),
and its controller asks every stored node's agent for its `Status` before deciding anything: the
shards the agents still hold are committed by shard id and not loaded again, replicas still
running at their stored epoch are left alone (`orchestrator.adoption`), and a deployment that
was loading loads only what is missing. Requests in flight through the Generate gateway at the
crash fail on the client with UNAVAILABLE (the connection is gone): retry them.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.admin_server import Servers, start_servers
from orchestrator.controller import Controller, GrpcAgentGateway, ShardCompiler
from orchestrator.core import CoreSettings, node_name
from orchestrator.metrics import ControlPlaneCollector, serve_metrics
from orchestrator.runtime import NodeSpec, Runtime
from orchestrator.state_files import AGENTS_FILE as AGENTS_FILE  # re-exported, as below
from orchestrator.state_files import ENDPOINT_FILE as ENDPOINT_FILE
from orchestrator.state_files import PORTS_FILE as PORTS_FILE
from orchestrator.state_files import TOKENS_FILE as TOKENS_FILE
from orchestrator.state_files import StatePaths, TokenError, load_tokens
from orchestrator.state_files import token_for as token_for
from orchestrator.store import Store, StoreError
from orchestrator.verify import VerificationLoop
from placement.errors import InputError
from placement.profiles import get_profile
from security.certs import CertError, init_cluster, load_control_plane, paths_for
from security.identity import CONTROL_PLANE

log = logging.getLogger("lockstep.control_plane")


def previous_ports(paths: StatePaths) -> dict[str, int]:
    """The ports an earlier control plane of this state directory served on (none when the
    file is absent or unreadable)."""
    try:
        data = json.loads(paths.ports.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        k: v
        for k, v in data.items()
        if k in ("admin", "registry", "metrics") and isinstance(v, int) and 0 < v < 65536
    }


def prepare_state(root: str | Path, hosts: tuple[str, ...] = ()) -> StatePaths:
    """Create the state directory, the CA and certificates, and tokens (idempotent).

    `hosts`: the addresses the control plane serves on, for its certificate's SANs."""
    paths = StatePaths(Path(root))
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(exist_ok=True)
    paths.shards.mkdir(exist_ok=True)
    init_cluster(paths.certs, hosts=hosts)
    if not paths.tokens.exists():
        fd = os.open(paths.tokens, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# TOKEN ROLE NAME (roles: admin, viewer)\n")
            f.write(f"{secrets.token_hex(32)} admin admin\n")
            f.write(f"{secrets.token_hex(32)} viewer viewer\n")
    return paths


WILDCARDS = ("0.0.0.0", "::", "")


def host_port(host: str, port: int) -> str:
    """`HOST:PORT`, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def routable_host(listen_host: str) -> str:
    """The address others reach a server on `listen_host` at: the host itself, or for a
    wildcard this machine's address on its default route (a UDP `connect` picks the route
    and sends nothing), else whatever the host name resolves to."""
    if listen_host not in WILDCARDS:
        return listen_host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never reached
            return str(probe.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def certificate_hosts(listen_host: str, advertise: str) -> tuple[str, ...]:
    """The hosts the control plane's certificate must name (a wildcard is not a name)."""
    return tuple(dict.fromkeys(h for h in (listen_host, advertise) if h not in WILDCARDS))


TEXT_HEADROOM_BYTES = 256 << 10
"""SRAM each simulated chip has beyond its profile's. The planner budgets a stage-0 chip for
weights, KV cache and activations but not for the tokenizer its shard carries (100 KiB for
tiny-llama), so on the `dev` profile stage 0's blob (2,113,232 bytes) overflows a 2 MiB chip.
Until the planner counts it, the embedded cluster's chips have this much room for it (the
planner still plans against the profile's capacity)."""


def node_specs(racks: int, nodes_per_rack: int, profile: str) -> list[NodeSpec]:
    chip = get_profile(profile)
    sram = chip.sram_bytes + TEXT_HEADROOM_BYTES
    return [
        NodeSpec(node_name(f"rack-{r}", s), f"rack-{r}", s, chip.chips_per_node, profile, sram)
        for r in range(racks)
        for s in range(nodes_per_rack)
    ]


def discovered_specs(profile: str) -> list[NodeSpec]:
    """The nodes of the joined Ray cluster (`--ray-address`): one per host advertising a
    `lockstep-host:` resource, with the same SRAM headroom as `node_specs`."""
    from orchestrator.ray_runtime import discover_nodes

    chip = get_profile(profile)
    specs = discover_nodes(profile, default_chips=chip.chips_per_node)
    if not specs:
        raise ValueError(
            "the Ray cluster has no host advertising a lockstep-host:<host> resource "
            "(ray start --resources '{\"lockstep-host:HOST\": 4096}')"
        )
    sram = chip.sram_bytes + TEXT_HEADROOM_BYTES
    return [s if s.sram_bytes is not None else replace(s, sram_bytes=sram) for s in specs]


def make_runtime(
    name: str,
    paths: StatePaths,
    registry: str,
    interval: float,
    ray_address: str | None = None,
    agent_args: tuple[str, ...] = (),
    owns_ray: bool = False,
) -> Runtime:
    if ray_address is not None and name != "ray":
        raise ValueError(f"--ray-address joins a Ray cluster: it needs --runtime ray, not {name}")
    if agent_args and name != "process":
        raise ValueError(f"agent flags {list(agent_args)} need --runtime process, not {name}")
    if name == "process":
        from orchestrator.process_runtime import ProcessRuntime

        return ProcessRuntime(
            paths.certs,
            registry,
            paths.logs,
            heartbeat_interval=interval,
            agent_args=agent_args,
            state_file=paths.agents,
        )
    try:
        module = importlib.import_module(f"orchestrator.{name}_runtime")
    except ImportError as exc:
        raise ValueError(f"runtime {name!r} is not available here: {exc}") from None
    factory: Any = getattr(module, "make_runtime", None)
    if factory is not None:
        runtime: Runtime = factory(
            certs=paths.certs,
            control_plane=registry,
            log_dir=paths.logs,
            heartbeat_interval=interval,
            **({} if ray_address is None else {"address": ray_address}),
            **({"owns_ray": True} if owns_ray else {}),
        )
    else:  # an adapter without the factory: its agents must register by themselves
        cls: Any = getattr(module, f"{name.title()}Runtime", None)
        if cls is None:
            raise ValueError(f"orchestrator.{name}_runtime has no make_runtime(...)")
        log.warning(
            "orchestrator.%s_runtime has no make_runtime(certs, control_plane, log_dir, "
            "heartbeat_interval): its agents are not told where to register",
            name,
        )
        runtime = cls(paths.certs)
    return runtime


class ControlPlane:
    """Everything of one embedded control plane, started and stopped together."""

    def __init__(
        self,
        state: str | Path,
        *,
        profile: str = "dev",
        racks: int = 2,
        nodes_per_rack: int = 3,
        runtime: str = "process",
        listen: str = "127.0.0.1",
        advertise: str | None = None,
        admin_listen: str | None = None,
        registry_listen: str | None = None,
        metrics_port: int = 0,
        settings: CoreSettings | None = None,
        ray_address: str | None = None,
        allow_fault_injection: bool = False,
    ) -> None:
        """`listen`: the host the admin, registry and metrics ports bind (module docstring);
        `advertise`: the host others reach them at (default: `routable_host(listen)`);
        `admin_listen` (HOST:PORT) overrides where the admin API binds (default: `listen`,
        any port); `registry_listen` likewise for the node registry (a fixed port for agents
        that are told where to register, e.g. the Kubernetes DaemonSet)."""
        self.ray_address = ray_address
        self.owns_ray = False
        if runtime == "ray":  # before any gRPC server or channel: see ray_runtime.connect_ray
            ray_runtime: Any = importlib.import_module("orchestrator.ray_runtime")
            self.owns_ray = ray_runtime.connect_ray(ray_address)
        self.agent_args = ("--allow-fault-injection",) if allow_fault_injection else ()
        self.specs: list[NodeSpec] = []
        self.listen = listen.strip("[]")
        self.advertise = (advertise or "").strip("[]") or routable_host(self.listen)
        self.paths = prepare_state(state, certificate_hosts(self.listen, self.advertise))
        self.profile = get_profile(profile)
        self.racks, self.nodes_per_rack, self.runtime_name = racks, nodes_per_rack, runtime
        before = previous_ports(self.paths)
        self.settings = settings or CoreSettings()
        self.store = Store(self.paths.store)
        creds = load_control_plane(self.paths.certs)
        self.gateway = GrpcAgentGateway(creds)
        self.controller = Controller(
            self.store,
            self.gateway,
            ShardCompiler(self.paths.shards),
            self.profile,
            settings=self.settings,
        )
        tokens = load_tokens(self.paths.tokens)
        for attempt in (before, {}):  # the ports it had, else any free ones
            self.admin_listen = admin_listen or host_port(self.listen, attempt.get("admin", 0))
            try:
                self.servers: Servers = start_servers(
                    self.store,
                    self.controller,
                    self.gateway,
                    self.profile,
                    creds,
                    tokens,
                    admin_listen=self.admin_listen,
                    registry_listen=registry_listen
                    or host_port(self.listen, attempt.get("registry", 0)),
                )
                break
            except (RuntimeError, OSError) as exc:  # grpc: RuntimeError("Failed to bind ...")
                if not attempt:
                    raise OSError(str(exc)) from None
                log.warning("the previous ports %s are taken (%s): using new ones", attempt, exc)
        self.verification = VerificationLoop(self.servers.service.verifier, self.store)
        self.runtime: Runtime | None = None
        self.restart_backoff = 1.0
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        cert, key = paths_for(self.paths.certs, CONTROL_PLANE)
        collector = ControlPlaneCollector(
            self.store, self.profile, self.settings, self.controller.stats
        )
        try:
            self.metrics_server, self.metrics_port = serve_metrics(
                collector,
                self.listen,
                metrics_port or before.get("metrics", 0),
                str(cert),
                str(key),
            )
        except OSError:
            if not before.get("metrics") or metrics_port:
                raise
            self.metrics_server, self.metrics_port = serve_metrics(
                collector, self.listen, 0, str(cert), str(key)
            )

    @property
    def admin_address(self) -> str:
        return host_port(self.advertise, self.servers.admin_port)

    @property
    def registry_address(self) -> str:
        """Where agents register: handed to the runtimes, so routable from their hosts."""
        return host_port(self.advertise, self.servers.registry_port)

    def start(self) -> None:
        """Start the agents, then the controller (so after a restart the nodes' grace period
        of one heartbeat timeout starts when their agents are up, not before), then publish
        the endpoint."""
        self.runtime = make_runtime(
            self.runtime_name,
            self.paths,
            self.registry_address,
            self.settings.heartbeat_interval,
            self.ray_address,
            self.agent_args,
            self.owns_ray,
        )
        if self.ray_address is None:
            self.specs = node_specs(self.racks, self.nodes_per_rack, self.profile.name)
        else:  # joined a Ray cluster: one agent per host that advertises LPU chips
            self.specs = discovered_specs(self.profile.name)
        self.runtime.start_agents(self.specs)
        adopted = list(getattr(self.runtime, "adopted", list)())
        for node in adopted:
            self.store.add_event(
                time.time(),
                "Normal",
                "AgentAdopted",
                f"the agent of {node} outlived the previous control plane: adopted",
                node=node,
            )
        self.controller.start()
        self.verification.start()
        self._supervisor.start()
        endpoint = {
            "admin": self.admin_address,
            "registry": self.registry_address,
            "metrics": f"https://{host_port(self.advertise, self.metrics_port)}/metrics",
            "listen": self.listen,
            "pid": os.getpid(),
            "profile": self.profile.name,
            "nodes": len(self.specs),
            "runtime": self.runtime_name,
            "agent_pids": list(getattr(self.runtime, "pids", list)()),
            "adopted": adopted,
        }
        ports = {
            "admin": self.servers.admin_port,
            "registry": self.servers.registry_port,
            "metrics": self.metrics_port,
        }
        for path, data in ((self.paths.ports, ports), (self.paths.endpoint, endpoint)):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            tmp.replace(path)

    def _supervise(self) -> None:
        """Restart agents that died (the runtime reports them, polled every 0.1 s). A death
        first marks the node's chips failed (`Controller.agent_died`) and waits for the
        controller to decide the failover (the stages there move onto spares); once no
        replica uses the node's chips (`_restartable`: at most `RESTART_WAIT` later) the agent
        is restarted and registers again as a fresh node whose empty chips become spares.
        Like Ray's `max_restarts=-1` for the process runtime; at most one restart of a node
        per `restart_backoff` seconds."""
        specs = {s.name: s for s in self.specs}
        last: dict[str, float] = {}
        pending: dict[str, float] = {}  # dead node -> when its death was recorded
        while not self._stopping.wait(min(0.1, self.settings.heartbeat_interval)):
            if self.runtime is None:
                continue
            dead = self._record_deaths()
            now = time.monotonic()
            if dead:  # deaths noticed meanwhile belong to the same incident (one move)
                dead += self._record_deaths()
            for node in dead:
                if node in specs:
                    pending.setdefault(node, now)
            due = self._restartable(pending, now)
            for node in due:
                del pending[node]
                wait = self.restart_backoff - (now - last.get(node, -1e9))
                if wait > 0 and self._stopping.wait(wait):
                    return
                last[node] = time.monotonic()
            if due and not self._stopping.is_set():
                try:
                    self.runtime.start_agents([specs[n] for n in due])
                except (OSError, RuntimeError) as exc:
                    log.error("restarting agents %s: %s", due, exc)
                else:
                    for node in due:
                        self.store.add_event(
                            time.time(), "Normal", "AgentRestarted", f"restarted {node}", node=node
                        )

    def _restartable(self, pending: dict[str, float], now: float) -> list[str]:
        """The dead nodes whose agents may start again: no replica uses their chips any more
        (the failover moved the stages), or `RESTART_WAIT` passed. A replica in its failover
        backoff moves its stages only when the backoff ends; an agent restarted before would
        come back with empty, healthy chips and the replica would reload there instead of
        moving. Past the wait (no spare to move to, a long backoff) the node comes back as
        it is: its chips are spares again, or the replica reloads on them."""
        if not pending:
            return []
        used = {
            c.rsplit("/chip-", 1)[0] for chips in self.store.replica_chips().values() for c in chips
        }
        return sorted(n for n, t in pending.items() if n not in used or now - t >= RESTART_WAIT)

    def _record_deaths(self) -> list[str]:
        """Agents the runtime reports dead: an `AgentDied` event each, their chips marked
        failed, and — before anything restarts them — the controller's passes that move
        their stages onto spares (a restarted agent's chips come back as spares)."""
        assert self.runtime is not None
        dead = self.runtime.dead_agents()
        for node in dead:
            self.store.add_event(
                time.time(), "Warning", "AgentDied", f"the agent of {node} exited", node=node
            )
            self.controller.agent_died(node, "agent died (reported by the runtime)")
        if dead:
            self.controller.wait_passes(1, timeout=5.0)
        return dead

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor.is_alive():
            self._supervisor.join(30)
        self.paths.endpoint.unlink(missing_ok=True)
        self.verification.stop()
        self.controller.stop()
        self.metrics_server.shutdown()
        self.servers.stop()
        if self.runtime is not None:
            self.runtime.stop()
        self.gateway.close()
        self.store.close()


START_ERRORS = (ValueError, OSError, RuntimeError, InputError, TokenError, CertError, StoreError)
"""What a control plane that cannot start raises (RuntimeError: Ray could not be joined or
started); `main` and the operator turn it into one line and exit 1."""


def add_arguments(
    parser: argparse.ArgumentParser, *, racks: int = 2, racks_help: str | None = None
) -> None:
    """The control plane's flags, shared by `python -m orchestrator.control_plane` and the
    Kubernetes operator (which runs the same control plane); `from_arguments` reads them."""
    parser.add_argument("--state", required=True, help="the control plane's state directory")
    parser.add_argument("--profile", default="dev")
    parser.add_argument("--racks", type=int, default=racks, help=racks_help)
    parser.add_argument("--nodes-per-rack", type=int, default=3)
    parser.add_argument("--runtime", default="process")
    parser.add_argument("--ray-address", help="join this Ray cluster (with --runtime ray)")
    parser.add_argument(
        "--listen",
        default="127.0.0.1",
        metavar="HOST",
        help="address the admin, registry and metrics ports bind (0.0.0.0: every interface)",
    )
    parser.add_argument(
        "--advertise",
        metavar="HOST",
        help="address agents and clients reach the control plane at (default: the --listen "
        "host, or for 0.0.0.0 this host's address on its default route)",
    )
    parser.add_argument("--admin-listen", help="HOST:PORT of the admin API (default: --listen)")
    parser.add_argument(
        "--registry-listen", help="HOST:PORT of the node registry (default: --listen, any port)"
    )
    parser.add_argument("--metrics-port", type=int, default=0, help="HTTPS /metrics (0: any)")
    parser.add_argument(
        "--allow-fault-injection",
        action="store_true",
        help="start the agents with --allow-fault-injection (tests only; process runtime)",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=CoreSettings.heartbeat_timeout,
        metavar="SECONDS",
        help="a node not heard from for this long is NotReady and its replicas are replaced "
        f"(default {CoreSettings.heartbeat_timeout:g})",
    )


def from_arguments(args: argparse.Namespace) -> ControlPlane:
    """The control plane `add_arguments`' flags describe (raises one of `START_ERRORS`)."""
    return ControlPlane(
        args.state,
        profile=args.profile,
        racks=args.racks,
        nodes_per_rack=args.nodes_per_rack,
        runtime=args.runtime,
        listen=args.listen,
        advertise=args.advertise,
        admin_listen=args.admin_listen,
        registry_listen=args.registry_listen,
        metrics_port=args.metrics_port,
        settings=CoreSettings(heartbeat_timeout=args.heartbeat_timeout),
        ray_address=args.ray_address,
        allow_fault_injection=args.allow_fault_injection,
    )


RESTART_WAIT = 10.0  # seconds a dead node's agent waits for its stages to move (_restartable)
GC_THRESHOLDS = (100_000, 50, 100)
SWITCH_INTERVAL = 0.0005


def tune_interpreter() -> None:
    """Two interpreter settings for the control-plane process, each measured at 1,305 nodes
    and 3,736 chips (`bench.scale`):

    * **Garbage collection** (`GC_THRESHOLDS`, default 700, 10, 10): a reconcile pass makes
      some 200,000 short-lived objects, and under the default thresholds enough of them
      lived through a young collection to trigger a full one about once a second — 0.13 to
      0.2 s each with the GIL held, collecting nothing, landing inside passes and failovers.
      With young collections every 100,000 allocations the pass's objects die by reference
      count first: no full collection in a whole bench run, young ones of 30 to 60 ms.
    * **GIL switch interval** (`SWITCH_INTERVAL`, default 5 ms): the agent-call loop (loads,
      Configure/StartEpoch rounds), the registry's heartbeat loop and the controller share
      the GIL; at 5 ms each wake-up of an I/O-bound loop behind a busy thread could wait a
      whole interval, and a round of 234 calls took 0.8 to 1.4 s. At 0.5 ms: 0.35 to 0.75 s.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.control_plane")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    tune_interpreter()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        plane = from_arguments(args)
    except START_ERRORS as exc:
        print(f"control plane: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        plane.start()
        log.info("control plane serving: admin %s", plane.admin_address)
        stop.wait()
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"control plane: cannot start: {exc}", file=sys.stderr)
        return 1
    finally:
        plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
