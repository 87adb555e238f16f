"""The silent-data-corruption canary: run it through every Ready replica, judge, fence.

`Verifier.verify(name)` (the admin API's `Verify`, `lpuctl verify NAME`, and the periodic
`VerificationLoop`) sends the same canary request — a fixed prompt, greedy, the spec's
`verification.canaryTokens` — to every Ready replica through its stage-0 agent, at the same
time. Each token comes back with the stage-0 tick that took it off the ring, which locates
the request's ticks at every stage (`orchestrator.core.canary.first_tick_of`); each agent of
the replica then reports its stages' output digests at those ticks (`StageDigests`). The
pure `judge` compares them stage by stage (see `orchestrator.core.canary` for what is
compared and which reference decides); when two replicas disagree with nothing to break the
tie, the canary runs once more on every replica.

A ring longer than the agents' digest logs (llama-3.1-405b: 1,868 stages) keeps only the
canary's last outputs; comparing a truncated history could blame the wrong stage, so the
canary runs again at once with as many tokens as every stage still held
(`orchestrator.core.canary.held_steps`), and later verifications of that ring start there.

A replica whose canary did not come back whole (a failure, or ticks not one ring period apart:
a failover replayed it) is not compared, and says so in the notes; the verification then does
not pass.

For a divergence (a different output, not a missing one) every chip of the named stage is
fenced: marked failed on its agent (`MarkChipFailed`: it drops its shards, so the replica
stops at its next tick) and in the store, with events `SilentDataCorruption` and
`ChipFenced`; the controller is woken and its chip-failure path moves the work off the chip.
The deployment's `Verified` condition says what the last verification found.

References agreed by a verification are kept in memory per (deployment, canary, stage shard
ids), so a later run with two disagreeing replicas is decided without a second run; they are
not persisted (a restarted control plane re-establishes them at its next verification).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from orchestrator.controller import AgentGateway
from orchestrator.core.canary import (
    Digests,
    Divergence,
    ReplicaTrace,
    StageTrace,
    Verdict,
    first_tick_of,
    held_steps,
    judge,
)
from orchestrator.core.model import (
    ChipHealth,
    Condition,
    ConditionStatus,
    ConditionType,
    Node,
    Phase,
    Replica,
)
from orchestrator.safe_yaml import clip
from orchestrator.store import ControlStore
from protos import admin_pb2, agent_pb2, agent_pb2_grpc

log = logging.getLogger("lockstep.verify")

# Token ids below 256, which every vocabulary has (the smallest here has 4096); the prompt is
# cut to leave room for the canary's tokens within maxContext.
CANARY_PROMPT = (1, 17, 101, 42, 250, 7, 64, 3)
DEFAULT_INTERVAL = 300.0
DEFAULT_TOKENS = 4
RPC_TIMEOUT = 60.0
MESSAGE_LIMIT = 500


class VerifyError(Exception):
    """A verification that could not start (the admin API answers with `code`)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class VerifyReport:
    """What one verification compared and found."""

    deployment: str
    passed: bool
    message: str
    divergences: list[tuple[Divergence, bool]] = field(default_factory=list)  # (what, fenced)
    replicas: list[int] = field(default_factory=list)
    runs: int = 1
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_proto(self) -> admin_pb2.VerifyResponse:
        return admin_pb2.VerifyResponse(
            passed=self.passed,
            message=self.message,
            divergences=[
                admin_pb2.CanaryDivergence(
                    replica=d.replica,
                    stage=d.stage,
                    chips=list(d.chips),
                    tick=d.tick,
                    step=d.step,
                    missing=d.missing,
                    fenced=fenced,
                    message=d.describe(),
                )
                for d, fenced in self.divergences
            ],
            replicas=self.replicas,
            runs=self.runs,
            seconds=self.seconds,
            notes=self.notes,
        )


def canary_request(max_context: int, tokens: int) -> tuple[tuple[int, ...], int]:
    """The canary's prompt and token count for a deployment's maxContext."""
    tokens = max(1, min(tokens, max_context - 1))
    prompt = CANARY_PROMPT[: max(1, min(len(CANARY_PROMPT), max_context - tokens))]
    return prompt, tokens


