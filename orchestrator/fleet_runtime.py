"""The fleet runtime: every node's agent is a virtual node of 1-2 simulated-fleet processes.

`lpuctl up --runtime fleet` (or `python -m orchestrator.control_plane --runtime fleet`)
imports this module by name. It starts `python -m agents.fleet` — by module name, the control
plane never imports the agents' code — and speaks the fleet's JSON-lines protocol on its stdin
and stdout (see that module): `start_agents` sends the node specs and waits for every node's
address; a reader thread collects deaths for `dead_agents`; `stop` closes stdin (the fleet
stops every node and exits) and reaps the process. A virtual node the supervisor restarts is
started again in the same process, registers again and comes back with empty chips, like a
restarted agent process.

Settings (environment, since the control plane's flags are shared by every runtime):

* `LOCKSTEP_FLEET_PROCESSES` (1 or 2, default 1): nodes are split between processes by rack.
  A timing-only replica passes frames in memory, so its stages must all be in one process:
  with 2 processes a replica spanning both is refused at ConfigureReplica.
* `LOCKSTEP_FLEET_TIME_SCALE` (default 1.0): wall seconds per simulated second of compute
  (0: as fast as the process runs).
* `LOCKSTEP_FLEET_HEARTBEAT_INTERVAL` (default: the control plane's heartbeat interval).

Each process also serves its control ops on a Unix socket, `STATE/fleet-N.sock` (mode 0600):
`kill_node` (and tests, benchmarks: `send_control`) kill a virtual node through it as if its
host died. The fleet dies with its control plane (end of stdin), so there is no adoption after
a control-plane crash: the restarted control plane starts a fresh fleet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from orchestrator.runtime import AgentHandle, NodeSpec
from security.identity import agent_identity

log = logging.getLogger("lockstep.fleet_runtime")

FLEET_MODULE = "agents.fleet"


def socket_path(state: str | Path, index: int = 0) -> Path:
    """The control socket of fleet process `index` of the control plane at `state`."""
    return Path(state) / f"fleet-{index}.sock"


def send_control(path: str | Path, op: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one control op to a fleet's Unix socket; its JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(op).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data or b"{}")
    return answer


@dataclass
class _Process:
    index: int
    proc: subprocess.Popen[bytes]
    socket: Path
    addresses: dict[str, str] = field(default_factory=dict)
    ready: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    reader: threading.Thread | None = None


class FleetRuntime:
    """Virtual nodes in 1-2 fleet processes (see the module docstring)."""

    def __init__(
        self,
        certs: str | Path,
        control_plane: str,
        log_dir: str | Path,
        *,
        heartbeat_interval: float = 0.5,
        processes: int = 1,
        time_scale: float = 1.0,
        startup_timeout: float = 300.0,
        python: str = sys.executable,
    ) -> None:
        if processes not in (1, 2):
            raise ValueError(f"LOCKSTEP_FLEET_PROCESSES must be 1 or 2, got {processes}")
        if not time_scale >= 0:
            raise ValueError(f"LOCKSTEP_FLEET_TIME_SCALE must not be negative, got {time_scale}")
        self.certs = Path(certs)
        self.control_plane = control_plane
        self.log_dir = Path(log_dir)
        self.state = self.log_dir.parent
        self.heartbeat_interval = heartbeat_interval
        self.processes = processes
        self.time_scale = time_scale
        self.startup_timeout = startup_timeout
        self.python = python
        self._procs: list[_Process] = []
        self._home: dict[str, int] = {}  # node -> process index
        self._alive: set[str] = set()
        self._dead: list[str] = []
        self._lock = threading.Lock()

    # --- processes ----------------------------------------------------------------------------

    def _spawn(self, index: int) -> _Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = socket_path(self.state, index)
        command = [
            self.python,
            "-m",
            FLEET_MODULE,
            "--control-plane",
            self.control_plane,
            "--certs",
            str(self.certs),
            "--heartbeat-interval",
            str(self.heartbeat_interval),
            "--time-scale",
            str(self.time_scale),
            "--control-socket",
            str(path),
        ]
        with open(self.log_dir / f"fleet-{index}.log", "ab") as log_file:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        process = _Process(index, proc, path)
        process.reader = threading.Thread(
            target=self._read, args=(process,), name=f"fleet-{index}", daemon=True
        )
        process.reader.start()
        return process

    def _read(self, process: _Process) -> None:
        """The fleet's events: addresses, readiness, deaths (and its own exit: all dead)."""
        assert process.proc.stdout is not None
        for raw in process.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            kind = event.get("event")
            with process.cond:
                if kind == "started":
                    process.addresses[str(event["node"])] = str(event["address"])
                    with self._lock:
                        self._alive.add(str(event["node"]))
                elif kind == "ready":
                    process.ready += 1
                elif kind == "died":
                    self._died([str(event["node"])])
                elif kind == "error":
                    log.warning("fleet %d: %s", process.index, event.get("message"))
                process.cond.notify_all()
        with process.cond:
            process.ready = -1  # exited
            process.cond.notify_all()
        self._died([n for n, i in self._home.items() if i == process.index])

    def _died(self, nodes: Sequence[str]) -> None:
        with self._lock:
            for node in nodes:
                if node in self._alive:
                    self._alive.discard(node)
                    self._dead.append(node)

    @staticmethod
    def _send(process: _Process, op: dict[str, Any]) -> None:
        stdin: IO[bytes] | None = process.proc.stdin
        if stdin is None or process.proc.poll() is not None:
            raise RuntimeError(f"fleet process {process.index} is not running")
        stdin.write(json.dumps(op).encode() + b"\n")
        stdin.flush()

    # --- the Runtime port -----------------------------------------------------------------------

    def start_agents(self, nodes: Sequence[NodeSpec]) -> list[AgentHandle]:
        if not self._procs:
            self._procs = [self._spawn(i) for i in range(self.processes)]
        racks = sorted({n.rack for n in nodes})
        batches: dict[int, list[dict[str, Any]]] = {}
        with self._lock:
            fresh = [n for n in nodes if n.name not in self._alive]
        for spec in fresh:
            index = self._home.get(spec.name)
            if index is None:
                index = racks.index(spec.rack) * self.processes // max(1, len(racks))
                self._home[spec.name] = index
            batches.setdefault(index, []).append(
                {
                    "name": spec.name,
                    "rack": spec.rack,
                    "slot": spec.slot,
                    "chips": spec.chips,
                    "profile": spec.profile,
                    "sram_bytes": spec.sram_bytes,
                }
            )
        deadline = time.monotonic() + self.startup_timeout
        for index, specs in batches.items():
            process = self._procs[index]
            with process.cond:
                want = process.ready + 1
            self._send(process, {"op": "start", "nodes": specs})
            with process.cond:
                while 0 <= process.ready < want:
                    left = deadline - time.monotonic()
                    if left <= 0 or not process.cond.wait(left):
                        break
                if process.ready < want:
                    raise RuntimeError(
                        f"fleet process {index} did not start {len(specs)} node(s); see "
                        f"{self.log_dir}/fleet-{index}.log"
                    )
        return self.handles()

    def handles(self) -> list[AgentHandle]:
        out = []
        with self._lock:
            alive = set(self._alive)
        for process in self._procs:
            with process.cond:
                for node, address in process.addresses.items():
                    if node in alive:
                        out.append(AgentHandle(node, address, agent_identity(node)))
        return out

    def dead_agents(self) -> list[str]:
        with self._lock:
            dead, self._dead = self._dead, []
        return dead

    def kill_node(self, node: str) -> bool:
        """Kill one virtual node as if its host died (tests, benchmarks)."""
        index = self._home.get(node)
        if index is None:
            return False
        return bool(send_control(self._procs[index].socket, {"op": "kill", "node": node})["ok"])

    def pids(self) -> list[int]:
        return [p.proc.pid for p in self._procs]

    def stop(self, grace: float = 15.0) -> None:
        for process in self._procs:
            if process.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    process.proc.stdin.close()  # end of stdin: the fleet stops and exits
        for process in self._procs:
            try:
                process.proc.wait(grace)
            except subprocess.TimeoutExpired:
                process.proc.kill()
                process.proc.wait()
            if process.reader is not None:
                process.reader.join(5.0)
            if process.proc.stdout is not None:
                process.proc.stdout.close()
        self._procs = []
        with self._lock:
            self._alive.clear()


def make_runtime(
    *,
    certs: str | Path,
    control_plane: str,
    log_dir: str | Path,
    heartbeat_interval: float,
    **_: Any,
) -> FleetRuntime:
    """The factory `orchestrator.control_plane.make_runtime` calls for `--runtime fleet`."""
    env = os.environ
    try:
        processes = int(env.get("LOCKSTEP_FLEET_PROCESSES", "1"))
        scale = float(env.get("LOCKSTEP_FLEET_TIME_SCALE", "1.0"))
        interval = float(env.get("LOCKSTEP_FLEET_HEARTBEAT_INTERVAL", str(heartbeat_interval)))
    except ValueError as exc:
        raise ValueError(f"LOCKSTEP_FLEET_* settings: {exc}") from None
    return FleetRuntime(
        certs,
        control_plane,
        log_dir,
        heartbeat_interval=interval,
        processes=processes,
        time_scale=scale,
    )
