"""The simulated fleet: one process hosting many virtual node agents (`python -m agents.fleet`).

Each virtual node (`agents.virtual_node.VirtualNode`) is a real gRPC peer of the control
plane: it registers with the `NodeRegistry` and keeps one `HeartbeatStream` open with its own
certificate, and it serves the agent API on its own port with its own certificate (mutual TLS;
the control plane dials it with `grpc.ssl_target_name_override` = the node's DNS name and
checks the identity, exactly as for a real agent). Everything runs on one asyncio event loop
(`grpc.aio`): an open heartbeat stream or an idle server is a suspended coroutine, not a
thread, so 1,305 nodes fit in one process. What the nodes simulate and what is stand-in:
`agents.virtual_node` (virtual SRAM, loads, the API) and `agents.virtual_pipeline`
(timing-only lockstep).

**Ports: one `grpc.aio` server per virtual node, one port each.** The alternative works too:
one port whose credentials hold every node's key/certificate pair — gRPC picks the pair whose
certificate matches the client's SNI name (the control plane sets it through
`grpc.ssl_target_name_override`), and a handler can read that name from its auth context
(`ssl_requested_server_name`), so it would know which node a call is for. Measured here with
1,305 nodes in one process (both idle at 0 CPU): one server per node takes 3.1 s to start and
+113 MiB RSS, a first call (TLS handshake + Status) 4.1 ms per node; one SNI port takes 0.4 s
and +23 MiB, but 7.5 ms per first call (the handshake searches the 1,305 pairs). We keep one
port per node: the difference is 90 MiB and a few seconds once, and a node with its own port
behaves like a real host where it matters — each node has its own address in the store, and a
killed node's port closes (open calls and connections fail UNAVAILABLE, new dials are refused)
instead of a shared port answering for a dead node.

Control: the process reads JSON lines on stdin and answers on stdout (one JSON object a line),
the protocol `orchestrator.fleet_runtime` speaks:

* `{"op": "start", "nodes": [{"name", "rack", "slot", "chips", "profile", "sram_bytes"}]}`
  starts nodes (a running one is left alone), answered by one `{"event": "started", "node",
  "address"}` per node, then `{"event": "ready", "count": N}`;
* `{"op": "kill", "node": NAME}` kills a virtual node as if its host died: its server closes
  at once (open calls fail UNAVAILABLE), its heartbeat stream is cancelled, the stages it
  hosted stop their replicas as broken links would; answered by `{"event": "died", "node"}`;
* `{"op": "stop"}` or the end of stdin (the control plane went away) stops every node and
  exits 0 — a fleet never outlives its control plane.

With `--control-socket PATH` the same ops are accepted on a Unix socket (mode 0600: only the
user who runs the control plane can kill a node; the answer is one JSON line), which is how
tests and `bench.scale` kill a node of a running `lpuctl up --runtime fleet`; the death is
reported on stdout too, so the runtime's `dead_agents()` sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from agents.registration import MAX_BACKOFF, reconnect_options
from agents.settings import DEFAULT_SETTINGS, AgentSettings
from agents.virtual_node import VirtualNode, make_virtual_chips
from agents.virtual_pipeline import SimReplica
from placement.profiles import ChipProfile, get_profile
from protos import admin_pb2, admin_pb2_grpc, agent_pb2
from security.certs import Credentials, ensure_agent
from security.identity import CONTROL_PLANE, agent_identity
from security.tls import channel_credentials, server_credentials, target_options

log = logging.getLogger("lockstep.fleet")

MAX_CONTROL_LINE = 16 << 20  # a start op for 1,305 nodes is ~150 kB
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 4 << 20 | 1024),
    ("grpc.max_send_message_length", 4 << 20 | 1024),
    ("grpc.so_reuseport", 0),
]


# A virtual node's settings: an agent's, but with a shorter chain log per stage (256
# (tick, head) pairs instead of 4,096): one process holds every stage of a 1,868-stage replica,
# and at 4,096 the logs alone would take about a gigabyte per replica. The canary's
# StageDigests can then look back 256 ticks.
FLEET_SETTINGS = replace(DEFAULT_SETTINGS, chain_log_limit=256)


class Fleet:
    """Every virtual node and timing-only replica of this process."""

    def __init__(
        self,
        control_plane: str,
        certs: Path,
        *,
        interval: float,
        time_scale: float,
        listen_host: str = "127.0.0.1",
        settings: AgentSettings = FLEET_SETTINGS,
        emit: Callable[[dict[str, Any]], None] = lambda event: None,
    ) -> None:
        self.control_plane = control_plane
        self.certs = certs
        self.interval = interval
        self.time_scale = time_scale
        self.listen_host = listen_host
        self.settings = settings
        self.emit = emit
        self.nodes: dict[str, VirtualNode] = {}
        self.by_address: dict[str, VirtualNode] = {}
        self.replicas: dict[tuple[str, int], SimReplica] = {}

    # --- replicas -----------------------------------------------------------------------------

    def replica_for(
        self, req: agent_pb2.ConfigureReplicaRequest, profile: ChipProfile, vocab: int
    ) -> SimReplica:
        key = (req.deployment, req.replica)
        sim = self.replicas.get(key)
        if sim is not None and (sim.stages, sim.max_batch, sim.link_secret) != (
            req.stages,
            req.max_batch,
            req.link_secret,
        ):
            # an older incarnation or epoch (a new configuration brings a new link secret):
            # the new one replaces it. Removed without a reason: a reason fails every
            # remaining stage per node removed, O(stages x nodes) for a 1,868-stage ring.
            for node in {st.node for st in sim.by_stage.values()}:
                if node in self.nodes and key in self.nodes[node].hosted:
                    self.nodes[node].remove(*key)
            sim = self.replicas.get(key)
        if sim is None:
            sim = SimReplica(
                req.deployment,
                req.replica,
                req.stages,
                req.max_batch,
                bytes(req.link_secret),
                profile,
                self.time_scale,
                vocab,
                on_empty=self._forget_replica,
            )
            self.replicas[key] = sim
        return sim

    def _forget_replica(self, sim: SimReplica) -> None:
        if self.replicas.get((sim.deployment, sim.replica)) is sim:
            del self.replicas[(sim.deployment, sim.replica)]

    # --- nodes --------------------------------------------------------------------------------

    async def start(self, specs: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        fresh = [s for s in specs if s["name"] not in self.nodes]
        # certificates: file I/O and key generation, off the loop (first start only issues)
        creds = await loop.run_in_executor(
            None, lambda: [ensure_agent(self.certs, s["name"]) for s in fresh]
        )
        for spec, cred in zip(fresh, creds, strict=True):
            node = await self._start_node(spec, cred)
            self.emit({"event": "started", "node": node.name, "address": node.address})
        self.emit({"event": "ready", "count": len(fresh)})

    async def _start_node(self, spec: dict[str, Any], creds: Credentials) -> VirtualNode:
        profile = get_profile(str(spec["profile"]))
        sram = int(spec.get("sram_bytes") or profile.sram_bytes)
        name = str(spec["name"])
        node = VirtualNode(
            fleet=self,
            name=name,
            rack=str(spec["rack"]),
            slot=int(spec["slot"]),
            profile=profile,
            chips=make_virtual_chips(int(spec["chips"]), sram),
            identity=agent_identity(name),
            settings=self.settings,
        )
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((node.handler(),))
        port = server.add_secure_port(f"{self.listen_host}:0", server_credentials(creds))
        await server.start()
        node.server = server
        node.address = f"{self.listen_host}:{port}"
        self.nodes[name] = node
        self.by_address[node.address] = node
        node.registration = asyncio.get_running_loop().create_task(self._register(node, creds))
        return node

    async def kill(self, name: str, why: str = "killed") -> bool:
        node = self.nodes.pop(name, None)
        if node is None:
            return False
        node.alive = False
        self.by_address.pop(node.address, None)
        if node.registration is not None:
            node.registration.cancel()
        for deployment, replica in list(node.hosted):
            node.remove(deployment, replica, reason=f"the agent of {name} died ({why})")
        if node.server is not None:
            await node.server.stop(None)
        self.emit({"event": "died", "node": name})
        return True

    async def stop(self) -> None:
        for name in list(self.nodes):
            node = self.nodes.pop(name)
            node.alive = False
            if node.registration is not None:
                node.registration.cancel()
            if node.server is not None:
                await node.server.stop(0.5)

    # --- registration and heartbeats ----------------------------------------------------------

    async def _register(self, node: VirtualNode, creds: Credentials) -> None:
        """Register, then beat on one stream every interval; again after any end (the policy
        of `agents.registration.Registration`, on the event loop)."""
        options = [*reconnect_options(self.interval), *target_options(CONTROL_PLANE)]
        async with grpc.aio.secure_channel(
            self.control_plane, channel_credentials(creds), options=options
        ) as channel:
            stub = admin_pb2_grpc.NodeRegistryStub(channel)
            failures = 0
            timeout = max(5.0, self.interval * 4)
            while node.alive:
                try:
                    await stub.Register(
                        admin_pb2.RegisterRequest(
                            node=node.name,
                            rack=node.rack,
                            slot=node.slot,
                            address=node.address,
                            profile=node.profile.name,
                            chips=node.registered_chips(),
                        ),
                        timeout=timeout,
                    )
                    failures = 0
                    await self._beat(node, stub)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the stream ended: any reason, register again
                    if node.alive:
                        log.info("node %s: control plane: %s", node.name, _describe(exc))
                failures += 1
                backoff = min(MAX_BACKOFF, self.interval * 2 ** (failures - 1) / 2)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))

    async def _beat(self, node: VirtualNode, stub: admin_pb2_grpc.NodeRegistryStub) -> None:
        call = stub.HeartbeatStream()
        ended = asyncio.ensure_future(call)  # done when the control plane ends the stream
        try:
            first = True
            while node.alive:
                beat = admin_pb2.HeartbeatRequest(
                    chips=[c for c in node.registered_chips() if c.failed],
                    node=node.name if first else "",
                    tokens=node.token_counters(),
                )
                await call.write(beat)
                node.beats += 1
                # spread the fleet's beats over the interval instead of all at once
                wait = self.interval * (random.uniform(0.0, 1.0) if first else 1.0)
                first = False
                await asyncio.wait({ended}, timeout=wait)
                if ended.done():
                    ended.result()  # raises the status that ended the stream
                    return
        finally:
            ended.cancel()
            call.cancel()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


# --- the process ---------------------------------------------------------------------------


async def _control(fleet: Fleet, line: bytes) -> dict[str, Any]:
    """Apply one control op (module docstring); its answer."""
    try:
        op = json.loads(line)
        kind = op["op"]
    except (ValueError, KeyError, TypeError):
        return {"error": "a control line is a JSON object with an 'op'"}
    if kind == "start":
        await fleet.start(list(op["nodes"]))
        return {"ok": True}
    if kind == "kill":
        return {"ok": await fleet.kill(str(op["node"]))}
    if kind == "list":
        return {"nodes": {n.name: n.address for n in fleet.nodes.values()}}
    if kind == "stop":
        return {"ok": True, "stop": True}
    return {"error": f"unknown op {str(kind)[:40]!r}"}


async def _serve_socket(fleet: Fleet, path: Path, stop: asyncio.Event) -> asyncio.Server:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            line = await reader.readline()
            answer = await _control(fleet, line)
            if answer.pop("stop", False):
                stop.set()
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    path.unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(client, path=str(path), limit=MAX_CONTROL_LINE)
    finally:
        os.umask(old)


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def emit(event: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    fleet = Fleet(
        args.control_plane,
        Path(args.certs),
        interval=args.heartbeat_interval,
        time_scale=args.time_scale,
        listen_host=args.listen_host,
        emit=emit,
    )
    server = None
    if args.control_socket:
        server = await _serve_socket(fleet, Path(args.control_socket), stop)
    reader = asyncio.StreamReader(limit=MAX_CONTROL_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def read_stdin() -> None:
        while True:
            line = await reader.readline()
            if not line:
                break  # the control plane went away
            answer = await _control(fleet, line)
            if answer.pop("stop", False):
                break
            if "error" in answer:
                emit({"event": "error", "message": answer["error"]})
        stop.set()

    task = loop.create_task(read_stdin())
    await stop.wait()
    task.cancel()
    if server is not None:
        server.close()
        Path(args.control_socket).unlink(missing_ok=True)
    await fleet.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agents.fleet",
        description="Host many virtual node agents in one process (control on stdin).",
    )
    parser.add_argument("--control-plane", required=True, help="the node registry HOST:PORT")
    parser.add_argument("--certs", required=True, help="the cluster's certificate directory")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="wall seconds per simulated second of stage compute (0: as fast as possible)",
    )
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--control-socket", help="also take control ops on this Unix socket")
    args = parser.parse_args(argv)
    if not args.heartbeat_interval > 0 or not args.time_scale >= 0:
        parser.error("--heartbeat-interval must be positive and --time-scale not negative")
    logging.basicConfig(
        level=os.environ.get("LOCKSTEP_FLEET_LOG", "WARNING"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # A fleet at full size holds millions of objects (1,305 nodes, two 1,868-stage rings and
    # their logs); under the default thresholds a full collection (a pause of tenths of a
    # second on the one event loop every node shares) came every second or so, in the middle
    # of Configure and StartEpoch rounds. Young collections every 100,000 allocations let
    # short-lived objects die by reference count first (as in the control plane's
    # `tune_interpreter`).
    gc.set_threshold(100_000, 50, 100)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
