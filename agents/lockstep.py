"""The lockstep tick state machine: pure, no I/O, no clocks, no threads.

Real LPUs run a static schedule: every chip does fixed work at fixed counter values. In software
we keep the same observable contract (DESIGN.md, "Lockstep and determinism"), and this module is
its core; the adapter around it only moves frames and calls kernels.

Schedule. A replica has S stages and B sequence slots (maxBatch). The ring period is
P = max(S, B): stage s at tick t works on slot (t - s) mod P, and on nothing (a bubble) when that
number is B or more. Every tick carries a frame through every stage, bubbles included, so each
stage sees the same tick sequence whatever the timing.

Links. Stage s (s > 0) takes as input for tick t the output of stage s-1 at tick t-1. Stage 0
takes the output of the last stage at tick t - 1 - (P - S): the sampled token of the slot it is
about to work on again (the decode ring). Stage 0 also admits new requests into empty slots;
that choice is the adapter's, made deterministically from the journal.

Rules a stage follows:
* ticks run in strictly increasing order, one at a time;
* tick t runs only once its input for t has arrived and its downstream has acknowledged tick
  t - W (bounded skew window W). The ring's way back (last stage to stage 0) needs no credit:
  it carries at most one sampled token per slot into stage 0's journal, a bounded buffer;
* a start barrier: nothing runs in epoch e until every chip of the replica confirmed ready
  for e; `halt` stops, `resume(epoch, tick)` restarts at a new epoch from a given tick, dropping
  frames of older epochs;
* every completed tick extends a hash chain over the stage's outputs:
  h_t = sha256(h_{t-1} || epoch-free tick || output digest), so two runs of the same requests
  have equal chains and the first differing link names the tick of a silent corruption.

Chain log. Each stage keeps its last `chain_log_limit` (tick, head) pairs (default
`DEFAULT_CHAIN_LOG_LIMIT`), a bounded memory. `resume(epoch, tick)` rewinds the chain to the
head covering the completed ticks before `tick` (GENESIS if none) and drops the log's entries
from `tick` on, so a halted and resumed stage has the same chain as a clean run; rewinding
needs that head, so resuming at a tick whose predecessor fell out of the window raises
`ProtocolError` naming the tick.

Output digests. Beside the chain, each stage keeps the digest of its output at each of its
last `chain_log_limit` ticks (rewound by `resume` like the chain log). The adapter passes the
request digest (`agents.pipeline.request_digest`: the sha256 of the output less its slot
tensor — the slot of a tick is the schedule's anyway), and the chain links that same digest.
The chain covers every request a replica served, so two replicas that served different
traffic have different chains; the digests at the ticks one request occupied
(`output_digests`) are a function of that request alone (kernels are row-independent and
deterministic, KV caches per slot), which is what the control plane's canary compares across
replicas (`orchestrator.core.canary`).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import zip_longest

GENESIS = b"\x00" * 32
DEFAULT_CHAIN_LOG_LIMIT = 4096  # (tick, head) pairs a stage keeps for resume and comparison


class ProtocolError(Exception):
    """A frame or acknowledgement that breaks the lockstep contract (a bug or corruption)."""


class Phase(StrEnum):
    BARRIER = "barrier"  # waiting for every chip to confirm ready for the epoch
    RUNNING = "running"
    HALTED = "halted"


@dataclass(frozen=True)
class Schedule:
    """The static schedule of one replica's ring."""

    stages: int
    slots: int

    def __post_init__(self) -> None:
        if self.stages < 1 or self.slots < 1:
            raise ValueError("a schedule needs at least one stage and one slot")

    @property
    def period(self) -> int:
        return max(self.stages, self.slots)

    def slot_at(self, stage: int, tick: int) -> int | None:
        """The sequence slot `stage` works on at `tick`, or None for a bubble."""
        if tick < stage:
            return None
        k = (tick - stage) % self.period
        return k if k < self.slots else None

    def input_tick(self, stage: int, tick: int) -> int:
        """The upstream tick whose output feeds `stage` at `tick` (may be negative: none)."""
        if stage > 0:
            return tick - 1
        return tick - 1 - (self.period - self.stages)

    def upstream(self, stage: int) -> int:
        return (stage - 1) % self.stages

    def downstream(self, stage: int) -> int:
        return (stage + 1) % self.stages


@dataclass(frozen=True)
class Frame:
    """What travels on a link: the output of `stage` at `tick` in `epoch`."""

    epoch: int
    tick: int
    slot: int | None
    payload: bytes


