"""The controller against real agent processes (one `lpuctl up` for the module, 2 racks x 3
`dev` nodes, mutual TLS), in file order: an agent that hangs delays only its own chips while
another deployment loads and becomes Ready; `lpuctl top` shows tokens/s while requests stream;
a rolling replacement keeps the deployment serving."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from agent_helpers import wait_for
from test_control_plane import EXAMPLE, TINY, Cluster, _processes_of
from test_control_plane import cluster as up  # noqa: F401  (the module's `lpuctl up`)

from agents.executor import ReferenceExecutor
from orchestrator.weights import SeededWeights
from protos import admin_pb2, admin_pb2_grpc
from security import certs as certs_mod
from security.identity import CONTROL_PLANE
from security.tls import open_channel


def _manifest(name: str, replicas: int) -> str:
    text = EXAMPLE.read_text().replace("name: tiny-llama", f"name: {name}")
    return text.replace("replicas: 2", f"replicas: {replicas}")


def _get(cluster: Cluster, name: str) -> admin_pb2.Deployment:
    reply: admin_pb2.Deployment = cluster.stub.Get(
        admin_pb2.GetRequest(name=name), metadata=cluster.viewer, timeout=30
    )
    return reply


class StandInBeats:
    """Heartbeats for a node whose agent is stopped, sent with the node's own certificate:
    the control plane keeps the node Ready, so only the stopped agent's calls hang (the worst
    case: liveness says fine, the load path is stuck)."""

    def __init__(self, cluster: Cluster, node: str) -> None:
        creds = certs_mod.load_agent(cluster.paths.certs, node)
        self.channel = open_channel(str(cluster.endpoint["registry"]), creds, peer=CONTROL_PLANE)
        self.stop = threading.Event()
        stub = admin_pb2_grpc.NodeRegistryStub(self.channel)
        self.call = stub.HeartbeatStream.future(self._beats(), timeout=300)

    def _beats(self) -> Iterator[admin_pb2.HeartbeatRequest]:
        while not self.stop.is_set():
            yield admin_pb2.HeartbeatRequest()
            self.stop.wait(0.2)

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(grpc.RpcError):  # the resumed agent's stream replaced it
            self.call.result(timeout=30)
        self.channel.close()


def test_a_hung_agent_delays_only_its_own_chips(up: Cluster) -> None:  # noqa: F811
    cluster = up
    first, second = _manifest("first", 1), _manifest("second", 1)
    plan = cluster.stub.Plan(
        admin_pb2.PlanRequest(yaml=first, source="first.yaml"), metadata=cluster.viewer
    )
    assert plan.fits, plan.reason
    chips = [c for stage in json.loads(plan.plan_json)["stages"] for c in stage["chips"]]
    hung = chips[-1].rsplit("/", 1)[0]  # the node of the last stage's chip
    (pid,) = _processes_of(cluster.state, node=hung)
    os.kill(pid, signal.SIGSTOP)
    beats = StandInBeats(cluster, hung)
    try:
        cluster.stub.Apply(
            admin_pb2.ApplyRequest(yaml=first, source="first.yaml"), metadata=cluster.admin
        )
        wait_for(
            lambda: _get(cluster, "first").phase == "Loading", timeout=60, what="first loading"
        )
        cluster.stub.Cordon(admin_pb2.NodeRequest(name=hung), metadata=cluster.admin)
        started = time.monotonic()
        cluster.stub.Apply(
            admin_pb2.ApplyRequest(yaml=second, source="second.yaml"), metadata=cluster.admin
        )
        wait_for(
            lambda: _get(cluster, "second").phase == "Ready",
            timeout=25,  # the hung loads' deadline is 30 s: a pass waiting on them fails this
            interval=0.05,
            what="second Ready while the agent of the first hangs",
        )
        took = time.monotonic() - started
        stuck = _get(cluster, "first")
        assert stuck.phase == "Loading" and stuck.bytes_loaded < stuck.bytes_total
        replica = _get(cluster, "second").replica_info[0]
        assert not any(c.startswith(hung + "/") for c in replica.chips)
        run = cluster.lpuctl("generate", "second", "--ids", "4", "2", "--max-tokens", "3")
        assert run.returncode == 0 and len(run.stdout.split()) == 3, run.stderr
    finally:
        os.kill(pid, signal.SIGCONT)
        beats.close()
    # resumed, the agent finishes its loads (or the controller retries them) and first serves
    wait_for(lambda: _get(cluster, "first").phase == "Ready", timeout=120, what="first Ready")
    print(f"second Ready {took:.2f} s after its apply while {hung} was stopped")
    cluster.stub.Uncordon(admin_pb2.NodeRequest(name=hung), metadata=cluster.admin)
    for name in ("first", "second"):
        run = cluster.lpuctl("delete", name, "--wait")
        assert run.returncode == 0, run.stderr


def _top(cluster: Cluster) -> dict[str, Any]:
    run = cluster.lpuctl("top", "-o", "json")
    assert run.returncode == 0, run.stderr
    report: dict[str, Any] = json.loads(run.stdout)
    return report


def test_top_shows_tokens_per_second(up: Cluster) -> None:  # noqa: F811
    """While requests stream, `lpuctl top` shows tokens/s for the deployment and for the
    nodes serving its replicas' token streams (stage 0); idle again, 0 after the window."""
    cluster = up
    run = cluster.lpuctl("apply", "-f", str(EXAMPLE), "--wait")
    assert run.returncode == 0, run.stderr
    stop = threading.Event()
    streamed: list[int] = []

    def load() -> None:
        request = admin_pb2.GenerateRequest(
            deployment="tiny-llama", prompt_ids=[4, 2], max_tokens=16
        )
        while not stop.is_set():
            for reply in cluster.stub.Generate(request, metadata=cluster.viewer, timeout=60):
                streamed.append(reply.token)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:

        def busy() -> dict[str, Any] | None:
            report = _top(cluster)
            (tiny,) = report["deployments"]
            serving = [n for n in report["nodes"] if n["tokens_per_second"] > 0]
            return report if tiny["tokens_per_second"] > 0 and serving else None

        report = wait_for(busy, timeout=60, interval=0.5, what="tokens/s in lpuctl top")
        serving = [n for n in report["nodes"] if n["tokens_per_second"] > 0]
        assert 1 <= len(serving) <= 2  # the stage-0 nodes of the two replicas
        assert all(n["deployments"] == ["tiny-llama"] for n in serving)
        table = cluster.lpuctl("top").stdout.splitlines()
        assert "TOKENS/S" in table[2] and "tokens/s: " in table[0]
    finally:
        stop.set()
        thread.join(60)
    assert streamed
    wait_for(
        lambda: _top(cluster)["deployments"][0]["tokens_per_second"] == 0,
        timeout=60,
        interval=0.5,
        what="tokens/s back to 0 when idle",
    )


