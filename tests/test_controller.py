"""The controller without processes: a real store and compiler, fake agents, a fake clock.

The fake gateway keeps what each chip holds and which replicas are configured and started, so
these tests check what the controller *does* with the reconciler's decisions: every shard is
loaded once onto its chip, each replica is configured then started, a failed step stops that
deployment's actions for the pass and is recorded for the backoff, a load that hangs delays
only its own chips (loads run on the controller's bounded pool), and a delete unloads every
shard before the deployment is forgotten.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from agent_helpers import wait_for
from test_compiler import TINY, tiny_plan

from orchestrator.compiler import compile_plan
from orchestrator.controller import (
    LOADS_PER_NODE,
    Controller,
    ShardCompiler,
    held_from_status,
    moved_refs,
)
from orchestrator.core import (
    Chip,
    ChipHealth,
    CoreSettings,
    MoveStages,
    Node,
    Phase,
    node_name,
)
from orchestrator.spec import load_deployment_file
from orchestrator.store import Store
from placement.profiles import get_profile
from protos import agent_pb2
from security.identity import agent_identity

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "manifests" / "examples" / "tiny-llama.yaml"
PROFILE = get_profile("dev")
SRAM = PROFILE.sram_bytes + (256 << 10)


class FakeError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "chip is full (fake)"


class FakeAgents:
    """Agents as dictionaries: chip -> held shard ids, plus every call made."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, int], dict[str, int]] = {}
        self.calls: list[tuple[str, ...]] = []
        self.fail_loads_on: set[tuple[str, int]] = set()
        self.hang_loads_on: set[str] = set()  # nodes whose loads wait for `release`
        self.release = threading.Event()
        self.started: set[tuple[str, int, int]] = set()
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="fake-load")

    def channel(self, address: str, node: str) -> grpc.Channel:
        raise AssertionError("the controller reaches agents through the gateway's methods")

    def status(self, address: str, node: str) -> agent_pb2.StatusResponse:
        chips = []
        for index in range(PROFILE.chips_per_node):
            held = self.held.get((node, index), {})
            used = sum(held.values())
            chips.append(
                agent_pb2.ChipStatus(
                    chip=index,
                    health=agent_pb2.CHIP_HEALTH_HEALTHY,
                    sram_capacity_bytes=SRAM,
                    sram_used_bytes=used,
                    sram_free_bytes=SRAM - used,
                    shards=[
                        agent_pb2.HeldShard(shard_id=s, size_bytes=n, reserved_bytes=n)
                        for s, n in held.items()
                    ],
                )
            )
        return agent_pb2.StatusResponse(node=node, chips=chips)

    def load(self, address: str, node: str, chip: int, path: Path, shard_id: str) -> Future[object]:
        """Runs the load on the fake's own threads, as the real gateway runs it beside the
        controller (on its event loop)."""
        return self.pool.submit(self._load, node, chip, path, shard_id)

    def _load(self, node: str, chip: int, path: Path, shard_id: str) -> None:
        self.calls.append(("load", node, str(chip), shard_id))
        if node in self.hang_loads_on:
            assert self.release.wait(60)
        if (node, chip) in self.fail_loads_on:
            raise FakeError()
        self.held.setdefault((node, chip), {})[shard_id] = path.stat().st_size

    def unload(self, address: str, node: str, chip: int, shard_id: str) -> None:
        self.calls.append(("unload", node, str(chip), shard_id))
        self.held.get((node, chip), {}).pop(shard_id, None)

    def remove_replica(self, address: str, node: str, deployment: str, replica: int) -> None:
        self.calls.append(("remove", node, deployment, str(replica)))

    def configure(
        self, requests: Mapping[str, agent_pb2.ConfigureReplicaRequest], nodes: Mapping[str, str]
    ) -> list[str]:
        first = next(iter(requests.values()))
        self.calls.append(("configure", first.deployment, str(first.replica)))
        return list(first.replica_chips)

    def start(
        self,
        requests: Mapping[str, agent_pb2.ConfigureReplicaRequest],
        ready: Sequence[str],
        nodes: Mapping[str, str],
    ) -> None:
        first = next(iter(requests.values()))
        assert sorted(ready) == sorted(first.replica_chips)  # the whole barrier
        self.calls.append(("start", first.deployment, str(first.replica)))
        self.started.add((first.deployment, first.replica, first.epoch))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> tuple[Controller, FakeAgents, Store, Clock]:
    store = Store(tmp_path / "store.db")
    clock = Clock()
    nodes = [
        Node(
            name=node_name(f"rack-{r}", s),
            rack=f"rack-{r}",
            slot=s,
            address=f"127.0.0.1:{7000 + 10 * r + s}",
            identity=agent_identity(node_name(f"rack-{r}", s)),
            chips=tuple(Chip(i, SRAM) for i in range(PROFILE.chips_per_node)),
            last_heartbeat=clock.now,
        )
        for r in range(2)
        for s in range(3)
    ]
    store.register_nodes(nodes, clock.now)
    agents = FakeAgents()
    controller = Controller(
        store,
        agents,
        ShardCompiler(tmp_path / "shards"),
        PROFILE,
        clock=clock,
        settings=CoreSettings(),
    )
    return controller, agents, store, clock


