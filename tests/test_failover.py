"""Failover without restarting the replica, end to end on a real embedded cluster.

One `lpuctl up` for the module (control plane and six agent processes, mutual TLS), the
tiny-llama example (2 replicas, spread: rack, one spare node per rack). Faults are injected
while a client streams tokens through the control plane's Generate gateway: an agent process
SIGKILLed (a node failure; stage 0's node; two nodes at once; the spare while the moved
stages load onto it), a chip marked failed by its agent, an agent SIGSTOPped (stalled) and
woken, no spare left (every node cordoned), an idle replica's node, a drain, a stage-to-stage
link's TCP connection reset between two live agents, and an agent killed while a fresh
deployment's shards stream into it. Each test checks what issue 10 asks: the client's tokens
equal the reference executor's (none lost, repeated or changed), the deployment goes Degraded
(events StagesMoved, Degraded; for the broken link, Resynchronizing on the same chips) and
Ready again, only the lost stage's chips changed, the other replica was not touched (unless
earlier failovers left some of its stages on the same node), and no chip keeps a stale shard.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterable, Iterator
from contextlib import closing

import grpc
import pytest
from agent_helpers import wait_for
from test_control_plane import EXAMPLE, TINY, Cluster, _processes_of, cluster

from agents.executor import ReferenceExecutor
from orchestrator.agent_client import dial
from orchestrator.weights import SeededWeights
from protos import admin_pb2, agent_pb2, agent_pb2_grpc
from security import certs as certs_mod

__all__ = ["cluster"]  # the module-scoped embedded cluster of test_control_plane

PROMPT = [5, 9, 2]
MAX_TOKENS = 240  # long enough that the fault lands mid-stream on a busy machine


@pytest.fixture(scope="module")
def reference() -> list[int]:
    ref = ReferenceExecutor(TINY, SeededWeights(TINY, 0, "F16"), max_context=256)
    return list(ref.generate(PROMPT, MAX_TOKENS).tokens)


@pytest.fixture(scope="module", autouse=True)
def deployed(cluster: Cluster) -> Iterator[None]:
    run = cluster.lpuctl("apply", "-f", str(EXAMPLE), "--wait", "--timeout", "180")
    assert run.returncode == 0, run.stdout + run.stderr
    yield


def _get(cluster: Cluster) -> admin_pb2.Deployment:
    return cluster.stub.Get(admin_pb2.GetRequest(name="tiny-llama"), metadata=cluster.viewer)


def _replicas(cluster: Cluster) -> dict[int, admin_pb2.ReplicaInfo]:
    return {r.index: r for r in _get(cluster).replica_info}


def _ready(cluster: Cluster) -> bool:
    d = _get(cluster)
    return d.phase == "Ready" and all(r.running for r in d.replica_info)


def _last_event_id(cluster: Cluster) -> int:
    events = cluster.stub.Events(admin_pb2.EventsRequest(), metadata=cluster.viewer).events
    return max((e.id for e in events), default=0)


def _events_since(cluster: Cluster, after: int) -> list[admin_pb2.Event]:
    events = cluster.stub.Events(admin_pb2.EventsRequest(), metadata=cluster.viewer).events
    return [e for e in events if e.id > after]


class Stream:
    """A Generate stream read on a thread: responses land on a queue as they arrive."""

    def __init__(self, cluster: Cluster) -> None:
        self.responses: queue.SimpleQueue[admin_pb2.GenerateResponse | BaseException] = (
            queue.SimpleQueue()
        )
        self.got: list[admin_pb2.GenerateResponse] = []
        self.call = cluster.stub.Generate(
            admin_pb2.GenerateRequest(
                deployment="tiny-llama", prompt_ids=PROMPT, max_tokens=MAX_TOKENS
            ),
            metadata=cluster.viewer,
            timeout=240,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                self.responses.put(reply)
        except BaseException as exc:  # handed to the test thread
            self.responses.put(exc)

    def next(self) -> admin_pb2.GenerateResponse:
        item = self.responses.get(timeout=120)
        if isinstance(item, BaseException):
            raise item
        self.got.append(item)
        return item

    def rest(self) -> list[admin_pb2.GenerateResponse]:
        while not (self.got and self.got[-1].finished):
            self.next()
        self.thread.join(30)
        return self.got


def _stale_shards(cluster: Cluster) -> list[str]:
    """Chips of live nodes holding a shard that no replica's chip list names (a NotReady
    node's report is as old as its last word; it is checked when it is back)."""
    claimed = {c for r in _get(cluster).replica_info for c in r.chips}
    nodes = cluster.stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=cluster.viewer).nodes
    return [
        c.id
        for n in nodes
        if n.state != "NotReady"
        for c in n.chips
        if c.shards and c.id not in claimed
    ]