def test_a_rolling_replacement_keeps_serving(up: Cluster, tmp_path: Path) -> None:  # noqa: F811
    """tiny-llama (2 replicas, fp16) applied again at bf16: the replicas are replaced one at a
    time, the chips held never exceed the old replicas' plus one new replica's, and a client
    generating all along sees no failure; at the end both replicas serve bf16 tokens."""
    cluster = up
    before = _get(cluster, "tiny-llama")
    assert before.phase == "Ready" and before.ready_replicas == 2
    per_replica = len(before.replica_info[0].chips)
    changed = tmp_path / "tiny-bf16.yaml"
    changed.write_text(EXAMPLE.read_text().replace("precision: fp16", "precision: bf16"))
    stop = threading.Event()
    served: list[list[int]] = []
    failures: list[str] = []

    def client() -> None:
        request = admin_pb2.GenerateRequest(
            deployment="tiny-llama", prompt_ids=[4, 2], max_tokens=5
        )
        while not stop.is_set():
            try:
                replies = cluster.stub.Generate(request, metadata=cluster.viewer, timeout=60)
                served.append([r.token for r in replies])
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    held: list[int] = []
    bringing_up: list[int] = []
    try:
        run = cluster.lpuctl("apply", "-f", str(changed))
        assert run.returncode == 0 and "configured (generation" in run.stdout, run.stderr
        generation = _get(cluster, "tiny-llama").generation
        assert generation > before.generation
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = _get(cluster, "tiny-llama")
            held.append(sum(len(r.chips) for r in now.replica_info))
            bringing_up.append(
                sum(1 for r in now.replica_info if r.generation == generation and not r.running)
            )
            done = [r for r in now.replica_info if r.generation == generation and r.running]
            if now.phase == "Ready" and len(done) == 2 and len(now.replica_info) == 2:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the rollout did not finish: {now}")
        count = len(served)
        wait_for(lambda: len(served) >= count + 2, timeout=60, what="requests after the rollout")
    finally:
        stop.set()
        thread.join(90)
    assert failures == [], failures[:5]
    assert all(len(tokens) == 5 for tokens in served)  # every request complete
    assert max(bringing_up) <= 1  # one replica at a time
    assert max(held) <= 3 * per_replica  # never more than the old two and one new
    reference = ReferenceExecutor(TINY, SeededWeights(TINY, 0, "BF16"), max_context=256)
    assert served[-1] == list(reference.generate([4, 2], 5).tokens)
    print(
        f"rollout: {len(served)} requests served, none failed; chips held at most "
        f"{max(held)} (replica: {per_replica})"
    )
