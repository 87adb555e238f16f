"""The lockstep adapter: runs one pipeline stage around the pure `agents.stage_core`.

A `StageRunner` owns one stage of one replica (a TP group is one stage, stepped as one
`TensorParallelGroup` with its fixed rank-order reduction). Every decision — which tick may
run, what stage 0 feeds, whether a frame is admitted, what a stop does — is made by its
`StageCore` (events in, actions out; it owns the `StageMachine` and stage 0's `Journal`). The
runner only feeds it events under one lock and executes the actions: its one thread runs a
tick's kernels (`execute`), sends the output frame downstream, acknowledges upstream and
reports stops; tokens and ended streams go straight into the callers' queues. Frames and
acknowledgements arrive from links (`LocalLink` in process, `agents.interconnect` over gRPC),
which only call `on_frame` / `on_ack`.

Roles by position in the ring:

* stage 0 holds the `Journal`. At each tick it first takes the frame coming back round the
  ring (the last stage's sampled token for this tick's slot; `journal.on_token`, and the token
  is streamed to the `Generate` caller), then asks the journal what to feed the slot: a whole
  prompt (prefill), one token (decode) or nothing (a bubble, an empty frame);
* the last stage samples: greedy or seeded (`agents.sampling.sample_token`, at the index stage 0
  sends along — the journal's `Feed.sample_index`, the token's sequence position, as the
  reference executor does) and sends token + logits row back;
* a stage that is both (one stage) does both in one tick.

Payloads: stage to stage `SAMPLING` header (temperature, seed, sequence index — the last
stage needs them and only stage 0 knows the request) followed by the `Activation` blob; last
stage to stage 0 the token (int64) and the float32 logits row. Bubbles are empty payloads.

Stops: a stage that stops — a rejected frame, an exception of any type while running a tick
(a malformed payload or a failing kernel or chip), a broken link — keeps the reason (Status
shows phase `failed` and the error), ends every waiting `Generate` stream at once and reports
upstream (`set_upstream`/`bind_upstream`'s stop callback: an in-process call, or the link
stream ending with ABORTED), stage by stage, until stage 0 ends every `Generate` stream with
the reason, which names the chip and the tick. `on_stop` lets the replica host stop the
replica's other stages on the same agent. A stopped replica is brought back by the control
plane (RemoveReplica, ConfigureReplica, StartEpoch at a new epoch); `Halt` and a new epoch
(`enter_epoch`) stop and restart the stages without tearing the links down.

Idle pipeline: stage 0 runs a tick only while its journal holds work (queued or in-flight
requests, including tokens still in the ring). With no work it stops at its next tick; every
other stage then stops for lack of input, so an idle replica uses no CPU. When a request
arrives stage 0 continues from the tick it stopped at — the tick counter never jumps, so the
chains stay a function of the requests and the ticks they were admitted at.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import queue
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agents.activation import Activation
from agents.executor import Stepper
from agents.journal import Journal, JournalError, QueueFull, TokenEvent
from agents.lockstep import DEFAULT_CHAIN_LOG_LIMIT, GENESIS, Frame, Schedule, StageMachine
from agents.sampling import GREEDY, Sampling, sample_token
from agents.stage_core import (
    TOKEN,
    AckArrived,
    Action,
    Cancel,
    ChipsReady,
    EndRequest,
    Event,
    Execute,
    Fail,
    FrameArrived,
    Halt,
    RejectCode,
    RejectFrame,
    ReportStop,
    Resume,
    SendAck,
    SendFrame,
    StageCore,
    StreamToken,
    Submit,
    TickExecuted,
    TickFailed,
    describe,
)
from shardformat.errors import ExecutionError

log = logging.getLogger("lockstep.pipeline")

SAMPLING = struct.Struct("<dQq")  # temperature, seed, sequence index of the token to sample

__all__ = [
    "JournalError",
    "LocalLink",
    "PipelineError",
    "QueueFull",
    "StageRunner",
    "TokenOut",
]


class PipelineError(Exception):
    """The stage stopped: a corrupted frame, a protocol violation or a failing kernel."""


class FrameSink(Protocol):
    """The sending end of a link to the downstream stage."""

    def send(self, frame: Frame) -> None: ...

    def close(self) -> None: ...


# --- payloads --------------------------------------------------------------------------------


def encode_work(sampling: Sampling, index: int, act: Activation) -> bytes:
    return SAMPLING.pack(sampling.temperature, sampling.seed, index) + act.to_bytes()


def decode_work(payload: bytes) -> tuple[Sampling, int, Activation]:
    temperature, seed, index = SAMPLING.unpack_from(payload)
    return Sampling(temperature, seed), index, Activation.from_bytes(payload[SAMPLING.size :])


def encode_token(token: int, logits: np.ndarray) -> bytes:
    return TOKEN.pack(token) + np.ascontiguousarray(logits, dtype="<f4").tobytes()


# --- links inside one process ----------------------------------------------------------------


class Jitter:
    """Delays each item by a random 0..`max_ms` (seeded) while keeping their order: one
    thread takes items in order and sleeps before passing each on. The sleep *is* the
    simulated wire delay, not a synchronization device."""

    def __init__(self, forward: Callable[[Frame], object], max_ms: float, seed: int) -> None:
        self._forward = forward
        self._max = max_ms / 1e3
        self._rng = random.Random(seed)
        self._items: queue.SimpleQueue[Frame | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="link-jitter", daemon=True)
        self._thread.start()

    def send(self, frame: Frame) -> None:
        self._items.put(frame)

    def _run(self) -> None:
        while (frame := self._items.get()) is not None:
            time.sleep(self._rng.uniform(0, self._max))
            self._forward(frame)

    def close(self) -> None:
        self._items.put(None)
        self._thread.join(timeout=5)


class LocalLink:
    """A link between two stages of one process (chips of one node): no network, same
    semantics — frames delivered in order to `on_frame`, acknowledged through `on_ack`."""

    def __init__(self, deliver: Callable[[Frame], object], jitter_ms: float = 0.0, seed: int = 0):
        self._jitter = Jitter(deliver, jitter_ms, seed) if jitter_ms > 0 else None
        self._deliver = deliver

    def send(self, frame: Frame) -> None:
        if self._jitter is not None:
            self._jitter.send(frame)
        else:
            self._deliver(frame)

    def close(self) -> None:
        if self._jitter is not None:
            self._jitter.close()


# --- the runner ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenOut:
    """One generated token for a `Generate` stream (or the end of the stream on error)."""

    event: TokenEvent | None
    logits: np.ndarray | None = None
    error: str | None = None
    cancelled: bool = False  # the request was cancelled (not a stopped pipeline)
    tick: int = -1  # the stage-0 tick that took the token off the ring (`StreamToken.tick`)


@dataclass
class StageStatus:
    epoch: int
    tick: int
    chain_head: bytes
    phase: str
    error: str


def _tensors(payload: bytes) -> dict[str, tuple[str, int, int]] | None:
    """A stage-to-stage payload's activation tensors: name -> (dtype, first byte, end) in
    `payload`; None when its header cannot be read."""
    base = SAMPLING.size + 8
    try:
        (size,) = struct.unpack_from("<Q", payload, SAMPLING.size)
        header = json.loads(payload[base : base + size])
        out = {}
        for name, entry in header.items():
            if name != "__metadata__":
                first, end = (base + size + int(x) for x in entry["data_offsets"])
                out[name] = (str(entry["dtype"]), first, end)
    except (ValueError, KeyError, TypeError, AttributeError, struct.error):
        return None
    if not all(base + size <= a <= b <= len(payload) for _, a, b in out.values()):
        return None
    return out


def request_digest(payload: bytes, is_last: bool) -> bytes:
    """sha256 of an output payload leaving out its `slots` tensor: the canary compares the
    outputs one request produced in different replicas, where it may run on different slots
    (everything else in a payload is a function of the request). The last stage's payload
    (token and logits) carries no slot. A payload whose activation header cannot be read is
    hashed whole (it differs from a good one either way)."""
    tensors = None if is_last or not payload else _tensors(payload)
    if tensors is None or "slots" not in tensors:
        return hashlib.sha256(payload).digest()
    _, first, end = tensors["slots"]
    view = memoryview(payload)
    digest = hashlib.sha256(view[:first])
    digest.update(view[end:])
    return digest.digest()


def flip_bit(payload: bytes, bit: int, is_last: bool) -> bytes:
    """`payload` with one bit flipped, counted from the end of its last floating-point values
    (the last stage's logits; another stage's last float tensor, e.g. the hidden state): a
    corrupted value, as a faulty multiplier would compute, not a corrupted index or header
    (which a stage refuses loudly rather than silently)."""
    end = len(payload)
    tensors = None if is_last else _tensors(payload)
    if tensors:
        floats = [(b, a) for dtype, a, b in tensors.values() if dtype.startswith(("F", "BF"))]
        if floats:
            end, first = max(floats)
            bit %= 8 * (end - first)
    bit %= 8 * end
    flipped = bytearray(payload)
    flipped[end - 1 - bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


def execute(stepper: Stepper, is_last: bool, action: Execute) -> bytes:
    """The stage's output payload for one tick (pure given its inputs and KV caches)."""
    if action.work is not None:
        w = action.work
        n = len(w.tokens)
        act = Activation.for_tokens(
            [w.slot] * n, range(w.start_position, w.start_position + n), w.tokens
        )
        sampling, index = w.sampling, w.sample_index
    elif action.slot is not None and action.payload:
        sampling, index, act = decode_work(action.payload)
    else:
        return b""
    out = stepper.step(act)
    if not is_last:
        return encode_work(sampling, index, out)
    if out.logits is None:
        raise ExecutionError(f"the last stage ended at op/chunk {out.cursor} without logits")
    row = out.logits[-1]
    return encode_token(sample_token(row, sampling, index), row)