def _kill(cluster: Cluster, node: str) -> None:
    (pid,) = _processes_of(cluster.state, node=node)
    os.kill(pid, signal.SIGKILL)


def _nodes_of(chips: Iterable[str]) -> list[str]:
    return sorted({c.rsplit("/", 1)[0] for c in chips})


def _check_other_replica(
    before: dict[int, admin_pb2.ReplicaInfo],
    after: dict[int, admin_pb2.ReplicaInfo],
    other: int,
    dead: list[str],
) -> None:
    """The other replica was not touched — unless earlier failovers left some of its stages
    on a node that died here too (then only those moved)."""
    hit = [c for c in before[other].chips if c.rsplit("/", 1)[0] in dead]
    if not hit:
        assert after[other].epoch == before[other].epoch
        assert list(after[other].chips) == list(before[other].chips)
        return
    for was, now in zip(before[other].chips, after[other].chips, strict=True):
        assert was == now or was in hit


def _resumed_and_healed(
    cluster: Cluster,
    stream: Stream | None,
    reference: list[int],
    before: dict[int, admin_pb2.ReplicaInfo],
    serving: int,
) -> dict[int, admin_pb2.ReplicaInfo]:
    """The stream (if any) ended with the reference tokens after at least one resumption,
    and the serving replica is Ready again at a newer epoch; the replicas then."""
    if stream is not None:
        got = stream.rest()
        assert [r.token for r in got] == reference  # nothing lost, repeated or changed
        assert [r.index for r in got] == list(range(len(reference)))
        assert got[-1].resumed >= 1, "the fault did not land mid-stream"

    def healed() -> bool:
        return _ready(cluster) and _replicas(cluster)[serving].epoch > before[serving].epoch

    wait_for(healed, timeout=120, interval=0.1, what="Ready again at a new epoch")
    return _replicas(cluster)


def _check_failover(
    cluster: Cluster,
    stream: Stream | None,
    reference: list[int],
    before: dict[int, admin_pb2.ReplicaInfo],
    serving: int,
    lost: set[str],
    since: int,
    *,
    nodes_died: bool = True,
) -> None:
    after = _resumed_and_healed(cluster, stream, reference, before, serving)
    _check_other_replica(before, after, 1 - serving, _nodes_of(lost) if nodes_died else [])
    assert after[serving].epoch > before[serving].epoch
    changed = {
        old
        for old, new in zip(before[serving].chips, after[serving].chips, strict=True)
        if old != new
    }
    assert changed == lost  # only the lost stages' chips moved
    assert after[serving].restarts >= 1  # counted against failover.maxRestarts
    described = cluster.lpuctl("describe", "deployment", "tiny-llama")
    assert described.returncode == 0 and "RESTARTS" in described.stdout
    reasons = [e.reason for e in _events_since(cluster, since) if e.deployment == "tiny-llama"]
    assert "StagesMoved" in reasons and "Degraded" in reasons, reasons
    # Degraded may come first: the survivors' links break (and they report the pipeline
    # stopped) before the runtime reports the dead agent — with framed links, at once.
    healing = max(reasons.index("StagesMoved"), reasons.index("Degraded"))
    assert "Ready" in reasons[healing:], reasons
    assert wait_for(lambda: not _stale_shards(cluster), timeout=30, what="no stale shards")
    # Both replicas serve the reference again (the gateway alternates between them).
    for _ in range(2):
        run = cluster.lpuctl("generate", "tiny-llama", "--ids", "3", "1", "--max-tokens", "5")
        assert run.returncode == 0, run.stderr
        ref = ReferenceExecutor(TINY, SeededWeights(TINY, 0, "F16"), max_context=256)
        assert [int(t) for t in run.stdout.split()] == list(ref.generate([3, 1], 5).tokens)


