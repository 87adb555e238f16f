"""The control plane's store: one SQLite file (WAL) holding everything a restart needs.

What is stored, and why each table exists:

* `deployments` — name, generation, the applied manifest (JSON, defaults applied) and the
  written status (phase, reason, message, ready replicas, observed generation), plus a
  deleting flag. `apply_deployment` is idempotent: the manifest is compared in canonical JSON;
  the same one changes nothing (not even `updated`), a different one bumps the generation.
* `conditions` — one row per deployment and condition type (Kubernetes-style conditions).
* `plans` — the planner's output of every placement (JSON), for `describe` and audits.
* `replicas` — every replica the control plane placed: template, stages (JSON), spares,
  epochs, failures, removing flag; `shard_bindings` — the compiled shard of each of its chips
  (indexed by chip: "who is on this chip" is one lookup).
* `nodes` / `chips` — registered nodes (rack, slot, address, certificate identity, liveness,
  cordon, last heartbeat) and their chips (SRAM, health); `held_shards` — what agents last
  reported on each chip, committed or in flight, with bytes (loading progress).
* `events` — every transition, in order (an integer id, so `events --watch` resumes after the
  last id it saw), indexed by deployment and by node.
* `schema_version` — one row. A file with a newer version is refused with a clear error
  (an older Lockstep must not write a schema it does not understand); an older version is
  migrated in a transaction by `_MIGRATIONS` (version 2 added the replicas' failover
  restarts and drain target, and the nodes' draining flag).

Decisions:

* **WAL**, `synchronous=NORMAL`: readers never block the writer nor each other, and a commit
  costs no fsync of the main file (WAL with NORMAL survives process crashes; a power loss may
  drop the last commits, which the reconciler redoes from what agents report).
* **One connection, one lock, explicit transactions.** The control plane is one process; a
  re-entrant lock serializes its threads on the connection, `transaction()` opens `BEGIN
  IMMEDIATE` (nested calls become savepoints), and every write method runs inside one, so a
  caller can group several (an apply and its validation, a batch of heartbeats) atomically: an
  exception inside rolls all of it back — an apply that fails validation stores nothing.
  Other processes (`lpuctl` reading directly, tests) open their own `Store(path,
  readonly=True)`.
* **Batched, indexed heartbeats.** `heartbeat(beats)` updates many nodes in one statement
  batch and one transaction: 1,305 nodes beating twice a second is a few thousand row updates
  per second in a handful of commits, with no thread per node. Nodes by rack/slot, chips by
  health, held shards by node, bindings by chip and events by deployment are indexed.
* **A revision, and cached chips.** `revision()` counts committed write transactions except
  heartbeat-only ones: the controller skips its full pass while it has not moved
  (`orchestrator.core.passes`). The writer keeps every node's chips between reads (10,440 rows
  at 1,305 nodes, most of the cost of reading all nodes); a write to the chips table or a
  rollback drops them. Read-only stores (other processes) never cache.
* Times are unix seconds passed in by the caller (the controller's clock port), never read
  here, so tests control them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.core.actions import (
    Action,
    BumpEpoch,
    DeleteDeployment,
    ForgetReplica,
    MarkNodeNotReady,
    MarkNodeReady,
    MoveStages,
    Place,
    PlacedReplica,
    PlanDrain,
    RecordEvent,
    RemoveReplica,
    SetCondition,
    SetPhase,
)
from orchestrator.core.model import (
    Chip,
    ChipHealth,
    Condition,
    ConditionStatus,
    ConditionType,
    DeploymentStatus,
    HeldShard,
    Node,
    Observed,
    Phase,
    Replica,
    ShardAssignment,
)
from placement.plan import StagePlan
from placement.profiles import ChipProfile

SCHEMA_VERSION = 2


class StoreError(Exception):
    """A store operation that cannot be done; the message says why, for a person."""


class SchemaError(StoreError):
    """The file is not a Lockstep store, or one of a schema version this code cannot use."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


@dataclass(frozen=True)
class ApplyResult:
    name: str
    generation: int
    created: bool
    changed: bool


@dataclass(frozen=True)
class DeploymentRecord:
    name: str
    generation: int
    manifest: dict[str, Any]
    deleting: bool
    created: float
    updated: float
    status: DeploymentStatus


@dataclass(frozen=True)
class EventRecord:
    id: int
    time: float
    deployment: str | None
    node: str | None
    kind: str
    reason: str
    message: str


