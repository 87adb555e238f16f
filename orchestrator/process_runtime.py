"""The process runtime: one `python -m agents.main` subprocess per node (the `Runtime` port).

For tests, laptops and machines without Ray. Each agent serves mutual TLS with the cluster's
certificate directory, registers with the control plane's node registry by itself
(`--control-plane`), and prints `listening on HOST:PORT`, which `start_agents` waits for.
`stop` terminates every agent it started and reaps it (SIGTERM, then SIGKILL after a grace
period). No `preexec_fn` (e.g. `PR_SET_PDEATHSIG`): forking a process that runs gRPC threads
and running Python in the child broke the child's gRPC event engine (measured: agents died
with `epoll_wait error: Bad file descriptor`), so a control plane killed with SIGKILL leaves
its agents running — on purpose: they keep serving what they hold.

**Adoption.** With a `state_file` (the control plane's `DIR/agents.json`) the runtime writes,
after every start, each agent's pid, its start time (so a reused pid is never taken for it),
its address and its command line. A runtime of a restarted control plane, asked to start a
node's agent, first looks there: an agent still alive with the very command it would run (the
same node, chips, certificates and control-plane registry address) is adopted instead of
started — watched, reported when it dies and stopped like the others, though it is not this
process's child. An agent of the node that is alive but was started with another command (the
registry moved to another port, the node's spec changed) is stopped and a new one started.
`lpuctl down` reads the same file, so no agent is left behind even when the control plane
that started it was killed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.runtime import AgentHandle, NodeSpec
from security.identity import agent_identity

AGENT_MODULE = "agents.main"


def process_started_at(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or
    None when no such process runs (a zombie counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] == "Z":
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_command(pid: int) -> list[str] | None:
    """The process's command line, or None when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def recorded_agents(state_file: Path) -> dict[str, dict[str, Any]]:
    """The agents a state file records (node -> pid, started, address, command); an absent or
    unreadable file records none."""
    try:
        data = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)}


@dataclass
class _Agent:
    """One agent: started here (`proc`), or adopted from an earlier control plane (`proc` is
    None; `pid` and its start time `started` identify the process)."""

    spec: NodeSpec
    handle: AgentHandle
    pid: int
    started: int | None
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    reported_dead: bool = False

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.started is not None and process_started_at(self.pid) == self.started

    def signal(self, signum: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(signum)
        elif self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


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
        state_file: str | Path | None = None,
    ) -> None:
        """`state_file`: where the agents are recorded for adoption after a control-plane
        restart and for `lpuctl down` (module docstring); None keeps no record."""
        self.state_file = None if state_file is None else Path(state_file)
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
        """Start an agent for each node that has none running: adopt the one an earlier
        control plane started when it still runs the same command (module docstring)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        started: list[_Agent] = []
        records = recorded_agents(self.state_file) if self.state_file is not None else {}
        try:
            for spec in nodes:
                known = self._agents.get(spec.name)
                if known is not None and known.alive():
                    continue
                adopted = self._adopt(spec, records.get(spec.name))
                if adopted is not None:
                    self._agents[spec.name] = adopted
                    continue
                started.append(self._spawn(spec))
            self._await_addresses(started)
        finally:
            self._record()
        return [a.handle for a in self._agents.values() if a.alive()]

    def adopted(self) -> list[str]:
        """The nodes whose agent was adopted from an earlier control plane (still running)."""
        return [n for n, a in self._agents.items() if a.proc is None and a.alive()]

    def _adopt(self, spec: NodeSpec, record: dict[str, Any] | None) -> _Agent | None:
        """The recorded agent of `spec`, when it still runs exactly the command this runtime
        would start; an agent of the node running another command is stopped."""
        if record is None:
            return None
        pid, started, address = record.get("pid"), record.get("started"), record.get("address")
        if not (isinstance(pid, int) and isinstance(started, int) and isinstance(address, str)):
            return None
        if process_started_at(pid) != started:
            return None  # gone (or the pid was reused)
        command = self._command(spec)
        running = process_command(pid)
        agent = _Agent(
            spec,
            AgentHandle(spec.name, address, agent_identity(spec.name)),
            pid,
            started,
            command,
        )
        if running is None or running[1:] != command[1:]:
            if (
                running is not None
                and record.get("command") == running
                and _agent_of(spec, running)
            ):
                agent.signal(signal.SIGTERM)  # this node's agent, started with another command
                _wait_gone([agent], 10.0)
            return None
        return agent

    def _spawn(self, spec: NodeSpec) -> _Agent:
        log_path = self.log_dir / f"agent-{spec.name.replace('/', '.')}.log"
        command = self._command(spec)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        agent = _Agent(
            spec,
            AgentHandle(spec.name, "", agent_identity(spec.name)),
            proc.pid,
            process_started_at(proc.pid),
            command,
            proc,
        )
        self._agents[spec.name] = agent
        return agent

    def _await_addresses(self, started: list[_Agent]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        for agent in started:  # they start in parallel; wait for each one's address
            assert agent.proc is not None
            line = _read_line(agent.proc, deadline)
            if not line.startswith("listening on "):
                self.stop()
                raise RuntimeError(
                    f"agent {agent.spec.name} did not start (printed {line!r}); see "
                    f"{self.log_dir}/agent-{agent.spec.name.replace('/', '.')}.log"
                )
            address = line.removeprefix("listening on ").strip()
            agent.handle = AgentHandle(agent.spec.name, address, agent.handle.identity)

    def _record(self) -> None:
        """Write every live agent to the state file (atomically: a kill mid-write leaves the
        previous record)."""
        if self.state_file is None:
            return
        records = {
            name: {
                "pid": a.pid,
                "started": a.started,
                "address": a.handle.address,
                "command": a.command,
            }
            for name, a in self._agents.items()
            if a.alive() and a.handle.address
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(records, indent=2))
        tmp.replace(self.state_file)

    def dead_agents(self) -> list[str]:
        dead = []
        for name, agent in self._agents.items():
            if not agent.alive() and not agent.reported_dead:
                agent.reported_dead = True
                dead.append(name)
        return dead

    def pids(self) -> list[int]:
        return [a.pid for a in self._agents.values()]

    def stop(self, grace: float = 10.0) -> None:
        agents = list(self._agents.values())
        for agent in agents:
            agent.signal(signal.SIGTERM)
        _wait_gone(agents, grace)
        for agent in agents:
            if agent.proc is not None and agent.proc.stdout is not None:
                agent.proc.stdout.close()
        self._agents.clear()
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)


def _agent_of(spec: NodeSpec, command: Sequence[str]) -> bool:
    """Whether `command` runs the agent of `spec`'s node (`-m agents.main ... --node NAME`):
    the only processes a record may make this runtime stop."""
    pairs = set(itertools.pairwise(command))
    return ("-m", AGENT_MODULE) in pairs and ("--node", spec.name) in pairs


def _wait_gone(agents: Sequence[_Agent], grace: float) -> None:
    """Wait up to `grace` seconds for the agents to exit, then SIGKILL the rest and reap them
    (children are waited for; an adopted agent is polled until its process is gone)."""
    deadline = time.monotonic() + grace
    for agent in agents:
        if agent.proc is not None:
            try:
                agent.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait()
            continue
        while agent.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if agent.alive():
            agent.signal(signal.SIGKILL)
            kill_deadline = time.monotonic() + 5.0
            while agent.alive() and time.monotonic() < kill_deadline:
                time.sleep(0.05)


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