def test_a_node_killed_during_generation_moves_only_its_stages(
    cluster: Cluster, reference: list[int]
) -> None:
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    before = _replicas(cluster)
    since = _last_event_id(cluster)
    stream = Stream(cluster)
    first = stream.next()
    serving = first.replica
    chips = list(before[serving].chips)
    head = chips[0].rsplit("/", 1)[0]
    victims = sorted(set(_nodes_of(chips)) - {head})
    assert victims, f"replica {serving} has every stage on its stage-0 node: {chips}"
    node = victims[-1]
    _kill(cluster, node)
    lost = {c for c in chips if c.startswith(node + "/")}
    _check_failover(cluster, stream, reference, before, serving, lost, since)


def test_stage_0_killed_during_generation_the_gateway_resumes_the_stream(
    cluster: Cluster, reference: list[int]
) -> None:
    """Stage 0's journal dies with its agent: the gateway re-submits prompt + the tokens
    already delivered, and the client's stream goes on identically."""
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    before = _replicas(cluster)
    since = _last_event_id(cluster)
    stream = Stream(cluster)
    serving = stream.next().replica
    chips = list(before[serving].chips)
    head = chips[0].rsplit("/", 1)[0]
    _kill(cluster, head)
    lost = {c for c in chips if c.startswith(head + "/")}
    _check_failover(cluster, stream, reference, before, serving, lost, since)


def test_an_idle_replica_loses_a_node(cluster: Cluster, reference: list[int]) -> None:
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    before = _replicas(cluster)
    since = _last_event_id(cluster)
    chips = list(before[0].chips)
    node = _nodes_of(chips)[-1]
    _kill(cluster, node)
    lost = {c for c in chips if c.startswith(node + "/")}
    _check_failover(cluster, None, reference, before, 0, lost, since)


def test_two_nodes_of_one_replica_killed_at_once(cluster: Cluster, reference: list[int]) -> None:
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    before = _replicas(cluster)
    since = _last_event_id(cluster)
    stream = Stream(cluster)
    serving = stream.next().replica
    chips = list(before[serving].chips)
    nodes = _nodes_of(chips)
    if len(nodes) < 2:
        pytest.skip(f"replica {serving} spans one node: {chips}")
    for node in nodes[:2]:
        _kill(cluster, node)
    lost = {c for c in chips if c.rsplit("/", 1)[0] in nodes[:2]}
    _check_failover(cluster, stream, reference, before, serving, lost, since)


def test_a_stalled_agent_is_failed_over_and_its_stale_pipeline_removed_when_it_wakes(
    cluster: Cluster, reference: list[int]
) -> None:
    """SIGSTOP: the process lives but says nothing (a hung host, a stalled link). Its
    heartbeats stop, the node goes NotReady and its stages move; when it wakes it still
    holds the old shards and pipeline — the control plane unloads and removes them."""
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    before = _replicas(cluster)
    since = _last_event_id(cluster)
    stream = Stream(cluster)
    serving = stream.next().replica
    chips = list(before[serving].chips)
    head = chips[0].rsplit("/", 1)[0]
    victims = sorted(set(_nodes_of(chips)) - {head})
    assert victims, f"replica {serving} has every stage on its stage-0 node: {chips}"
    node = victims[-1]
    (pid,) = _processes_of(cluster.state, node=node)
    os.kill(pid, signal.SIGSTOP)
    try:
        lost = {c for c in chips if c.startswith(node + "/")}
        _check_failover(cluster, stream, reference, before, serving, lost, since)
    finally:
        os.kill(pid, signal.SIGCONT)

    # Awake again: Ready, and nothing of the old replica stays on its chips.
    def clean() -> bool:
        listed = cluster.stub.ListChips(
            admin_pb2.ListChipsRequest(node=node), metadata=cluster.viewer
        ).chips
        return _ready(cluster) and not any(c.shards for c in listed) and not _stale_shards(cluster)

    wait_for(clean, timeout=60, interval=0.2, what="the woken node holds nothing stale")
    info = next(
        n
        for n in cluster.stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=cluster.viewer).nodes
        if n.name == node
    )
    creds = certs_mod.load_control_plane(cluster.paths.certs)
    with dial(info.address, creds, info.name) as channel:
        status = agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.StatusRequest(), timeout=30)
    assert not any(c.pipelines for c in status.chips)


