"""The verifier's decisions without a cluster (orchestrator.verify): when the periodic loop
runs a canary, what a verification refuses before it sends anything, and — against scripted
agents — the second run that breaks a tie, fencing, events and the Verified condition."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from orchestrator.core.model import ChipHealth, ConditionStatus, DeploymentStatus, Phase
from orchestrator.verify import (
    CANARY_PROMPT,
    VerificationLoop,
    Verifier,
    VerifyError,
    VerifyReport,
    canary_request,
)
from protos import agent_pb2


@dataclass
class Record:
    name: str
    manifest: dict[str, Any]
    status: DeploymentStatus
    generation: int = 1


def record(name: str, phase: Phase = Phase.READY, interval: float | None = 10.0) -> Record:
    spec: dict[str, Any] = {"serving": {"maxBatch": 4, "maxContext": 256}}
    if interval is not None:
        spec["verification"] = {"intervalSeconds": interval, "canaryTokens": 4}
    return Record(name, {"spec": spec}, DeploymentStatus(phase=phase))


@dataclass
class FakeStore:
    records: list[Record]
    replica_list: list[Any] = field(default_factory=list)

    def deployments(self) -> list[Record]:
        return self.records

    def deployment(self, name: str) -> Record | None:
        return next((r for r in self.records if r.name == name), None)

    def replicas(self, name: str) -> list[Any]:
        return self.replica_list


class FakeVerifier:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def verify(self, name: str) -> VerifyReport:
        self.calls.append(name)
        return VerifyReport(name, True, "ok")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_loop_runs_each_serving_deployment_once_per_interval() -> None:
    store = FakeStore(
        [
            record("a"),
            record("off", interval=0),
            record("pending", Phase.PENDING),
            record("degraded", Phase.DEGRADED, interval=25),
        ]
    )
    verifier, clock = FakeVerifier(), Clock()
    loop = VerificationLoop(verifier, store, clock=clock)  # type: ignore[arg-type]
    loop.tick()
    assert verifier.calls == []  # the first run is an interval after first seen serving
    for now in (5, 10, 15, 20, 25, 30):
        clock.now = now
        loop.tick()
    assert verifier.calls == ["a", "a", "degraded", "a"]  # at 10, 20, 25 and 30


def test_a_deployment_that_stops_serving_starts_its_interval_again() -> None:
    store = FakeStore([record("a")])
    verifier, clock = FakeVerifier(), Clock()
    loop = VerificationLoop(verifier, store, clock=clock)  # type: ignore[arg-type]
    loop.tick()
    store.records = [record("a", Phase.PLACING)]
    clock.now = 10
    loop.tick()
    store.records = [record("a")]
    clock.now = 12
    loop.tick()
    clock.now = 21
    loop.tick()
    assert verifier.calls == []
    clock.now = 22
    loop.tick()
    assert verifier.calls == ["a"]


def test_a_failing_verification_does_not_stop_the_loop() -> None:
    class Refusing(FakeVerifier):
        def verify(self, name: str) -> VerifyReport:
            self.calls.append(name)
            raise VerifyError(grpc.StatusCode.FAILED_PRECONDITION, "no Ready replica")

    store = FakeStore([record("a"), record("b")])
    verifier, clock = Refusing(), Clock()
    loop = VerificationLoop(verifier, store, clock=clock)  # type: ignore[arg-type]
    loop.tick()
    clock.now = 10
    assert loop.tick() == []
    assert verifier.calls == ["a", "b"]


def test_verify_refuses_an_unknown_deployment_and_one_without_ready_replicas() -> None:
    store = FakeStore([record("a")])
    verifier = Verifier(store, gateway=None, wake=lambda: None)  # type: ignore[arg-type]
    with pytest.raises(VerifyError) as unknown:
        verifier.verify("nope")
    assert unknown.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(VerifyError) as none_ready:
        verifier.verify("a")
    assert none_ready.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "no Ready replica" in str(none_ready.value)


def test_the_canary_fits_the_context() -> None:
    assert canary_request(256, 4) == (CANARY_PROMPT, 4)
    prompt, tokens = canary_request(6, 4)
    assert (len(prompt), tokens) == (2, 4)
    prompt, tokens = canary_request(2, 64)
    assert (len(prompt), tokens) == (1, 1)


def test_a_changed_interval_counts_from_the_change() -> None:
    store = FakeStore([record("a", interval=300)])
    verifier, clock = FakeVerifier(), Clock()
    loop = VerificationLoop(verifier, store, clock=clock)  # type: ignore[arg-type]
    loop.tick()
    clock.now = 50
    store.records = [record("a", interval=1)]
    loop.tick()
    assert verifier.calls == []
    clock.now = 51
    loop.tick()
    assert verifier.calls == ["a"]


# --- a verification against scripted agents -------------------------------------------------

STAGES, BATCH, TOKENS = 2, 4, 4
PERIOD = max(STAGES, BATCH)


@dataclass
class Cluster:
    """Two replicas of two stages; replica r stage s runs on node n{r}{s}, chip s. `flips`:
    (replica, stage) -> the runs (1-based) in which that stage computes a wrong output."""

    flips: dict[tuple[int, int], set[int]]
    runs: dict[int, int] = field(default_factory=dict)
    fenced: list[tuple[str, int]] = field(default_factory=list)
    held: int | None = None  # the last outputs a stage's digest log holds (None: all)
    asked: list[int] = field(default_factory=list)  # max_tokens of every Generate


class FakeAgent:
    def __init__(self, cluster: Cluster, node: str) -> None:
        self.cluster, self.node = cluster, node

    def Generate(self, request: Any, timeout: float) -> list[Any]:
        r = request.replica
        self.cluster.asked.append(request.max_tokens)
        self.cluster.runs[r] = self.cluster.runs.get(r, 0) + 1
        first = 10 + 100 * r + 1000 * self.cluster.runs[r]
        return [
            agent_pb2.GenerateResponse(token=1, index=k, tick=first + (k + 1) * PERIOD)
            for k in range(request.max_tokens)
        ]

    def StageDigests(self, request: Any, timeout: float) -> Any:
        r, s = request.replica, int(self.node[-1])
        run = self.cluster.runs[r]
        bad = any(
            run in runs and rr == r and s >= ss for (rr, ss), runs in self.cluster.flips.items()
        )
        digests = [
            hashlib.sha256(f"{s}/{k}{'!' if bad else ''}".encode()).digest()
            for k in range(request.count)
        ]
        held = self.cluster.held
        if held is not None:  # the older outputs fell out of the log
            digests = [b"" if k < request.count - held else x for k, x in enumerate(digests)]
        return agent_pb2.StageDigestsResponse(
            stages=[
                agent_pb2.StageOutputDigests(
                    stage=s, chip_names=[f"rack-0/node-{r}{s}/chip-{s}"], digests=digests
                )
            ]
        )

    def MarkChipFailed(self, request: Any, timeout: float) -> Any:
        self.cluster.fenced.append((self.node, request.chip))
        return agent_pb2.MarkChipFailedResponse()


@dataclass
class RecordingStore(FakeStore):
    events: list[tuple[str, str]] = field(default_factory=list)
    health: list[tuple[str, int, ChipHealth]] = field(default_factory=list)
    conditions: list[Any] = field(default_factory=list)

    def nodes(self) -> list[Any]:
        return [
            SimpleNamespace(
                name=f"rack-0/node-{r}{s}",
                address=f"127.0.0.1:{r}{s}",
                chips=(SimpleNamespace(index=s),),
                chip_id=lambda i, r=r, s=s: f"rack-0/node-{r}{s}/chip-{i}",
            )
            for r in range(2)
            for s in range(STAGES)
        ]

    def add_event(self, time: float, kind: str, reason: str, message: str, **_: Any) -> int:
        self.events.append((reason, message))
        return len(self.events)

    def set_chip_health(self, node: str, index: int, health: ChipHealth, reason: str) -> None:
        self.health.append((node, index, health))

    def set_condition(self, name: str, condition: Any) -> None:
        self.conditions.append(condition)


def scripted(flips: dict[tuple[int, int], set[int]]) -> tuple[Verifier, Cluster, RecordingStore]:
    cluster = Cluster(flips)
    replicas = [
        SimpleNamespace(
            index=r,
            epoch=1,
            running_epoch=1,
            removing=False,
            stages=tuple(
                SimpleNamespace(chips=(f"rack-0/node-{r}{s}/chip-{s}",)) for s in range(STAGES)
            ),
            shards=tuple(
                SimpleNamespace(chip=f"rack-0/node-{r}{s}/chip-{s}", shard_id=f"shard-{s}")
                for s in range(STAGES)
            ),
        )
        for r in range(2)
    ]
    store = RecordingStore([record("a")], replicas)
    store.records[0].manifest["spec"]["serving"]["maxBatch"] = BATCH
    woken: list[bool] = []

    class Scripted(Verifier):
        def _stub(self, node: Any) -> Any:
            return FakeAgent(cluster, node.name)

    verifier = Scripted(store, gateway=None, wake=lambda: woken.append(True))  # type: ignore[arg-type]
    return verifier, cluster, store


def test_a_transient_flip_is_outvoted_by_a_second_run_and_fenced() -> None:
    verifier, cluster, store = scripted({(1, 1): {1}})
    report = verifier.verify("a")
    assert not report.passed and report.runs == 2
    ((div, fenced),) = report.divergences
    assert (div.replica, div.stage, div.step, div.missing, fenced) == (1, 1, 0, False, True)
    assert div.tick == 10 + 100 + 1000 + 1  # replica 1's first run, stage 1, step 0
    assert cluster.fenced == [("rack-0/node-11", 1)]
    assert store.health == [("rack-0/node-11", 1, ChipHealth.FAILED)]
    assert [e[0] for e in store.events] == ["SilentDataCorruption", "ChipFenced"]
    assert store.conditions[-1].status is ConditionStatus.FALSE
    assert "replica 1 stage 1 (chip rack-0/node-11/chip-1)" in report.message


def test_a_persistent_disagreement_of_two_replicas_is_inconclusive_and_fences_nothing() -> None:
    verifier, cluster, store = scripted({(0, 1): {1, 2}})
    report = verifier.verify("a")
    assert not report.passed and report.runs == 2 and report.divergences == []
    assert "no reference" in report.message
    assert cluster.fenced == [] and store.health == []
    assert store.conditions[-1].status is ConditionStatus.UNKNOWN


def test_a_recorded_reference_decides_without_a_second_run() -> None:
    verifier, cluster, store = scripted({(0, 0): {2}})
    clean = verifier.verify("a")
    assert clean.passed and clean.runs == 1
    assert store.conditions[-1].status is ConditionStatus.TRUE
    report = verifier.verify("a")  # run 2 for each replica: replica 0 stage 0 flips
    assert report.runs == 1
    assert [(d.replica, d.stage) for d, _ in report.divergences] == [(0, 0)]
    assert cluster.fenced == [("rack-0/node-00", 0)]


def test_a_canary_longer_than_the_digest_logs_runs_again_as_short_as_they_hold() -> None:
    """The agents' logs hold only the last output (a ring longer than the log): the canary
    runs again at once with one token, which fits and passes; the next verification of the
    ring starts with one token. A corruption is then still found and fenced."""
    verifier, cluster, store = scripted({(1, 0): {4}})
    cluster.held = 1
    report = verifier.verify("a")
    assert report.passed and report.runs == 2, report.message
    assert cluster.asked == [TOKENS, TOKENS, 1, 1]
    assert "1 output(s) each" in report.message and report.notes == []
    again = verifier.verify("a")
    assert again.passed and again.runs == 1 and cluster.asked[4:] == [1, 1]
    flipped = verifier.verify("a")  # run 4 of replica 1: stage 0 flips; recorded reference
    assert [(d.replica, d.stage, d.step, f) for d, f in flipped.divergences] == [(1, 0, 0, True)]
    assert cluster.fenced == [("rack-0/node-10", 0)]
    assert store.health == [("rack-0/node-10", 0, ChipHealth.FAILED)]


def test_a_log_that_holds_no_canary_output_is_inconclusive_and_fences_nothing() -> None:
    verifier, cluster, store = scripted({})
    cluster.held = 0
    report = verifier.verify("a")
    assert not report.passed and cluster.fenced == [] and store.health == []
    assert report.divergences == [] and report.runs == 2  # nothing to compare: no reference
    assert report.message.startswith("inconclusive: no reference")
    assert cluster.asked == [TOKENS] * 4  # no shorter canary to try


def test_fault_injection_reaches_process_agents_only(tmp_path: Any) -> None:
    from orchestrator.control_plane import make_runtime, prepare_state
    from orchestrator.process_runtime import ProcessRuntime
    from orchestrator.runtime import NodeSpec

    flag = ("--allow-fault-injection",)
    spec = NodeSpec("rack-0/node-0", "rack-0", 0, 8, "dev")
    assert "--allow-fault-injection" not in ProcessRuntime(tmp_path, "x:1", tmp_path)._command(spec)
    runtime = ProcessRuntime(tmp_path, "x:1", tmp_path, agent_args=flag)
    assert runtime._command(spec)[-1] == "--allow-fault-injection"
    paths = prepare_state(tmp_path / "state")
    with pytest.raises(ValueError, match="need --runtime process"):
        make_runtime("ray", paths, "x:1", 0.5, agent_args=flag)