class StageRunner:
    """One stage of one replica: the thread-and-queue adapter around `StageCore`.

    Every event (a frame, an acknowledgement, a request, a control call, a finished tick) goes
    through `StageCore.handle` under one lock. Of the actions it returns, those that only put
    into a caller's queue (tokens, ended streams) are done at once, under the lock, so a stop
    reaches waiting clients immediately; the others — run a tick, send a frame, acknowledge,
    report a stop upstream — go to an outbox that the stage's one thread executes in order,
    outside the lock (the ring is a cycle: no lock is held while calling another stage).
    """

    def __init__(
        self,
        *,
        label: str,
        stage: int,
        schedule: Schedule,
        window: int,
        replica_chips: Sequence[str],
        stepper: Stepper,
        journal: Journal | None = None,
        vocab_size: int | None = None,
        epoch: int = 0,
        chain_log_limit: int = DEFAULT_CHAIN_LOG_LIMIT,
    ) -> None:
        self.core = StageCore(
            label,
            stage,
            schedule,
            window,
            frozenset(replica_chips),
            journal=journal,
            vocab_size=vocab_size,
            epoch=epoch,
            chain_log_limit=chain_log_limit,
        )
        self.label = label
        self.stage = stage
        self.stepper = stepper
        self.is_last = stage == schedule.stages - 1
        self._cond = threading.Condition()
        self._outbox: deque[Action] = deque()
        self._downstream: FrameSink | None = None
        self._ack_upstream: Callable[[int, int], None] | None = None
        self._stop_upstream: Callable[[str], None] | None = None
        self._upstream_incarnation: int | None = None  # None: no stream bound since start
        self._replaced: Callable[[str], None] | None = None
        self._streams: dict[str, queue.SimpleQueue[TokenOut]] = {}
        self._on_stop: list[Callable[[str], None]] = []
        self._closed = False
        self._fault: tuple[int, int] | None = None  # (from tick, bit from the end): flip once
        # For the agent's metrics, plain counters: `ticks_executed` is written only by the stage's
        # thread, `tokens_streamed` only under `_cond` (held there anyway); readers take a value.
        self.ticks_executed = 0  # ticks executed (bubbles included: the clock of the lockstep)
        self.tokens_streamed = 0  # tokens this stage streamed to requests (stage 0 only)
        self._thread = threading.Thread(target=self._loop, name=f"stage-{label}", daemon=True)

    # --- views ----------------------------------------------------------------------------

    @property
    def machine(self) -> StageMachine:
        return self.core.machine

    @property
    def journal(self) -> Journal | None:
        return self.core.journal

    @property
    def error(self) -> str:
        return self.core.error

    # --- wiring ---------------------------------------------------------------------------

    def connect(self, downstream: FrameSink) -> None:
        self._downstream = downstream

    def set_upstream(self, ack: Callable[[int, int], None], stop: Callable[[str], None]) -> None:
        """Where credits for consumed frames go, and where a stop of this stage is reported:
        an upstream stage in this process (set once, when the replica is wired)."""
        with self._cond:
            self._ack_upstream = ack
            self._stop_upstream = stop
            self._upstream_incarnation = LOCAL_UPSTREAM

    def bind_upstream(
        self,
        incarnation: int,
        ack: Callable[[int, int], None],
        stop: Callable[[str], None],
        replaced: Callable[[str], None],
    ) -> str | None:
        """Bind a network stream from the upstream stage; None when bound, else why not.

        A stream takes over only with an incarnation newer than every one bound before (a
        restarted sender); an older or equal one — a stale or second sender — is refused, and
        so is any stream when the upstream stage is in this process. The stream replaced is
        told through its `replaced` callback (outside the lock)."""
        with self._cond:
            held = self._upstream_incarnation
            if held == LOCAL_UPSTREAM:
                return f"{self.label}: its upstream stage runs in the same agent"
            if held is not None and incarnation <= held:
                return (
                    f"{self.label}: an upstream stream of incarnation {held} was bound; "
                    f"incarnation {incarnation} does not replace it"
                )
            previous = self._replaced
            self._ack_upstream = ack
            self._stop_upstream = stop
            self._replaced = replaced
            self._upstream_incarnation = incarnation
        if previous is not None:
            previous(f"{self.label}: replaced by an upstream stream of incarnation {incarnation}")
        return None

    def unbind_upstream(self, ack: Callable[[int, int], None]) -> None:
        """Forget the upstream callbacks if `ack` is still the bound one (its link stream
        ended): credits and stops then go nowhere until a newer stream binds, instead of
        into a dead stream's queue."""
        with self._cond:
            if self._ack_upstream is ack:
                self._unbind()

    def _unbind(self) -> None:
        self._ack_upstream = None
        self._stop_upstream = None
        self._replaced = None

    def on_stop(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` (from the stage's thread) when the stage stops with an
        error: the replica host stops the replica's other stages on this agent."""
        self._on_stop.append(callback)

    def start(self) -> None:
        if self._downstream is None:
            raise ValueError(f"{self.label}: connect a downstream link before starting")
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, close the downstream link, end the bound upstream stream (it
        would otherwise keep this stage, its program and KV cache referenced while its
        sender's heartbeats keep it open) and end every waiting request."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            streams, self._streams = list(self._streams.values()), {}
            upstream = self._replaced
            self._unbind()
        if upstream is not None:
            upstream(f"{self.label}: the replica was removed")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self._downstream is not None:
            self._downstream.close()
        for stream in streams:
            stream.put(TokenOut(None, error="the pipeline was removed"))

    # --- events ---------------------------------------------------------------------------

    def _apply(self, event: Event) -> list[RejectFrame]:
        """Hand one event to the core (lock held); queue-only actions now, the rest to the
        outbox. Returns the frame rejections, for the link to end its stream with."""
        rejected = []
        for action in self.core.handle(event):
            if isinstance(action, StreamToken):
                self.tokens_streamed += 1
                stream = self._streams.get(action.event.request_id)
                if action.event.finished:
                    self._streams.pop(action.event.request_id, None)
                if stream is not None:
                    stream.put(TokenOut(action.event, action.logits, tick=action.tick))
            elif isinstance(action, EndRequest):
                stream = self._streams.pop(action.request_id, None)
                if stream is not None:
                    stream.put(TokenOut(None, error=action.reason, cancelled=action.cancelled))
            elif isinstance(action, RejectFrame):
                rejected.append(action)
            else:
                if isinstance(action, ReportStop):
                    log.error("%s", action.reason)
                self._outbox.append(action)
                self._cond.notify_all()
        return rejected

    def on_frame(
        self, frame: Frame, via: Callable[[int, int], None] | None = None
    ) -> RejectFrame | None:
        """Hand an upstream frame to the core; the rejection (the stage then stopped, the
        reason in `error`) when it is refused. `via`: the network stream's acknowledgement
        callback — a frame of a stream no longer bound is refused (ABORTED) untouched."""
        with self._cond:
            if via is not None and self._ack_upstream is not via:
                return RejectFrame(
                    RejectCode.ABORTED, f"{self.label}: this upstream stream was replaced"
                )
            rejected = self._apply(FrameArrived(frame))
            if rejected and via is not None:
                self._unbind()  # the stream ends with the rejection, not with the stop
        return rejected[0] if rejected else None

    def fail_via(self, via: Callable[[int, int], None], message: str) -> bool:
        """`fail` on behalf of a network stream, only while it is the bound one (which then
        ends with its own status rather than with the stop report)."""
        with self._cond:
            if self._ack_upstream is not via:
                return False
            self._unbind()
            self._apply(Fail(message))
            return True

    def on_ack(self, tick: int, epoch: int) -> None:
        with self._cond:
            self._apply(AckArrived(tick, epoch))

    def fail(self, message: str) -> None:
        """Stop the stage with a reason (a link detected corruption); shown in status."""
        with self._cond:
            self._apply(Fail(message))

    def confirm_ready(self, chips: Collection[str], epoch: int) -> bool:
        with self._cond:
            self._apply(ChipsReady(chips, epoch))
            return self.core.running and self.core.machine.epoch == epoch

    def halt(self) -> int:
        with self._cond:
            self._apply(Halt())
            return self.core.last_tick

    def enter_epoch(self, epoch: int, tick: int) -> None:
        """Restart at `epoch` from `tick` unless the stage is already there (one check under
        the lock, so two concurrent StartEpoch calls resume once); stage 0 replays every
        request in flight."""
        with self._cond:
            if epoch > self.core.machine.epoch:
                self.resume(epoch, tick)

    def resume(self, epoch: int, tick: int) -> None:
        """Restart at a new epoch from `tick`; stage 0 replays every request in flight."""
        with self._cond:
            self._apply(Resume(epoch, tick))

    def status(self) -> StageStatus:
        with self._cond:
            m = self.core.machine
            return StageStatus(m.epoch, m.next_tick - 1, m.chain, self.core.phase, self.error)

    def chain_log(self) -> list[tuple[int, bytes]]:
        with self._cond:
            return self.core.machine.chain_log()

    def output_digests(self, ticks: Sequence[int]) -> tuple[StageStatus, list[bytes | None]]:
        """The stage's status and the sha256 of its output at each of `ticks` (one lock)."""
        with self._cond:
            m = self.core.machine
            status = StageStatus(m.epoch, m.next_tick - 1, m.chain, self.core.phase, self.error)
            return status, m.output_digests(ticks)

    def inject_fault(self, from_tick: int, bit: int) -> None:
        """Test hook (agents started with --allow-fault-injection only): flip `bit` (counted
        from the end) of this stage's first non-empty output at or after `from_tick`, once —
        a silent corruption: the flipped output is chained and sent downstream as computed."""
        with self._cond:
            self._fault = (from_tick, bit)

    def _corrupt(self, tick: int, output: bytes) -> bytes:
        with self._cond:
            fault = self._fault
            if fault is None or not output or tick < fault[0]:
                return output
            self._fault = None
        log.warning("%s: injected a bit flip into the output of tick %d", self.label, tick)
        return flip_bit(output, fault[1], self.is_last)

    # --- requests (stage 0) -----------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt: Sequence[int],
        max_tokens: int,
        sampling: Sampling = GREEDY,
    ) -> queue.SimpleQueue[TokenOut]:
        """Queue a request; its tokens arrive on the returned queue. Raises `JournalError`
        (bad request) or `QueueFull` (admission bound reached)."""
        stream: queue.SimpleQueue[TokenOut] = queue.SimpleQueue()
        event = Submit(request_id, tuple(int(t) for t in prompt), max_tokens, sampling)
        with self._cond:
            self._apply(event)
            self._streams[request_id] = stream
        return stream

    def cancel(self, request_id: str) -> None:
        """Drop a request (deadline passed, client gone); its slot frees when idle."""
        with self._cond:
            self._apply(Cancel(request_id))

    def tokens(
        self, stream: queue.SimpleQueue[TokenOut], timeout: float | None
    ) -> Iterator[TokenOut]:
        """A request's tokens until it finishes; raises `TimeoutError` at the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out = stream.get(timeout=left)
            except queue.Empty:
                raise TimeoutError from None
            yield out
            if out.error is not None or (out.event is not None and out.event.finished):
                return

    # --- the thread: executes the core's actions ----------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._outbox:
                    self._cond.wait()
                if self._closed:
                    return
                action = self._outbox.popleft()
            try:
                self._perform(action)
            except Exception as exc:  # a link or callback failed: the stage stops, visibly
                with self._cond:
                    self._apply(Fail(f"{self.label}: {describe(exc)}"))

    def _perform(self, action: Action) -> None:
        if isinstance(action, Execute):
            try:
                output = self._corrupt(action.tick, execute(self.stepper, self.is_last, action))
            except Exception as exc:  # any type: a payload or kernel fault stops the stage
                result: Event = TickFailed(action.tick, action.epoch, describe(exc))
            else:
                digest = request_digest(output, self.is_last)
                result = TickExecuted(action.tick, action.epoch, output, digest)
            self.ticks_executed += 1
            with self._cond:
                self._apply(result)
        elif isinstance(action, SendFrame):
            assert self._downstream is not None
            self._downstream.send(action.frame)
        elif isinstance(action, SendAck):
            with self._cond:
                ack = self._ack_upstream
            if ack is not None:
                ack(action.tick, action.epoch)
        elif isinstance(action, ReportStop):
            with self._cond:
                stop = self._stop_upstream
            if stop is not None:
                stop(action.reason)
            for callback in self._on_stop:
                callback(action.reason)


LOCAL_UPSTREAM = -1  # `_upstream_incarnation` of a stage fed by a stage of this process


def chain_hex(head: bytes) -> str:
    return head.hex() if head != GENESIS else "genesis"


@contextlib.contextmanager
def running(runners: Sequence[StageRunner]) -> Iterator[Sequence[StageRunner]]:
    """Start runners and close them (threads joined, links closed) on exit."""
    started: list[StageRunner] = []
    try:
        for runner in runners:
            runner.start()
            started.append(runner)
        yield runners
    finally:
        for runner in started:
            runner.close()


def local_ring(
    steppers: Sequence[Stepper],
    *,
    slots: int,
    max_context: int,
    window: int = 2,
    queue_limit: int = 64,
    vocab_size: int | None = None,
    jitter_ms: float = 0.0,
    seed: int = 0,
    eos_token_id: int | None = None,
) -> list[StageRunner]:
    """A whole replica in this process, stages joined by `LocalLink`s (tests, benchmarks,
    and an agent hosting every stage). The barrier is passed: call `start` and submit."""
    stages = len(steppers)
    schedule = Schedule(stages, slots)
    chips = [f"stage-{s}" for s in range(stages)]
    runners = [
        StageRunner(
            label=f"stage {s}",
            stage=s,
            schedule=schedule,
            window=window,
            replica_chips=chips,
            stepper=stepper,
            journal=Journal(slots, max_context, queue_limit, eos_token_id) if s == 0 else None,
            vocab_size=vocab_size,
        )
        for s, stepper in enumerate(steppers)
    ]
    for s, runner in enumerate(runners):
        down = runners[(s + 1) % stages]
        runner.connect(LocalLink(down.on_frame, jitter_ms, seed * 1000 + s))
        down.set_upstream(runner.on_ack, runner.fail)
        runner.confirm_ready(chips, 0)
    return runners
