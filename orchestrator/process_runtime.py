"""The process runtime: one `python -m agents.main` subprocess per node (the `Runtime` port).

For tests, laptops and machines without Ray. Each agent serves mutual TLS with the cluster's
certificate directory, registers with the control plane's node registry by itself
(`--control-plane`), and prints `listening on HOST:PORT`, which `start_agents` waits for.
`stop` terminates every agent it started and reaps it (SIGTERM, then SIGKILL after a grace
period). No `preexec_fn` (e.g. `PR_SET_PDEATHSIG`): forking a process that runs gRPC threads
and running Python in the child broke the child's gRPC event engine (measured: agents died
with `epoll_wait error: Bad file descriptor`), so a control plane killed with SIGKILL leaves
its agents running; `lpuctl down` then finds them by the pids in `agents.json`.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.runtime import AgentHandle, NodeSpec
from security.identity import agent_identity

AGENT_MODULE = "agents.main"


@dataclass
class _Agent:
    spec: NodeSpec
    proc: subprocess.Popen[bytes]
    handle: AgentHandle
    reported_dead: bool = False


class ProcessRuntime:
    """Agents as local subprocesses (see the module docstring)."""

    def __init__(
        self,
        certs: str | Path,
        control_plane: str,
        log_dir: str | Path,
        *,
        heartbeat_interval: float = 0.5,
        startup_timeout: float = 60.0,
        python: str = sys.executable,
        agent_args: Sequence[str] = (),
    ) -> None:
        self.certs = Path(certs)
        self.control_plane = control_plane
        self.log_dir = Path(log_dir)
        self.heartbeat_interval = heartbeat_interval
        self.startup_timeout = startup_timeout
        self.python = python
        self.agent_args = tuple(agent_args)  # extra agent flags (--allow-fault-injection)
        self._agents: dict[str, _Agent] = {}

    def _command(self, spec: NodeSpec) -> list[str]:
        command = [
            self.python,
            "-m",
            AGENT_MODULE,
            "--node",
            spec.name,
            "--chips",
            str(spec.chips),
            "--profile",
            spec.profile,
            "--listen",
            "127.0.0.1:0",
            "--certs",
            str(self.certs),
            "--control-plane",
            self.control_plane,
            "--rack",
            spec.rack,
            "--slot",
            str(spec.slot),
            "--heartbeat-interval",
            str(self.heartbeat_interval),
        ]
        if spec.sram_bytes is not None:
            command += ["--sram-bytes", str(spec.sram_bytes)]
        return command + list(self.agent_args)

    def start_agents(self, nodes: Sequence[NodeSpec]) -> list[AgentHandle]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started: list[_Agent] = []
        for spec in nodes:
            known = self._agents.get(spec.name)
            if known is not None and known.proc.poll() is None:
                continue
            log_path = self.log_dir / f"agent-{spec.name.replace('/', '.')}.log"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    self._command(spec),
                    stdout=subprocess.PIPE,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            agent = _Agent(spec, proc, AgentHandle(spec.name, "", agent_identity(spec.name)))
            self._agents[spec.name] = agent
            started.append(agent)
        deadline = time.monotonic() + self.startup_timeout
        for agent in started:  # they start in parallel; wait for each one's address
            line = _read_line(agent.proc, deadline)
            if not line.startswith("listening on "):
                self.stop()
                raise RuntimeError(
                    f"agent {agent.spec.name} did not start (printed {line!r}); see "
                    f"{self.log_dir}/agent-{agent.spec.name.replace('/', '.')}.log"
                )
            address = line.removeprefix("listening on ").strip()
            agent.handle = AgentHandle(agent.spec.name, address, agent.handle.identity)
        return [a.handle for a in self._agents.values() if a.proc.poll() is None]

    def dead_agents(self) -> list[str]:
        dead = []
        for name, agent in self._agents.items():
            if agent.proc.poll() is not None and not agent.reported_dead:
                agent.reported_dead = True
                dead.append(name)
        return dead

    def pids(self) -> list[int]:
        return [a.proc.pid for a in self._agents.values()]

    def stop(self, grace: float = 10.0) -> None:
        for agent in self._agents.values():
            if agent.proc.poll() is None:
                agent.proc.terminate()
        deadline = time.monotonic() + grace
        for agent in self._agents.values():
            try:
                agent.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait()
            if agent.proc.stdout is not None:
                agent.proc.stdout.close()
        self._agents.clear()


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """The first stdout line of `proc`, or "" if it exits or the deadline passes first."""
    assert proc.stdout is not None
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()
