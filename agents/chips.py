"""The chips of one node: SRAM arena, held and in-flight shard tables, health and binding.

No RPC code here: the service (`agents.server`) calls these methods and maps the errors of
`agents.errors` to statuses through `agents.status_codes`.

A load goes through three steps and only the last one makes it visible:

1. `begin_load` — under the chip lock: refuse if the chip failed, answer "already loaded" if
   the chip holds the shard, reserve SRAM (`ResourceExhausted` if it does not fit) and
   register the load as in flight (Status shows its byte progress);
2. the caller writes the chunks into `flight.block` through its receiver (`agents.loader`);
3. `commit` — under the chip lock the in-flight entry becomes the held shard.

Whatever ends a load early, the caller calls `abort`, which closes the receiver and frees the
block and its accounting, so nothing half-loaded is ever held or executable.

Locks: `Chip.lock` guards the tables (short critical sections, never held while receiving);
`Chip.exec_lock` serializes executions on the chip (a stage program owns KV-cache state) and
is taken by unload and fail before they free memory a program may be reading. Order:
exec_lock, then lock.

Binding: a chip is bound to at most one replica (`bind`/`release`), so two replicas never share
a program instance and its KV cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from agents.arena import ArenaExhausted, Block, SramArena
from agents.errors import Aborted as AbortedError
from agents.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from agents.text import clip, quote
from shardformat.errors import ExecutionError

if TYPE_CHECKING:
    from agents.executor import StageProgram
    from agents.loader import ShardHeader


class Receiver(Protocol):
    """What a chip needs of a load's receiver (`agents.loader.ShardReceiver`)."""

    header: ShardHeader
    bytes_loaded: int

    def close(self) -> None: ...


@dataclass
class HeldEntry:
    """A committed shard: its verified header, its arena block and, once built, its program."""

    header: ShardHeader
    block: Block
    digest: str
    loaded_unix_ms: int
    program: StageProgram | None = None


@dataclass
class InFlight:
    """A load between reservation and commit; `touched` is when its last message arrived.

    `cancel(message)` ends the load's call from another thread (the idle-load reaper); `idle`
    says the reaper did so.
    """

    receiver: Receiver
    block: Block
    cancel: Callable[[str], None]
    touched: float = field(default_factory=time.monotonic)
    idle: bool = False


@dataclass(frozen=True)
class LoadSnapshot:
    shard_id: str
    bytes_loaded: int
    bytes_total: int
    reserved_bytes: int


@dataclass(frozen=True)
class ChipSnapshot:
    """A consistent view of one chip (taken under its lock)."""

    index: int
    failed_reason: str | None
    capacity: int
    used: int
    loading: int
    free: int
    held: tuple[HeldEntry, ...]
    loads: tuple[LoadSnapshot, ...]
    bound_to: str | None


