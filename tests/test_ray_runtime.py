"""Ray mode: node agents as Ray actors (mTLS, death detection, restart, clean stop) and the
compile fan-out over Ray tasks (exactly the in-process result).

One embedded Ray serves the whole session (about 4 s and 600 MB to start): conftest.py starts
it before the first test when this module is selected, so the runtimes made here join it.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import ray
from agent_helpers import wait_for

from orchestrator.agent_client import dial
from orchestrator.compiler import compile_plan
from orchestrator.ray_runtime import (
    RayRuntime,
    RayRuntimeError,
    actor_name,
    discover_nodes,
    init_embedded,
    lockstep_hosts,
)
from orchestrator.ray_tasks import compile_plan_ray
from orchestrator.runtime import AgentHandle, NodeSpec
from orchestrator.weights import write_checkpoint
from placement.models import MODEL_PRESETS
from placement.planner import PlanRequest, make_plan
from placement.topology import preset_topology
from protos import agent_pb2, agent_pb2_grpc
from security import certs as certs_mod

TINY = MODEL_PRESETS["tiny-llama"]


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """The session's embedded Ray: conftest.py starts it before the first test (while no gRPC
    thread exists); started here only when it is not running."""
    started = not ray.is_initialized()
    if started:
        init_embedded()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@pytest.fixture
def runtime(ray_session: None, session_certs: Path) -> Iterator[RayRuntime]:
    rt = RayRuntime(session_certs)
    try:
        yield rt
    finally:
        rt.stop()


def status(handle: AgentHandle, certs: Path) -> agent_pb2.StatusResponse:
    """Status over mTLS as the control plane, checking the agent's certificate names its node."""
    channel = dial(handle.address, certs_mod.load_control_plane(certs), handle.node)
    try:
        return agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.StatusRequest(), timeout=10)
    finally:
        channel.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno != errno.ESRCH
    return True


def node(name: str, chips: int = 4) -> NodeSpec:
    return NodeSpec(name, "rack-0", int(name.rsplit("-", 1)[1]), chips, "dev")


def test_agents_serve_status_over_mtls(runtime: RayRuntime, session_certs: Path) -> None:
    assert lockstep_hosts() == ["local"]
    handles = runtime.start_agents([node("rack-0/node-0", 4), node("rack-0/node-1", 2)])
    assert [h.node for h in handles] == ["rack-0/node-0", "rack-0/node-1"]
    assert len({h.address for h in handles}) == 2
    for handle, chips in zip(handles, (4, 2), strict=True):
        assert handle.identity == f"spiffe://lockstep/agent/{handle.node}"
        assert handle.address.startswith("127.0.0.1:")
        assert len(status(handle, session_certs).chips) == chips
    # detached and named in the lockstep namespace
    named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert actor_name("rack-0/node-0") in named
    # idempotent: starting a running node again returns its handle, no second actor
    assert runtime.start_agents([node("rack-0/node-0", 4)]) == handles[:1]
    # a plaintext client is refused by the mTLS port
    with grpc.insecure_channel(handles[0].address) as plain, pytest.raises(grpc.RpcError):
        agent_pb2_grpc.AgentStub(plain).Status(agent_pb2.StatusRequest(), timeout=5)


def test_sigkill_is_reported_and_ray_restarts_the_agent(
    runtime: RayRuntime, session_certs: Path
) -> None:
    [first, other] = runtime.start_agents([node("rack-0/node-2"), node("rack-0/node-3")])
    pid = runtime.process_id(first.node)
    assert pid is not None and alive(pid)
    assert runtime.dead_agents() == []
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    assert wait_for(
        runtime.dead_agents, timeout=30, interval=0.05, what="the death to be reported"
    ) == [first.node]
    detected = time.monotonic() - killed
    back = wait_for(
        lambda: runtime.handle(first.node),
        timeout=60,
        interval=0.05,
        what="the restarted agent's address",
    )
    restarted = time.monotonic() - killed
    print(f"death reported after {detected:.2f} s, serving again after {restarted:.2f} s")
    new_pid = runtime.process_id(first.node)
    assert new_pid is not None and new_pid != pid and alive(new_pid)
    assert back.address != first.address  # a new process, a new port: the handle moved
    assert len(status(back, session_certs).chips) == 4
    assert runtime.restarts(first.node) == 1
    assert runtime.dead_agents() == []  # each death is reported once
    assert runtime.handle(other.node) == other  # the other agent was untouched
    assert len(status(other, session_certs).chips) == 4


