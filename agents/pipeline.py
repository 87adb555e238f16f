"""The lockstep adapter: runs one pipeline stage around the pure `agents.lockstep` machine.

A `StageRunner` owns one stage of one replica (a TP group is one stage, stepped as one
`TensorParallelGroup` with its fixed rank-order reduction). It has a thread that waits on a
condition variable until the `StageMachine` says a tick may run (input arrived, downstream
credit, barrier passed), executes the tick outside the lock, records the output in the hash
chain, sends the output frame downstream and acknowledges the consumed frame upstream.
Frames and acknowledgements arrive from links (`LocalLink` in process, `agents.interconnect`
over gRPC), which only call `on_frame` / `on_ack`.

Roles by position in the ring:

* stage 0 holds the `Journal`. At each tick it first takes the frame coming back round the
  ring (the last stage's sampled token for this tick's slot; `journal.on_token`, and the token
  is streamed to the `Generate` caller), then asks the journal what to feed the slot: a whole
  prompt (prefill), one token (decode) or nothing (a bubble, an empty frame);
* the last stage samples: greedy or seeded (`agents.sampling.sample_token`, indexed by the token's
  sequence position, as the reference executor does) and sends token + logits row back;
* a stage that is both (one stage) does both in one tick.

Payloads: stage to stage `SAMPLING` header (temperature, seed, sequence index — the last
stage needs them and only stage 0 knows the request) followed by the `Activation` blob; last
stage to stage 0 the token (int64) and the float32 logits row. Bubbles are empty payloads.

Stops: a stage that stops on an error (a corrupted frame, a protocol violation, a failing
kernel or chip) reports it upstream (`set_upstream`'s stop callback: an in-process call, or the
link stream ending with ABORTED), stage by stage, until stage 0 ends every `Generate` stream
with the reason, which names the chip and the tick. A stopped replica is brought back by the
control plane (RemoveReplica, ConfigureReplica, StartEpoch at a new epoch); `Halt` and a new
epoch (`resume`) stop and restart the stages without tearing the links down.

Idle pipeline: stage 0 runs a tick only while its journal holds work (queued or in-flight
requests, including tokens still in the ring). With no work it stops at its next tick; every
other stage then stops for lack of input, so an idle replica uses no CPU. When a request
arrives stage 0 continues from the tick it stopped at — the tick counter never jumps, so the
chains stay a function of the requests and the ticks they were admitted at.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agents.activation import Activation
from agents.executor import Stepper
from agents.journal import Journal, JournalError, QueueFull, TokenEvent
from agents.lockstep import (
    DEFAULT_CHAIN_LOG_LIMIT,
    GENESIS,
    Frame,
    Phase,
    ProtocolError,
    Schedule,
    StageMachine,
)
from agents.sampling import GREEDY, Sampling, sample_token
from shardformat.errors import ExecutionError

log = logging.getLogger("lockstep.pipeline")

SAMPLING = struct.Struct("<dQq")  # temperature, seed, sequence index of the token to sample
TOKEN = struct.Struct("<q")

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


def decode_token(payload: bytes) -> tuple[int, np.ndarray]:
    (token,) = TOKEN.unpack_from(payload)
    return int(token), np.frombuffer(payload, dtype="<f4", offset=TOKEN.size)


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


@dataclass
class StageStatus:
    epoch: int
    tick: int
    chain_head: bytes
    phase: str
    error: str


@dataclass
class _Stage0Tick:
    """What stage 0 decided under the lock for one tick: tokens to stream, work to run."""

    events: list[tuple[TokenEvent, np.ndarray]] = field(default_factory=list)
    work: tuple[Sampling, int, Activation] | None = None


class StageRunner:
    """One stage of one replica, driven by its own thread (see the module docstring)."""

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
        if (stage == 0) != (journal is not None):
            raise ValueError("stage 0, and only stage 0, holds the journal")
        self.label = label
        self.stage = stage
        self.machine = StageMachine(
            stage,
            schedule,
            window,
            frozenset(replica_chips),
            epoch=epoch,
            chain_log_limit=chain_log_limit,
        )
        self.stepper = stepper
        self.journal = journal
        self.vocab_size = vocab_size
        self.is_last = stage == schedule.stages - 1
        self.error = ""
        self._cond = threading.Condition()
        self._downstream: FrameSink | None = None
        self._ack_upstream: Callable[[int, int], None] | None = None
        self._stop_upstream: Callable[[str], None] | None = None
        self._sampling: dict[str, Sampling] = {}
        self._listeners: dict[str, queue.SimpleQueue[TokenOut]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"stage-{label}", daemon=True)

    # --- wiring ---------------------------------------------------------------------------

    def connect(self, downstream: FrameSink) -> None:
        self._downstream = downstream

    def set_upstream(self, ack: Callable[[int, int], None], stop: Callable[[str], None]) -> None:
        """Where credits for consumed frames go, and where a stop of this stage is reported
        (the upstream's link); the latest one wins. Stops travel upstream stage by stage, so
        they reach stage 0, whose `Generate` callers then end with the reason."""
        with self._cond:
            self._ack_upstream = ack
            self._stop_upstream = stop

    def unbind_upstream(self, ack: Callable[[int, int], None]) -> None:
        """Forget the upstream callbacks if `ack` is still the bound one (its link stream
        ended): credits and stops then go nowhere until the next stream binds, instead of
        into a dead stream's queue."""
        with self._cond:
            if self._ack_upstream is ack:
                self._ack_upstream = None
                self._stop_upstream = None

    def start(self) -> None:
        if self._downstream is None:
            raise ValueError(f"{self.label}: connect a downstream link before starting")
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self._downstream is not None:
            self._downstream.close()
        self._fail_listeners("the pipeline was removed")

    # --- events from links and the control plane -------------------------------------------

    def on_frame(self, frame: Frame) -> bool:
        """Hand an upstream frame to the machine; False (and the stage stopped, the reason
        in `error`) when it breaks the protocol."""
        with self._cond:
            try:
                self.machine.on_frame(frame)
            except ProtocolError as exc:
                self._stop(f"{self.label}: {exc}")
                return False
            self._cond.notify_all()
            return True

    def on_ack(self, tick: int, epoch: int) -> None:
        with self._cond:
            try:
                self.machine.on_ack(tick, epoch)
            except ProtocolError as exc:
                self._stop(f"{self.label}: {exc}")
                return
            self._cond.notify_all()

    def fail(self, message: str) -> None:
        """Stop the stage with a reason (a link detected corruption); shown in status."""
        with self._cond:
            self._stop(message)

    def confirm_ready(self, chips: Sequence[str], epoch: int) -> bool:
        with self._cond:
            running = False
            for chip in chips:
                running = self.machine.confirm_ready(chip, epoch)
            self._cond.notify_all()
            return running

    def halt(self) -> int:
        with self._cond:
            return self.machine.halt()

    def enter_epoch(self, epoch: int, tick: int) -> None:
        """`resume` at `epoch` unless the stage is already there (one check under the lock,
        so two concurrent StartEpoch calls resume once)."""
        with self._cond:
            if epoch > self.machine.epoch:
                self.resume(epoch, tick)

    def resume(self, epoch: int, tick: int) -> None:
        """Restart at a new epoch from `tick`; stage 0 replays every request in flight."""
        with self._cond:
            self.machine.resume(epoch, tick)
            self.error = ""
            if self.journal is not None:
                self.journal.replay()
            self._cond.notify_all()

    def status(self) -> StageStatus:
        with self._cond:
            m = self.machine
            return StageStatus(m.epoch, m.next_tick - 1, m.chain, m.phase.value, self.error)

    def chain_log(self) -> list[tuple[int, bytes]]:
        with self._cond:
            return self.machine.chain_log()

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
        if self.journal is None:
            raise JournalError(f"{self.label} is not stage 0: requests enter at stage 0")
        stream: queue.SimpleQueue[TokenOut] = queue.SimpleQueue()
        with self._cond:
            if self.error:
                raise JournalError(f"the pipeline is stopped: {self.error}")
            self.journal.submit(
                request_id,
                tuple(int(t) for t in prompt),
                max_tokens,
                temperature=sampling.temperature,
                seed=sampling.seed,
                vocab_size=self.vocab_size,
            )
            self._sampling[request_id] = sampling
            self._listeners[request_id] = stream
            self._cond.notify_all()
        return stream

    def cancel(self, request_id: str) -> None:
        """Drop a request (deadline passed, client gone); its slot frees when idle."""
        if self.journal is None:
            return
        with self._cond:
            self.journal.cancel(request_id)
            stream = self._listeners.pop(request_id, None)
            if stream is not None:  # wake whoever still waits on it
                stream.put(
                    TokenOut(None, error=f"request {request_id!r} was cancelled", cancelled=True)
                )
            self._sampling.pop(request_id, None)
            self._cond.notify_all()

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

    # --- the tick loop ----------------------------------------------------------------------

    def _may_run(self) -> bool:
        """Stage 0 ticks only while it has work (see the module docstring)."""
        return self.journal is None or not self.journal.idle

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._may_run() or self.machine.ready() is None):
                    self._cond.wait()
                if self._closed:
                    return
                run = self.machine.ready()
                assert run is not None
                epoch = self.machine.epoch
                try:
                    prepared = self._stage0_prepare(run.slot, run.input) if self.journal else None
                except JournalError as exc:
                    self._stop(f"{self.label}: tick {run.tick}: {exc}")
                    continue
            try:
                output = self._execute(run.slot, run.input, prepared)
            except (ExecutionError, ValueError, struct.error) as exc:
                with self._cond:
                    self._stop(f"{self.label}: tick {run.tick}: {exc}")
                continue
            with self._cond:
                # Halted meanwhile: the tick never happened (the epoch restarts before it).
                current = self.machine.epoch == epoch and self.machine.phase is Phase.RUNNING
                if current:
                    self.machine.complete(run.tick, output)
                if prepared is not None:  # tokens the journal took are real, halted or not
                    self._stream(prepared.events)
                if not current:
                    continue
                ack = self._ack_upstream if self.stage > 0 else None
            assert self._downstream is not None
            self._downstream.send(Frame(epoch, run.tick, run.slot, output))
            if ack is not None and run.input is not None:
                ack(run.input.tick, epoch)

    def _stop(self, message: str) -> None:
        """Halt with a reason; call with the lock held."""
        if not self.error:
            self.error = message
            log.error("%s", message)
            if self._stop_upstream is not None:  # not under our lock: the ring is a cycle
                threading.Thread(
                    target=self._stop_upstream, args=(message,), daemon=True, name="stop-upstream"
                ).start()
        self.machine.halt()
        self._fail_listeners(message)
        self._cond.notify_all()

    def _fail_listeners(self, message: str) -> None:
        for stream in self._listeners.values():
            stream.put(TokenOut(None, error=message))
        self._listeners.clear()

    def _stage0_prepare(self, slot: int | None, ring: Frame | None) -> _Stage0Tick:
        """Take the token coming back round the ring, then choose what this tick feeds."""
        journal = self.journal
        assert journal is not None
        prepared = _Stage0Tick()
        if slot is None:
            return prepared
        if ring is not None and ring.payload:
            token, logits = decode_token(ring.payload)
            if journal.cancelled(slot):
                journal.drop_cancelled(slot)
            else:
                prepared.events.append((journal.on_token(slot, token), logits))
        feed = journal.feed(slot)
        if feed is not None:
            n = len(feed.tokens)
            act = Activation.for_tokens(
                [slot] * n, range(feed.start_position, feed.start_position + n), feed.tokens
            )
            sampling = self._sampling.get(feed.request_id, GREEDY)
            prepared.work = (sampling, feed.start_position + n, act)
        return prepared

    def _stream(self, events: list[tuple[TokenEvent, np.ndarray]]) -> None:
        for event, logits in events:
            stream = self._listeners.get(event.request_id)
            if event.finished:
                self._listeners.pop(event.request_id, None)
                self._sampling.pop(event.request_id, None)
            if stream is not None:
                stream.put(TokenOut(event, logits))

    def _execute(
        self, slot: int | None, frame: Frame | None, prepared: _Stage0Tick | None
    ) -> bytes:
        """The stage's output payload for one tick (pure given its inputs and KV caches)."""
        if prepared is not None:
            work = prepared.work
        elif slot is not None and frame is not None and frame.payload:
            work = decode_work(frame.payload)
        else:
            work = None
        if work is None:
            return b""
        sampling, index, act = work
        out = self.stepper.step(act)
        if not self.is_last:
            return encode_work(sampling, index, out)
        if out.logits is None:
            raise ExecutionError(f"the last stage ended at op/chunk {out.cursor} without logits")
        row = out.logits[-1]
        return encode_token(sample_token(row, sampling, index), row)


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
