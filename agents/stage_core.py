"""One pipeline stage as a pure object: events in, actions out (no threads, clocks or I/O).

The shape follows h11's connection and Temporal's workflow activation: the adapter
(`agents.pipeline.StageRunner`) feeds everything that happens to a stage into `StageCore.handle`
and executes the actions it gets back — running a tick's kernels, sending a frame downstream,
acknowledging upstream, streaming a token to a `Generate` caller, ending a caller's stream,
reporting a stop upstream. Every decision lives here: which tick may run (the `StageMachine`
of `agents.lockstep`), what stage 0 feeds a slot (its `Journal`), which sequence index the last
stage samples at (`Feed.sample_index`, the one formula), whether an arriving frame is admitted,
and what a stop does. The adapter decides nothing, so these rules are tested without threads.

Frames are checked before they reach the machine (`FrameArrived`): an older epoch is dropped
(what a halted epoch left on the link), a newer epoch, a tick outside the credit window, a
slot the schedule does not give that tick, a stale or duplicate tick and a malformed token
payload are rejected; a rejection stops the stage. The credit window bounds what a stage
buffers: stage s > 0 holds at most upstream ticks up to (its last acknowledgement) + W, and
stage 0 — whose input comes back round the ring without credit — at most P ticks ahead of its
own progress (the ring cannot be further ahead), so memory stays bounded whatever a peer sends.

A stop (rejected frame, failed tick, a link or a downstream stage reporting one) is final for
the epoch: the stage halts, its reason is kept for status, every open request stream ends with
it, and the stop is reported upstream so it travels round to stage 0. `Resume` (a new epoch)
clears it and replays the journal.

`handle` never raises, except for the two events whose refusal is the caller's answer and
changes nothing: `Submit` (`JournalError`, `QueueFull`) and `ChipsReady` naming a chip outside
the replica (`ProtocolError`).
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from agents.journal import Journal, JournalError, TokenEvent
from agents.lockstep import (
    DEFAULT_CHAIN_LOG_LIMIT,
    Frame,
    Phase,
    ProtocolError,
    Schedule,
    StageMachine,
)
from agents.sampling import GREEDY, Sampling, check_sampling

TOKEN = struct.Struct("<q")  # the ring's way back: the sampled token, then its float32 logits


class Stopped(JournalError):
    """A request sent to a stage that stopped (FAILED_PRECONDITION: the replica must be
    brought back at a new epoch first)."""


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameArrived:
    """An upstream frame (already checksum-verified and routed by the link)."""

    frame: Frame


@dataclass(frozen=True)
class AckArrived:
    """Downstream consumed our output of `tick` in `epoch`: one credit back."""

    tick: int
    epoch: int


@dataclass(frozen=True)
class TickExecuted:
    """The adapter ran `Execute(tick, epoch)` and got this output payload. `digest`: the
    output's request digest (`agents.pipeline.request_digest`: its sha256 without the slot
    it ran on), kept for the canary; None: the output's plain sha256."""

    tick: int
    epoch: int
    output: bytes
    digest: bytes | None = None


@dataclass(frozen=True)
class TickFailed:
    """Running `Execute(tick, epoch)` raised; `reason` names the exception."""

    tick: int
    epoch: int
    reason: str


@dataclass(frozen=True)
class Submit:
    """A `Generate` request enters stage 0."""

    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: Sampling = GREEDY


@dataclass(frozen=True)
class Cancel:
    """The client went away or its deadline passed."""

    request_id: str


@dataclass(frozen=True)
class ChipsReady:
    """The barrier: these chips confirmed ready for `epoch` (a frozenset when one StartEpoch
    confirms them to many stages: made once, not once per stage)."""

    chips: Collection[str]
    epoch: int


@dataclass(frozen=True)
class Halt:
    """Stop running (control plane); the last completed tick is `StageCore.last_tick`."""


@dataclass(frozen=True)
class Resume:
    """Restart at a new `epoch` from `tick`; stage 0 replays every request in flight."""

    epoch: int
    tick: int


@dataclass(frozen=True)
class Fail:
    """Stop with a reason from outside the core (a link broke, a downstream stage stopped,
    a frame failed its checksum, the replica was removed)."""

    reason: str


Event = (
    FrameArrived
    | AckArrived
    | TickExecuted
    | TickFailed
    | Submit
    | Cancel
    | ChipsReady
    | Halt
    | Resume
    | Fail
)

# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """What stage 0 feeds its slot at one tick: tokens at positions, and how the last stage
    samples (`sample_index`: the sequence position of the token it samples)."""

    request_id: str
    slot: int
    tokens: tuple[int, ...]
    start_position: int
    sampling: Sampling
    sample_index: int


@dataclass(frozen=True)
class Execute:
    """Run `tick` (on `slot`, None for a bubble): stage 0 with `work`, other stages with the
    upstream frame's `payload` (empty: a bubble). Answer with `TickExecuted` or `TickFailed`."""

    tick: int
    epoch: int
    slot: int | None
    work: Work | None
    payload: bytes


@dataclass(frozen=True)
class SendFrame:
    frame: Frame


@dataclass(frozen=True)
class SendAck:
    tick: int
    epoch: int


@dataclass(frozen=True)
class StreamToken:
    """A generated token (and the logits row it was sampled from) for `event.request_id`.
    `tick`: the stage-0 tick that took it off the ring (the request's k-th token comes back
    k + 1 ring periods after its prefill tick: the canary locates the request's ticks by it)."""

    event: TokenEvent
    logits: np.ndarray
    tick: int = -1


@dataclass(frozen=True)
class EndRequest:
    """End a request's stream with an error (`cancelled`: the client's own doing)."""

    request_id: str
    reason: str
    cancelled: bool = False


@dataclass(frozen=True)
class ReportStop:
    """Tell the upstream stage (its link) that this stage stopped, with the reason."""

    reason: str


@dataclass(frozen=True)
class RejectFrame:
    """The frame was refused (the stage stopped): the link ends its stream with `code`."""

    code: RejectCode
    reason: str


Action = Execute | SendFrame | SendAck | StreamToken | EndRequest | ReportStop | RejectFrame


class RejectCode(StrEnum):
    """Why a frame was refused, as the gRPC status code the link ends its stream with."""

    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # wrong epoch, slot, stale or duplicate tick
    OUT_OF_RANGE = "OUT_OF_RANGE"  # tick beyond the credit window
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # a payload that cannot be decoded
    ABORTED = "ABORTED"  # the stream was replaced by a newer one (decided by the adapter)