def _apply(store: Store, clock: Clock, name: str = "tiny-llama", **spec_fields: object) -> None:
    """The example deployment, under `name`, with `spec_fields` changed."""
    manifest = load_deployment_file(EXAMPLE).manifest
    manifest = {
        **manifest,
        "metadata": {**manifest["metadata"], "name": name},
        "spec": {**manifest["spec"], **spec_fields},
    }
    store.apply_deployment(name, manifest, clock.now)


def _run(controller: Controller, clock: Clock, passes: int = 60) -> None:
    """Passes until nothing is left to do; loads run on the controller's pool, so each pass
    first waits for the loads handed out before (their results are then in the store)."""
    for _ in range(passes):
        wait_for(lambda: not controller.loads_in_flight(), timeout=30, what="loads")
        # agents heartbeat every pass (through the buffer, as the registry does)
        for node in controller.store.nodes():
            controller.heartbeats.add(node.name, clock.now)
        result = controller.run_pass()
        clock.now += 0.1
        if not result.executed and not result.failed:
            return


def test_apply_to_ready_loads_each_shard_once(
    world: tuple[Controller, FakeAgents, Store, Clock],
) -> None:
    controller, agents, store, clock = world
    _apply(store, clock)
    _run(controller, clock)
    record = store.deployment("tiny-llama")
    assert record is not None and record.status.phase is Phase.READY
    loads = Counter((c[1], c[2]) for c in agents.calls if c[0] == "load")
    assert len(loads) == 24 and set(loads.values()) == {1}  # 24 chips, each loaded once
    steps = [c for c in agents.calls if c[0] in ("configure", "start")]
    for replica in ("0", "1"):
        mine = [c[0] for c in steps if c[2] == replica]
        assert mine == ["configure", "start"]
    assert agents.started == {("tiny-llama", 0, 0), ("tiny-llama", 1, 0)}
    # the store's held shards are what the agents reported
    assert len([h for h in store.held() if h.committed]) == 24


def test_a_failed_load_is_recorded_for_the_backoff(
    world: tuple[Controller, FakeAgents, Store, Clock],
) -> None:
    controller, agents, store, clock = world
    agents.fail_loads_on.add(("rack-0/node-0", 0))
    _apply(store, clock)
    for _ in range(6):
        controller.run_pass()
        wait_for(lambda: not controller.loads_in_flight(), timeout=30, what="loads")
        clock.now += 0.1
        if any(r.failures for r in store.replicas("tiny-llama")):
            break
    [replica] = [r for r in store.replicas("tiny-llama") if r.failures]
    assert replica.failures == 1 and "RESOURCE_EXHAUSTED" in replica.last_error
    warnings = [e for e in store.events("tiny-llama") if e.reason == "ActionFailed"]
    assert len(warnings) == 1 and "chip is full" in warnings[0].message
    assert controller.stats.failed_actions == 1
    # the replica whose load failed was not configured
    assert not any(c[0] == "configure" and c[2] == str(replica.index) for c in agents.calls)


def test_a_hung_load_delays_only_its_own_chips(
    world: tuple[Controller, FakeAgents, Store, Clock],
) -> None:
    """Loads to one node hang: the pass does not wait for them, the node holds at most
    LOADS_PER_NODE loads, and a deployment on other nodes loads and becomes Ready."""
    controller, agents, store, clock = world
    hung = "rack-0/node-0"
    agents.hang_loads_on.add(hung)
    try:
        _apply(store, clock, "first", replicas=1)
        for _ in range(10):  # until the hung node's loads are out
            controller.run_pass()
            clock.now += 0.1
            if hung in controller.loads_in_flight().values():
                break
        store.set_cordoned(hung, True)  # the second deployment goes elsewhere
        _apply(store, clock, "second", replicas=1)
        for _ in range(60):
            for node in store.nodes():
                controller.heartbeats.add(node.name, clock.now)
            controller.run_pass()
            clock.now += 0.1
            second = store.deployment("second")
            if second is not None and second.status.phase is Phase.READY:
                break
            wait_for(
                lambda: set(controller.loads_in_flight().values()) <= {hung},
                timeout=30,
                what="the other nodes' loads",
            )
        second = store.deployment("second")
        assert second is not None and second.status.phase is Phase.READY
        first = store.deployment("first")
        assert first is not None and first.status.phase is not Phase.READY
        in_flight = list(controller.loads_in_flight().values())
        assert in_flight == [hung] * LOADS_PER_NODE  # bounded per node
    finally:
        agents.release.set()
    _run(controller, clock)
    store.set_cordoned(hung, False)
    first = store.deployment("first")
    assert first is not None and first.status.phase is Phase.READY


