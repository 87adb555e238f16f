"""The Ray runtime: every node agent a detached, named Ray actor pinned to its host.

Each agent runs the real gRPC agent server (mutual TLS, certificates from the runtime's
certificate directory) inside its own Ray worker process. The actor is started by module name
(`agents.hosted.start_agent`, imported inside the actor's process): the orchestrator never
imports agent code.

Why each actor option:

* **Pinned by a per-host custom resource** `lockstep-host:<host>` (every Ray node that hosts LPU
  chips advertises it; the embedded default advertises `lockstep-host:local`). Hard
  node-affinity scheduling was measured to lose an actor for good when its node dies, while a
  resource-pinned actor is restarted wherever that resource comes back (the host re-joining).
* **Detached and named** `lockstep-agent:<node>` in namespace `lockstep`: the agents outlive the
  control plane's driver; a restarted control plane finds them by name (`get_if_exists`)
  instead of starting a second agent for a node.
* **`max_restarts=-1`, `max_task_retries=0`**: Ray restarts a dead agent process forever, but
  never replays a call on the new process: a restarted agent holds no shards, and the control
  plane, not Ray, decides what it loads again.
* **`num_cpus=0`**: an agent's CPU is the chips it simulates, not a Ray scheduling unit; with a
  CPU each, two cores would host two agents.

Death is watched with one long-running `serve()` call per actor: it returns only when the agent
is stopped, and fails with `ActorDiedError` / `ActorUnavailableError` when its process dies.
`dead_agents()` polls those calls without blocking (`ray.wait(timeout=0)`), reports each death
once, and asks the restarting actor for its new address; `handle(node)` is None until the
restarted agent answers, then carries the new address.

Ray itself: `RayRuntime` joins an initialized Ray, or `address` (`ray start` on each host, or a
KubeRay RayCluster), or starts the embedded default (`init_embedded`: a local Ray with two CPUs,
no dashboard, a small object store, the `lockstep-host:local` resource), which it shuts down in
`stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from orchestrator.runtime import AgentHandle, NodeSpec

NAMESPACE = "lockstep"
ACTOR_PREFIX = "lockstep-agent:"
HOST_RESOURCE_PREFIX = "lockstep-host:"
EMBEDDED_HOST = "local"
HOST_SLOTS = 4096
"""How many agents one host's resource admits (each takes one unit): simulated clusters put
every node of a rack set on the one embedded host."""
EMBEDDED_OBJECT_STORE = 96 << 20
"""The embedded default's object store: compile tasks return small refs, not shard bytes."""
EMBEDDED_START_ATTEMPTS = 2
GCS_WAIT_VARIABLE = "RAY_gcs_server_port_wait_time_s"
EMBEDDED_GCS_WAIT_S = 60


def host_resource(host: str) -> str:
    """The custom resource that pins agents to `host` (`ray start --resources`)."""
    return f"{HOST_RESOURCE_PREFIX}{host}"


def actor_name(node: str) -> str:
    """The detached actor's name for `node`'s agent."""
    return f"{ACTOR_PREFIX}{node}"


def init_embedded(
    *,
    num_cpus: int = 2,
    object_store_memory: int = EMBEDDED_OBJECT_STORE,
    namespace: str = NAMESPACE,
    host: str = EMBEDDED_HOST,
) -> None:
    """Start the embedded default: a local Ray on this machine advertising `host`'s resource.

    About 4 s and 600 MB here (measured), so tests start it once per session.

    A start that fails is shut down and tried once more. On a loaded two-core machine Ray's GCS
    was seen never to write its port file within Ray's 30 s wait (CI, once in about ten full
    runs): the second start is cheap next to failing `lpuctl up`. The wait itself is raised to
    `EMBEDDED_GCS_WAIT_S` unless the operator set `RAY_gcs_server_port_wait_time_s`."""
    os.environ.setdefault(GCS_WAIT_VARIABLE, str(EMBEDDED_GCS_WAIT_S))
    for attempt in range(1, EMBEDDED_START_ATTEMPTS + 1):
        try:
            ray.init(
                address="local",  # a new instance, even where `ray start` left a cluster to join
                num_cpus=num_cpus,
                include_dashboard=False,
                object_store_memory=object_store_memory,
                resources={host_resource(host): HOST_SLOTS},
                namespace=namespace,
                log_to_driver=False,
            )
            return
        except Exception:
            ray.shutdown()
            if attempt == EMBEDDED_START_ATTEMPTS:
                raise