def test_a_chip_failed_during_generation_moves_its_stage(
    cluster: Cluster, reference: list[int]
) -> None:
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    before = _replicas(cluster)
    since = _last_event_id(cluster)
    stream = Stream(cluster)
    first = stream.next()
    serving = first.replica
    chips = list(before[serving].chips)
    victim = chips[-1]  # the last stage (not stage 0)
    node_name, _, index = victim.rpartition("/chip-")
    node = next(
        n
        for n in cluster.stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=cluster.viewer).nodes
        if n.name == node_name
    )
    creds = certs_mod.load_control_plane(cluster.paths.certs)
    with dial(node.address, creds, node.name) as channel:
        agent_pb2_grpc.AgentStub(channel).MarkChipFailed(
            agent_pb2.MarkChipFailedRequest(chip=int(index), reason="injected: ECC storm"),
            timeout=30,
        )
    _check_failover(cluster, stream, reference, before, serving, {victim}, since, nodes_died=False)
    chip = next(
        c
        for c in cluster.stub.ListChips(admin_pb2.ListChipsRequest(), metadata=cluster.viewer).chips
        if c.id == victim
    )
    assert chip.health == "Failed" and not chip.shards and not chip.deployment


def test_generate_through_the_gateway_is_unchanged_without_faults(
    cluster: Cluster, reference: list[int]
) -> None:
    stream = Stream(cluster)
    got = stream.rest()
    assert [r.token for r in got] == reference and got[-1].resumed == 0


def test_a_bad_request_is_not_resumed(cluster: Cluster) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(
            cluster.stub.Generate(
                admin_pb2.GenerateRequest(
                    deployment="tiny-llama", prompt_ids=[999_999], max_tokens=3
                ),
                metadata=cluster.viewer,
                timeout=60,
            )
        )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_no_spare_left_stays_degraded_with_the_reason_and_serves_on(
    cluster: Cluster, reference: list[int]
) -> None:
    """Every node cordoned: a lost stage has nowhere to go. The replica waits (Degraded,
    NoSpare, a Warning event), the other replica serves on; uncordoned, the stage moves."""
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    before = _replicas(cluster)
    since = _last_event_id(cluster)
    nodes = cluster.stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=cluster.viewer).nodes
    names = [n.name for n in nodes]
    for name in names:
        assert cluster.lpuctl("cordon", name).returncode == 0
    try:
        chips = list(before[0].chips)
        node = _nodes_of(chips)[-1]
        _kill(cluster, node)

        def waiting() -> admin_pb2.Deployment | None:
            d = _get(cluster)
            return d if d.phase == "Degraded" and d.reason == "NoSpare" else None

        d = wait_for(waiting, timeout=60, interval=0.1, what="Degraded, NoSpare")
        assert node in d.message and "waiting for chips" in d.message
        reasons = [e.reason for e in _events_since(cluster, since)]
        assert "Unplaceable" in reasons and "Degraded" in reasons
        # the other replica serves on, through the gateway, the reference tokens
        run = cluster.lpuctl(
            "generate", "tiny-llama", "--ids", *map(str, PROMPT), "--max-tokens", "8"
        )
        assert run.returncode == 0, run.stderr
        assert [int(t) for t in run.stdout.split()] == reference[:8]
    finally:
        for name in names:
            assert cluster.lpuctl("uncordon", name).returncode == 0

    # The killed node's agent came back meanwhile with empty chips: uncordoned, the replica
    # is whole again (on the same chips, reloaded, or moved) and resynchronized.
    def healed() -> bool:
        return _ready(cluster) and _replicas(cluster)[0].epoch > before[0].epoch

    wait_for(healed, timeout=120, interval=0.1, what="Ready again")
    after = _replicas(cluster)
    _check_other_replica(before, after, 1, [node])
    kept = {c for c in chips if not c.startswith(node + "/")}
    assert kept <= set(after[0].chips)  # the stages elsewhere never moved
    assert wait_for(lambda: not _stale_shards(cluster), timeout=30, what="no stale shards")