class ControlStore(Protocol):
    """The store port the controller and the admin API use (`Store` is the SQLite adapter)."""

    def transaction(self) -> contextlib.AbstractContextManager[None]: ...
    def revision(self) -> int: ...

    # deployments
    def apply_deployment(
        self, name: str, manifest: Mapping[str, Any], now: float
    ) -> ApplyResult: ...
    def mark_deleting(self, name: str, now: float) -> bool: ...
    def delete_deployment(self, name: str) -> None: ...
    def deployment(self, name: str) -> DeploymentRecord | None: ...
    def deployments(self) -> list[DeploymentRecord]: ...
    def set_phase(
        self,
        name: str,
        phase: Phase,
        reason: str,
        message: str,
        ready_replicas: int,
        observed_generation: int,
        now: float,
    ) -> None: ...
    def set_condition(self, name: str, condition: Condition) -> None: ...
    def put_plan(self, name: str, generation: int, plan: Mapping[str, Any], now: float) -> int: ...
    def plans(self, name: str) -> list[dict[str, Any]]: ...

    # replicas
    def add_replicas(
        self, deployment: str, generation: int, template: str, placed: Sequence[PlacedReplica]
    ) -> None: ...
    def set_replica_shards(
        self, deployment: str, index: int, shards: Sequence[ShardAssignment]
    ) -> None: ...
    def set_replica_epochs(
        self,
        deployment: str,
        index: int,
        *,
        epoch: int | None = None,
        configured: int | None = None,
        running: int | None = None,
    ) -> None: ...
    def record_replica_failure(
        self, deployment: str, index: int, error: str, now: float
    ) -> None: ...
    def move_stages(self, action: MoveStages, now: float) -> None: ...
    def mark_replica_removing(self, deployment: str, index: int) -> None: ...
    def forget_replica(self, deployment: str, index: int) -> None: ...
    def replicas(self, deployment: str | None = None) -> list[Replica]: ...
    def replica_chips(self) -> dict[tuple[str, int], frozenset[str]]: ...

    # nodes, chips, held shards
    def register_nodes(self, nodes: Iterable[Node], now: float) -> None: ...
    def heartbeat(self, beats: Iterable[tuple[str, float]]) -> int: ...
    def set_node_ready(self, name: str, ready: bool) -> None: ...
    def set_cordoned(self, name: str, cordoned: bool, *, draining: bool = False) -> None: ...
    def set_chip_health(self, node: str, index: int, health: ChipHealth, reason: str) -> None: ...
    def nodes(self) -> list[Node]: ...
    def node(self, name: str) -> Node | None: ...
    def chips(
        self, node: str | None = None, health: ChipHealth | None = None
    ) -> list[tuple[str, Chip]]: ...
    def report_held(self, node: str, held: Sequence[HeldShard]) -> None: ...
    def held(self, node: str | None = None) -> list[HeldShard]: ...

    # events
    def add_event(
        self,
        time: float,
        kind: str,
        reason: str,
        message: str,
        *,
        deployment: str | None = None,
        node: str | None = None,
    ) -> int: ...
    def events(
        self, deployment: str | None = None, *, after: int = 0, limit: int = 1000
    ) -> list[EventRecord]: ...
    def prune_events(self, keep: int) -> int: ...

    # the reconciler's view, and store-only actions
    def observed(self, profile: ChipProfile) -> Observed: ...
    def record(self, action: Action, now: float) -> bool: ...


_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE deployments (
    name TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    deleting INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    phase TEXT NOT NULL DEFAULT 'Pending',
    reason TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '',
    ready_replicas INTEGER NOT NULL DEFAULT 0,
    observed_generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE conditions (
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    last_transition REAL NOT NULL,
    observed_generation INTEGER NOT NULL,
    PRIMARY KEY (deployment, type)
);
CREATE TABLE plans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment TEXT NOT NULL REFERENCES deployments(name) ON DELETE CASCADE,
    generation INTEGER NOT NULL,
    plan TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX plans_by_deployment ON plans(deployment, id);
CREATE TABLE replicas (
    deployment TEXT NOT NULL,
    idx INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    template TEXT NOT NULL,
    stages TEXT NOT NULL,
    spares TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    configured_epoch INTEGER,
    running_epoch INTEGER,
    failures INTEGER NOT NULL DEFAULT 0,
    last_failure REAL,
    last_error TEXT NOT NULL DEFAULT '',
    removing INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    last_restart REAL,
    next_stages TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (deployment, idx)
);
CREATE TABLE shard_bindings (
    deployment TEXT NOT NULL,
    replica INTEGER NOT NULL,
    chip TEXT NOT NULL,
    shard_id TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    PRIMARY KEY (deployment, replica, chip),
    FOREIGN KEY (deployment, replica) REFERENCES replicas(deployment, idx) ON DELETE CASCADE
);
CREATE INDEX bindings_by_chip ON shard_bindings(chip);
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    rack TEXT NOT NULL,
    slot INTEGER NOT NULL,
    address TEXT NOT NULL,
    identity TEXT NOT NULL,
    ready INTEGER NOT NULL DEFAULT 1,
    cordoned INTEGER NOT NULL DEFAULT 0,
    draining INTEGER NOT NULL DEFAULT 0,
    last_heartbeat REAL NOT NULL,
    registered REAL NOT NULL,
    UNIQUE (rack, slot)
);
CREATE TABLE chips (
    node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    sram_bytes INTEGER NOT NULL,
    health TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (node, idx)
);
CREATE INDEX chips_by_health ON chips(health, node);
CREATE TABLE held_shards (
    node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
    chip TEXT NOT NULL,
    shard_id TEXT NOT NULL,
    reserved_bytes INTEGER NOT NULL,
    bytes_loaded INTEGER NOT NULL,
    bytes_total INTEGER NOT NULL,
    committed INTEGER NOT NULL,
    PRIMARY KEY (chip, shard_id)
);
CREATE INDEX held_by_node ON held_shards(node);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    deployment TEXT,
    node TEXT,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX events_by_deployment ON events(deployment, id);