def test_stop_leaves_no_agent_process(ray_session: None, session_certs: Path) -> None:
    rt = RayRuntime(session_certs)
    handles = rt.start_agents([node("rack-0/node-4"), node("rack-0/node-5")])
    pids = [rt.process_id(h.node) for h in handles]
    assert all(p is not None and alive(p) for p in pids)
    rt.stop()
    assert not [p for p in pids if p is not None and alive(p)]
    named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert not {actor_name(h.node) for h in handles} & named
    assert rt.handles() == []


def test_a_second_runtime_finds_running_agents_by_name(
    ray_session: None, session_certs: Path
) -> None:
    """A restarted control plane attaches to the detached actors instead of starting more; when
    one runtime stops them, the other hears of it once and forgets them."""
    first = RayRuntime(session_certs)
    second = RayRuntime(session_certs)
    try:
        [handle] = first.start_agents([node("rack-0/node-6")])
        pid = first.process_id(handle.node)
        assert second.start_agents([node("rack-0/node-6")]) == [handle]
        assert second.process_id(handle.node) == pid
        second.stop()
        assert wait_for(
            first.dead_agents, timeout=30, interval=0.05, what="the stop to be reported"
        ) == [handle.node]
        wait_for(
            lambda: first.nodes() == [],
            timeout=30,
            interval=0.05,
            what="the first runtime to drop the killed agent",
        )
        assert first.handle(handle.node) is None and first.handles() == []
        assert first.dead_agents() == []
        assert pid is not None and not alive(pid)
    finally:
        second.stop()
        first.stop()


def test_discover_nodes_one_per_advertising_host(ray_session: None) -> None:
    # the embedded Ray advertises only its host resource: defaults for chips and rack
    assert discover_nodes("dev", default_chips=4) == [NodeSpec("local", "rack-0", 0, 4, "dev")]


def test_bad_node_fails_with_its_cause(runtime: RayRuntime) -> None:
    with pytest.raises(
        RayRuntimeError,
        match=r"agent rack-0/node-9: profile: unknown chip profile .no-such-profile.",
    ):
        runtime.start_agents([NodeSpec("rack-0/node-9", "rack-0", 9, 2, "no-such-profile")])
    assert runtime.handle("rack-0/node-9") is None
    named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert actor_name("rack-0/node-9") not in named


def test_agent_options_reach_the_agent(ray_session: None, session_certs: Path) -> None:
    rt = RayRuntime(session_certs, agent_options={"no_such_option": 1})
    try:
        with pytest.raises(RayRuntimeError, match="unexpected keyword argument 'no_such_option'"):
            rt.start_agents([node("rack-0/node-8")])
    finally:
        rt.stop()


def test_nodes_need_a_host(ray_session: None, session_certs: Path) -> None:
    rt = RayRuntime(session_certs, hosts={"rack-0/node-7": "elsewhere"})
    try:
        with pytest.raises(RayRuntimeError, match="host 'elsewhere' is not in the Ray cluster"):
            rt.start_agents([node("rack-0/node-7")])
        assert rt.handles() == []
    finally:
        rt.stop()


def _plan(replicas: int, tp: int):  # type: ignore[no-untyped-def]
    request = PlanRequest(
        "fanout",
        TINY,
        "int8",
        replicas=replicas,
        max_context=64,
        max_batch=4,
        tensor_parallel=tp,
        spread="none",
        spares_per_rack=0,
    )
    return make_plan(request, preset_topology(2, "dev"))