def test_drain_moves_a_serving_replica_off_a_node_without_failing_a_request(
    cluster: Cluster, reference: list[int]
) -> None:
    """`lpuctl drain NODE` while a stream is served from it: the node's stages load onto
    spares first, the replica switches over at a new epoch, the node's shards are unloaded;
    the client's tokens are the reference, nothing failed."""
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    before = _replicas(cluster)
    since = _last_event_id(cluster)
    stream = Stream(cluster)
    serving = stream.next().replica
    chips = list(before[serving].chips)
    node = _nodes_of(chips)[-1]
    try:
        run = cluster.lpuctl("drain", node)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"node/{node}: drained" in run.stdout
        got = stream.rest()
        assert [r.token for r in got] == reference
        listed = cluster.stub.ListChips(
            admin_pb2.ListChipsRequest(node=node), metadata=cluster.viewer
        ).chips
        assert not any(c.shards or c.deployment for c in listed)
        after = _replicas(cluster)
        _check_other_replica(before, after, 1 - serving, [node])
        changed = {
            old
            for old, new in zip(before[serving].chips, after[serving].chips, strict=True)
            if old != new
        }
        assert changed == {c for c in chips if c.startswith(node + "/")}
        assert not any(c.startswith(node + "/") for c in after[serving].chips)
        reasons = [e.reason for e in _events_since(cluster, since)]
        assert reasons.index("DrainStarted") < reasons.index("StagesDrained")
        assert "Draining" in reasons
    finally:
        assert cluster.lpuctl("uncordon", node).returncode == 0
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready after drain")
    assert not _stale_shards(cluster)


def test_the_spare_killed_while_the_moved_stages_load_onto_it(
    cluster: Cluster, reference: list[int]
) -> None:
    """A second fault during the failover's load: the node receiving the moved stages dies
    while they load. The same incident moves them again (no backoff), the client's stream
    still ends with the reference tokens."""
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    before = _replicas(cluster)
    since = _last_event_id(cluster)
    stream = Stream(cluster)
    serving = stream.next().replica
    chips = list(before[serving].chips)
    head = chips[0].rsplit("/", 1)[0]
    node = sorted(set(_nodes_of(chips)) - {head})[-1]
    _kill(cluster, node)

    def moved_to() -> list[str]:
        for e in _events_since(cluster, since):
            if e.reason == "StagesMoved":  # "...; moving stage 1 A -> B; stage 2 C -> D (...)"
                moves = e.message.split("; moving ", 1)[1].rsplit(" (restart", 1)[0]
                targets = [part.split(" -> ")[1] for part in moves.split("; ")]
                return _nodes_of(c for t in targets for c in t.split(", "))
        return []

    spare_nodes = [
        n for n in wait_for(moved_to, timeout=30, interval=0.005, what="StagesMoved") if n != head
    ]
    assert spare_nodes, "the stages moved onto stage 0's node: no separate spare to kill"
    for spare in spare_nodes:
        _kill(cluster, spare)
    got = stream.rest()
    assert [r.token for r in got] == reference
    wait_for(
        lambda: _ready(cluster) and _replicas(cluster)[serving].epoch > before[serving].epoch,
        timeout=120,
        interval=0.1,
        what="Ready again",
    )
    after = _replicas(cluster)
    _check_other_replica(before, after, 1 - serving, [node, *spare_nodes])
    reasons = [e.reason for e in _events_since(cluster, since) if e.deployment == "tiny-llama"]
    first = reasons.index("StagesMoved")
    second = reasons.index("StagesMoved", first + 1)  # the spare's stages moved again,
    assert "Ready" not in reasons[first:second]  # before the replica came back: mid-load
    kept = [c for c in chips if c.rsplit("/", 1)[0] != node]
    assert set(kept) <= set(after[serving].chips)
    assert wait_for(lambda: not _stale_shards(cluster), timeout=30, what="no stale shards")


