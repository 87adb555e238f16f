"""The verifier's decisions without a cluster: when the periodic loop runs a canary, and what
a verification refuses before it sends anything (orchestrator.verify)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from orchestrator.core.model import DeploymentStatus, Phase
from orchestrator.verify import (
    CANARY_PROMPT,
    VerificationLoop,
    Verifier,
    VerifyError,
    VerifyReport,
    canary_request,
)


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