def _verification(manifest: Mapping[str, object]) -> tuple[float, int]:
    """(intervalSeconds, canaryTokens) of a stored manifest (defaults applied when stored)."""
    spec = manifest.get("spec")
    block = spec.get("verification") if isinstance(spec, Mapping) else None
    block = block if isinstance(block, Mapping) else {}
    interval = block.get("intervalSeconds", DEFAULT_INTERVAL)
    tokens = block.get("canaryTokens", DEFAULT_TOKENS)
    return (
        float(interval) if isinstance(interval, int | float) else DEFAULT_INTERVAL,
        tokens if isinstance(tokens, int) else DEFAULT_TOKENS,
    )


def _serving(manifest: Mapping[str, object]) -> tuple[int, int]:
    """(maxBatch, maxContext) of a stored manifest."""
    spec = manifest.get("spec")
    serving = spec.get("serving") if isinstance(spec, Mapping) else None
    serving = serving if isinstance(serving, Mapping) else {}
    batch, context = serving.get("maxBatch", 1), serving.get("maxContext", 2048)
    return (batch if isinstance(batch, int) else 1, context if isinstance(context, int) else 2048)


class Verifier:
    """Runs canaries and fences corrupted chips (see the module docstring). Thread-safe: one
    verification per deployment at a time (a second caller waits for the first, at most
    `rpc_timeout`, then gets UNAVAILABLE)."""

    def __init__(
        self,
        store: ControlStore,
        gateway: AgentGateway,
        wake: Callable[[], None],
        *,
        clock: Callable[[], float] = time.time,
        rpc_timeout: float = RPC_TIMEOUT,
    ) -> None:
        self.store = store
        self.gateway = gateway
        self.wake = wake
        self.clock = clock
        self.rpc_timeout = rpc_timeout
        self._lock = threading.Lock()
        self._running: dict[str, threading.Lock] = {}
        # (deployment, canary prompt, canary tokens) -> stage key -> agreed digests
        self._recorded: dict[tuple[str, tuple[int, ...], int], dict[tuple[str, ...], Digests]] = {}
        # (deployment, ring period) -> the canary tokens the agents' digest logs hold
        self._fits: dict[tuple[str, int], int] = {}

    # --- the one entry point ----------------------------------------------------------------

    def verify(self, name: str) -> VerifyReport:
        record = self.store.deployment(name)
        if record is None:
            raise VerifyError(grpc.StatusCode.NOT_FOUND, f"no deployment named {clip(name, 200)!r}")
        with self._lock:
            running = self._running.setdefault(name, threading.Lock())
        if not running.acquire(timeout=self.rpc_timeout):
            raise VerifyError(
                grpc.StatusCode.UNAVAILABLE, f"a verification of {name} is still running"
            )
        try:
            return self._verify(name, record.manifest, record.status.condition)
        finally:
            running.release()

    def _verify(
        self,
        name: str,
        manifest: Mapping[str, object],
        condition: Callable[[ConditionType], Condition | None],
    ) -> VerifyReport:
        started = time.perf_counter()
        replicas = [
            r
            for r in self.store.replicas(name)
            if r.running_epoch == r.epoch and not r.removing and r.shards
        ]
        if not replicas:
            raise VerifyError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"deployment {name} has no Ready replica to verify; wait for it: "
                "lpuctl get deployments",
            )
        _, tokens = _verification(manifest)
        max_batch, max_context = _serving(manifest)
        ring = (name, max(max(len(r.stages) for r in replicas), max_batch))
        prompt, tokens = canary_request(max_context, min(tokens, self._fits.get(ring, tokens)))
        where = self._where()
        notes: list[str] = []
        traces = self._run(name, replicas, where, prompt, tokens, max_batch, notes)
        runs = 1
        held = held_steps(traces)
        if held is not None and 1 <= held < tokens:
            log.info("%s: the digest logs held %d of %d canary outputs: again", name, held, tokens)
            self._fits[ring] = tokens = held
            runs, notes = 2, []
            traces = self._run(name, replicas, where, prompt, tokens, max_batch, notes)
        recorded = self._recorded.setdefault((name, prompt, tokens), {})
        verdict = judge(traces, recorded)
        if verdict.unresolved and traces:
            runs += 1
            traces += self._run(name, replicas, where, prompt, tokens, max_batch, notes)
            verdict = judge(traces, recorded)
        recorded.update(verdict.agreed)
        report = VerifyReport(
            name,
            False,
            "",
            replicas=sorted({t.replica for t in traces}),
            runs=runs,
            notes=notes,
        )
        self._conclude(name, verdict, report, where, len(replicas), tokens)
        report.seconds = time.perf_counter() - started
        self._condition(name, report, condition(ConditionType.VERIFIED))
        return report

    # --- running the canary -----------------------------------------------------------------

    def _where(self) -> dict[str, tuple[Node, int]]:
        """Every registered chip id → (its node, its index)."""
        return {n.chip_id(c.index): (n, c.index) for n in self.store.nodes() for c in n.chips}

    def _stub(self, node: Node) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(self.gateway.channel(node.address, node.name))

    def _run(
        self,
        name: str,
        replicas: Sequence[Replica],
        where: Mapping[str, tuple[Node, int]],
        prompt: tuple[int, ...],
        tokens: int,
        max_batch: int,
        notes: list[str],
    ) -> list[ReplicaTrace]:
        """The canary through every replica at once; the traces that came back whole."""
        with ThreadPoolExecutor(len(replicas), thread_name_prefix="canary") as pool:
            results = list(
                pool.map(lambda r: self._trace(name, r, where, prompt, tokens, max_batch), replicas)
            )
        traces = []
        for result in results:
            if isinstance(result, str):
                notes.append(result)
            else:
                traces.append(result)
        return traces

    def _trace(
        self,
        name: str,
        replica: Replica,
        where: Mapping[str, tuple[Node, int]],
        prompt: tuple[int, ...],
        tokens: int,
        max_batch: int,
    ) -> ReplicaTrace | str:
        """One replica's canary trace, or why there is none."""
        index = replica.index
        chips = [c for stage in replica.stages for c in stage.chips]
        unknown = [c for c in chips if c not in where]
        if unknown:
            return f"replica {index}: chip {unknown[0]} is on no registered node: not compared"
        period = max(len(replica.stages), max_batch)
        request = agent_pb2.GenerateRequest(
            deployment=name,
            replica=index,
            request_id=f"canary-{uuid.uuid4().hex}",
            prompt_ids=list(prompt),
            max_tokens=tokens,
        )
        head, _ = where[replica.stages[0].chips[0]]
        try:
            ticks = [r.tick for r in self._stub(head).Generate(request, timeout=self.rpc_timeout)]
        except grpc.RpcError as exc:
            return f"replica {index}: the canary failed: {exc.code().name}: {exc.details()}"
        first = first_tick_of(ticks, period)
        if first is None:
            return (
                f"replica {index}: the canary's tokens came back at ticks {ticks[:4]}, not one "
                f"ring period ({period}) apart (replayed by a failover?): not compared"
            )
        shard_of = {a.chip: a.shard_id for a in replica.shards}
        stages: dict[int, StageTrace] = {}
        asked = agent_pb2.StageDigestsRequest(
            deployment=name, replica=index, first_tick=first, period=period, count=len(ticks)
        )
        hosts = list({where[c][0].name: where[c][0] for c in chips}.values())

        def ask(node: Node) -> agent_pb2.StageDigestsResponse | str:
            try:
                return self._stub(node).StageDigests(asked, timeout=self.rpc_timeout)
            except grpc.RpcError as exc:
                return (
                    f"replica {index}: no digests from {node.name}: "
                    f"{exc.code().name}: {exc.details()}"
                )

        with ThreadPoolExecutor(len(hosts), thread_name_prefix="canary-digests") as pool:
            replies = list(pool.map(ask, hosts))
        for reply in replies:
            if isinstance(reply, str):
                return reply
            for s in reply.stages:
                names = tuple(s.chip_names)
                key = tuple(shard_of.get(c, f"unknown:{c}") for c in names)
                stages[s.stage] = StageTrace(
                    s.stage, names, key, tuple(d or None for d in s.digests)
                )
        absent = sorted(set(range(len(replica.stages))) - set(stages))
        if absent:
            return f"replica {index}: no agent reported stage {absent[0]}: not compared"
        return ReplicaTrace(index, first, period, tuple(stages[s] for s in sorted(stages)))

    # --- conclusions ------------------------------------------------------------------------

    def _conclude(
        self,
        name: str,
        verdict: Verdict,
        report: VerifyReport,
        where: Mapping[str, tuple[Node, int]],
        replicas: int,
        tokens: int,
    ) -> None:
        """Fence what the verdict found, record events, and write the report's message."""
        report.notes += [
            f"no reference for the stage running shard(s) {k}" for k in verdict.unresolved
        ]
        fenced: set[str] = set()
        for div in verdict.divergences:
            done = False
            if not div.missing:
                done = self._fence(name, div, where, fenced)
            report.divergences.append((div, done))
        corrupted = verdict.corrupted
        sources = sorted(set(verdict.references.values()))
        if corrupted:
            what = "; ".join(d.describe() for d in corrupted)
            report.message = f"silent data corruption: {what}; fenced chip(s) {sorted(fenced)}"
        elif verdict.divergences or report.notes:
            first = verdict.divergences[0].describe() if verdict.divergences else report.notes[0]
            report.message = f"inconclusive: {first}"
            self.store.add_event(
                self.clock(),
                "Warning",
                "CanaryInconclusive",
                report.message[:MESSAGE_LIMIT],
                deployment=name,
            )
        else:
            report.passed = True
            stages = len(verdict.references)
            report.message = (
                f"canary matched: {len(report.replicas)} of {replicas} Ready replica(s), "
                f"{stages} stage(s), {tokens} output(s) each (reference: {', '.join(sources)})"
            )
            self.store.add_event(
                self.clock(),
                "Normal",
                "CanaryMatched",
                report.message[:MESSAGE_LIMIT],
                deployment=name,
            )

    def _fence(
        self,
        name: str,
        div: Divergence,
        where: Mapping[str, tuple[Node, int]],
        fenced: set[str],
    ) -> bool:
        """Mark the divergent stage's chips failed in the store and on their agent."""
        reason = f"silent data corruption: {div.describe()}"[:MESSAGE_LIMIT]
        self.store.add_event(
            self.clock(), "Warning", "SilentDataCorruption", reason, deployment=name
        )
        ok = True
        for chip in div.chips:
            if chip in fenced:
                continue
            node, index = where[chip]
            try:
                self._stub(node).MarkChipFailed(
                    agent_pb2.MarkChipFailedRequest(chip=index, reason=reason[:200]),
                    timeout=self.rpc_timeout,
                )
            except grpc.RpcError as exc:  # the store still fences it: nothing is placed there
                ok = False
                log.warning("fencing %s on its agent: %s %s", chip, exc.code().name, exc.details())
            self.store.set_chip_health(node.name, index, ChipHealth.FAILED, reason[:200])
            fenced.add(chip)
            self.store.add_event(
                self.clock(),
                "Warning",
                "ChipFenced",
                f"{chip} fenced: it computed a different output at tick {div.tick}",
                deployment=name,
                node=node.name,
            )
        self.wake()
        return ok

    def _condition(self, name: str, report: VerifyReport, before: Condition | None) -> None:
        if report.passed:
            status, reason = ConditionStatus.TRUE, "CanaryMatched"
        elif any(not d.missing for d, _ in report.divergences):
            status, reason = ConditionStatus.FALSE, "SilentDataCorruption"
        else:
            status, reason = ConditionStatus.UNKNOWN, "Inconclusive"
        now = self.clock()
        record = self.store.deployment(name)
        generation = record.generation if record is not None else 0
        since = before.last_transition_time if before and before.status is status else now
        self.store.set_condition(
            name,
            Condition(
                ConditionType.VERIFIED,
                status,
                reason,
                report.message[:MESSAGE_LIMIT],
                since,
                generation,
            ),
        )