@pytest.mark.parametrize("source", ["seed", "checkpoint"])
def test_compile_fan_out_equals_in_process(ray_session: None, tmp_path: Path, source: str) -> None:
    plan = _plan(replicas=2, tp=2)
    weights: int | Path = 7
    if source == "checkpoint":
        weights = tmp_path / "ckpt"
        write_checkpoint(TINY, weights, seed=7)
    local = compile_plan(plan, TINY, weights, tmp_path / "local")
    fanned = compile_plan_ray(plan, TINY, weights, tmp_path / "ray", tasks=3)
    assert len(fanned) == len(plan.chips()) > 4
    assert not any(r.virtual for r in fanned)
    assert [(r.label, r.chip, r.shard_id, r.size_bytes, r.binding) for r in fanned] == [
        (r.label, r.chip, r.shard_id, r.size_bytes, r.binding) for r in local
    ]
    for mine, theirs in zip(fanned, local, strict=True):
        assert mine.path.read_bytes() == theirs.path.read_bytes()
        assert mine.path.is_relative_to(tmp_path / "ray")
    # the recipe index is written too: compiling again writes nothing
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*.safetensors"))
    assert compile_plan_ray(plan, TINY, weights, tmp_path / "ray") == fanned
    after = sorted(p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*.safetensors"))
    assert before == after


def test_lpuctl_up_joins_a_ray_cluster(ray_session: None, tmp_path: Path) -> None:
    """`lpuctl up --ray-address ADDR`: one agent per host that advertises LPU chips (here the
    session's Ray, host `local`), registered with the control plane; `lpuctl down` stops the
    agent and the control plane but leaves the joined cluster running."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LOCKSTEP_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env["LOCKSTEP_CONFIG"] = str(tmp_path / "no-config.yaml")
    for key in ("LOCKSTEP_SERVER", "LOCKSTEP_TOKEN", "LOCKSTEP_CA", "RAY_ADDRESS"):
        env.pop(key, None)

    def lpuctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    address = ray.get_runtime_context().gcs_address
    up = lpuctl("up", "--ray-address", address, "--timeout", "60")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"Ray cluster at {address}" in up.stdout and "1 nodes Ready" in up.stdout
        n = json.loads(lpuctl("get", "nodes", "-o", "json").stdout)  # one node: an object
        assert (n["name"], n["rack"], n["state"], len(n["chips"])) == (
            "local",
            "rack-0",
            "Ready",
            8,
        )
        assert actor_name("local") in {
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
        }
    finally:
        down = lpuctl("down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert actor_name("local") not in named
    assert ray.is_initialized() and lockstep_hosts() == ["local"]  # the cluster still runs


def test_embedded_start_is_tried_again_after_a_failed_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed embedded start (Ray's GCS never writing its port file, seen on a loaded CI
    machine) is shut down and tried once more; a second failure is raised, not swallowed. No Ray
    is started here: `ray.init` and `ray.shutdown` are replaced for the test."""
    import orchestrator.ray_runtime as ray_runtime

    calls: list[str] = []
    failures = ["Timed out waiting for file gcs_server_port"]

    def init(**kwargs: object) -> None:
        calls.append(f"init {kwargs['address']}")
        if failures:
            raise RuntimeError(failures.pop())

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.delenv(ray_runtime.GCS_WAIT_VARIABLE, raising=False)
    ray_runtime.init_embedded()
    assert calls == ["init local", "shutdown", "init local"]
    assert os.environ[ray_runtime.GCS_WAIT_VARIABLE] == str(ray_runtime.EMBEDDED_GCS_WAIT_S)

    calls.clear()
    failures.extend(["second", "first"])
    with pytest.raises(RuntimeError, match="second"):
        ray_runtime.init_embedded()
    assert calls == ["init local", "shutdown", "init local", "shutdown"]


def test_the_control_plane_joins_ray_before_it_serves_grpc(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`ControlPlane(runtime="ray")` starts (or joins) Ray before its first gRPC server: Ray
    forks its GCS and raylet with a `preexec_fn`, which can hang once gRPC's threads run (seen
    in CI). Both steps are replaced here: the test records their order, no Ray starts."""
    import orchestrator.control_plane as control_plane
    import orchestrator.ray_runtime as ray_runtime

    order: list[str] = []

    def connect(address: str | None, **_: object) -> bool:
        order.append(f"ray {address}")
        return True

    def servers(*_: object, **__: object) -> None:
        order.append("grpc")
        raise OSError("stop here")

    monkeypatch.setattr(ray_runtime, "connect_ray", connect)
    monkeypatch.setattr(control_plane, "start_servers", servers)
    with pytest.raises(OSError, match="stop here"):
        control_plane.ControlPlane(tmp_path / "state", runtime="ray")
    assert order == ["ray None", "grpc"]
    order.clear()
    with pytest.raises(OSError, match="stop here"):
        control_plane.ControlPlane(tmp_path / "state2", runtime="process")
    assert order == ["grpc"]