def connect_ray(
    address: str | None,
    *,
    namespace: str = NAMESPACE,
    num_cpus: int = 2,
    object_store_memory: int = EMBEDDED_OBJECT_STORE,
) -> bool:
    """Join the Ray cluster at `address`, or start the embedded default; True when Ray was
    started here (the caller owns it and shuts it down). RayRuntimeError says why not.

    A process that serves gRPC must call this BEFORE its first gRPC server or channel: Ray
    starts its GCS and raylet with `subprocess.Popen(preexec_fn=...)`, which runs Python in the
    forked child, and a fork taken while gRPC's threads hold locks can hang that child before
    it execs (seen in CI: the GCS never wrote its port file, `Other threads are currently
    calling into gRPC, skipping fork() handlers` in the log)."""
    if address is not None:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayRuntimeError(f"cannot join the Ray cluster at {address}: {exc}") from None
        return False
    try:
        init_embedded(
            num_cpus=num_cpus, object_store_memory=object_store_memory, namespace=namespace
        )
    except Exception as exc:
        ray.shutdown()
        raise RayRuntimeError(f"cannot start the embedded Ray: {exc}") from None
    return True


def lockstep_hosts() -> list[str]:
    """The hosts of the connected Ray cluster that advertise a `lockstep-host:` resource."""
    return sorted(
        key.removeprefix(HOST_RESOURCE_PREFIX)
        for key in ray.cluster_resources()  # type: ignore[no-untyped-call]
        if key.startswith(HOST_RESOURCE_PREFIX)
    )


CHIPS_RESOURCE = "lockstep-chips"
RACK_RESOURCE_PREFIX = "lockstep-rack:"
DEFAULT_RACK = "rack-0"


def discover_nodes(profile: str, default_chips: int = 8) -> list[NodeSpec]:
    """One node per live Ray node that advertises `lockstep-host:<host>` (joining a cluster:
    one agent per host). The node is named after its host; its chips come from the
    `lockstep-chips` resource (else `default_chips`), its rack from a `lockstep-rack:<rack>`
    resource (else `rack-0`); slots number the hosts of a rack in name order."""
    found: list[tuple[str, str, int]] = []
    for ray_node in ray.nodes():  # type: ignore[no-untyped-call]
        if not ray_node.get("Alive"):
            continue
        resources: dict[str, float] = ray_node.get("Resources", {})
        hosts = _suffixes(resources, HOST_RESOURCE_PREFIX)
        racks = _suffixes(resources, RACK_RESOURCE_PREFIX)
        chips = int(resources.get(CHIPS_RESOURCE, default_chips))
        for host in hosts:
            found.append((racks[0] if racks else DEFAULT_RACK, host, chips))
    specs, slots = [], dict[str, int]()
    for rack, host, chips in sorted(found):
        slot = slots.get(rack, 0)
        slots[rack] = slot + 1
        specs.append(NodeSpec(host, rack, slot, chips, profile))
    return specs


def _suffixes(resources: dict[str, float], prefix: str) -> list[str]:
    return sorted(key.removeprefix(prefix) for key in resources if key.startswith(prefix))


class RayRuntimeError(RuntimeError):
    """An agent could not be placed or started (its cause in the message)."""


@dataclass(frozen=True)
class AgentInfo:
    """What a running agent actor reports about itself."""

    node: str
    address: str
    identity: str
    pid: int
    ray_node_id: str