@dataclass
class Chip:
    """One chip of the node: SRAM arena, shard tables, health and the replica it serves."""

    index: int
    arena: SramArena
    held: dict[str, HeldEntry] = field(default_factory=dict)
    loading: dict[str, InFlight] = field(default_factory=dict)
    failed_reason: str | None = None
    bound_to: str | None = None  # the replica ("deployment/replica-N") this chip serves
    # Counted at commit, under `lock` (taken there anyway), for the agent's metrics.
    loads_committed: int = 0
    bytes_loaded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    exec_lock: threading.Lock = field(default_factory=threading.Lock)

    # --- checks (call with `lock` held) ------------------------------------------------------

    def check_healthy(self, action: str) -> None:
        if self.failed_reason is not None:
            raise FailedPrecondition(
                f"chip {self.index} is failed ({self.failed_reason}): cannot {action}"
            )

    def usage(self) -> str:
        """What occupies the chip, for error messages; call with `lock` held."""
        used = sum(e.header.reserved_bytes for e in self.held.values())
        loading = sum(f.receiver.header.reserved_bytes for f in self.loading.values())
        return (
            f"chip {self.index} holds {len(self.held)} shard(s) ({used} bytes) and has "
            f"{len(self.loading)} load(s) in flight ({loading} bytes)"
        )

    def not_held(self, shard_id: str) -> NotFound:
        loading = " (a load of it is in progress)" if shard_id in self.loading else ""
        return NotFound(f"chip {self.index} does not hold shard {quote(shard_id, 64)}{loading}")

    # --- loads -------------------------------------------------------------------------------

    def begin_load(
        self,
        header: ShardHeader,
        receiver_for: Callable[[ShardHeader, memoryview], Receiver],
        cancel: Callable[[str], None],
    ) -> HeldEntry | InFlight:
        """Reserve SRAM and register the load; the held entry if the chip already has it."""
        with self.lock:
            self.check_healthy("load " + header.label)
            held = self.held.get(header.shard_id)
            if held is not None:
                # The held shard was verified under this id (every commit is: the id is the
                # blob's BLAKE3), so the id alone proves its bytes; a header that describes it
                # otherwise is refused.
                if (held.header.size_bytes, held.header.virtual) != (
                    header.size_bytes,
                    header.virtual,
                ):
                    raise InvalidArgument(
                        f"chip {self.index} holds {header.label} with "
                        f"{held.header.size_bytes} bytes, virtual={held.header.virtual}; the "
                        f"header says {header.size_bytes} bytes, virtual={header.virtual}"
                    )
                return held
            if header.shard_id in self.loading:
                raise AbortedError(f"chip {self.index}: {header.label} is already being loaded")
            try:
                block = self.arena.reserve(header.label, header.reserved_bytes, header.size_bytes)
            except ArenaExhausted as exc:
                raise ResourceExhausted(f"{exc}; {self.usage()}") from None
            try:
                flight = InFlight(receiver_for(header, block.view), block, cancel)
            except Exception as exc:
                self.arena.free_block(block)  # nothing holds the block yet: give it back
                if isinstance(exc, InvalidArgument):
                    raise
                raise Internal(
                    f"chip {self.index}: {header.label}: could not start the load: {exc}"
                ) from None
            self.loading[header.shard_id] = flight
        return flight

    def commit(self, flight: InFlight, digest: str) -> HeldEntry:
        """Make a verified load visible (the in-flight entry becomes the held shard)."""
        header = flight.receiver.header
        with self.lock:
            self.check_healthy("commit " + header.label)
            entry = HeldEntry(header, flight.block, digest, int(time.time() * 1000))
            del self.loading[header.shard_id]
            self.held[header.shard_id] = entry
            self.loads_committed += 1
            self.bytes_loaded += header.size_bytes
        return entry

    def abort(self, flight: InFlight) -> None:
        """Undo a load that did not commit: receiver closed, block and accounting freed."""
        flight.receiver.close()
        with self.lock:
            if self.loading.get(flight.receiver.header.shard_id) is flight:
                del self.loading[flight.receiver.header.shard_id]
        self.arena.free_block(flight.block)

    def stalled_loads(self, before: float) -> list[InFlight]:
        """Loads whose last message arrived before the monotonic time `before`."""
        with self.lock:
            return [f for f in self.loading.values() if f.touched < before]

    # --- unload, fail, recover -----------------------------------------------------------

    def unload(self, shard_id: str) -> HeldEntry:
        """Drop a held shard and free its SRAM; NotFound if the chip does not hold it."""
        with self.exec_lock, self.lock:
            entry = self.held.pop(shard_id, None)
            if entry is None:
                raise self.not_held(shard_id)
            entry.program = None
            self.arena.free_block(entry.block)
        return entry

    def fail(self, reason: str) -> tuple[list[str], ChipSnapshot]:
        """Mark the chip failed: every held shard is lost (its SRAM freed)."""
        with self.exec_lock, self.lock:
            lost = list(self.held)
            self.failed_reason = reason
            for entry in self.held.values():
                entry.program = None
                self.arena.free_block(entry.block)
            self.held.clear()
            return lost, self._snapshot()

    def recover(self) -> ChipSnapshot:
        """Mark the chip healthy again (it holds nothing: a failure lost its shards)."""
        with self.exec_lock, self.lock:
            self.failed_reason = None
            return self._snapshot()

    # --- execution ---------------------------------------------------------------------------

    def entry_for(self, shard_id: str, action: str) -> HeldEntry:
        """The held shard `shard_id` of a healthy chip (NotFound / FailedPrecondition)."""
        with self.lock:
            self.check_healthy(action)
            entry = self.held.get(shard_id)
            if entry is None:
                raise self.not_held(shard_id)
            return entry

    def program(self, entry: HeldEntry) -> StageProgram:
        """The shard's stage program, built on first use (weights are views into the arena).

        Call with `exec_lock` held (a program is built and stepped by one thread at a time).
        """
        if entry.header.virtual:
            raise FailedPrecondition(
                f"chip {self.index}: {entry.header.label} is virtual (manifest only): it "
                f"accounts {entry.header.reserved_bytes} bytes of SRAM but has no "
                "weights to execute"
            )
        if entry.program is None:
            from agents import executor  # numpy and the kernels: only once something runs

            try:
                entry.program = executor.load_shard(entry.block.view)
            except ExecutionError as exc:
                raise FailedPrecondition(
                    f"chip {self.index}: {entry.header.label} cannot run: {exc}"
                ) from None
        return entry.program

    # --- binding to a replica ----------------------------------------------------------------

    def bind(self, owner: str) -> None:
        """Reserve the chip for replica `owner`; AlreadyExists naming the holder if taken."""
        with self.lock:
            if self.bound_to is not None and self.bound_to != owner:
                raise AlreadyExists(
                    f"chip {self.index} is bound to replica {clip(self.bound_to, 300)}: "
                    "a chip serves at most one replica (RemoveReplica that one first)"
                )
            self.bound_to = owner

    def release(self, owner: str) -> None:
        """Free the chip of replica `owner` (no-op if another replica holds it)."""
        with self.lock:
            if self.bound_to == owner:
                self.bound_to = None

    # --- status ------------------------------------------------------------------------------

    def snapshot(self) -> ChipSnapshot:
        with self.lock:
            return self._snapshot()

    def _snapshot(self) -> ChipSnapshot:
        return ChipSnapshot(
            index=self.index,
            failed_reason=self.failed_reason,
            capacity=self.arena.capacity,
            used=sum(e.header.reserved_bytes for e in self.held.values()),
            loading=sum(f.receiver.header.reserved_bytes for f in self.loading.values()),
            free=self.arena.free,
            held=tuple(self.held.values()),
            loads=tuple(
                LoadSnapshot(
                    f.receiver.header.shard_id,
                    f.receiver.bytes_loaded,
                    f.receiver.header.size_bytes,
                    f.receiver.header.reserved_bytes,
                )
                for f in self.loading.values()
            ),
            bound_to=self.bound_to,
        )


def make_chips(count: int, sram_bytes: int) -> list[Chip]:
    """`count` chips of `sram_bytes` SRAM each."""
    if count < 1:
        raise ValueError(f"a node needs at least one chip, got {count}")
    return [Chip(i, SramArena(i, sram_bytes)) for i in range(count)]