def test_delete_unloads_every_shard_then_forgets(
    world: tuple[Controller, FakeAgents, Store, Clock],
) -> None:
    controller, agents, store, clock = world
    _apply(store, clock)
    _run(controller, clock)
    assert store.mark_deleting("tiny-llama", clock.now)
    _run(controller, clock)
    assert store.deployment("tiny-llama") is None
    assert all(not held for held in agents.held.values())
    assert store.held() == []
    removes = {c[3] for c in agents.calls if c[0] == "remove"}
    assert removes == {"0", "1"}


def test_held_from_status_names_chips_by_rack_and_slot() -> None:
    node = Node("rack-1/node-2", "rack-1", 2, "a:1", "id", (Chip(0, 10),), 0.0)
    status = agent_pb2.StatusResponse(
        chips=[
            agent_pb2.ChipStatus(
                chip=3,
                shards=[agent_pb2.HeldShard(shard_id="s", size_bytes=5, reserved_bytes=7)],
                loads=[agent_pb2.LoadProgress(shard_id="t", bytes_loaded=1, bytes_total=4)],
            )
        ]
    )
    held = held_from_status(node, status)
    assert [(h.chip, h.shard_id, h.committed) for h in held] == [
        ("rack-1/node-2/chip-3", "s", True),
        ("rack-1/node-2/chip-3", "t", False),
    ]
    assert held[0].reserved_bytes == 7 and held[1].bytes_loaded == 1


def test_moved_refs_equal_a_recompile_of_the_moved_plan(tmp_path: Path) -> None:
    """The failover path renames the moved chips in the cached shard refs instead of
    recompiling: the result must be exactly what compiling the moved plan gives (TP 2, so
    TP groups and the neighbours' upstream/downstream lists are renamed too)."""
    plan = tiny_plan(2)
    refs = compile_plan(plan, TINY, 0, tmp_path)
    stage = plan.stages[1]
    used = {c for s in plan.stages for c in s.chips}
    spare = next(
        f"rack-1/node-{n}/chip-{i}"
        for n in range(3)
        for i in range(8)
        if f"rack-1/node-{n}/chip-{i}" not in used
    )
    new_chips = (stage.chips[0], spare)
    stages = tuple(
        dataclasses.replace(s, chips=new_chips, refs=()) if s.index == 1 else s for s in plan.stages
    )
    move = MoveStages("demo", 0, stages, ((1, stage.chips, new_chips),), 1, 1, "test")
    got_plan, got = moved_refs((plan, refs), move)
    want = compile_plan(dataclasses.replace(plan, stages=stages), TINY, 0, tmp_path)
    assert [s.chips for s in got_plan.stages] == [s.chips for s in stages]
    assert [(r.chip, r.shard_id, r.binding) for r in got] == [
        (r.chip, r.shard_id, r.binding) for r in want
    ]
    assert any(spare in r.binding.upstream or spare in r.binding.downstream for r in got)