class AgentActor:
    """One node's agent inside a Ray worker process (an async actor: `serve` waits without
    holding a thread, so `info` and `stop` answer while it waits)."""

    def __init__(
        self,
        spec: NodeSpec,
        listen_host: str | None,
        certs: str | None,
        insecure: bool,
        options: Mapping[str, Any],
    ) -> None:
        import importlib

        hosted = importlib.import_module("agents.hosted")  # by name: see the module docstring
        host = listen_host or ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        if options.get("control_plane") is not None:  # it registers with the spec's place
            options = {"rack": spec.rack, "slot": spec.slot, **options}
        self._agent = hosted.start_agent(
            spec.name,
            spec.chips,
            spec.profile,
            f"[{host}]:0" if ":" in host else f"{host}:0",  # an IPv6 node address
            sram_bytes=spec.sram_bytes,
            certs=certs,
            insecure=insecure,
            **options,
        )
        self._info = AgentInfo(
            spec.name,
            self._agent.address,
            self._agent.identity,
            os.getpid(),
            ray.get_runtime_context().get_node_id(),
        )
        self._stopped = asyncio.Event()

    async def info(self) -> AgentInfo:
        return self._info

    async def serve(self) -> str:
        """Return only once the agent is stopped; fails when the process dies."""
        await self._stopped.wait()
        return "stopped"

    async def stop(self, grace: float) -> None:
        """Graceful stop (health NOT_SERVING, in-flight calls get `grace` seconds)."""
        await asyncio.to_thread(self._agent.stop, grace)
        self._stopped.set()


_RemoteAgent: Any = ray.remote(AgentActor)


@dataclass
class _Agent:
    """The runtime's view of one node's actor."""

    spec: NodeSpec
    actor: Any
    info: AgentInfo | None = None
    serve_ref: Any = None  # the pending serve() call while the agent is up
    info_ref: Any = None  # the pending info() call while it restarts
    restarts: int = 0


