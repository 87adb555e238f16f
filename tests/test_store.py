"""The SQLite store, on real database files in tmp_path."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from core_world import PROFILE, World, make_nodes, target

from orchestrator.core import (
    Chip,
    ChipHealth,
    Condition,
    ConditionStatus,
    ConditionType,
    HeldShard,
    Load,
    MoveStages,
    Node,
    Phase,
    Place,
    ShardAssignment,
    reconcile,
)
from orchestrator.store import (
    SCHEMA_VERSION,
    Conflict,
    NotFound,
    SchemaError,
    Store,
    StoreError,
)

MANIFEST = {
    "apiVersion": "lpu.lockstep.dev/v1alpha1",
    "metadata": {"name": "a"},
    "spec": {"replicas": 1},
}


def test_apply_is_idempotent_and_a_change_bumps_the_generation(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        first = store.apply_deployment("a", MANIFEST, now=10.0)
        assert (first.generation, first.created, first.changed) == (1, True, True)
        # Same document, keys in another order: nothing changes, not even `updated`.
        same = store.apply_deployment("a", dict(reversed(list(MANIFEST.items()))), now=20.0)
        assert (same.generation, same.created, same.changed) == (1, False, False)
        record = store.deployment("a")
        assert record is not None and record.updated == 10.0
        changed = store.apply_deployment("a", MANIFEST | {"spec": {"replicas": 2}}, now=30.0)
        assert (changed.generation, changed.changed) == (2, True)
        record = store.deployment("a")
        assert record is not None
        assert record.manifest["spec"] == {"replicas": 2} and record.updated == 30.0
        assert record.status.phase is Phase.PENDING


def test_an_apply_that_fails_validation_stores_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.apply_deployment("a", MANIFEST, now=1.0)
        with pytest.raises(ValueError, match="invalid"), store.transaction():
            store.apply_deployment("a", MANIFEST | {"spec": {"replicas": 9}}, now=2.0)
            store.apply_deployment("b", MANIFEST, now=2.0)
            raise ValueError("invalid spec")
        assert [d.name for d in store.deployments()] == ["a"]
        record = store.deployment("a")
        assert record is not None and record.generation == 1
        assert record.manifest["spec"] == {"replicas": 1}


def test_nested_transactions_roll_back_only_the_inner_part(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store, store.transaction():
        store.apply_deployment("a", MANIFEST, now=1.0)
        with pytest.raises(RuntimeError), store.transaction():
            store.apply_deployment("b", MANIFEST, now=1.0)
            raise RuntimeError
    with Store(tmp_path / "s.db") as store:
        assert [d.name for d in store.deployments()] == ["a"]


def test_deleting_blocks_reapply_and_delete_forgets(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        store.apply_deployment("a", MANIFEST, now=1.0)
        assert store.mark_deleting("a", now=2.0) and not store.mark_deleting("zz", now=2.0)
        with pytest.raises(Conflict, match="being deleted"):
            store.apply_deployment("a", MANIFEST, now=3.0)
        store.set_condition(
            "a", Condition(ConditionType.READY, ConditionStatus.FALSE, "Deleting", "", 2.0, 1)
        )
        store.delete_deployment("a")
        assert store.deployment("a") is None and store.deployments() == []


def registered(store: Store, racks: int = 2, per_rack: int = 3) -> dict[str, Node]:
    nodes = make_nodes(racks, per_rack)
    store.register_nodes(nodes.values(), now=0.0)
    return nodes


def test_a_reconciled_world_survives_a_restart(tmp_path: Path) -> None:
    """Run the simulated world to Ready, mirroring every store-only action into the store,
    then reopen the file: the reconciler decides nothing new from the reopened store."""
    path = tmp_path / "s.db"
    w = World(make_nodes(2, 3))
    w.targets["a"] = target("a", replicas=2)
    store = Store(path)
    store.register_nodes(w.nodes.values(), now=0.0)
    store.apply_deployment("a", MANIFEST, now=0.0)
    for _ in range(40):
        w.now += 0.1
        actions = reconcile(list(w.targets.values()), w.observed(), w.now)
        if not actions:
            break
        w.apply(actions)
        for action in actions:
            store.record(action, w.now)  # False for agent work, recorded below
        # Agent and compiler work: record its results as the controller would.
        for (dep, idx), r in w.replicas.items():
            store.set_replica_shards(dep, idx, r.shards)
            store.set_replica_epochs(
                dep, idx, epoch=r.epoch, configured=r.configured_epoch, running=r.running_epoch
            )
        for node in w.nodes:
            store.report_held(node, [h for h in w.held.values() if h.chip.startswith(node + "/")])
        store.heartbeat((n, w.now) for n in w.nodes)
    store.close()
    with Store(path) as reopened:
        observed = reopened.observed(PROFILE)
        assert observed.replicas == tuple(sorted(w.replicas.values(), key=lambda r: r.index))
        assert set(observed.held) == set(w.held.values())
        stored, simulated = observed.statuses["a"], w.status("a")
        reconciled = [t for t in ConditionType if t is not ConditionType.VERIFIED]  # canary's
        assert [c.type for c in stored.conditions] == reconciled  # flow order
        assert set(stored.conditions) == set(simulated.conditions)
        assert replace(stored, conditions=()) == replace(simulated, conditions=())
        assert observed.statuses["a"].phase is Phase.READY
        assert reconcile(list(w.targets.values()), observed, w.now) == []
        assert len(reopened.plans("a")) == 1
        events = reopened.events("a")
        assert [e.reason for e in events if e.reason in {p.value for p in Phase}] == [
            "Placing",
            "Compiling",
            "Loading",
            "Synchronizing",
            "Ready",
        ]
        assert [e.id for e in events] == sorted(e.id for e in events)
        later = reopened.events("a", after=events[2].id)
        assert later == events[3:]


def test_nodes_chips_cordon_health_and_heartbeats(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        nodes = registered(store)
        name = "rack-1/node-2"
        assert store.node(name) == nodes[name]
        store.set_cordoned(name, True)
        store.set_chip_health(name, 3, ChipHealth.FAILED, "ecc errors")
        assert store.heartbeat([(name, 5.0), ("rack-0/node-0", 4.0), ("nobody", 1.0)]) == 2
        assert store.heartbeat([(name, 3.0)]) == 1  # a late beat never moves time back
        node = store.node(name)
        assert node is not None and node.cordoned and node.last_heartbeat == 5.0
        assert node.chips[3] == Chip(3, PROFILE.sram_bytes, ChipHealth.FAILED, "ecc errors")
        failed = store.chips(health=ChipHealth.FAILED)
        assert [(n, c.index) for n, c in failed] == [(name, 3)]
        assert len(store.chips(node=name)) == PROFILE.chips_per_node
        store.set_node_ready(name, False)
        # Re-registration (an agent restart) keeps the cordon, marks it Ready, new chips.
        store.register_nodes([nodes[name]], now=9.0)
        node = store.node(name)
        assert node is not None and node.cordoned and node.ready and node.last_heartbeat == 9.0
        assert all(c.health is ChipHealth.HEALTHY for c in node.chips)
        with pytest.raises(NotFound):
            store.set_cordoned("nobody", True)
        with pytest.raises(Conflict, match="slot 2 of rack rack-1"):
            store.register_nodes([Node("other", "rack-1", 2, "x:1", "agent:other", (), 0.0)], 1.0)


def test_held_shards_are_replaced_per_node(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        registered(store)
        a = HeldShard("rack-0/node-0/chip-0", "s1", 100, 100, 100, True)
        b = HeldShard("rack-0/node-0/chip-1", "s2", 100, 40, 100, False)
        c = HeldShard("rack-0/node-1/chip-0", "s3", 100, 100, 100, True)
        store.report_held("rack-0/node-0", [a, b])
        store.report_held("rack-0/node-1", [c])
        store.report_held("rack-0/node-0", [b])
        assert store.held() == [b, c] and store.held("rack-0/node-1") == [c]


def test_replica_records(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        w = World(make_nodes(2, 3))
        w.targets["a"] = target("a", replicas=2)
        actions = reconcile(list(w.targets.values()), w.observed(), 1.0)
        place = next(a for a in actions if isinstance(a, Place))
        store.apply_deployment("a", MANIFEST, now=1.0)
        assert store.record(place, 1.0)
        shards = [ShardAssignment(c, "sid-" + c, 10) for c in place.replicas[0].stages[0].chips]
        store.set_replica_shards("a", 0, shards)
        store.record_replica_failure("a", 1, "boom", 2.0)
        store.record_replica_failure("a", 1, "boom again", 3.0)
        r0, r1 = store.replicas("a")
        assert r0.shards == tuple(shards) and r0.stages == place.replicas[0].stages
        assert (r1.failures, r1.last_failure_time, r1.last_error) == (2, 3.0, "boom again")
        store.set_replica_epochs("a", 1, configured=0, running=0)
        (r1,) = store.replicas("a")[1:]
        assert (r1.failures, r1.running_epoch) == (0, 0)
        store.mark_replica_removing("a", 0)
        assert store.replicas("a")[0].removing
        store.forget_replica("a", 0)
        assert [r.index for r in store.replicas()] == [1]
        with pytest.raises(NotFound, match="no replica 0"):
            store.set_replica_shards("a", 0, shards)


def test_move_stages_rebinds_only_the_moved_chips_and_counts_a_restart(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        w = World(make_nodes(2, 3))
        w.targets["a"] = target("a", replicas=1)
        place = next(
            a
            for a in reconcile(list(w.targets.values()), w.observed(), 1.0)
            if isinstance(a, Place)
        )
        store.apply_deployment("a", MANIFEST, now=1.0)
        store.record(place, 1.0)
        (before,) = store.replicas("a")
        shards = [ShardAssignment(c, "sid-" + c, 10) for c in before.chips]
        store.set_replica_shards("a", 0, shards)
        old = before.stages[1].chips[0]
        new = "rack-1/node-2/chip-3"
        stages = tuple(replace(s, chips=(new,)) if s.index == 1 else s for s in before.stages)
        move = MoveStages("a", 0, stages, ((1, (old,), (new,)),), 3, 1, "chip failed")
        assert store.record(move, 7.0)
        (after,) = store.replicas("a")
        assert after.stages == stages and after.epoch == 3
        assert (after.restarts, after.last_restart_time) == (1, 7.0)
        assert after.shard_for(new) == ShardAssignment(new, "sid-" + old, 10)
        assert after.shard_for(old) is None
        assert [after.shard_for(c) for c in before.chips if c != old] == [
            s for s in shards if s.chip != old
        ]


def test_a_version_1_store_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as store:
        store.apply_deployment("a", MANIFEST, now=1.0)
    with sqlite3.connect(path) as conn:  # what a version-1 store looked like
        conn.execute("ALTER TABLE replicas DROP COLUMN restarts")
        conn.execute("ALTER TABLE replicas DROP COLUMN last_restart")
        conn.execute("ALTER TABLE replicas DROP COLUMN next_stages")
        conn.execute("ALTER TABLE nodes DROP COLUMN draining")
        conn.execute("UPDATE schema_version SET version = 1")
    with Store(path) as store:
        assert store.replicas() == [] and store.deployment("a") is not None
    with sqlite3.connect(path) as conn:
        cols = {row[1] for row in conn.execute("PRAGMA table_info(replicas)")}
        assert {"restarts", "last_restart", "next_stages"} <= cols
        assert conn.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)


def test_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaError, match="newer than this Lockstep supports"):
        Store(path)


def test_foreign_and_garbage_files_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(SchemaError, match="not a Lockstep store"):
        Store(other)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(SchemaError, match="not a Lockstep store"):
        Store(garbage)
    with pytest.raises(StoreError, match="no store"):
        Store(tmp_path / "missing.db", readonly=True)


def test_readers_see_whole_transactions_while_a_writer_writes(tmp_path: Path) -> None:
    """WAL: readers in other connections run while the writer commits, and never see half a
    registration (a node without its chips)."""
    path = tmp_path / "s.db"
    writer = Store(path)
    assert writer._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0, 0]

    def read(slot: int) -> None:
        try:
            with Store(path, readonly=True) as reader:
                while not stop.is_set():
                    for node in reader.nodes():
                        assert len(node.chips) == PROFILE.chips_per_node, node
                    reads[slot] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        for rack in range(30):
            writer.register_nodes(_rack(rack), now=float(rack))
            writer.heartbeat((f"rack-{rack}/node-{s}", rack + 0.5) for s in range(4))
        deadline = time.monotonic() + 10.0
        while min(reads) < 3 and time.monotonic() < deadline and not errors:
            stop.wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10.0)
        writer.close()
    assert not errors, errors
    assert min(reads) >= 3
    with Store(path, readonly=True) as reader:
        assert len(reader.nodes()) == 120
        with pytest.raises(StoreError, match="read-only"):
            reader.apply_deployment("a", MANIFEST, now=1.0)


def _rack(rack: int) -> list[Node]:
    return [
        Node(
            f"rack-{rack}/node-{s}",
            f"rack-{rack}",
            s,
            f"10.0.{rack}.{s}:7070",
            f"agent:rack-{rack}/node-{s}",
            tuple(Chip(i, PROFILE.sram_bytes) for i in range(PROFILE.chips_per_node)),
            0.0,
        )
        for s in range(4)
    ]


def test_1305_nodes_of_8_chips_register_and_query_quickly(tmp_path: Path) -> None:
    racks, per_rack = 145, 9  # the largest published system: 1,305 nodes, 10,440 chips
    nodes = [
        Node(
            f"rack-{r}/node-{s}",
            f"rack-{r}",
            s,
            f"10.{r // 256}.{r % 256}.{s}:7070",
            f"agent:rack-{r}/node-{s}",
            tuple(Chip(i, 230 << 20) for i in range(8)),
            0.0,
        )
        for r in range(racks)
        for s in range(per_rack)
    ]
    with Store(tmp_path / "big.db") as store:
        t0 = time.perf_counter()
        store.register_nodes(nodes, now=0.0)
        register = time.perf_counter() - t0
        t0 = time.perf_counter()
        updated = store.heartbeat((n.name, 1.0) for n in nodes)
        beat = time.perf_counter() - t0
        store.set_chip_health("rack-7/node-3", 5, ChipHealth.FAILED, "x")
        t0 = time.perf_counter()
        all_nodes = store.nodes()
        failed = store.chips(health=ChipHealth.FAILED)
        one = store.chips(node="rack-100/node-8")
        node = store.node("rack-144/node-8")
        query = time.perf_counter() - t0
        assert updated == 1305 and len(all_nodes) == 1305
        assert sum(len(n.chips) for n in all_nodes) == 10_440
        assert [(n, c.index) for n, c in failed] == [("rack-7/node-3", 5)]
        assert len(one) == 8 and node is not None and node.last_heartbeat == 1.0
        print(
            f"\n1,305 nodes x 8 chips: register {register * 1e3:.0f} ms, one batched heartbeat "
            f"of all nodes {beat * 1e3:.1f} ms ({beat / 1305 * 1e6:.1f} us/node), "
            f"list all + indexed chip queries {query * 1e3:.0f} ms"
        )
        assert register < 10.0 and beat < 2.0 and query < 5.0


def test_conflicting_writes_are_conflicts_and_events_are_pruned(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        w = World(make_nodes(2, 3))
        w.targets["a"] = target("a")
        place = next(
            a
            for a in reconcile(list(w.targets.values()), w.observed(), 1.0)
            if isinstance(a, Place)
        )
        with pytest.raises(Conflict, match="conflicting write"):
            store.record(place, 1.0)  # its deployment was never applied: nothing is stored
        assert store.replicas() == [] and store.plans("a") == []
        store.apply_deployment("a", MANIFEST, now=1.0)
        assert store.record(place, 1.0)
        with pytest.raises(Conflict):
            store.record(place, 2.0)  # the same replica index twice
        assert len(store.replicas("a")) == 1 and len(store.plans("a")) == 1
        assert not store.record(Load("a", 0, "n", "x:1", "n/chip-0", 0, "sid", 1), 1.0)
        for i in range(10):
            store.add_event(float(i), "Normal", "R", f"m{i}", deployment="a")
        assert store.prune_events(keep=3) == 7
        assert [e.message for e in store.events("a")] == ["m7", "m8", "m9"]


def test_an_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open the store"):
        Store(tmp_path / "no" / "such" / "dir" / "s.db")


def test_revision_moves_on_writes_but_not_on_heartbeats(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        nodes = registered(store)
        before = store.revision()
        store.heartbeat((name, 5.0) for name in nodes)
        assert store.revision() == before  # heartbeats alone: the controller's gate skips
        store.set_cordoned("rack-0/node-0", True)
        assert store.revision() == before + 1
        with store.transaction():  # a write with heartbeats inside counts once
            store.heartbeat([("rack-0/node-1", 6.0)])
            store.set_node_ready("rack-0/node-1", False)
        assert store.revision() == before + 2
        with pytest.raises(RuntimeError), store.transaction():
            store.set_node_ready("rack-0/node-2", False)
            raise RuntimeError("rolled back")
        assert store.revision() == before + 2  # nothing committed


def test_cached_chips_follow_health_registration_and_rollback(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as store:
        nodes = registered(store)
        name = "rack-0/node-1"
        assert store.nodes()[1].chips == nodes[name].chips  # read, and kept
        store.set_chip_health(name, 2, ChipHealth.FAILED, "ecc")
        assert store.nodes()[1].chips[2].health is ChipHealth.FAILED
        with pytest.raises(RuntimeError), store.transaction():
            store.set_chip_health(name, 2, ChipHealth.HEALTHY, "")
            assert store.nodes()[1].chips[2].health is ChipHealth.HEALTHY  # inside: its own
            raise RuntimeError("rolled back")
        assert store.nodes()[1].chips[2].health is ChipHealth.FAILED
        fewer = replace(nodes[name], chips=nodes[name].chips[:2])
        store.register_nodes([fewer], now=1.0)
        assert len(store.nodes()[1].chips) == 2
        with Store(tmp_path / "s.db", readonly=True) as reader:  # another process's view
            assert reader.nodes()[1].chips == fewer.chips
            store.set_chip_health(name, 0, ChipHealth.FAILED, "x")
            assert reader.nodes()[1].chips[0].health is ChipHealth.FAILED