def _cut_tcp(pid: int, address: str) -> int:
    """Reset every established TCP connection process `pid` holds to `address` (host:port),
    with `ss -K` (SOCK_DESTROY: the kernel aborts the socket and sends the peer an RST, as
    a failed switch port or a middlebox dropping the flow would). Returns how many were cut."""
    host, _, port = address.rpartition(":")
    listed = subprocess.run(
        ["ss", "-tnpH", "state", "established", "dst", f"{host}:{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    local_ports = [
        line.split()[2].rpartition(":")[2] for line in listed.splitlines() if f"pid={pid}," in line
    ]
    for local in local_ports:
        subprocess.run(
            [
                "ss",
                "-K",
                "-tn",
                "state",
                "established",
                "sport",
                f"= :{local}",
                "dport",
                f"= :{port}",
            ],
            capture_output=True,
            check=True,
        )
    return len(local_ports)


@pytest.mark.skipif(
    shutil.which("ss") is None or os.geteuid() != 0, reason="needs ss -K (root, CAP_NET_ADMIN)"
)
def test_a_link_broken_between_two_live_agents_resynchronizes_on_the_same_chips(
    cluster: Cluster, reference: list[int]
) -> None:
    """The TCP connection carrying a stage-to-stage Link stream is reset (`ss -K` on the
    sending agent's sockets to the receiving agent) while both agents live: the real fault
    of a flapping link. Links dial the downstream agent directly, so no proxy can sit in
    between, and no agent RPC breaks a link without also dropping or halting a stage (which
    would be a different fault). The sending stage sees its stream break and stops, the
    gateway sees the pipeline stop, no chip or node explains it, so after the grace period
    the replica resynchronizes at a new epoch on the same chips and the client's stream goes
    on identically."""
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    before = _replicas(cluster)
    since = _last_event_id(cluster)
    stream = Stream(cluster)
    serving = stream.next().replica
    chips = list(before[serving].chips)
    nodes = [c.rsplit("/", 1)[0] for c in chips]
    pairs = [(a, b) for a, b in itertools.pairwise(nodes) if a != b]
    if not pairs:
        pytest.skip(f"replica {serving} has no link between two agents: {chips}")
    sender, receiver = pairs[0]
    listed = cluster.stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=cluster.viewer).nodes
    address = next(n.address for n in listed if n.name == receiver)
    (pid,) = _processes_of(cluster.state, node=sender)
    # The link runs over the receiver's framed link port (agents.wire) or its gRPC port.
    creds = certs_mod.load_control_plane(cluster.paths.certs)
    with dial(address, creds, receiver) as channel:
        link_port = agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.StatusRequest()).link_port
    targets = [address, *([f"{address.rpartition(':')[0]}:{link_port}"] if link_port else [])]
    cut = sum(_cut_tcp(pid, target) for target in targets)
    assert cut >= 1, f"no connection from {sender} to {receiver} ({targets})"
    assert _processes_of(cluster.state, node=sender) == [pid]  # both agents live on
    after = _resumed_and_healed(cluster, stream, reference, before, serving)
    assert list(after[serving].chips) == chips  # resynchronized where it was
    assert _processes_of(cluster.state, node=receiver)  # nobody died
    reasons = [e.reason for e in _events_since(cluster, since) if e.deployment == "tiny-llama"]
    assert "Resynchronizing" in reasons, reasons
    assert "StagesMoved" not in reasons, reasons
    assert "AgentDied" not in [e.reason for e in _events_since(cluster, since)]
    assert wait_for(lambda: not _stale_shards(cluster), timeout=30, what="no stale shards")
    run = cluster.lpuctl("generate", "tiny-llama", "--ids", *map(str, PROMPT), "--max-tokens", "8")
    assert run.returncode == 0, run.stderr
    assert [int(t) for t in run.stdout.split()] == reference[:8]


def _held_and_bound(cluster: Cluster) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Shards each chip holds, asked of every live agent itself (chip id -> shard ids), and
    the store's bindings (chip id -> the shard the store says it must hold), read from the
    control plane's SQLite store (read-only)."""
    creds = certs_mod.load_control_plane(cluster.paths.certs)
    held: dict[str, set[str]] = {}
    nodes = cluster.stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=cluster.viewer).nodes
    for node in nodes:
        with dial(node.address, creds, node.name) as channel:
            status = agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.StatusRequest(), timeout=30)
        for chip in status.chips:
            if chip.shards:
                held[f"{node.name}/chip-{chip.chip}"] = {s.shard_id for s in chip.shards}
    bound: dict[str, set[str]] = {}
    with closing(sqlite3.connect(f"file:{cluster.paths.store}?mode=ro", uri=True)) as db:
        for chip, shard in db.execute("SELECT chip, shard_id FROM shard_bindings"):
            bound.setdefault(chip, set()).add(shard)
    return held, bound