class RayRuntime:
    """The Ray adapter of `orchestrator.runtime.Runtime` (see the module docstring).

    `certs`: the certificate directory every agent loads its node certificate from (the
    embedded default creates them there on first start; on a multi-host cluster each host needs
    it at the same path). `hosts` maps node names to Ray hosts; a node without an entry goes to
    the host of its own name, else to the only host when there is one. `listen_host` is the
    address agents bind (default: 127.0.0.1 on the embedded default, the Ray node's IP when
    joining a cluster). `agent_options` are more keyword arguments of
    `agents.hosted.start_agent` for every agent (e.g. its `settings`). `owns_ray`: Ray was
    already started for this runtime (`connect_ray`), and `stop()` shuts it down.
    """

    def __init__(
        self,
        certs: str | Path | None,
        *,
        address: str | None = None,
        namespace: str = NAMESPACE,
        hosts: Mapping[str, str] | None = None,
        listen_host: str | None = None,
        insecure: bool = False,
        num_cpus: int = 2,
        object_store_memory: int = EMBEDDED_OBJECT_STORE,
        start_timeout: float = 60.0,
        stop_grace: float = 2.0,
        agent_options: Mapping[str, Any] | None = None,
        owns_ray: bool = False,
    ) -> None:
        self.agent_options = dict(agent_options or {})
        self.certs = None if certs is None else str(certs)
        self.namespace = namespace
        self.insecure = insecure
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self._hosts = dict(hosts or {})
        self._agents: dict[str, _Agent] = {}
        self._lock = threading.Lock()
        self.owns_ray = owns_ray
        if ray.is_initialized():
            embedded = address is None
        else:
            self.owns_ray = connect_ray(
                address,
                namespace=namespace,
                num_cpus=num_cpus,
                object_store_memory=object_store_memory,
            )
            embedded = self.owns_ray
        self.listen_host = listen_host or ("127.0.0.1" if embedded else None)

    # --- the port ---

    def start_agents(self, nodes: Sequence[NodeSpec]) -> list[AgentHandle]:
        """Start (or find, by name) one agent actor per node; wait until each new one serves.
        Nodes whose agent Ray is restarting are left to Ray (no handle until it is back)."""
        with self._lock:
            fresh = []
            for spec in nodes:
                if spec.name not in self._agents:
                    agent = _Agent(spec, self._create(spec))
                    agent.info_ref = agent.actor.info.remote()
                    self._agents[spec.name] = agent
                    fresh.append(agent)
            self._await_infos(fresh)
            serving = [self._agents[spec.name] for spec in nodes]
            return [self._handle_of(a) for a in serving if a.info is not None]

    def dead_agents(self) -> list[str]:
        """Nodes whose agent process died since the last call; Ray is already restarting them."""
        with self._lock:
            by_ref = {a.serve_ref: a for a in self._agents.values() if a.serve_ref is not None}
            dead = []
            if by_ref:
                ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
                for ref in ready:
                    agent = by_ref[ref]
                    with contextlib.suppress(RayError):
                        ray.get(ref)  # returns only if someone else stopped the agent
                    agent.serve_ref, agent.info = None, None
                    agent.restarts += 1
                    agent.info_ref = agent.actor.info.remote()  # answered once it is back
                    dead.append(agent.spec.name)
            self._refresh()
            return sorted(dead)

    def stop(self) -> None:
        """Stop every agent gracefully, kill its actor (no restart), wait until its process is
        gone; shut Ray down when this runtime started it."""
        with self._lock:
            agents, self._agents = list(self._agents.values()), {}
            stops = [a.actor.stop.remote(self.stop_grace) for a in agents]
            with contextlib.suppress(RayError):
                ray.wait(stops, num_returns=len(stops), timeout=self.stop_grace + 5)
            pids = [a.info for a in agents if a.info is not None]
            for agent in agents:
                with contextlib.suppress(RayError, ValueError):
                    ray.kill(agent.actor, no_restart=True)
            local = ray.get_runtime_context().get_node_id()
            _wait_gone([i.pid for i in pids if i.ray_node_id == local], self.start_timeout)
            if self.owns_ray:
                ray.shutdown()
                self.owns_ray = False

    # --- beyond the port ---

    def handle(self, node: str) -> AgentHandle | None:
        """`node`'s current handle; None while its agent restarts (or if it is not started)."""
        with self._lock:
            self._refresh()
            agent = self._agents.get(node)
            return None if agent is None or agent.info is None else self._handle_of(agent)

    def handles(self) -> list[AgentHandle]:
        """The handles of every serving agent, by node name."""
        with self._lock:
            self._refresh()
            return [
                self._handle_of(a) for _, a in sorted(self._agents.items()) if a.info is not None
            ]

    def nodes(self) -> list[str]:
        """The nodes this runtime runs agents for, serving or restarting (an agent killed for
        good by someone else is dropped once noticed)."""
        with self._lock:
            self._refresh()
            return sorted(self._agents)

    def process_id(self, node: str) -> int | None:
        """The pid of `node`'s agent process (on its Ray node), while it serves."""
        with self._lock:
            agent = self._agents.get(node)
            return None if agent is None or agent.info is None else agent.info.pid

    def pids(self) -> list[int]:
        """The pids of the serving agents' processes on this machine (for endpoint.json)."""
        with self._lock:
            local = ray.get_runtime_context().get_node_id()
            return [
                a.info.pid
                for a in self._agents.values()
                if a.info is not None and a.info.ray_node_id == local
            ]

    def restarts(self, node: str) -> int:
        """How many deaths of `node`'s agent this runtime has seen."""
        with self._lock:
            return self._agents[node].restarts

    # --- internals ---

    def _host_of(self, spec: NodeSpec) -> str:
        hosts = lockstep_hosts()
        if spec.name in self._hosts:
            host = self._hosts[spec.name]
            if host not in hosts:
                raise RayRuntimeError(
                    f"node {spec.name}: host {host!r} is not in the Ray cluster (no Ray node "
                    f"advertises {host_resource(host)}; hosts: {', '.join(hosts) or 'none'})"
                )
            return host
        if spec.name in hosts:
            return spec.name
        if len(hosts) == 1:
            return hosts[0]
        raise RayRuntimeError(
            f"node {spec.name}: no Ray host to run its agent on: "
            + (
                f"the cluster has hosts {', '.join(hosts)}; map the node to one (hosts=...)"
                if hosts
                else f"no Ray node advertises a {HOST_RESOURCE_PREFIX}<host> resource "
                f"(ray start --resources '{{\"{host_resource('HOST')}\": {HOST_SLOTS}}}')"
            )
        )

    def _create(self, spec: NodeSpec) -> Any:
        return _RemoteAgent.options(
            name=actor_name(spec.name),
            namespace=self.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=0,
            num_cpus=0,
            resources={host_resource(self._host_of(spec)): 1},
        ).remote(spec, self.listen_host, self.certs, self.insecure, self.agent_options)

    def _await_infos(self, agents: list[_Agent]) -> None:
        """Wait for the agents' first info; on any failure, kill the ones just created."""
        try:
            infos = ray.get([a.info_ref for a in agents], timeout=self.start_timeout)
        except (RayError, GetTimeoutError) as exc:
            for agent in agents:
                del self._agents[agent.spec.name]
                with contextlib.suppress(RayError, ValueError):
                    ray.kill(agent.actor, no_restart=True)
            raise RayRuntimeError(f"agents did not start: {_cause(exc)}") from None
        for agent, info in zip(agents, infos, strict=True):
            agent.info, agent.info_ref = info, None
            agent.serve_ref = agent.actor.serve.remote()

    def _refresh(self) -> None:
        """Take the new address of every restarted agent that answered."""
        pending = {a.info_ref: a for a in self._agents.values() if a.info_ref is not None}
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in ready:
            agent = pending[ref]
            try:
                agent.info = ray.get(ref)
            except RayActorError:
                if self._gone_for_good(agent):
                    del self._agents[agent.spec.name]  # start_agents would start a new one
                else:  # died again while restarting: ask again
                    agent.info_ref = agent.actor.info.remote()
                continue
            agent.info_ref = None
            agent.serve_ref = agent.actor.serve.remote()

    def _gone_for_good(self, agent: _Agent) -> bool:
        """Whether the actor will not come back: killed without restart (by another runtime's
        `stop()`, or `ray kill`), so its name is free again."""
        try:
            ray.get_actor(actor_name(agent.spec.name), namespace=self.namespace)
        except ValueError:
            return True
        return False

    @staticmethod
    def _handle_of(agent: _Agent) -> AgentHandle:
        assert agent.info is not None
        return AgentHandle(agent.spec.name, agent.info.address, agent.info.identity)


