"""`lpuctl up --runtime ray` end to end: the embedded control plane with its agents as Ray actors.

One `lpuctl up --runtime ray` (the control plane starts its own local Ray, as a user's would,
and six agent actors, mutual TLS) for the module: apply tiny-llama → Ready → generate (tokens
equal the reference executor's); SIGKILL one agent actor's process → Ray restarts the actor, the
agent registers again by itself and the deployment comes back to Ready with the same tokens;
`lpuctl down` leaves no process of the control plane, its Ray or its agents.

The control plane's Ray is its own (not the test session's): `lpuctl up` starts it in the
control-plane process, which is what this test is about. It lives only while this module runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_helpers import wait_for

from agents.executor import ReferenceExecutor
from orchestrator.control_plane import StatePaths, token_for
from orchestrator.weights import SeededWeights
from placement.models import MODEL_PRESETS
from protos import admin_pb2, admin_pb2_grpc
from security.identity import CONTROL_PLANE, dns_name

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "manifests" / "examples" / "tiny-llama.yaml"
TINY = MODEL_PRESETS["tiny-llama"]


@dataclass
class RayCluster:
    state: Path
    env: dict[str, str]
    stub: admin_pb2_grpc.AdminStub
    viewer: tuple[tuple[str, str], ...]
    endpoint: dict[str, object]
    processes: list[int]  # the control plane and everything it started (Ray, agents)
    up_seconds: float

    def lpuctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _descendants(root: int) -> list[int]:
    """`root` and every live process below it (Ray's GCS, raylet, workers, the agent actors)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _alive(pid):
            found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _listener(port: int, pids: list[int]) -> int:
    """Which of `pids` listens on TCP `port` (the agent actor's process serving a node)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no agent process listens on port {port}")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    import grpc

    state = tmp_path_factory.mktemp("lockstep-ray")
    env = {**os.environ, "LOCKSTEP_HOME": str(state), "PYTHONUNBUFFERED": "1"}
    for key in ("LOCKSTEP_SERVER", "LOCKSTEP_TOKEN", "LOCKSTEP_CA", "RAY_ADDRESS"):
        env.pop(key, None)
    env["LOCKSTEP_CONFIG"] = str(state / "no-config.yaml")
    started = time.monotonic()
    up = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "up", "--runtime", "ray", "--timeout", "90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    up_seconds = time.monotonic() - started
    paths = StatePaths(state)
    processes: list[int] = []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "runtime ray" in up.stdout and "6 nodes Ready" in up.stdout, up.stdout
        endpoint = json.loads(paths.endpoint.read_text())
        processes = _descendants(int(endpoint["pid"]))
        ca = (paths.certs / "ca.crt").read_bytes()
        channel = grpc.secure_channel(
            str(endpoint["admin"]),
            grpc.ssl_channel_credentials(ca),
            options=[("grpc.ssl_target_name_override", dns_name(CONTROL_PLANE))],
        )
        viewer = (("authorization", f"Bearer {token_for(paths, 'viewer')}"),)
        yield RayCluster(
            state,
            env,
            admin_pb2_grpc.AdminStub(channel),
            viewer,
            endpoint,
            processes,
            up_seconds,
        )
        channel.close()
    finally:
        if not processes and paths.endpoint.exists():
            processes = _descendants(int(json.loads(paths.endpoint.read_text())["pid"]))
        down = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "down"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert down.returncode == 0, down.stderr
        assert "control plane and agents stopped" in down.stdout
        deadline = time.monotonic() + 45  # Ray's workers exit after its raylet (slower when busy)
        while [p for p in processes if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in processes if _alive(p)]
        assert not left, f"processes left after lpuctl down: {left}"


def _replicas(cluster: RayCluster) -> dict[int, admin_pb2.ReplicaInfo]:
    got = cluster.stub.Get(admin_pb2.GetRequest(name="tiny-llama"), metadata=cluster.viewer)
    return {r.index: r for r in got.replica_info}


def _generate(cluster: RayCluster, ids: list[int], count: int) -> list[int]:
    run = cluster.lpuctl(
        "generate", "tiny-llama", "--ids", *map(str, ids), "--max-tokens", str(count)
    )
    assert run.returncode == 0, run.stderr
    return [int(t) for t in run.stdout.split()]


def test_ray_agents_register_apply_generate_and_heal(ray_cluster: RayCluster) -> None:
    cluster = ray_cluster
    print(f"lpuctl up --runtime ray: {cluster.up_seconds:.1f} s")
    assert cluster.endpoint["runtime"] == "ray"
    nodes = cluster.stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=cluster.viewer).nodes
    assert sorted(n.name for n in nodes) == [
        f"rack-{r}/node-{s}" for r in (0, 1) for s in (0, 1, 2)
    ]
    assert all(n.state == "Ready" and len(n.chips) == 8 for n in nodes)
    agents = [int(p) for p in cluster.endpoint["agent_pids"]]  # type: ignore[attr-defined]
    assert len(agents) == 6 and all(p in cluster.processes for p in agents)
    assert all(b"ray::" in Path(f"/proc/{p}/cmdline").read_bytes() for p in agents)

    started = time.monotonic()
    run = cluster.lpuctl("apply", "-f", str(EXAMPLE), "--wait", "--timeout", "90")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tiny-llama: Ready 2/2 ready" in run.stdout
    print(f"apply -> Ready: {time.monotonic() - started:.1f} s")
    reference = ReferenceExecutor(TINY, SeededWeights(TINY, 0, "F16"), max_context=256)
    want = list(reference.generate([1, 2, 3], 6).tokens)
    for _ in range(2):  # both replicas (round robin)
        assert _generate(cluster, [1, 2, 3], 6) == want

    # SIGKILL the agent actor serving a stage of replica 1: Ray restarts the actor, the new
    # agent registers by itself, the replica is reloaded and resynchronized
    before = _replicas(cluster)
    node = before[1].chips[0].rsplit("/", 1)[0]
    address = cluster.stub.GetNode(
        admin_pb2.GetNodeRequest(name=node), metadata=cluster.viewer
    ).address
    pid = _listener(int(address.rsplit(":", 1)[1]), agents)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()

    def healed() -> bool:
        got = _replicas(cluster)
        d = cluster.stub.Get(admin_pb2.GetRequest(name="tiny-llama"), metadata=cluster.viewer)
        return bool(d.phase == "Ready" and got[1].epoch > before[1].epoch and got[1].running)

    wait_for(healed, timeout=45, interval=0.1, what="replica 1 back to Ready")
    print(f"SIGKILL -> Ready again: {time.monotonic() - killed:.1f} s")
    moved = cluster.stub.GetNode(admin_pb2.GetNodeRequest(name=node), metadata=cluster.viewer)
    assert moved.state == "Ready" and moved.address != address  # a new process registered
    assert not _alive(pid)
    after = _replicas(cluster)
    assert after[0].epoch == before[0].epoch  # the other replica was not touched

    def died() -> list[admin_pb2.Event]:
        events = cluster.stub.Events(admin_pb2.EventsRequest(), metadata=cluster.viewer).events
        return [e for e in events if e.reason == "AgentDied"]

    # the actor's death is a failure signal beside heartbeats (Ray reports it, maybe only
    # after the restarted agent has registered and its replica healed)
    assert [e.node for e in wait_for(died, timeout=20, interval=0.1, what="AgentDied")] == [node]
    for _ in range(2):
        assert _generate(cluster, [1, 2, 3], 6) == want