def test_a_stopped_pipeline_the_gateway_reports_is_resynchronized_unless_a_chip_explains_it(
    world: tuple[Controller, FakeAgents, Store, Clock],
) -> None:
    """A broken or stalled link stops a pipeline with every chip healthy: after the grace
    period the replica is brought back at a new epoch on the same chips (no reload). A
    report that a failed chip explains is left to the failover (the chip's stage moves)."""
    controller, agents, store, clock = world
    _apply(store, clock)
    _run(controller, clock)
    r0, r1 = store.replicas("tiny-llama")
    controller.pipeline_stopped("tiny-llama", 0, r0.epoch, "ABORTED: link broken")
    _run(controller, clock, passes=3)  # within the grace period: nothing yet
    assert store.replicas("tiny-llama")[0].epoch == r0.epoch
    clock.now += 1.0
    agents.calls.clear()
    _run(controller, clock)
    after0, after1 = store.replicas("tiny-llama")
    assert after0.epoch == r0.epoch + 1 and after0.running_epoch == after0.epoch
    assert after0.chips == r0.chips and after1 == r1
    assert not [c for c in agents.calls if c[0] == "load"]  # same chips, nothing reloaded
    assert ("tiny-llama", 0, r0.epoch + 1) in agents.started
    assert "Resynchronizing" in [e.reason for e in store.events(deployment="tiny-llama")]
    # A report at an epoch the replica left is stale: nothing happens.
    controller.pipeline_stopped("tiny-llama", 0, r0.epoch, "late report")
    clock.now += 2.0
    _run(controller, clock)
    assert store.replicas("tiny-llama")[0].epoch == r0.epoch + 1
    # A failed chip explains the stop: the failover moves its stage instead.
    victim = after1.chips[-1]
    node, _, index = victim.rpartition("/chip-")
    store.set_chip_health(node, int(index), ChipHealth.FAILED, "ECC")
    controller.pipeline_stopped("tiny-llama", 1, after1.epoch, "ABORTED: stage stopped")
    clock.now += 2.0
    _run(controller, clock)
    moved = store.replicas("tiny-llama")[1]
    assert victim not in moved.chips and moved.restarts == 1
    assert moved.epoch == after1.epoch + 1  # one new epoch: the move's, not a second bump


def test_a_death_reported_after_the_agent_came_back_leaves_its_chips_healthy(
    world: tuple[Controller, FakeAgents, Store, Clock],
) -> None:
    """The runtime may report a death late, after the restarted agent registered again: the
    controller asks the agent, whose Status (all healthy here) puts the chips back, so no
    stage moves off a live agent and no chip stays failed."""
    controller, _, store, clock = world
    _apply(store, clock)
    _run(controller, clock)
    before = store.replicas("tiny-llama")
    node = before[0].chips[0].rpartition("/chip-")[0]
    assert controller.agent_died(node, "agent died (late report)")
    assert all(c.health is ChipHealth.FAILED for c in store.node(node).chips)  # type: ignore[union-attr]
    _run(controller, clock)
    assert all(c.health is ChipHealth.HEALTHY for c in store.node(node).chips)  # type: ignore[union-attr]
    assert [r.chips for r in store.replicas("tiny-llama")] == [r.chips for r in before]
    assert not controller.agent_died("rack-9/node-9", "unknown")


def test_ticks_run_a_full_pass_only_when_something_changed(
    world: tuple[Controller, FakeAgents, Store, Clock],
) -> None:
    """The loop's tick: heartbeats reach the store every tick, a full pass only when the
    store changed, a node went silent, a deployment is on its way, or it was woken."""
    controller, _, store, clock = world

    def beat_all() -> None:
        for node in store.nodes():
            controller.heartbeats.add(node.name, clock.now)

    assert controller.tick() is not None  # the first tick is a full pass
    for _ in range(8):  # idle, every node beating: heartbeats flushed, no full pass
        clock.now += 0.25
        beat_all()
        assert controller.tick() is None
    assert all(n.last_heartbeat == clock.now for n in store.nodes())
    # a store write: a full pass, but not sooner than a heartbeat interval after the last
    store.add_event(clock.now, "Normal", "Test", "a write")
    assert controller.tick() is not None
    store.add_event(clock.now, "Normal", "Test", "another write")
    clock.now += 0.25
    assert controller.tick() is None  # 0.25 s after the last pass: it waits
    clock.now += 0.25
    assert controller.tick() is not None
    passes = controller.passes
    _apply(store, clock)  # a store write: the next tick is a full pass, and so on until Ready
    for _ in range(80):
        wait_for(lambda: not controller.loads_in_flight(), timeout=30, what="loads")
        clock.now += 0.1
        beat_all()
        controller.tick()
        record = store.deployment("tiny-llama")
        assert record is not None
        if record.status.phase is Phase.READY:
            break
    assert record.status.phase is Phase.READY and controller.passes > passes + 3
    for _ in range(10):  # the passes after Ready write nothing: then ticks stay cheap
        clock.now += 0.6
        beat_all()
        if controller.tick() is None:
            break
    clock.now += 0.6
    beat_all()
    assert controller.tick() is None
    # one node falls silent: a full pass once its heartbeat is older than the timeout
    silent = "rack-1/node-2"
    passes = controller.passes
    for _ in range(10):  # 2.5 s: not yet past heartbeat_timeout
        clock.now += 0.25
        for node in store.nodes():
            if node.name != silent:
                controller.heartbeats.add(node.name, clock.now)
        assert controller.tick() is None
    clock.now += 0.25
    assert controller.tick() is not None
    node = store.node(silent)
    assert node is not None and not node.ready and controller.passes > passes
    assert controller.tick(woken=True) is not None  # a wake is always a full pass