def make_runtime(
    *,
    certs: str | Path,
    control_plane: str,
    log_dir: str | Path,
    heartbeat_interval: float,
    address: str | None = None,
    owns_ray: bool = False,
) -> RayRuntime:
    """The control plane's factory (`orchestrator.control_plane.make_runtime`): agents that
    register with `control_plane` and heartbeat every `heartbeat_interval` seconds, on the
    embedded Ray or, with `address`, on an existing Ray cluster. `log_dir` is unused: an
    actor's output goes to Ray's session logs (`/tmp/ray/session_latest/logs/worker-*`).
    `owns_ray`: the caller started Ray (`connect_ray`) and hands it over."""
    del log_dir
    return RayRuntime(
        certs,
        address=address,
        owns_ray=owns_ray,
        agent_options={"control_plane": control_plane, "heartbeat_interval": heartbeat_interval},
    )


def _cause(exc: BaseException) -> str:
    """What failed, from a Ray error: the agent's own exception line (`HostedAgentError: ...`)
    when the traceback carries one, else the error's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(line)
        if match:
            return match.group(1)
    return lines[0] if lines else type(exc).__name__


_EXCEPTION_LINE = re.compile(r"^[\w.]+(?:Error|Exception): (.+)$")


def _wait_gone(pids: Sequence[int], timeout: float) -> None:
    """Poll until every pid (on this machine) has exited, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    remaining = set(pids)
    while remaining and time.monotonic() < deadline:
        for pid in list(remaining):
            try:
                os.kill(pid, 0)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    remaining.discard(pid)
        if remaining:
            time.sleep(0.02)  # polling a process table, not synchronizing threads