class VerificationLoop:
    """Runs each Ready (or Degraded) deployment's canary every `verification.intervalSeconds`
    (the first one an interval after it was first seen serving, or after its interval
    changed), in its own thread so a canary never delays a reconcile pass."""

    def __init__(
        self,
        verifier: Verifier,
        store: ControlStore,
        *,
        poll: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verifier = verifier
        self.store = store
        self.poll = poll
        self.clock = clock
        self._due: dict[str, tuple[float, float]] = {}  # name -> (next run, its interval)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="verification", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.tick()
            except Exception:  # a bad pass must not end periodic verification
                log.exception("periodic verification pass failed")

    def tick(self) -> list[VerifyReport]:
        """One pass: verify every deployment that is due; the reports."""
        now = self.clock()
        reports = []
        serving = set()
        for record in self.store.deployments():
            interval, _ = _verification(record.manifest)
            if interval <= 0 or record.status.phase not in (Phase.READY, Phase.DEGRADED):
                continue
            serving.add(record.name)
            due, every = self._due.get(record.name, (now + interval, interval))
            if every != interval:  # the spec changed: the new interval counts from now
                due = now + interval
            self._due[record.name] = (due, interval)
            if now < due or self._stop.is_set():
                continue
            try:
                reports.append(self.verifier.verify(record.name))
            except VerifyError as exc:
                log.info("periodic verification of %s: %s", record.name, exc)
            self._due[record.name] = (self.clock() + interval, interval)
        for name in set(self._due) - serving:
            del self._due[name]
        return reports