def test_an_agent_killed_during_the_first_load_is_replaced_and_no_chip_keeps_a_stale_shard(
    cluster: Cluster, reference: list[int]
) -> None:
    """A fresh deployment whose shards are streaming in when one of its agents dies. To
    land the kill inside the load deterministically every agent is frozen (SIGSTOP) before
    the apply, so nothing can commit; once the control plane has placed the replicas the
    others are woken, and once a shard has committed on one of them (the loads stream, at
    most two per node at once) the victim (a node of replica 0) is SIGKILLed with its own
    loads blocked mid-stream — they fail (ActionFailed) and its stages move (AgentDied).
    The deployment reaches Ready with the victim's stages elsewhere, every chip holds
    exactly the shard the store binds to it (nothing stale from the aborted load or the
    dead node), and a generate returns the reference tokens. Runs last: it redeploys the
    module's tiny-llama."""
    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready")
    cluster.stub.Delete(admin_pb2.DeleteRequest(name="tiny-llama"), metadata=cluster.admin)

    def gone() -> bool:
        listed = cluster.stub.List(admin_pb2.ListRequest(), metadata=cluster.viewer).deployments
        try:
            held, bound = _held_and_bound(cluster)
        except grpc.RpcError:  # an agent restarted by an earlier test is not back yet
            return False
        return not listed and not held and not bound

    wait_for(gone, timeout=120, interval=0.2, what="tiny-llama deleted, every chip empty")
    since = _last_event_id(cluster)
    nodes = cluster.stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=cluster.viewer).nodes
    addresses = {n.name: n.address for n in nodes}
    pids = {name: _processes_of(cluster.state, node=name)[0] for name in addresses}
    creds = certs_mod.load_control_plane(cluster.paths.certs)
    frozen = set(pids)
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        cluster.stub.Apply(
            admin_pb2.ApplyRequest(yaml=EXAMPLE.read_text(), source=EXAMPLE.name),
            metadata=cluster.admin,
            timeout=30,
        )

        def placed() -> dict[int, list[str]] | None:
            info = _get(cluster).replica_info
            if len(info) == 2 and all(r.chips for r in info):
                return {r.index: list(r.chips) for r in info}
            return None

        plan = wait_for(placed, timeout=30, interval=0.01, what="the replicas placed")
        assert plan is not None  # wait_for returns the probe's truthy value
        victim = _nodes_of(plan[0])[-1]
        for name in sorted(frozen - {victim}):
            os.kill(pids[name], signal.SIGCONT)
            frozen.discard(name)

        def loading() -> bool:
            """A shard committed on another node: the loads are streaming (at most two per
            node at once, so the victim's first two are among them, blocked)."""
            for name in set(_nodes_of(plan[0] + plan[1])) - {victim}:
                with dial(addresses[name], creds, name) as channel:
                    status = agent_pb2_grpc.AgentStub(channel).Status(
                        agent_pb2.StatusRequest(), timeout=30
                    )
                if any(c.shards for c in status.chips):
                    return True
            return False

        wait_for(loading, timeout=30, interval=0.01, what="shards streaming in")
        os.kill(pids[victim], signal.SIGKILL)  # a stopped process dies at once
    finally:
        for name in frozen:
            os.kill(pids[name], signal.SIGCONT)
    lost = {c for c in plan[0] if c.startswith(victim + "/")}

    wait_for(lambda: _ready(cluster), timeout=120, interval=0.1, what="Ready after the kill")
    after = _replicas(cluster)
    assert not lost & set(after[0].chips), (plan, after[0].chips)  # its stages moved
    kept = set(plan[0]) - lost
    assert kept <= set(after[0].chips), (plan, after[0].chips)  # the others stayed
    reasons = [e.reason for e in _events_since(cluster, since)]
    assert "AgentDied" in reasons, reasons
    aborted = [
        e.message
        for e in _events_since(cluster, since)
        if e.reason == "ActionFailed" and e.message.startswith(f"load/{victim}/")
    ]
    assert aborted, "no load into the victim was cut short"

    def consistent() -> bool:
        try:
            held, bound = _held_and_bound(cluster)
        except grpc.RpcError:  # the victim's agent is restarting (its new address not yet known)
            return False
        claimed = {c for r in after.values() for c in r.chips}
        return held == bound and set(bound) == claimed

    assert wait_for(consistent, timeout=30, interval=0.2, what="held shards == bindings")
    run = cluster.lpuctl("generate", "tiny-llama", "--ids", *map(str, PROMPT), "--max-tokens", "8")
    assert run.returncode == 0, run.stderr
    assert [int(t) for t in run.stdout.split()] == reference[:8]