@dataclass(frozen=True)
class Run:
    """The adapter should execute `tick` on `slot` with `input` (None: no upstream frame)."""

    tick: int
    slot: int | None
    input: Frame | None


@dataclass
class StageMachine:
    """One stage's lockstep state. Feed it events; ask it what may run next."""

    stage: int
    schedule: Schedule
    window: int
    chips: frozenset[str]
    epoch: int = 0
    next_tick: int = 0
    phase: Phase = Phase.BARRIER
    chain: bytes = GENESIS
    acked: int = -1  # highest tick downstream acknowledged
    origin: int = 0  # the tick the current epoch started at: no upstream frame before it
    chain_log_limit: int = DEFAULT_CHAIN_LOG_LIMIT
    _inputs: dict[int, Frame] = field(default_factory=dict)
    _ready: set[str] = field(default_factory=set)
    _chain_log: deque[tuple[int, bytes]] = field(default_factory=deque)
    _digests: deque[tuple[int, bytes]] = field(default_factory=deque)  # (tick, sha256(output))
    # The head covering every completed tick below `_floor_tick` not in the log (entries that
    # fell out of the window, or a chain handed to `resume`).
    _floor_tick: int = 0
    _floor_head: bytes = GENESIS

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("the skew window W must be at least 1")
        if self.chain_log_limit < 1:
            raise ValueError("the chain log must keep at least one entry")
        if not 0 <= self.stage < self.schedule.stages:
            raise ValueError(f"stage {self.stage} outside 0..{self.schedule.stages - 1}")

    # --- barrier and epochs -----------------------------------------------------------------

    def confirm_ready(self, chip: str, epoch: int) -> bool:
        """Record that `chip` is ready for `epoch`; True once every chip has confirmed."""
        return self.confirm_all((chip,), epoch)

    def confirm_all(self, chips: Collection[str], epoch: int) -> bool:
        """`confirm_ready` for many chips at once, with set operations: a StartEpoch names
        every chip of the replica (1,868 at full size) to each of its stages, and a call per
        chip per stage made the barrier of a 1,868-stage replica seconds of CPU. Every chip
        at once (the usual StartEpoch) opens the barrier without copying the set."""
        if epoch != self.epoch:
            return False
        given = chips if isinstance(chips, frozenset) else frozenset(chips)
        unknown = given - self.chips
        if unknown:
            raise ProtocolError(f"chips {sorted(unknown)} are not part of this replica")
        if self.phase is Phase.BARRIER:
            if len(given) == len(self.chips):  # a subset of equal size: all of them
                self.phase = Phase.RUNNING
            else:
                self._ready.update(given)
                # `_ready` only holds chips of `chips`: equal sizes mean every chip confirmed
                # (a set comparison here made a barrier of n chips O(n^2) per stage).
                if len(self._ready) == len(self.chips):
                    self.phase = Phase.RUNNING
        return self.phase is Phase.RUNNING

    def halt(self) -> int:
        """Stop running; returns the last completed tick."""
        self.phase = Phase.HALTED
        return self.next_tick - 1

    def resume(self, epoch: int, tick: int, chain: bytes | None = None) -> None:
        """Restart at a new epoch from `tick` (after failover): barrier again, old frames gone."""
        if epoch <= self.epoch:
            raise ProtocolError(f"epoch must increase: {epoch} after {self.epoch}")
        if chain is None:
            head = self._head_before(tick)
            while self._chain_log and self._chain_log[-1][0] >= tick:
                self._chain_log.pop()
            while self._digests and self._digests[-1][0] >= tick:
                self._digests.pop()
            self.chain = head
        else:
            self._chain_log.clear()
            self._digests.clear()
            self._floor_tick, self._floor_head = tick, chain
            self.chain = chain
        self.epoch = epoch
        self.next_tick = tick
        self.origin = tick
        self.phase = Phase.BARRIER
        self._ready.clear()
        self._inputs = {t: f for t, f in self._inputs.items() if f.epoch == epoch}
        self.acked = tick - 1

    def _head_before(self, tick: int) -> bytes:
        """The chain head covering every completed tick below `tick`."""
        for done, head in reversed(self._chain_log):
            if done < tick:
                return head
        if tick < self._floor_tick:
            raise ProtocolError(
                f"stage {self.stage}: cannot resume at tick {tick}: the chain head before it "
                f"fell out of the {self.chain_log_limit}-entry chain log"
            )
        return self._floor_head

    # --- events -----------------------------------------------------------------------------

    def on_frame(self, frame: Frame) -> bool:
        """An upstream frame arrived. Returns False if it belongs to an older epoch (dropped)."""
        if frame.epoch < self.epoch:
            return False
        if frame.epoch > self.epoch:
            raise ProtocolError(f"frame of epoch {frame.epoch} while in epoch {self.epoch}")
        wanted = self.schedule.input_tick(self.stage, self.next_tick)
        if frame.tick < wanted:
            raise ProtocolError(
                f"stage {self.stage}: stale frame for tick {frame.tick}, already past {wanted}"
            )
        held = self._inputs.get(frame.tick)
        if held is not None and held != frame:
            raise ProtocolError(
                f"stage {self.stage}: two different frames for upstream tick {frame.tick}"
            )
        self._inputs[frame.tick] = frame
        return True

    def on_ack(self, tick: int, epoch: int) -> None:
        """Downstream acknowledged consuming our output of `tick`: one more credit."""
        if epoch != self.epoch:
            return
        if tick >= self.next_tick:
            raise ProtocolError(
                f"stage {self.stage}: acknowledgement of tick {tick}, never sent "
                f"(next tick {self.next_tick})"
            )
        self.acked = max(self.acked, tick)

    # --- what runs next ---------------------------------------------------------------------

    def needs_input(self, tick: int) -> bool:
        """Whether `tick` consumes an upstream frame: upstreams emit one per tick from the
        epoch's first tick on (tick 0, or the tick `resume` restarted at)."""
        return self.schedule.input_tick(self.stage, tick) >= self.origin

    def needs_credit(self) -> bool:
        """The last stage returns tokens into stage 0's journal, one per slot: no credit."""
        return self.stage < self.schedule.stages - 1

    def ready(self) -> Run | None:
        """The next tick if it may run now, else None."""
        if self.phase is not Phase.RUNNING:
            return None
        tick = self.next_tick
        if self.needs_credit() and self.acked < tick - self.window:
            return None
        frame: Frame | None = None
        if self.needs_input(tick):
            frame = self._inputs.get(self.schedule.input_tick(self.stage, tick))
            if frame is None:
                return None
        return Run(tick, self.schedule.slot_at(self.stage, tick), frame)

    def complete(self, tick: int, output: bytes, request_digest: bytes | None = None) -> bytes:
        """The adapter executed `tick` with this output; returns the new chain head.
        `request_digest` is the output's digest the chain links and `output_digests` reports
        (default: its sha256; the adapter passes one without the slot tensor, which differs
        between replicas and which the schedule fixes for the tick anyway): one hash pass."""
        if self.phase is not Phase.RUNNING:
            raise ProtocolError(f"stage {self.stage}: completed tick {tick} while {self.phase}")
        if tick != self.next_tick:
            raise ProtocolError(
                f"stage {self.stage}: completed tick {tick}, expected {self.next_tick}"
            )
        self._inputs.pop(self.schedule.input_tick(self.stage, tick), None)
        digest = hashlib.sha256(output).digest() if request_digest is None else request_digest
        self.chain = chain_link(self.chain, tick, digest)
        if len(self._chain_log) >= self.chain_log_limit:
            dropped, head = self._chain_log.popleft()
            self._floor_tick, self._floor_head = dropped + 1, head
            self._digests.popleft()
        self._chain_log.append((tick, self.chain))
        self._digests.append((tick, digest))
        self.next_tick += 1
        return self.chain

    def chain_log(self) -> list[tuple[int, bytes]]:
        return list(self._chain_log)

    def output_digests(self, ticks: Iterable[int]) -> list[bytes | None]:
        """sha256 of this stage's output at each of `ticks` (None: not completed in this
        stage's history, or fell out of the log)."""
        held = dict(self._digests)
        return [held.get(t) for t in ticks]


def chain_link(previous: bytes, tick: int, digest: bytes) -> bytes:
    """One link of the chain: the previous head, the tick and the output's sha256."""
    return hashlib.sha256(previous + tick.to_bytes(8, "little", signed=True) + digest).digest()


def chain_step(previous: bytes, tick: int, output: bytes) -> bytes:
    return chain_link(previous, tick, hashlib.sha256(output).digest())


def first_divergence(a: Iterable[tuple[int, bytes]], b: Iterable[tuple[int, bytes]]) -> int | None:
    """The first tick at which two chain logs differ, or None if they are equal. When one log
    ends early, the first tick missing from it is the divergence."""
    for entry_a, entry_b in zip_longest(a, b):
        if entry_a is None or entry_b is None:
            return (entry_a or entry_b)[0]
        (tick_a, head_a), (tick_b, head_b) = entry_a, entry_b
        if tick_a != tick_b or head_a != head_b:
            return min(tick_a, tick_b)
    return None
