"""Timing-only lockstep: the real tick protocol over synthetic outputs, for the simulated fleet.

A replica of a model too large to hold here (llama-3.1-405b: 1,868 stages of virtual shards)
still runs the real lockstep machinery: every stage is an `agents.stage_core.StageCore` — the
same tick machine, credit window, start barrier, epochs, stage-0 journal (admission, continuous
batching, replay) and hash chains as a real agent's `StageRunner` — fed the same events. What
is stand-in:

* **Outputs.** A stage's output at a tick is a deterministic function of its input and its
  shard id (`synthetic_output`): sha256 of the shard id and the input (stage 0: the tokens,
  positions and sampling of its `Work`); the last stage's is a token frame (int64 token, one
  float32 logit per vocabulary entry: 1.0 at the token) whose token is that digest modulo the
  vocabulary. A bubble outputs nothing, as a real stage does. Two replicas fed the same
  requests therefore have equal hash chains, and a replayed request yields the same tokens.
* **Time.** A non-bubble tick takes the stage's time from the placement cost model
  (`stage_seconds`: `placement.cost.op_time_ps` of the ops the shard's manifest lists, at its
  TP width), a frame the hop time of `placement.cost.hop_seconds` (same node, same rack or
  across racks, an activation row per token), both multiplied by `time_scale` (the fleet's
  `--time-scale`: 1 is real time, 0 as fast as this process runs). A bubble costs no
  compute, as in the numpy agents.
* **Frames in memory.** Every stage of a replica must be hosted by virtual nodes of the same
  fleet process: a `SendFrame` is handed to the downstream stage's core on the event loop, not
  sent over a `Link`. The link's checks still apply at delivery: the downstream stage must be
  on the node its `downstream_address` names, and `security.identity.check_link` must accept
  the sending node's identity and the replica's link secret (a refused link stops the stage
  as a refused Link stream does). ConfigureReplica refuses a downstream address outside the
  process (FAILED_PRECONDITION), so a replica cannot silently span two fleet processes.

One `SimReplica` per (deployment, replica) in the process, shared by the virtual nodes that
host its stages; one asyncio task (`run`) drives it as a discrete-event simulation: a heap of
(due time, sequence, stage, event), each event applied with `StageCore.handle` and its actions
performed at the event's due time (the simulation's own clock, so a lagging simulation keeps
its timing consistent and only runs late). The task yields to the event loop every few
milliseconds: the same loop carries every virtual node's heartbeats and RPCs.

Cost: every tick of every stage is real work (a stage runs each tick of the ring, bubbles
included; P = max(stages, maxBatch) ticks per token), so one token of a 1,868-stage replica
is ~3.5 million stage ticks, and so is the start of every epoch: stage s runs its s bubble
ticks before any input reaches it (S^2/2 = 1.7 million for 1,868 stages). A simulation is
therefore held to `SIM_SHARE` of a core (it sleeps after each slice of work): it runs in the
background, behind the fleet's heartbeats and RPCs, and is late rather than starving them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from agents.journal import TokenEvent
from agents.lockstep import Schedule
from agents.stage_core import (
    TOKEN,
    AckArrived,
    EndRequest,
    Event,
    Execute,
    Fail,
    FrameArrived,
    RejectFrame,
    ReportStop,
    SendAck,
    SendFrame,
    StageCore,
    StreamToken,
    TickExecuted,
)
from placement.cost import Workload, hop_seconds, op_time_ps
from placement.models import ModelConfig, Op, build_ops
from placement.profiles import ChipProfile
from placement.topology import HopClass
from security.identity import check_link
from shardformat.manifest import Manifest

log = logging.getLogger("lockstep.fleet")

SLICE_SECONDS = 0.004  # the simulation yields to the event loop after this much work
# Of a core, what one replica's simulation may use: after a slice it sleeps long enough to
# stay under it. The rest is the fleet's: heartbeats and RPCs of every node must not wait
# behind a 1,868-stage ring (its warm-up alone is ~1.7 million stage ticks, see below).
SIM_SHARE = 0.2
_ACTIVATION_BYTES = 4  # fp32 activations between stages, per hidden unit and token


_OPS: dict[tuple[str, str], tuple[Op, ...]] = {}  # op lists by (model config, precision)


def _ops(cfg: ModelConfig, precision: str) -> tuple[Op, ...]:
    """The model's op list, built once per model and precision (a 405B list takes a while)."""
    key = (repr(cfg), precision)
    if key not in _OPS:
        _OPS[key] = tuple(build_ops(cfg, precision))
    return _OPS[key]