CREATE INDEX events_by_node ON events(node, id);
"""

# version -> SQL that upgrades a store from `version` to `version + 1`.
_MIGRATIONS: dict[int, str] = {
    # 1 -> 2: a replica's incremental failovers (MoveStages), for the restart budget; the
    # stages a drain switches a replica to; draining nodes.
    1: """
ALTER TABLE replicas ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replicas ADD COLUMN last_restart REAL;
ALTER TABLE replicas ADD COLUMN next_stages TEXT NOT NULL DEFAULT '[]';
ALTER TABLE nodes ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
""",
}


def _canonical(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)


class Store:
    """The SQLite adapter of `ControlStore` (see the module docstring for the decisions)."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._depth = 0
        self._revision = 0  # committed write transactions, heartbeats not counted
        self._writes = False  # the open transaction counts toward the revision
        # every node's chips as last read (the writer's own connection only: no other
        # process writes the store); None after any write to the chips table
        self._chips: dict[str, tuple[Chip, ...]] | None = None
        if readonly and not os.path.exists(self.path):
            raise StoreError(f"no store at {self.path}")
        try:
            if readonly:
                uri = f"file:{self.path}?mode=ro"
                conn = sqlite3.connect(
                    uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0
                )
            else:
                conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=10.0
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {self.path}: {exc}") from None
        self._conn = conn
        try:
            self._prepare()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise SchemaError(
                f"{self.path} is not a Lockstep store (SQLite says: {exc}); "
                "point --store at another file"
            ) from None
        except StoreError:
            conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- opening --------------------------------------------------------------------------

    def _prepare(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA busy_timeout = 10000")
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not tables:
            if self.readonly:
                raise SchemaError(f"{self.path} is an empty database, not a Lockstep store")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            with self.transaction():
                for statement in _statements(_SCHEMA):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            return
        if "schema_version" not in tables:
            raise SchemaError(
                f"{self.path} is an SQLite database but not a Lockstep store "
                "(it has no schema_version table); point --store at another file"
            )
        rows = conn.execute("SELECT version FROM schema_version").fetchall()
        if len(rows) != 1 or not isinstance(rows[0][0], int):
            raise SchemaError(
                f"{self.path}: the schema_version table must hold one integer, found {rows[:3]!r}"
            )
        version = rows[0][0]
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"{self.path} has store schema version {version}, newer than this Lockstep "
                f"supports ({SCHEMA_VERSION}): it was written by a newer release; upgrade "
                "Lockstep, or point --store at another file"
            )
        if not self.readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        if version < SCHEMA_VERSION:
            if self.readonly:
                raise SchemaError(
                    f"{self.path} has store schema version {version}; open it writable once "
                    f"to migrate it to {SCHEMA_VERSION}"
                )
            with self.transaction():
                for v in range(version, SCHEMA_VERSION):
                    if v not in _MIGRATIONS:
                        raise SchemaError(f"{self.path}: no migration from schema version {v}")
                    for statement in _statements(_MIGRATIONS[v]):
                        conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    # --- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, counts: bool = True) -> Iterator[None]:
        """All writes inside commit together or not at all (nested calls are savepoints).

        A committed transaction moves `revision()` unless every part of it was opened with
        `counts=False` (heartbeats: they only move `last_heartbeat`)."""
        if self.readonly:
            raise StoreError(f"the store {self.path} is open read-only")
        with self._lock:
            depth = self._depth
            self._conn.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT sp{depth}")
            self._depth += 1
            if depth == 0:
                self._writes = False
            self._writes = self._writes or counts
            try:
                yield
            except BaseException as exc:
                self._depth -= 1
                self._chips = None  # what a rolled-back write left in the cache
                if depth == 0:
                    self._conn.execute("ROLLBACK")
                else:
                    self._conn.execute(f"ROLLBACK TO sp{depth}")
                    self._conn.execute(f"RELEASE sp{depth}")
                if isinstance(exc, sqlite3.IntegrityError):
                    # A write that contradicts what is stored (a replica index taken, a plan
                    # for a deployment deleted meanwhile): a conflict, not a crash.
                    raise Conflict(f"the store refused a conflicting write: {exc}") from None
                raise
            self._depth -= 1
            self._conn.execute("COMMIT" if depth == 0 else f"RELEASE sp{depth}")
            if depth == 0 and self._writes:
                self._revision += 1

    def revision(self) -> int:
        """How many write transactions this store committed, heartbeats not counted: the
        controller runs a full reconcile pass only when it moved (`orchestrator.core.passes`).
        Writes of other processes are not seen (one control plane writes a store)."""
        return self._revision

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Several reads that must agree: one read transaction (WAL: a consistent snapshot)."""
        with self._lock:
            if self._depth:
                yield
                return
            self._conn.execute("BEGIN")
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                self._conn.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._conn.execute(sql, args)
            rows: list[sqlite3.Row] = cur.fetchall()
            return rows

    # --- deployments ----------------------------------------------------------------------

    def apply_deployment(self, name: str, manifest: Mapping[str, Any], now: float) -> ApplyResult:
        """Store a validated manifest: new → generation 1; changed → generation + 1; same → no-op.

        Raises `Conflict` while a delete of the same name is in progress (as Kubernetes does
        not let a terminating object be re-created).
        """
        text = _canonical(manifest)
        with self.transaction():
            row = self._conn.execute(
                "SELECT generation, manifest, deleting FROM deployments WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                self._conn.execute(
                    "INSERT INTO deployments (name, generation, manifest, created, updated) "
                    "VALUES (?, 1, ?, ?, ?)",
                    (name, text, now, now),
                )
                return ApplyResult(name, 1, created=True, changed=True)
            generation, stored, deleting = row
            if deleting:
                raise Conflict(
                    f"deployment {name} is being deleted; apply it again once it is gone"
                )
            if stored == text:
                return ApplyResult(name, generation, created=False, changed=False)
            self._conn.execute(
                "UPDATE deployments SET generation = ?, manifest = ?, updated = ? WHERE name = ?",
                (generation + 1, text, now, name),
            )
            return ApplyResult(name, generation + 1, created=False, changed=True)

    def mark_deleting(self, name: str, now: float) -> bool:
        """Request deletion; False if there is no such deployment."""
        with self.transaction():
            cur = self._conn.execute(
                "UPDATE deployments SET deleting = 1, updated = ? WHERE name = ?", (now, name)
            )
            return cur.rowcount == 1

    def delete_deployment(self, name: str) -> None:
        """Forget a deployment (its conditions and plans go with it; events stay)."""
        with self.transaction():
            self._conn.execute("DELETE FROM deployments WHERE name = ?", (name,))

    def deployment(self, name: str) -> DeploymentRecord | None:
        records = self._deployments("WHERE name = ?", (name,))
        return records[0] if records else None

    def deployments(self) -> list[DeploymentRecord]:
        return self._deployments("", ())

    def _deployments(self, where: str, args: Sequence[Any]) -> list[DeploymentRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, generation, manifest, deleting, created, updated, phase, reason, "
                f"message, ready_replicas, observed_generation FROM deployments {where} "
                "ORDER BY name",
                args,
            ).fetchall()
            conds: dict[str, list[Condition]] = {r[0]: [] for r in rows}
            if rows:
                # One deployment: its conditions by the primary key; all: one scan.
                cwhere = "WHERE deployment = ?" if where else ""
                crow = self._conn.execute(
                    "SELECT deployment, type, status, reason, message, last_transition, "
                    f"observed_generation FROM conditions {cwhere} ORDER BY deployment, type",
                    args,
                ).fetchall()
                for c in crow:
                    if c[0] in conds:
                        conds[c[0]].append(
                            Condition(
                                ConditionType(c[1]),
                                ConditionStatus(c[2]),
                                c[3],
                                c[4],
                                c[5],
                                c[6],
                            )
                        )
        return [
            DeploymentRecord(
                name=r[0],
                generation=r[1],
                manifest=json.loads(r[2]),
                deleting=bool(r[3]),
                created=r[4],
                updated=r[5],
                status=DeploymentStatus(
                    phase=Phase(r[6]),
                    reason=r[7],
                    message=r[8],
                    ready_replicas=r[9],
                    observed_generation=r[10],
                    conditions=tuple(sorted(conds[r[0]], key=_condition_key)),
                ),
            )
            for r in rows
        ]

    def set_phase(
        self,
        name: str,
        phase: Phase,
        reason: str,
        message: str,
        ready_replicas: int,
        observed_generation: int,
        now: float,
    ) -> None:
        with self.transaction():
            self._conn.execute(
                "UPDATE deployments SET phase = ?, reason = ?, message = ?, ready_replicas = ?, "
                "observed_generation = ? WHERE name = ?",
                (phase.value, reason, message, ready_replicas, observed_generation, name),
            )

    def set_condition(self, name: str, condition: Condition) -> None:
        with self.transaction():
            self._conn.execute(
                "INSERT INTO conditions VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (deployment, type) DO UPDATE SET status = excluded.status, "
                "reason = excluded.reason, message = excluded.message, "
                "last_transition = excluded.last_transition, "
                "observed_generation = excluded.observed_generation",
                (
                    name,
                    condition.type.value,
                    condition.status.value,
                    condition.reason,
                    condition.message,
                    condition.last_transition_time,
                    condition.observed_generation,
                ),
            )

    def put_plan(self, name: str, generation: int, plan: Mapping[str, Any], now: float) -> int:
        with self.transaction():
            cur = self._conn.execute(
                "INSERT INTO plans (deployment, generation, plan, created) VALUES (?, ?, ?, ?)",
                (name, generation, _canonical(plan), now),
            )
            return int(cur.lastrowid or 0)

    def plans(self, name: str) -> list[dict[str, Any]]:
        """Every stored plan of a deployment, oldest first."""
        rows = self._query("SELECT plan FROM plans WHERE deployment = ? ORDER BY id", (name,))
        return [json.loads(r[0]) for r in rows]

    # --- replicas -------------------------------------------------------------------------

    def add_replicas(
        self, deployment: str, generation: int, template: str, placed: Sequence[PlacedReplica]
    ) -> None:
        with self.transaction():
            self._conn.executemany(
                "INSERT INTO replicas (deployment, idx, generation, template, stages, spares) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        deployment,
                        p.index,
                        generation,
                        template,
                        _stages_json(p.stages),
                        json.dumps(list(p.spares)),
                    )
                    for p in placed
                ],
            )

    def set_replica_shards(
        self, deployment: str, index: int, shards: Sequence[ShardAssignment]
    ) -> None:
        with self.transaction():
            self._require_replica(deployment, index)
            self._conn.execute(
                "DELETE FROM shard_bindings WHERE deployment = ? AND replica = ?",
                (deployment, index),
            )
            self._conn.executemany(
                "INSERT INTO shard_bindings VALUES (?, ?, ?, ?, ?)",
                [(deployment, index, s.chip, s.shard_id, s.size_bytes) for s in shards],
            )

    def set_replica_epochs(
        self,
        deployment: str,
        index: int,
        *,
        epoch: int | None = None,
        configured: int | None = None,
        running: int | None = None,
    ) -> None:
        """Set the target epoch and/or record ConfigureReplica / StartEpoch success.

        A replica that started its epoch has recovered: its failure count is reset.
        """
        with self.transaction():
            self._require_replica(deployment, index)
            if epoch is not None:
                self._conn.execute(
                    "UPDATE replicas SET epoch = ? WHERE deployment = ? AND idx = ?",
                    (epoch, deployment, index),
                )
            if configured is not None:
                self._conn.execute(
                    "UPDATE replicas SET configured_epoch = ? WHERE deployment = ? AND idx = ?",
                    (configured, deployment, index),
                )
            if running is not None:
                self._conn.execute(
                    "UPDATE replicas SET running_epoch = ?, failures = 0, last_error = '' "
                    "WHERE deployment = ? AND idx = ?",
                    (running, deployment, index),
                )

    def record_replica_failure(self, deployment: str, index: int, error: str, now: float) -> None:
        with self.transaction():
            self._require_replica(deployment, index)
            self._conn.execute(
                "UPDATE replicas SET failures = failures + 1, last_failure = ?, last_error = ? "
                "WHERE deployment = ? AND idx = ?",
                (now, error, deployment, index),
            )

    def move_stages(self, action: MoveStages, now: float) -> None:
        """Record an incremental failover: the replica's new stages, each moved chip's shard
        bound to its replacement, the new target epoch and one more restart (one
        transaction: a crash leaves the replica entirely before or after the move). Failed
        steps counted before the move (they failed on the lost chips) are cleared: the moved
        replica starts a fresh bring-up, budgeted by `restarts`."""
        chip_map = action.chip_map()
        with self.transaction():
            self._require_replica(action.deployment, action.replica)
            self._conn.execute(
                "UPDATE replicas SET stages = ?, epoch = ?, restarts = ?, "
                "last_restart = COALESCE(?, last_restart), failures = 0, last_failure = NULL, "
                "last_error = '', next_stages = '[]' WHERE deployment = ? AND idx = ?",
                (
                    _stages_json(action.stages),
                    action.epoch,
                    action.restarts,
                    None if action.drain else now,
                    action.deployment,
                    action.replica,
                ),
            )
            bound = self._conn.execute(
                "SELECT chip, shard_id, size_bytes FROM shard_bindings "
                "WHERE deployment = ? AND replica = ?",
                (action.deployment, action.replica),
            ).fetchall()
            self._conn.execute(
                "DELETE FROM shard_bindings WHERE deployment = ? AND replica = ?",
                (action.deployment, action.replica),
            )
            self._conn.executemany(
                "INSERT INTO shard_bindings VALUES (?, ?, ?, ?, ?)",
                [
                    (action.deployment, action.replica, chip_map.get(b[0], b[0]), b[1], b[2])
                    for b in bound
                ],
            )

    def mark_replica_removing(self, deployment: str, index: int) -> None:
        with self.transaction():
            self._conn.execute(
                "UPDATE replicas SET removing = 1, running_epoch = NULL "
                "WHERE deployment = ? AND idx = ?",
                (deployment, index),
            )

    def forget_replica(self, deployment: str, index: int) -> None:
        with self.transaction():
            self._conn.execute(
                "DELETE FROM replicas WHERE deployment = ? AND idx = ?", (deployment, index)
            )

    def _require_replica(self, deployment: str, index: int) -> None:
        row = self._conn.execute(
            "SELECT 1 FROM replicas WHERE deployment = ? AND idx = ?", (deployment, index)
        ).fetchone()
        if row is None:
            raise NotFound(f"deployment {deployment} has no replica {index}")

    def replica_chips(self) -> dict[tuple[str, int], frozenset[str]]:
        """(deployment, replica) -> the chips its stages use: what `replicas` says about
        where replicas are, without their shard bindings (asked on every agent's Status)."""
        with self._lock:
            rows = self._conn.execute("SELECT deployment, idx, stages FROM replicas").fetchall()
        return {(r[0], r[1]): _chips_of(r[2]) for r in rows}

    def replicas(self, deployment: str | None = None) -> list[Replica]:
        where = "WHERE deployment = ?" if deployment is not None else ""
        args: tuple[Any, ...] = (deployment,) if deployment is not None else ()
        with self._lock:
            rows = self._conn.execute(
                "SELECT deployment, idx, generation, template, stages, spares, epoch, "
                "configured_epoch, running_epoch, failures, last_failure, last_error, removing, "
                "restarts, last_restart, next_stages "
                f"FROM replicas {where} ORDER BY deployment, idx",
                args,
            ).fetchall()
            bound: dict[tuple[str, int], list[ShardAssignment]] = {}
            for b in self._conn.execute(
                "SELECT deployment, replica, chip, shard_id, size_bytes FROM shard_bindings "
                f"{where} ORDER BY deployment, replica, chip",
                args,
            ):
                bound.setdefault((b[0], b[1]), []).append(ShardAssignment(b[2], b[3], b[4]))
        out = []
        for r in rows:
            stages = _stages_from_json(r[4])
            order = {chip: i for i, chip in enumerate(c for s in stages for c in s.chips)}
            shards = sorted(bound.get((r[0], r[1]), ()), key=lambda s: order.get(s.chip, 0))
            out.append(
                Replica(
                    deployment=r[0],
                    index=r[1],
                    generation=r[2],
                    template=r[3],
                    stages=stages,
                    spares=tuple(json.loads(r[5])),
                    shards=tuple(shards),
                    epoch=r[6],
                    configured_epoch=r[7],
                    running_epoch=r[8],
                    failures=r[9],
                    last_failure_time=r[10],
                    last_error=r[11],
                    removing=bool(r[12]),
                    restarts=r[13],
                    last_restart_time=r[14],
                    next_stages=_stages_from_json(r[15]),
                )
            )
        return out

    # --- nodes and chips ------------------------------------------------------------------

    def register_nodes(self, nodes: Iterable[Node], now: float) -> None:
        """Register (or re-register) nodes: address, identity and chips are replaced.

        Re-registration keeps the cordon (an operator's decision outlives an agent restart)
        and marks the node Ready with a fresh heartbeat.
        """
        nodes = list(nodes)
        with self.transaction():
            for node in nodes:
                clash = self._conn.execute(
                    "SELECT name FROM nodes WHERE rack = ? AND slot = ? AND name != ?",
                    (node.rack, node.slot, node.name),
                ).fetchone()
                if clash is not None:
                    raise Conflict(
                        f"node {node.name} registers slot {node.slot} of rack {node.rack}, "
                        f"which node {clash[0]} holds"
                    )
            self._conn.executemany(
                "INSERT INTO nodes (name, rack, slot, address, identity, ready, cordoned, "
                "last_heartbeat, registered) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET rack = excluded.rack, slot = excluded.slot, "
                "address = excluded.address, identity = excluded.identity, ready = 1, "
                "last_heartbeat = excluded.last_heartbeat, registered = excluded.registered",
                [
                    (n.name, n.rack, n.slot, n.address, n.identity, int(n.cordoned), now, now)
                    for n in nodes
                ],
            )
            self._chips = None
            self._conn.executemany("DELETE FROM chips WHERE node = ?", [(n.name,) for n in nodes])
            self._conn.executemany(
                "INSERT INTO chips VALUES (?, ?, ?, ?, ?)",
                [
                    (n.name, c.index, c.sram_bytes, c.health.value, c.reason)
                    for n in nodes
                    for c in n.chips
                ],
            )

    def heartbeat(self, beats: Iterable[tuple[str, float]]) -> int:
        """Record many heartbeats in one transaction; returns how many nodes were known.
        Not counted in `revision()`."""
        with self.transaction(counts=False):
            cur = self._conn.executemany(
                "UPDATE nodes SET last_heartbeat = MAX(last_heartbeat, ?) WHERE name = ?",
                [(when, name) for name, when in beats],
            )
            return cur.rowcount

    def set_node_ready(self, name: str, ready: bool) -> None:
        with self.transaction():
            self._conn.execute("UPDATE nodes SET ready = ? WHERE name = ?", (int(ready), name))

    def set_cordoned(self, name: str, cordoned: bool, *, draining: bool = False) -> None:
        """Cordon (or uncordon) a node; `draining` also moves its stages off it (drain).
        Uncordon ends a drain too."""
        with self.transaction():
            cur = self._conn.execute(
                "UPDATE nodes SET cordoned = ?, draining = ? WHERE name = ?",
                (int(cordoned), int(cordoned and draining), name),
            )
            if cur.rowcount != 1:
                raise NotFound(f"no node named {name}")

    def set_chip_health(self, node: str, index: int, health: ChipHealth, reason: str) -> None:
        with self.transaction():
            self._chips = None
            cur = self._conn.execute(
                "UPDATE chips SET health = ?, reason = ? WHERE node = ? AND idx = ?",
                (health.value, reason, node, index),
            )
            if cur.rowcount != 1:
                raise NotFound(f"node {node} has no chip {index}")

    def nodes(self) -> list[Node]:
        return self._nodes("", ())

    def node(self, name: str) -> Node | None:
        found = self._nodes("WHERE name = ?", (name,))
        return found[0] if found else None

    def _nodes(self, where: str, args: Sequence[Any]) -> list[Node]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, rack, slot, address, identity, ready, cordoned, last_heartbeat, "
                f"draining FROM nodes {where} ORDER BY rack, slot",
                args,
            ).fetchall()
            chips = self._chips_of(where, args)
        return [
            Node(
                name=r[0],
                rack=r[1],
                slot=r[2],
                address=r[3],
                identity=r[4],
                chips=tuple(chips.get(r[0], ())),
                last_heartbeat=r[7],
                ready=bool(r[5]),
                cordoned=bool(r[6]),
                draining=bool(r[8]),
            )
            for r in rows
        ]

    def _chips_of(self, where: str, args: Sequence[Any]) -> Mapping[str, Sequence[Chip]]:
        """Node -> its chips (one node's when `where` names it). All nodes' chips are kept
        between reads by the writer: at 1,305 nodes they are 10,440 rows, most of what a
        full read of the nodes costs, and they change only on a registration or a chip's
        health (which empty the cache)."""
        if not where and self._chips is not None:
            return self._chips
        chips: dict[str, list[Chip]] = {}
        health = _HEALTH
        for c in self._conn.execute(
            f"SELECT node, idx, sram_bytes, health, reason FROM chips "
            f"{'WHERE node = ?' if where else ''} ORDER BY node, idx",
            args,
        ):
            chips.setdefault(c[0], []).append(Chip(c[1], c[2], health[c[3]], c[4]))
        frozen = {name: tuple(found) for name, found in chips.items()}
        if not where and not self.readonly:
            self._chips = frozen
        return frozen

    def chips(
        self, node: str | None = None, health: ChipHealth | None = None
    ) -> list[tuple[str, Chip]]:
        """Chips as (node name, chip), filtered by node and/or health (both indexed)."""
        clauses, args = [], []
        if node is not None:
            clauses.append("node = ?")
            args.append(node)
        if health is not None:
            clauses.append("health = ?")
            args.append(health.value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._query(
            f"SELECT node, idx, sram_bytes, health, reason FROM chips {where} ORDER BY node, idx",
            args,
        )
        return [(r[0], Chip(r[1], r[2], ChipHealth(r[3]), r[4])) for r in rows]

    def report_held(self, node: str, held: Sequence[HeldShard]) -> None:
        """Replace what a node holds with its agent's latest report."""
        with self.transaction():
            self._conn.execute("DELETE FROM held_shards WHERE node = ?", (node,))
            self._conn.executemany(
                "INSERT INTO held_shards VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        node,
                        h.chip,
                        h.shard_id,
                        h.reserved_bytes,
                        h.bytes_loaded,
                        h.bytes_total,
                        int(h.committed),
                    )
                    for h in held
                ],
            )

    def held(self, node: str | None = None) -> list[HeldShard]:
        where, args = ("WHERE node = ?", (node,)) if node is not None else ("", ())
        rows = self._query(
            "SELECT chip, shard_id, reserved_bytes, bytes_loaded, bytes_total, committed "
            f"FROM held_shards {where} ORDER BY chip, shard_id",
            args,
        )
        return [HeldShard(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]

    # --- events ---------------------------------------------------------------------------

    def add_event(
        self,
        time: float,
        kind: str,
        reason: str,
        message: str,
        *,
        deployment: str | None = None,
        node: str | None = None,
    ) -> int:
        with self.transaction():
            cur = self._conn.execute(
                "INSERT INTO events (time, deployment, node, kind, reason, message) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time, deployment, node, kind, reason, message),
            )
            return int(cur.lastrowid or 0)

    def events(
        self, deployment: str | None = None, *, after: int = 0, limit: int = 1000
    ) -> list[EventRecord]:
        """Events with id > `after`, oldest first (of one deployment when named)."""
        if deployment is not None:
            sql = "WHERE deployment = ? AND id > ?"
            args: tuple[Any, ...] = (deployment, after, limit)
        else:
            sql, args = "WHERE id > ?", (after, limit)
        rows = self._query(
            f"SELECT id, time, deployment, node, kind, reason, message FROM events {sql} "
            "ORDER BY id LIMIT ?",
            args,
        )
        return [EventRecord(*r) for r in rows]

    def prune_events(self, keep: int) -> int:
        """Delete all but the newest `keep` events; returns how many went.

        Events are an audit trail, not state: the controller prunes them periodically so a
        flapping node cannot grow the file without bound.
        """
        with self.transaction():
            cur = self._conn.execute(
                "DELETE FROM events WHERE id <= (SELECT COALESCE(MAX(id), 0) FROM events) - ?",
                (keep,),
            )
            return cur.rowcount

    # --- the reconciler's view ------------------------------------------------------------

    def observed(self, profile: ChipProfile) -> Observed:
        """Everything the reconciler needs, read in one transaction (a consistent snapshot)."""
        with self._snapshot():
            nodes = self.nodes()
            held = self.held()
            replicas = self.replicas()
            statuses = {d.name: d.status for d in self.deployments()}
        return Observed(
            profile=profile,
            nodes=tuple(nodes),
            held=tuple(held),
            replicas=tuple(replicas),
            statuses=statuses,
        )

    def record(self, action: Action, now: float) -> bool:
        """Carry out an action whose whole effect is in the store; False for the others.

        Store-only: Place (the plan and the new replicas, together), SetPhase, SetCondition,
        RecordEvent, MarkNodeNotReady/Ready, BumpEpoch, MoveStages, RemoveReplica (marks it
        removing — the controller first asks the agents to drop the stages), ForgetReplica,
        DeleteDeployment. Compile, Load, Unload, Configure and StartEpoch need agents or the
        compiler; their results are recorded with the specific methods.
        """
        with self.transaction():
            if isinstance(action, Place):
                self.put_plan(action.deployment, action.generation, action.plan.to_dict(), now)
                self.add_replicas(
                    action.deployment, action.generation, action.template, action.replicas
                )
            elif isinstance(action, SetPhase):
                self.set_phase(
                    action.deployment,
                    action.phase,
                    action.reason,
                    action.message,
                    action.ready_replicas,
                    action.observed_generation,
                    now,
                )
            elif isinstance(action, SetCondition):
                self.set_condition(action.deployment, action.condition)
            elif isinstance(action, RecordEvent):
                self.add_event(
                    action.time,
                    action.kind,
                    action.reason,
                    action.message,
                    deployment=action.deployment,
                    node=action.node,
                )
            elif isinstance(action, MarkNodeNotReady):
                self.set_node_ready(action.node, False)
            elif isinstance(action, MarkNodeReady):
                self.set_node_ready(action.node, True)
            elif isinstance(action, RemoveReplica):
                self.mark_replica_removing(action.deployment, action.replica)
            elif isinstance(action, MoveStages):
                self.move_stages(action, now)
            elif isinstance(action, PlanDrain):
                self._require_replica(action.deployment, action.replica)
                self._conn.execute(
                    "UPDATE replicas SET next_stages = ? WHERE deployment = ? AND idx = ?",
                    (_stages_json(action.stages), action.deployment, action.replica),
                )
            elif isinstance(action, BumpEpoch):
                self.set_replica_epochs(action.deployment, action.replica, epoch=action.epoch)
            elif isinstance(action, ForgetReplica):
                self.forget_replica(action.deployment, action.replica)
            elif isinstance(action, DeleteDeployment):
                self.delete_deployment(action.deployment)
            else:
                return False
        return True


_CONDITION_ORDER = list(ConditionType)
_HEALTH = {h.value: h for h in ChipHealth}


def _condition_key(c: Condition) -> int:
    return _CONDITION_ORDER.index(c.type)


def _stages_json(stages: Sequence[StagePlan]) -> str:
    """Stages in the plan's JSON shape, plus the exact stage time (the shape rounds it to
    the nanosecond for people; the store keeps what the planner computed)."""
    return json.dumps([s.to_dict() | {"stageSeconds": s.stage_seconds} for s in stages])


@functools.lru_cache(maxsize=512)
def _stages_from_json(text: str) -> tuple[StagePlan, ...]:
    """Parsed stages, cached by their text: every pass reads every replica, and a 1,868-stage
    replica's JSON took most of a pass to parse again (the stages are frozen, so sharing is
    safe; a changed row is a different text)."""
    return tuple(
        replace(StagePlan.from_dict(raw), stage_seconds=float(raw["stageSeconds"]))
        for raw in json.loads(text)
    )


@functools.lru_cache(maxsize=512)
def _chips_of(stages_text: str) -> frozenset[str]:
    return frozenset(chip for stage in _stages_from_json(stages_text) for chip in stage.chips)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


if TYPE_CHECKING:  # mypy checks that the adapter implements the port
    _port: type[ControlStore] = Store
