"""The control plane survives its own crash (SIGKILL), with real processes.

One `lpuctl up` for the module (a control-plane process and six agent processes, mutual TLS);
the control plane is killed with SIGKILL twice and started again with `lpuctl up`, which
adopts the agents still running. What is checked, counting every shard load from the agents'
own metrics (`lockstep_agent_shard_loads_total`, per chip):

* killed while loading: the deployment finishes after the restart, every chip committed before
  the kill keeps its shard (loaded once in all), the rest are loaded once — the issue 9 item "a
  control plane restarted mid-load resumes from its store", without restarting the agents;
* killed while serving: a Generate streaming through the control plane's gateway fails with
  UNAVAILABLE at once (it does not hang); after the restart the deployment is Ready with zero
  shard loads and the same epochs, the same agent processes serve, nodes stay Ready past the
  heartbeat timeout, and a generate returns the reference tokens;
* `lpuctl down` right after a crash stops the agents the dead control plane left, and after
  the restarts no process of the module is left (the fixture's teardown), though the agents
  were not started by the control plane that stopped them.

To kill the control plane *while* it loads, deterministically, the agent of replica 1's first
stage is frozen (SIGSTOP) before the apply: the control plane loads replica 0's twelve chips,
then blocks streaming the next shard into the frozen agent, and is killed there. The module's
first control plane runs with `--heartbeat-timeout 60` so that the frozen agent is not taken
for dead meanwhile; the restarted ones run with the default (2.5 s), which the adopted agents
must meet.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from agent_helpers import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_control_plane import (
    EXAMPLE,
    ROOT,
    TINY,
    Cluster,
    _alive,
    _processes_of,
    lpuctl_env,
)

from agents.executor import ReferenceExecutor
from orchestrator.agent_client import dial
from orchestrator.control_plane import StatePaths, token_for
from orchestrator.weights import SeededWeights
from protos import admin_pb2, agent_pb2, agent_pb2_grpc
from security import certs as certs_mod
from security.identity import agent_identity, dns_name

SEEN: set[int] = set()  # every control-plane and agent pid of the module: all gone at the end


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("lockstep-crash")
    paths = StatePaths(state)
    made = Cluster(state, paths, lpuctl_env(state), None, (), (), {})  # type: ignore[arg-type]
    try:
        up = made.lpuctl("up", "--timeout", "120", "--heartbeat-timeout", "60")
        assert up.returncode == 0, up.stdout + up.stderr
        made.admin = (("authorization", f"Bearer {token_for(paths, 'admin')}"),)
        made.viewer = (("authorization", f"Bearer {token_for(paths, 'viewer')}"),)
        made.connect()
        _remember(made)
        yield made
    finally:
        down = made.lpuctl("down")
        assert down.returncode == 0, down.stderr
        assert not [p for p in SEEN if _alive(p)], "processes left after lpuctl down"
        assert not _processes_of(state), f"processes left: {_processes_of(state)}"


def _agents(cluster: Cluster) -> dict[str, dict[str, object]]:
    """node -> the process runtime's record of its agent (pid, address, ...)."""
    agents: dict[str, dict[str, object]] = json.loads(cluster.paths.agents.read_text())
    return agents


def _remember(cluster: Cluster) -> None:
    SEEN.add(int(str(cluster.endpoint["pid"])))
    SEEN.update(int(str(a["pid"])) for a in _agents(cluster).values())


def _kill_control_plane(cluster: Cluster) -> None:
    pid = int(str(cluster.endpoint["pid"]))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid), timeout=30, what="the control plane gone")


def _up_again(cluster: Cluster) -> None:
    """`lpuctl up` on the same state directory (default heartbeat timeout): it adopts."""
    up = cluster.lpuctl("up", "--timeout", "120")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "6 nodes Ready (6 running agent(s) adopted)" in up.stdout
    cluster.connect()
    assert sorted(cluster.endpoint["adopted"]) == sorted(_agents(cluster))  # type: ignore[call-overload]
    _remember(cluster)