def stage_seconds(manifest: Manifest, profile: ChipProfile) -> float:
    """The cost model's time of one token through the shard's stage: each op piece it runs,
    at its TP width, as the fraction of the op's chunks the piece covers."""
    cfg = manifest.config
    ops = _ops(cfg, manifest.precision)
    work = Workload(manifest.max_context, manifest.max_batch, manifest.precision)
    total = 0.0
    for piece in manifest.ops:
        if not 0 <= piece.op < len(ops):
            continue
        share = (piece.chunk_last - piece.chunk_first + 1) / max(1, piece.chunks)
        total += op_time_ps(ops[piece.op], manifest.tp_size, cfg, profile, work) * share
    return total / 1e12


def synthetic_output(shard_id: str, action: Execute, is_last: bool, vocab: int) -> bytes:
    """A stage's output for one tick: a function of its input and its shard (module
    docstring). The slot is left out (two replicas may run a request on different slots)."""
    if action.work is not None:
        w = action.work
        seed = struct.pack(
            f"<qqdQ{len(w.tokens)}q",
            w.start_position,
            w.sample_index,
            w.sampling.temperature,
            w.sampling.seed,
            *w.tokens,
        )
    elif action.slot is not None and action.payload:
        seed = action.payload
    else:
        return b""
    digest = hashlib.sha256(shard_id.encode() + seed).digest()
    if not is_last:
        return digest
    token = int.from_bytes(digest[:8], "little") % vocab
    logits = np.zeros(vocab, dtype="<f4")
    logits[token] = 1.0
    return TOKEN.pack(token) + logits.tobytes()


@dataclass
class TokenOut:
    """What a Generate stream receives: a token, or the end with an error."""

    event: TokenEvent | None = None
    logits: bytes = b""
    tick: int = -1
    error: str | None = None
    cancelled: bool = False


@dataclass
class SimStage:
    """One stage of a replica on one virtual node."""

    core: StageCore
    node: str
    identity: str
    address: str
    rack: str
    shard_id: str
    chip_names: tuple[str, ...]
    chips: tuple[int, ...]
    seconds: float  # per non-bubble tick, before `time_scale`
    hop_bytes: int
    downstream_address: str  # "" : the same node
    upstream_identity: str  # "" : the same node
    ticks: int = 0


