"""The agent's pipeline RPCs: bind held shards to replica stages, run them, serve Generate.

`ReplicaHost` keeps, per (deployment, replica), the `StageRunner`s of the stages this agent
hosts. `ConfigureReplica` builds each stage's program from the shards its chips hold (a TP
group — always inside one agent — steps as one `TensorParallelGroup`), joins consecutive
stages of this agent with `LocalLink`s and opens a `FramedLink` (`agents.wire`; or a `GrpcLink`,
by the replica's or the agent's `link_transport`) to the agent of any downstream stage
elsewhere. Stages start only when `StartEpoch` brings every chip of the replica through the
barrier. `Generate` enters at stage 0 and streams tokens as they come back round the ring.

While a stage steps it holds its chips' execution locks and checks they are healthy and still
hold their shards, so `UnloadShard` and `MarkChipFailed` never free weights under a running
kernel, and a failed chip stops its stage with an error naming it.

Isolation: ConfigureReplica binds every chip it names to the replica (`Chip.bind`) before it
builds anything, and refuses (ALREADY_EXISTS, naming the chip and the replica holding it) a
chip bound to another replica; RemoveReplica, or a configuration that fails, releases them.
So a program instance and its KV cache belong to exactly one replica.

Errors are the classes of `agents.errors`; client-chosen names are quoted through
`agents.text.quote` (bounded).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from agents.activation import Activation
from agents.chips import Chip
from agents.errors import (
    AgentError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from agents.executor import Stepper, TensorParallelGroup
from agents.interconnect import GrpcLink, link_channels
from agents.journal import Journal
from agents.lockstep import Schedule
from agents.pipeline import LocalLink, StageRunner
from agents.sampling import Sampling
from agents.settings import DEFAULT_SETTINGS, AgentSettings
from agents.status_codes import MESSAGE_LIMIT
from agents.text import clip, quote
from agents.tokenizer import TextCodec, TextDecoder, TextError
from agents.wire import FramedLink
from placement.models import ModelConfig
from protos import agent_pb2
from security.certs import Credentials
from shardformat.errors import ExecutionError
from shardformat.text import TextSpec

log = logging.getLogger("lockstep.agent")

_TRANSPORTS = {
    agent_pb2.LINK_TRANSPORT_GRPC: "grpc",
    agent_pb2.LINK_TRANSPORT_FRAMED: "framed",
    agent_pb2.LINK_TRANSPORT_AUTO: "auto",
}


@dataclass
class ChipGuard:
    """A chip of a stage and the shard it must still hold while the stage steps."""

    chip: Chip
    shard_id: str
    name: str


class GuardedStepper:
    """Steps a stage while holding its chips' execution locks (index order), refusing when
    a chip failed or lost its shard."""

    def __init__(self, inner: Stepper, guards: Sequence[ChipGuard]) -> None:
        self.inner = inner
        self.guards = sorted(guards, key=lambda g: g.chip.index)

    def step(self, batch: Activation) -> Activation:
        with ExitStack() as stack:
            for guard in self.guards:
                stack.enter_context(guard.chip.exec_lock)
                if guard.chip.failed_reason is not None:
                    raise ExecutionError(f"chip {guard.name} failed: {guard.chip.failed_reason}")
                if guard.shard_id not in guard.chip.held:
                    raise ExecutionError(
                        f"chip {guard.name} no longer holds shard {guard.shard_id[:12]}"
                    )
            return self.inner.step(batch)


@dataclass
class Replica:
    deployment: str
    replica: int
    runners: dict[int, StageRunner]
    chips: dict[int, tuple[int, str]]  # chip index -> (stage, chip name)
    vocab_size: int
    link_secret: bytes = b""
    upstream: dict[int, str] = field(default_factory=dict)  # stage -> upstream agent identity
    text: TextCodec | None = None  # stage 0's tokenizer, when its shard carries one

    @property
    def owner(self) -> str:
        return owner_label(self.deployment, self.replica)


def superseded(rep: Replica, req: agent_pb2.ConfigureReplicaRequest) -> bool:
    """Whether `req` configures `rep` at a newer epoch than every stage of it here runs."""
    return all(runner.status().epoch < req.epoch for runner in rep.runners.values())


def owner_label(deployment: str, replica: int) -> str:
    """The name a bound chip gives for the replica holding it (bounded)."""
    return f"{quote(deployment)}/replica-{replica}"


def replica_not_here(deployment: str, replica: int) -> AgentError:
    """The refusal of a request naming a replica this agent does not host (StartEpoch, Halt,
    RemoveReplica, StageDigests, InjectFault; the virtual node's too).

    NOT_FOUND: the request is well-formed, the replica is just not here (never configured,
    removed, or the agent restarted) — the control plane's RemoveReplica callers take it as
    "already gone". An empty deployment name is a malformed request, never configured by
    anyone (`ConfigureReplica` refuses it): INVALID_ARGUMENT. Generate too: the control
    plane's gateway resumes a request on another replica on NOT_FOUND."""
    if not deployment:
        return InvalidArgument("deployment must not be empty")
    return NotFound(
        f"deployment {quote(deployment)} replica {replica} is not configured on this agent"
    )


def resume_tokens_of(req: agent_pb2.GenerateRequest) -> list[int]:
    """The tokens a failover resume says were already delivered (the gateway replays the
    request with them); at most max_tokens - 1, so there is something left to generate."""
    resume = [int(t) for t in req.resume_tokens]
    if resume and len(resume) >= req.max_tokens:
        raise InvalidArgument(
            f"resume_tokens holds {len(resume)} tokens; at most max_tokens - 1 "
            f"({max(req.max_tokens, 1) - 1}) may be resumed"
        )
    return resume


def _stop_others(runners: dict[int, StageRunner], stopped: int, reason: str) -> None:
    """A stage stopped: the replica is in error, so its other stages on this agent stop too
    (Status shows the reason on every chip of it, and stage 0's clients are ended at once
    even when the stage that failed is not upstream of it here)."""
    for stage, runner in runners.items():
        if stage != stopped:
            runner.fail(f"replica stopped: {reason}")


class ReplicaHost:
    """Every replica stage hosted by one agent (see the module docstring)."""

    def __init__(
        self,
        chips: Sequence[Chip],
        settings: AgentSettings = DEFAULT_SETTINGS,
        tls: Credentials | None = None,
    ) -> None:
        self.chips = chips
        self.settings = settings
        self.tls = tls  # this agent's certificate for outgoing links (None: plaintext)
        self._lock = threading.Lock()
        self._replicas: dict[tuple[str, int], Replica] = {}
        self._configuring: set[tuple[str, int]] = set()  # keys whose ConfigureReplica runs

    # --- lookups ------------------------------------------------------------------------------

    def resolve(self, deployment: str, replica: int, stage: int) -> StageRunner | None:
        with self._lock:
            found = self._replicas.get((deployment, replica))
        return None if found is None else found.runners.get(stage)

    def link_policy(self, runner: StageRunner) -> tuple[str, bytes] | None:
        """(configured upstream identity, link secret) of the replica stage `runner` runs."""
        with self._lock:
            for rep in self._replicas.values():
                if rep.runners.get(runner.stage) is runner:
                    return rep.upstream.get(runner.stage, ""), rep.link_secret
        return None

    def _replica(self, deployment: str, replica: int) -> Replica:
        """The replica, or `replica_not_here` raised."""
        with self._lock:
            found = self._replicas.get((deployment, replica))
        if found is None:
            raise replica_not_here(deployment, replica)
        return found

    def stages(self, deployment: str, replica: int) -> list[tuple[int, StageRunner, list[str]]]:
        """(stage, runner, chip names in TP rank order) of every stage of the replica hosted
        here, by stage; NOT_FOUND for a replica not configured here (`replica_not_here`)."""
        rep = self._replica(deployment, replica)
        return [
            (stage, runner, [name for s, name in rep.chips.values() if s == stage])
            for stage, runner in sorted(rep.runners.items())
        ]

    def stage_counters(self) -> list[tuple[str, int, int, int, int]]:
        """(deployment, replica, stage, ticks executed, tokens streamed) of every stage
        hosted here, for the agent's metrics. Reads the runners' plain counters without
        their locks: a scrape never waits for, or slows, a tick."""
        with self._lock:
            replicas = list(self._replicas.values())
        return sorted(
            (rep.deployment, rep.replica, stage, runner.ticks_executed, runner.tokens_streamed)
            for rep in replicas
            for stage, runner in rep.runners.items()
        )

    def chip_status(self, index: int) -> list[agent_pb2.PipelineStatus]:
        """The chip's stage in every replica that binds it (sorted by deployment, replica)."""
        with self._lock:
            replicas = sorted(self._replicas.values(), key=lambda r: (r.deployment, r.replica))
        out = []
        for rep in replicas:
            if index in rep.chips:
                stage, _ = rep.chips[index]
                st = rep.runners[stage].status()
                out.append(
                    agent_pb2.PipelineStatus(
                        deployment=rep.deployment,
                        replica=rep.replica,
                        stage=stage,
                        epoch=st.epoch,
                        tick=st.tick,
                        chain_head=st.chain_head,
                        phase=st.phase,
                        error=st.error,
                    )
                )
        return out

    # --- ConfigureReplica -----------------------------------------------------------------

    def configure(self, req: agent_pb2.ConfigureReplicaRequest) -> list[str]:
        """Bind, build and wire the replica's stages here. A replica this agent runs at an
        older epoch is replaced (`superseded`): the request is checked first, then the old
        pipeline goes as by `RemoveReplica`, so a failover's new epoch is one call per agent
        rather than Status, RemoveReplica and ConfigureReplica. The same or a newer epoch
        already here is ALREADY_EXISTS."""
        key = (req.deployment, req.replica)
        self._check_request(req)
        with self._lock:
            old = self._replicas.get(key)
            if key in self._configuring or (old is not None and not superseded(old, req)):
                raise AlreadyExists(
                    f"deployment {quote(req.deployment)} replica {req.replica} is "
                    "already configured at this epoch or a newer one (RemoveReplica first)"
                )
            self._configuring.add(key)
            if old is not None:
                del self._replicas[key]
        try:
            if old is not None:
                self._tear_down(old)
            return self._configure(req, key)
        finally:
            with self._lock:
                self._configuring.discard(key)

    def _configure(self, req: agent_pb2.ConfigureReplicaRequest, key: tuple[str, int]) -> list[str]:
        owner = owner_label(req.deployment, req.replica)
        schedule = Schedule(req.stages, req.max_batch)
        runners: dict[int, StageRunner] = {}
        chips: dict[int, tuple[int, str]] = {}
        vocab = 0
        bound: list[Chip] = []
        texts: dict[int, TextCodec] = {}
        try:
            for index in sorted({c for a in req.assignments for c in a.chips}):
                self.chips[index].bind(owner)
                bound.append(self.chips[index])
            vocab = self._build(req, schedule, runners, chips, texts)
            self._wire(req, runners)
        except BaseException:
            for runner in runners.values():
                runner.close()
            for chip in bound:
                chip.release(owner)
            raise
        with self._lock:
            self._replicas[key] = Replica(
                req.deployment,
                req.replica,
                runners,
                chips,
                vocab,
                req.link_secret,
                {a.stage: a.upstream_identity for a in req.assignments},
                texts.get(0),
            )
        for runner in runners.values():
            runner.start()
        return [name for a in req.assignments for name in a.chip_names]

    def _build(
        self,
        req: agent_pb2.ConfigureReplicaRequest,
        schedule: Schedule,
        runners: dict[int, StageRunner],
        chips: dict[int, tuple[int, str]],
        texts: dict[int, TextCodec],
    ) -> int:
        """One runner per assigned stage (not yet linked); returns the vocabulary size.

        Stage 0's tokenizer (if its shard has one) goes into `texts`; its EOS ids end
        sequences, besides the request's `eos_token_id`."""
        vocab = 0
        for a in req.assignments:
            stepper, cfg, spec = self._stepper(req, a)
            vocab = cfg.vocab_size
            queue_limit = req.queue_limit or self.settings.queue_factor * req.max_batch
            eos = set(spec.eos_token_ids) if spec is not None and a.stage == 0 else set()
            if req.HasField("eos_token_id"):
                eos.add(req.eos_token_id)
            if spec is not None and a.stage == 0:
                try:
                    texts[0] = TextCodec(spec)
                except TextError as exc:
                    raise FailedPrecondition(f"stage 0: {exc}") from None
            runners[a.stage] = StageRunner(
                label=f"{req.deployment}/replica-{req.replica}/stage-{a.stage} "
                f"(chip {', '.join(a.chip_names)})",
                stage=a.stage,
                schedule=schedule,
                window=req.window or self.settings.window,
                chain_log_limit=self.settings.stage_log_limit(schedule.stages, schedule.slots),
                replica_chips=list(req.replica_chips),
                stepper=stepper,
                journal=Journal(req.max_batch, req.max_context, queue_limit, eos)
                if a.stage == 0
                else None,
                vocab_size=cfg.vocab_size,
                epoch=req.epoch,
            )
            chips |= {c: (a.stage, n) for c, n in zip(a.chips, a.chip_names, strict=True)}
        return vocab

    def _check_request(self, req: agent_pb2.ConfigureReplicaRequest) -> None:
        if not req.deployment:
            raise InvalidArgument("deployment must not be empty")
        if req.stages < 1 or req.max_batch < 1 or req.max_context < 2 or req.window < 0:
            raise InvalidArgument(
                f"stages ({req.stages}) and max_batch ({req.max_batch}) must be at least 1, "
                f"max_context ({req.max_context}) at least 2, window ({req.window}) at least "
                f"0 (0: the agent's default, {self.settings.window})"
            )
        if req.window > self.settings.max_window:
            raise InvalidArgument(
                f"window {req.window} is over the limit of {self.settings.max_window}"
            )
        if not 0 <= req.jitter_ms <= self.settings.max_jitter_ms:  # also refuses NaN
            raise InvalidArgument(
                f"jitter_ms {req.jitter_ms} must be from 0 to {self.settings.max_jitter_ms}"
            )
        if req.link_transport and req.link_transport not in _TRANSPORTS:
            raise InvalidArgument(
                f"link_transport {req.link_transport} is not a LinkTransport value "
                f"(0 unspecified, {', '.join(f'{k} {v}' for k, v in _TRANSPORTS.items())})"
            )
        if not req.assignments:
            raise InvalidArgument("no stage assignments")
        seen = set()
        chips_seen: set[int] = set()
        replica_chips = frozenset(req.replica_chips)  # once: 1,868 names at full size
        for a in req.assignments:
            for index in a.chips:
                if index >= len(self.chips):
                    raise InvalidArgument(
                        f"chip {index} does not exist (chips 0..{len(self.chips) - 1})"
                    )
                if index in chips_seen:
                    raise InvalidArgument(f"chip {index} is assigned twice")
                chips_seen.add(index)
            if a.stage >= req.stages or a.stage in seen:
                raise InvalidArgument(
                    f"stage {a.stage} is outside 0..{req.stages - 1} or assigned twice"
                )
            seen.add(a.stage)
            if not a.chips or not len(a.chips) == len(a.shard_ids) == len(a.chip_names):
                raise InvalidArgument(
                    f"stage {a.stage}: chips, shard_ids and chip_names must be "
                    "non-empty and of equal length"
                )
            if not replica_chips.issuperset(a.chip_names):
                raise InvalidArgument(
                    f"stage {a.stage}: chips {list(a.chip_names)} are not all in replica_chips"
                )

    def _stepper(
        self, req: agent_pb2.ConfigureReplicaRequest, a: agent_pb2.StageAssignment
    ) -> tuple[Stepper, ModelConfig, TextSpec | None]:
        guards, programs = [], []
        for index, shard_id, name in zip(a.chips, a.shard_ids, a.chip_names, strict=True):
            chip = self.chips[index]
            with chip.lock:
                chip.check_healthy(f"run stage {a.stage}")
                entry = chip.held.get(shard_id)
            if entry is None:
                raise NotFound(
                    f"chip {index} ({quote(name)}) does not hold shard {quote(shard_id, 64)}"
                )
            with chip.exec_lock:
                program = chip.program(entry)
            serving = program.serving
            if program.manifest.stages != req.stages:
                raise FailedPrecondition(
                    f"chip {index} ({quote(name)}): shard {shard_id[:12]} is stage "
                    f"{program.stage} of a {program.manifest.stages}-stage pipeline; asked to "
                    f"run it in one of {req.stages} stages"
                )
            if (
                program.stage != a.stage
                or serving.max_batch != req.max_batch
                or serving.max_context != req.max_context
            ):
                raise FailedPrecondition(
                    f"chip {index} ({quote(name)}): shard {shard_id[:12]} is stage "
                    f"{program.stage} for maxBatch {serving.max_batch}, maxContext "
                    f"{serving.max_context}; asked to run stage {a.stage} with "
                    f"{req.max_batch}/{req.max_context}",
                )
            guards.append(ChipGuard(chip, shard_id, name))
            programs.append(program)
        try:
            inner = programs[0] if len(programs) == 1 else TensorParallelGroup(programs)
        except ExecutionError as exc:
            raise FailedPrecondition(f"stage {a.stage}: {exc}") from None
        if len(programs) == 1 and programs[0].tp_size != 1:
            raise FailedPrecondition(
                f"stage {a.stage} is {programs[0].tp_size}-way tensor-parallel: "
                "assign all its ranks' chips (a TP group runs inside one agent)",
            )
        return GuardedStepper(inner, guards), programs[0].cfg, programs[0].text

    def _wire(
        self, req: agent_pb2.ConfigureReplicaRequest, runners: dict[int, StageRunner]
    ) -> None:
        by_stage = {a.stage: a for a in req.assignments}
        for stage, runner in runners.items():
            runner.on_stop(functools.partial(_stop_others, runners, stage))
            down = (stage + 1) % req.stages
            seed = req.jitter_seed * 1000 + stage
            address = by_stage[stage].downstream_address
            if not address:
                if down not in runners:
                    raise InvalidArgument(
                        f"stage {stage}: its downstream stage {down} is not on this "
                        "agent and no downstream_address was given"
                    )
                runner.connect(LocalLink(runners[down].on_frame, req.jitter_ms, seed))
                runners[down].set_upstream(runner.on_ack, runner.fail)
            elif self._transport(req) != "grpc":
                runner.connect(
                    FramedLink(
                        address,
                        req.deployment,
                        req.replica,
                        down,
                        on_ack=runner.on_ack,
                        on_error=runner.fail,
                        creds=self.tls,
                        peer=by_stage[stage].downstream_identity or None,
                        secret=req.link_secret,
                        jitter_ms=req.jitter_ms,
                        seed=seed,
                        heartbeat=self.settings.link_heartbeat,
                        fallback=self._transport(req) == "auto",
                    )
                )
            else:
                runner.connect(
                    GrpcLink(
                        address,
                        req.deployment,
                        req.replica,
                        down,
                        on_ack=runner.on_ack,
                        on_error=runner.fail,
                        jitter_ms=req.jitter_ms,
                        seed=seed,
                        heartbeat=self.settings.link_heartbeat,
                        channel_factory=link_channels(
                            self.tls, by_stage[stage].downstream_identity or None
                        ),
                        secret=req.link_secret,
                    )
                )

    def _transport(self, req: agent_pb2.ConfigureReplicaRequest) -> str:
        """The replica's link transport: its request's, else this agent's setting."""
        return _TRANSPORTS.get(req.link_transport, self.settings.link_transport)

    # --- StartEpoch, Halt, RemoveReplica --------------------------------------------------

    def start_epoch(self, req: agent_pb2.StartEpochRequest) -> bool:
        rep = self._replica(req.deployment, req.replica)
        running = True
        ready = frozenset(req.ready_chips)
        for runner in rep.runners.values():
            runner.enter_epoch(req.epoch, req.tick)
            running = runner.confirm_ready(ready, req.epoch) and running
        return running

    def halt(self, req: agent_pb2.HaltRequest) -> int:
        rep = self._replica(req.deployment, req.replica)
        return max(runner.halt() for runner in rep.runners.values())

    def remove(self, deployment: str, replica: int) -> None:
        with self._lock:
            rep = self._replicas.pop((deployment, replica), None)
        if rep is None:
            raise replica_not_here(deployment, replica)
        self._tear_down(rep)

    def _tear_down(self, rep: Replica) -> None:
        """Stop a replica taken out of `_replicas`: its runners close, its chips are free."""
        for runner in rep.runners.values():
            runner.close()
        for index in rep.chips:
            self.chips[index].release(rep.owner)

    def close(self) -> None:
        with self._lock:
            keys = list(self._replicas)
        for key in keys:
            self.remove(*key)

    # --- Generate -----------------------------------------------------------------------------

    def generate(
        self, req: agent_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.GenerateResponse]:
        rep = self._replica(req.deployment, req.replica)
        head = rep.runners.get(0)
        if head is None:
            raise InvalidArgument(
                f"this agent does not host stage 0 of {quote(req.deployment)} replica "
                f"{req.replica}: send Generate to the agent that does"
            )
        if req.prompt_text and req.prompt_ids:
            raise InvalidArgument("send prompt_text or prompt_ids, not both")
        prompt = list(req.prompt_ids)
        if req.prompt_text:
            if rep.text is None:
                raise InvalidArgument("this model has no tokenizer: send prompt_ids (token ids)")
            try:
                prompt = rep.text.encode(req.prompt_text)
            except TextError as exc:
                raise InvalidArgument(str(exc)) from None
        resume = resume_tokens_of(req)
        # Stopped, JournalError and QueueFull map through agents.status_codes.
        stream = head.submit(
            req.request_id,
            [*prompt, *resume],
            req.max_tokens - len(resume),
            Sampling(req.temperature, req.seed),
        )
        decoder = rep.text.stream() if req.prompt_text and rep.text is not None else None
        if decoder is not None:
            for token in resume:  # the text already delivered: hold back the same bytes
                decoder.push(token)
        return self._stream_tokens(head, req, stream, context, decoder, len(resume))

    def _stream_tokens(
        self,
        head: StageRunner,
        req: agent_pb2.GenerateRequest,
        stream: Any,
        context: grpc.ServicerContext,
        decoder: TextDecoder | None = None,
        resumed: int = 0,
    ) -> Iterator[agent_pb2.GenerateResponse]:
        """The request's tokens as responses; `resumed` tokens were delivered before (a
        failover resumption), so indices continue after them."""
        finished = False

        def on_done() -> None:
            if not finished:
                head.cancel(req.request_id)

        context.add_callback(on_done)
        context.send_initial_metadata((("lockstep-admitted", "1"),))  # queued: a slot or wait
        remaining = context.time_remaining()
        timeout = remaining if remaining is not None else None
        if req.deadline_ms:
            deadline = req.deadline_ms / 1e3
            timeout = deadline if timeout is None else min(timeout, deadline)
        try:
            for out in head.tokens(stream, timeout):
                if out.cancelled:
                    context.abort(
                        grpc.StatusCode.CANCELLED, clip(out.error or "cancelled", MESSAGE_LIMIT)
                    )
                if out.error is not None:
                    context.abort(
                        grpc.StatusCode.ABORTED,
                        clip(f"the pipeline stopped: {out.error}", MESSAGE_LIMIT),
                    )
                assert out.event is not None
                finished = out.event.finished
                logits = b""
                if req.return_logits and out.logits is not None:
                    logits = np.ascontiguousarray(out.logits, dtype="<f4").tobytes()
                yield agent_pb2.GenerateResponse(
                    request_id=req.request_id,
                    token=out.event.token,
                    index=out.event.index + resumed,
                    finished=out.event.finished,
                    logits=logits,
                    text=decoder.push(out.event.token) if decoder is not None else "",
                    tick=out.tick,
                )
        except TimeoutError:
            head.cancel(req.request_id)
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request {quote(req.request_id)} passed its deadline",
            )