def _loads(cluster: Cluster, nodes: list[str] | None = None) -> dict[str, int]:
    """Committed shard loads per chip id, from each agent's own metrics (asked as the control
    plane for its metrics port, then scraped over TLS checking the agent's name)."""
    creds = certs_mod.load_control_plane(cluster.paths.certs)
    context = ssl.create_default_context(cafile=str(cluster.paths.certs / "ca.crt"))
    counts: dict[str, int] = {}
    for node, record in _agents(cluster).items():
        if nodes is not None and node not in nodes:
            continue
        address = str(record["address"])
        channel = dial(address, creds, node)
        try:
            status = agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.StatusRequest(), timeout=30)
        finally:
            channel.close()
        host = address.rsplit(":", 1)[0]
        with (
            socket.create_connection((host, status.metrics_port), timeout=30) as raw,
            context.wrap_socket(raw, server_hostname=dns_name(agent_identity(node))) as tls,
        ):
            tls.sendall(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
        body = reply.partition(b"\r\n\r\n")[2].decode()
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == "lockstep_agent_shard_loads_total":
                    counts[f"{node}/chip-{sample.labels['chip']}"] = int(sample.value)
    return counts


def _plan_chips() -> dict[int, list[str]]:
    """Replica -> its chips in stage order, as `lpuctl plan` places the example (the control
    plane places a fresh deployment exactly so)."""
    run = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", "-f", str(EXAMPLE), "-o", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    chips: dict[int, list[str]] = {}
    for stage in sorted(json.loads(run.stdout)["stages"], key=lambda s: s["index"]):
        chips.setdefault(stage["replica"], []).extend(stage["chips"])
    return chips


def _get(cluster: Cluster) -> admin_pb2.Deployment:
    reply: admin_pb2.Deployment = cluster.stub.Get(
        admin_pb2.GetRequest(name="tiny-llama"), metadata=cluster.viewer, timeout=30
    )
    return reply


def _generate(cluster: Cluster, prompt: list[int], tokens: int) -> list[int]:
    run = cluster.lpuctl(
        "generate", "tiny-llama", "--ids", *map(str, prompt), "--max-tokens", str(tokens)
    )
    assert run.returncode == 0, run.stderr
    return [int(t) for t in run.stdout.split()]


REFERENCE = ReferenceExecutor(TINY, SeededWeights(TINY, 0, "F16"), max_context=256)


def test_killed_while_loading_it_finishes_loading_only_what_is_missing(cluster: Cluster) -> None:
    plan = _plan_chips()
    frozen_node = plan[1][0].rsplit("/", 1)[0]  # holds replica 1's first stage
    assert not any(c.startswith(frozen_node + "/") for c in plan[0])
    first_nodes = sorted({c.rsplit("/", 1)[0] for c in plan[0]})
    frozen = int(str(_agents(cluster)[frozen_node]["pid"]))
    os.kill(frozen, signal.SIGSTOP)
    try:
        run = cluster.lpuctl("apply", "-f", str(EXAMPLE))
        assert run.returncode == 0, run.stdout + run.stderr

        def replica_0_committed() -> bool:
            loads = _loads(cluster, first_nodes)
            return all(loads.get(c) == 1 for c in plan[0])

        wait_for(replica_0_committed, timeout=120, interval=0.2, what="replica 0 loaded")
        _kill_control_plane(cluster)  # blocked streaming a shard into the frozen agent
    finally:
        os.kill(frozen, signal.SIGCONT)
    before = _loads(cluster)
    assert all(before[c] == 1 for c in plan[0])
    assert sum(before.values()) < len(plan[0]) + len(plan[1])  # it was killed mid-load
    pids = {n: a["pid"] for n, a in _agents(cluster).items()}

    _up_again(cluster)
    run = cluster.lpuctl("apply", "-f", str(EXAMPLE), "--wait", "--timeout", "120")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "unchanged (generation 1)" in run.stdout
    assert {n: a["pid"] for n, a in _agents(cluster).items()} == pids  # adopted, not restarted
    got = _get(cluster)
    assert {r.index: list(r.chips) for r in got.replica_info} == plan
    after = _loads(cluster)
    # every chip of the deployment loaded exactly once in all: the chips committed before the
    # kill were adopted, the others (the frozen agent's aborted load among them) loaded once
    assert {c: n for c, n in after.items() if n} == {c: 1 for r in plan.values() for c in r}
    assert _generate(cluster, [7], 4) == list(REFERENCE.generate([7], 4).tokens)


def test_killed_while_serving_it_adopts_everything_and_the_stream_fails_unavailable(
    cluster: Cluster,
) -> None:
    assert _get(cluster).phase == "Ready"
    epochs = {r.index: r.epoch for r in _get(cluster).replica_info}
    loads = _loads(cluster)
    pids = {n: a["pid"] for n, a in _agents(cluster).items()}
    endpoint = dict(cluster.endpoint)
    stream = cluster.stub.Generate(
        admin_pb2.GenerateRequest(deployment="tiny-llama", prompt_ids=[5], max_tokens=240),
        metadata=cluster.viewer,
        timeout=120,
    )
    received = [next(stream).token]  # in flight through the gateway
    _kill_control_plane(cluster)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        for reply in stream:
            received.append(reply.token)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value
    assert time.monotonic() - started < 60 and len(received) < 240
    restarted_at = time.time()

    _up_again(cluster)
    for port in ("admin", "registry", "metrics"):  # the agents and clients knew these
        assert cluster.endpoint[port] == endpoint[port]
    wait_for(lambda: _get(cluster).phase == "Ready", timeout=60, what="Ready again")
    assert {r.index: r.epoch for r in _get(cluster).replica_info} == epochs  # no resync
    assert _loads(cluster) == loads  # zero shard loads
    assert {n: a["pid"] for n, a in _agents(cluster).items()} == pids
    assert _generate(cluster, [5], 8) == list(REFERENCE.generate([5], 8).tokens)
    # the adopted agents keep heartbeating: nodes stay Ready well past the 2.5 s timeout
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        nodes = cluster.stub.ListNodes(
            admin_pb2.ListNodesRequest(), metadata=cluster.viewer, timeout=30
        ).nodes
        assert len(nodes) == 6 and all(n.state == "Ready" for n in nodes)
        time.sleep(0.2)  # an observation window, not a synchronization
    events = cluster.stub.Events(admin_pb2.EventsRequest(), metadata=cluster.viewer).events
    late = [e.reason for e in events if e.time >= restarted_at]
    assert late.count("AgentAdopted") == 6
    assert not {"NodeNotReady", "Resynchronizing", "ReplicaLost", "ActionFailed"} & set(late)
    assert _get(cluster).phase == "Ready"


def test_down_after_a_crash_stops_the_agents_it_left(cluster: Cluster) -> None:
    agents = [int(str(a["pid"])) for a in _agents(cluster).values()]
    assert all(_alive(p) for p in agents)
    _kill_control_plane(cluster)
    assert all(_alive(p) for p in agents)  # they outlive it, serving
    down = cluster.lpuctl("down")
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not any(_alive(p) for p in agents), timeout=30, what="the agents gone")
    assert not _processes_of(cluster.state)