@dataclass
class StageCore:
    """One stage of one replica (see the module docstring). Not thread-safe: the adapter
    serializes calls."""

    label: str
    stage: int
    schedule: Schedule
    window: int
    chips: frozenset[str]
    journal: Journal | None = None
    vocab_size: int | None = None
    epoch: int = 0
    chain_log_limit: int = DEFAULT_CHAIN_LOG_LIMIT
    machine: StageMachine = field(init=False)
    error: str = ""
    _sampling: dict[str, Sampling] = field(default_factory=dict)
    _listeners: set[str] = field(default_factory=set)
    _executing: bool = False
    # Tokens stage 0 took off the ring for the tick being executed: streamed once that tick
    # finished, so a client that has its last token sees the tick that took it completed.
    _taken: list[StreamToken] = field(default_factory=list)
    _acked_input: int = -1  # highest upstream tick acknowledged in this epoch

    def __post_init__(self) -> None:
        if (self.stage == 0) != (self.journal is not None):
            raise ValueError("stage 0, and only stage 0, holds the journal")
        self.machine = StageMachine(
            self.stage,
            self.schedule,
            self.window,
            self.chips,
            epoch=self.epoch,
            chain_log_limit=self.chain_log_limit,
        )
        self._acked_input = self.machine.origin - 1

    @property
    def is_last(self) -> bool:
        return self.stage == self.schedule.stages - 1

    @property
    def phase(self) -> str:
        """`failed` once stopped with a reason, else the machine's phase."""
        return "failed" if self.error else self.machine.phase.value

    @property
    def last_tick(self) -> int:
        return self.machine.next_tick - 1

    @property
    def executing(self) -> bool:
        return self._executing

    # --- the one entry point ----------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Apply one event; the actions to execute, in order."""
        out: list[Action] = []
        match event:
            case FrameArrived(frame):
                self._on_frame(frame, out)
            case AckArrived(tick, epoch):
                try:
                    self.machine.on_ack(tick, epoch)
                except ProtocolError as exc:
                    self._stop(f"{self.label}: {exc}", out)
            case TickExecuted(tick, epoch, output, digest):
                self._on_executed(tick, epoch, output, out, digest)
            case TickFailed(tick, epoch, reason):
                self._executing = False
                out.extend(self._taken)  # taken off the ring: real whatever the tick did
                self._taken.clear()
                if epoch == self.machine.epoch:
                    self._stop(f"{self.label}: tick {tick}: {reason}", out)
            case Submit():
                self._submit(event, out)
            case Cancel(request_id):
                self._cancel(request_id, out)
            case ChipsReady(chips, epoch):
                # a chip outside the replica is the caller's mistake: `confirm_all` raises
                # ProtocolError before it changes anything
                self.machine.confirm_all(chips, epoch)
            case Halt():
                self.machine.halt()
            case Resume(epoch, tick):
                self._resume(epoch, tick, out)
            case Fail(reason):
                self._stop(reason, out)
        self._next(out)
        return out

    @property
    def running(self) -> bool:
        return self.machine.phase is Phase.RUNNING

    def _resume(self, epoch: int, tick: int, out: list[Action]) -> None:
        """Enter `epoch` at `tick` unless already there (two StartEpoch calls resume once)."""
        if epoch <= self.machine.epoch:
            return
        try:
            self.machine.resume(epoch, tick)
        except ProtocolError as exc:
            self._stop(f"{self.label}: {exc}", out)
            return
        self.error = ""
        self._acked_input = tick - 1
        if self.journal is not None:
            self.journal.replay()

    # --- frames -----------------------------------------------------------------------------

    def input_limit(self) -> int:
        """The highest upstream tick this stage may be sent now (see the module docstring)."""
        if self.stage > 0:
            return self._acked_input + self.window
        return self.machine.next_tick - 1 + self.schedule.stages - 1

    def _on_frame(self, frame: Frame, out: list[Action]) -> None:
        m = self.machine
        if frame.epoch < m.epoch:
            return  # left on the link by a halted epoch
        if self.error:
            out.append(RejectFrame(RejectCode.FAILED_PRECONDITION, self.error))
            return
        upstream = self.schedule.upstream(self.stage)
        refusal: tuple[RejectCode, str] | None = None
        if frame.epoch > m.epoch:
            refusal = (
                RejectCode.FAILED_PRECONDITION,
                f"frame of epoch {frame.epoch} while in epoch {m.epoch}",
            )
        elif not m.origin <= frame.tick <= self.input_limit():
            refusal = (
                RejectCode.OUT_OF_RANGE,
                f"frame of tick {frame.tick} outside the credit window "
                f"{m.origin}..{self.input_limit()}",
            )
        elif frame.slot != self.schedule.slot_at(upstream, frame.tick):
            refusal = (
                RejectCode.FAILED_PRECONDITION,
                f"frame of tick {frame.tick} for slot {frame.slot}; the schedule gives stage "
                f"{upstream} slot {self.schedule.slot_at(upstream, frame.tick)} at that tick",
            )
        elif self.stage == 0 and frame.payload:
            refusal = self._check_token(frame.payload)
        if refusal is None:
            try:
                m.on_frame(frame)
            except ProtocolError as exc:
                refusal = (RejectCode.FAILED_PRECONDITION, str(exc))
        if refusal is not None:
            code, why = refusal
            reason = f"{self.label}: {why} (from stage {upstream})"
            self._stop(reason, out)
            out.append(RejectFrame(code, reason))

    def _check_token(self, payload: bytes) -> tuple[RejectCode, str] | None:
        """The ring's way back carries one int64 token and its float32 logits row."""
        rows = (len(payload) - TOKEN.size) / 4
        if len(payload) < TOKEN.size or not rows.is_integer():
            return RejectCode.INVALID_ARGUMENT, f"a token payload of {len(payload)} bytes"
        (token,) = TOKEN.unpack_from(payload)
        vocab = self.vocab_size
        if vocab is not None and (not 0 <= token < vocab or rows != vocab):
            return (
                RejectCode.INVALID_ARGUMENT,
                f"token {token} with {int(rows)} logits for a vocabulary of {vocab}",
            )
        return None

    # --- ticks ------------------------------------------------------------------------------

    def _next(self, out: list[Action]) -> None:
        """Issue the next tick if one may run and none is running."""
        if self._executing or self.error:
            return
        if self.journal is not None and self.journal.idle:
            return  # stage 0 ticks only while it has work: an idle replica uses no CPU
        run = self.machine.ready()
        if run is None:
            return
        work: Work | None = None
        payload = b""
        if self.journal is not None:
            try:
                work = self._stage0_prepare(run.tick, run.slot, run.input, out)
            except JournalError as exc:
                self._stop(f"{self.label}: tick {run.tick}: {exc}", out)
                return
        elif run.slot is not None and run.input is not None:
            payload = run.input.payload
        self._executing = True
        out.append(Execute(run.tick, self.machine.epoch, run.slot, work, payload))

    def _stage0_prepare(
        self, tick: int, slot: int | None, ring: Frame | None, out: list[Action]
    ) -> Work | None:
        """Take the token coming back round the ring, then choose what this tick feeds."""
        journal = self.journal
        assert journal is not None
        if slot is None:
            return None
        if ring is not None and ring.payload:
            (token,) = TOKEN.unpack_from(ring.payload)
            if journal.cancelled(slot):
                journal.drop_cancelled(slot)
            else:
                event = journal.on_token(slot, int(token))
                logits = np.frombuffer(ring.payload, dtype="<f4", offset=TOKEN.size)
                if event.finished:
                    self._sampling.pop(event.request_id, None)
                if event.request_id in self._listeners:
                    if event.finished:
                        self._listeners.discard(event.request_id)
                    self._taken.append(StreamToken(event, logits, tick))
        feed = journal.feed(slot)
        if feed is None:
            return None
        return Work(
            feed.request_id,
            slot,
            feed.tokens,
            feed.start_position,
            self._sampling.get(feed.request_id, GREEDY),
            feed.sample_index,
        )

    def _on_executed(
        self, tick: int, epoch: int, output: bytes, out: list[Action], digest: bytes | None
    ) -> None:
        self._executing = False
        out.extend(self._taken)  # taken off the ring: real whether or not the tick counts
        self._taken.clear()
        m = self.machine
        if epoch != m.epoch or m.phase is not Phase.RUNNING or self.error:
            return  # halted meanwhile: the tick never happened (the epoch restarts before it)
        consumed = m.schedule.input_tick(self.stage, tick) if m.needs_input(tick) else None
        m.complete(tick, output, digest)
        out.append(SendFrame(Frame(epoch, tick, m.schedule.slot_at(self.stage, tick), output)))
        if self.stage > 0 and consumed is not None:
            self._acked_input = max(self._acked_input, consumed)
            out.append(SendAck(consumed, epoch))

    # --- requests (stage 0) -----------------------------------------------------------------

    def _submit(self, req: Submit, out: list[Action]) -> None:
        if self.journal is None:
            raise JournalError(f"{self.label} is not stage 0: requests enter at stage 0")
        if self.error:
            raise Stopped(f"the pipeline is stopped: {self.error}")
        try:
            check_sampling(req.sampling)
        except ValueError as exc:
            raise JournalError(str(exc)) from None
        self.journal.submit(
            req.request_id,
            req.prompt,
            req.max_tokens,
            temperature=req.sampling.temperature,
            seed=req.sampling.seed,
            vocab_size=self.vocab_size,
        )
        self._sampling[req.request_id] = req.sampling
        self._listeners.add(req.request_id)

    def _cancel(self, request_id: str, out: list[Action]) -> None:
        if self.journal is None:
            return
        self.journal.cancel(request_id)
        self._sampling.pop(request_id, None)
        if request_id in self._listeners:
            self._listeners.discard(request_id)
            out.append(EndRequest(request_id, f"request {request_id!r} was cancelled", True))

    # --- stops ------------------------------------------------------------------------------

    def _stop(self, reason: str, out: list[Action]) -> None:
        """Halt with a reason: status keeps the first one, every open stream ends with it,
        and the stop travels upstream once."""
        if not self.error:
            self.error = reason
            out.append(ReportStop(reason))
        self.machine.halt()
        for request_id in sorted(self._listeners):
            out.append(EndRequest(request_id, reason))
        self._listeners.clear()

    def listeners(self) -> Sequence[str]:
        """The requests whose streams are open (stage 0)."""
        return sorted(self._listeners)


def describe(exc: BaseException) -> str:
    """An exception as a status reason: its type (a TypeError is not an ExecutionError) and
    its message, bounded."""
    text = str(exc)
    if len(text) > 500:
        text = text[:500] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