@dataclass
class SimReplica:
    """Every stage of one replica hosted by this fleet process (module docstring)."""

    deployment: str
    replica: int
    stages: int
    max_batch: int
    link_secret: bytes
    profile: ChipProfile
    time_scale: float
    vocab: int
    on_empty: Callable[[SimReplica], None]
    by_stage: dict[int, SimStage] = field(default_factory=dict)
    streams: dict[str, asyncio.Queue[TokenOut]] = field(default_factory=dict)
    tokens: int = 0  # streamed by stage 0 (the heartbeat's token counter)
    _heap: list[tuple[float, int, int, Event]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    schedule: Schedule = field(init=False)

    def __post_init__(self) -> None:
        self.schedule = Schedule(self.stages, self.max_batch)

    # --- membership -------------------------------------------------------------------------

    def add(self, stage: SimStage) -> None:
        self.by_stage[stage.core.stage] = stage
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    def remove_node(self, node: str, reason: str | None = None) -> list[int]:
        """Drop the node's stages (RemoveReplica, or the node died); with `reason`, the other
        stages stop as they would when their links to it break."""
        gone = [s for s, st in self.by_stage.items() if st.node == node]
        for stage in gone:
            core = self.by_stage.pop(stage).core
            if stage == 0:
                for request_id in list(self.streams):
                    self._end(request_id, TokenOut(error=f"{core.label}: removed"))
        if reason is not None:
            for stage in self.by_stage:
                self.apply(stage, Fail(reason))
        if not self.by_stage:
            self.close()
        return gone

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for request_id in list(self.streams):
            self._end(request_id, TokenOut(error="the replica was removed"))
        self.on_empty(self)

    # --- events -----------------------------------------------------------------------------

    def apply(self, stage: int, event: Event, at: float | None = None) -> None:
        """Apply an event now (from an RPC) and perform its actions."""
        st = self.by_stage.get(stage)
        if st is None:
            return
        now = asyncio.get_running_loop().time() if at is None else at
        self._perform(st, st.core.handle(event), now)

    def _push(self, due: float, stage: int, event: Event) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), stage, event))
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        heap = self._heap
        sliced = time.perf_counter()
        while True:
            if not heap:
                self._wake.clear()
                await self._wake.wait()
                sliced = time.perf_counter()
                continue
            delay = heap[0][0] - loop.time()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                sliced = time.perf_counter()
                continue
            due, _, stage, event = heapq.heappop(heap)
            st = self.by_stage.get(stage)
            if st is not None:
                self._perform(st, st.core.handle(event), due)
            spent = time.perf_counter() - sliced
            if spent > SLICE_SECONDS:
                await asyncio.sleep(spent * (1 / SIM_SHARE - 1))
                sliced = time.perf_counter()

    def _perform(self, st: SimStage, actions: Sequence[object], now: float) -> None:
        stage = st.core.stage
        for action in actions:
            if isinstance(action, Execute):
                output = synthetic_output(st.shard_id, action, st.core.is_last, self.vocab)
                spent = st.seconds * self.time_scale if output else 0.0
                st.ticks += 1
                self._push(now + spent, stage, TickExecuted(action.tick, action.epoch, output))
            elif isinstance(action, SendFrame):
                self._send(st, action, now)
            elif isinstance(action, SendAck):
                up = self.schedule.upstream(stage)
                self._push(now, up, AckArrived(action.tick, action.epoch))
            elif isinstance(action, StreamToken):
                self.tokens += 1
                logits = np.ascontiguousarray(action.logits, dtype="<f4").tobytes()
                self._deliver(action.event.request_id, TokenOut(action.event, logits, action.tick))
            elif isinstance(action, EndRequest):
                self._end(
                    action.request_id, TokenOut(error=action.reason, cancelled=action.cancelled)
                )
            elif isinstance(action, ReportStop):
                up = self.schedule.upstream(stage)
                if up != stage:
                    self._push(now, up, Fail(f"downstream stopped: {action.reason}"))
            elif isinstance(action, RejectFrame):
                up = self.schedule.upstream(stage)
                self._push(now, up, Fail(f"link to stage {stage}: {action.code}: {action.reason}"))

    def _send(self, st: SimStage, action: SendFrame, now: float) -> None:
        """Hand a frame to the downstream stage with the link's checks (module docstring)."""
        down = self.schedule.downstream(st.core.stage)
        target = self.by_stage.get(down)
        where = st.downstream_address or st.address
        if target is None or target.address != where:
            self._push(
                now, st.core.stage, Fail(f"link to stage {down} at {where}: no such stage there")
            )
            return
        if target.node != st.node:
            refusal = check_link(
                st.identity,
                self.link_secret,
                target.upstream_identity,
                self.link_secret,
                target.core.label,
            )
            if refusal is not None:
                self._push(now, st.core.stage, Fail(f"link to stage {down}: {refusal.message}"))
                return
            hop = HopClass.RACK if target.rack == st.rack else HopClass.GLOBAL
        else:
            hop = HopClass.NODE
        nbytes = st.hop_bytes if action.frame.payload else 0
        spent = hop_seconds(self.profile, hop, nbytes) * self.time_scale if nbytes else 0.0
        self._push(now + spent, down, FrameArrived(action.frame))

    # --- request streams (stage 0) ----------------------------------------------------------

    def open_stream(self, request_id: str) -> asyncio.Queue[TokenOut]:
        stream: asyncio.Queue[TokenOut] = asyncio.Queue()
        self.streams[request_id] = stream
        return stream

    def _deliver(self, request_id: str, out: TokenOut) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.put_nowait(out)
            if out.event is not None and out.event.finished:
                del self.streams[request_id]

    def _end(self, request_id: str, out: TokenOut) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            stream.put_nowait(out)
