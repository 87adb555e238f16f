"""The agent's RPC error mapping, in process: every failure becomes a named gRPC status (never
UNKNOWN) and leaves nothing reserved."""

from __future__ import annotations

import json
import queue
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest_agents import make_shard, messages

from agents import server as server_mod
from agents.activation import ACTIVATION_KEY, ACTIVATION_VERSION, Activation
from agents.arena import SramArena
from agents.interconnect import LinkService, link_frame
from agents.journal import Journal
from agents.lockstep import Frame, Schedule
from agents.pipeline import StageRunner
from agents.replicas import Replica
from agents.server import AgentService, HeldEntry
from protos import agent_pb2
from shardformat.codec import encode_safetensors

MiB = 1 << 20


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class FakeContext:
    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)

    def time_remaining(self) -> float | None:
        return None

    def add_callback(self, callback: Any) -> bool:
        return True

    def send_initial_metadata(self, metadata: Any) -> None:
        pass


@pytest.fixture
def service() -> Iterator[AgentService]:
    svc = AgentService("t0", "dev", 2, 4 * MiB)
    try:
        yield svc
    finally:
        svc.replicas.close()


def call(method: Any, request: Any) -> Aborted:
    with pytest.raises(Aborted) as info:
        method(request, FakeContext())
    return info.value


def test_a_failing_load_start_frees_its_reservation(
    service: AgentService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("no receiver")

    monkeypatch.setattr(server_mod, "ShardReceiver", broken)
    arena: SramArena = service.chips[0].arena
    err = call(service.LoadShard, iter(messages(make_shard(MiB), 0)))
    assert err.code is grpc.StatusCode.INTERNAL and "no receiver" in err.message
    assert arena.accounted == 0 and not service.chips[0].loading


class RaisingProgram:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def step(self, batch: Any) -> Any:
        raise self.exc


@pytest.mark.parametrize(
    ("blob", "exc"),
    [
        (b"", None),
        (b"garbage" * 10, None),
        (b"short cursor", None),
        (b"valid", ValueError("operands could not be broadcast")),
        (b"valid", struct.error("unpack requires a buffer of 8 bytes")),
    ],
)
def test_execute_on_bad_input_is_invalid_argument(
    service: AgentService, blob: bytes, exc: BaseException | None
) -> None:
    chip = service.chips[0]
    block = chip.arena.reserve("x", 16, 16)
    header = type("H", (), {"virtual": False, "label": "shard x", "reserved_bytes": 16})()
    entry = HeldEntry(header, block, "d", 0)  # type: ignore[arg-type]
    entry.program = RaisingProgram(exc or AssertionError("never stepped"))
    chip.held["x"] = entry
    if blob == b"valid":
        blob = Activation.for_tokens([0], [0], [1]).to_bytes()
    if blob == b"short cursor":
        act = Activation.for_tokens([0], [0], [1])
        meta = {"version": ACTIVATION_VERSION, "cursor": [0]}
        blob = encode_safetensors(act._arrays(), {ACTIVATION_KEY: json.dumps(meta)})
    err = call(service.Execute, agent_pb2.ExecuteRequest(chip=0, shard_id="x", activation=blob))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT, err.message
    if exc is not None:
        assert str(exc) in err.message


class IdleStepper:
    def step(self, batch: Any) -> Any:
        raise AssertionError("never stepped")


def host_replica(service: AgentService, stages: int = 1) -> StageRunner:
    """A replica whose stage `stages - 1` is hosted by `service` (not started: no thread)."""
    stage = stages - 1
    runner = StageRunner(
        label="r",
        stage=stage,
        schedule=Schedule(stages, 2),
        window=1,
        replica_chips=["c0"],
        stepper=IdleStepper(),  # type: ignore[arg-type]
        journal=Journal(2, 16, 8, None) if stage == 0 else None,
        vocab_size=32,
    )
    service.replicas._replicas[("d", 0)] = Replica("d", 0, {stage: runner}, {}, 32)
    return runner


def test_start_epoch_with_an_unknown_chip_is_failed_precondition(service: AgentService) -> None:
    host_replica(service, stages=2)
    req = agent_pb2.StartEpochRequest(deployment="d", epoch=0, tick=0, ready_chips=["nope"])
    err = call(service.StartEpoch, req)
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION and "nope" in err.message


def test_concurrent_start_epochs_resume_once(service: AgentService) -> None:
    runner = host_replica(service, stages=2)
    req = agent_pb2.StartEpochRequest(deployment="d", epoch=3, tick=0, ready_chips=[])
    errors: list[BaseException] = []
    resumes: list[int] = []
    resume = runner.resume

    def slow_resume(epoch: int, tick: int) -> None:  # widens the check-then-resume race
        resumes.append(epoch)
        time.sleep(0.05)
        resume(epoch, tick)

    runner.resume = slow_resume  # type: ignore[method-assign]

    def start() -> None:
        try:
            service.StartEpoch(req, FakeContext())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert runner.machine.epoch == 3 and resumes == [3]


def generate(service: AgentService, context: FakeContext, **fields: Any) -> Aborted:
    req = agent_pb2.GenerateRequest(deployment="d", request_id="q", prompt_ids=[1, 2], **fields)
    with pytest.raises(Aborted) as info:
        list(service.Generate(req, context))
    return info.value


def test_an_expired_deadline_is_not_infinite(service: AgentService) -> None:
    host_replica(service)

    class Expired(FakeContext):
        def time_remaining(self) -> float | None:
            return 0.0

    started = time.monotonic()
    err = generate(service, Expired(), max_tokens=2, deadline_ms=30_000)
    assert err.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


def test_a_cancelled_request_is_cancelled_not_a_stopped_pipeline(service: AgentService) -> None:
    runner = host_replica(service)

    class CancelsAtOnce(FakeContext):
        def send_initial_metadata(self, metadata: Any) -> None:
            runner.cancel("q")

    err = generate(service, CancelsAtOnce(), max_tokens=2)
    assert err.code is grpc.StatusCode.CANCELLED, err
    assert "stopped" not in err.message


def test_an_ended_link_stream_no_longer_takes_the_stages_credits() -> None:
    """Acks of a stage whose upstream link stream ended must not go into that dead stream's
    queue; the next stream to deliver a frame binds the stage again."""
    runner = StageRunner(
        label="r",
        stage=1,
        schedule=Schedule(2, 2),
        window=1,
        replica_chips=["c0"],
        stepper=IdleStepper(),  # type: ignore[arg-type]
    )
    service = LinkService(lambda d, r, s: runner, "t0")
    frame = link_frame("d", 0, 1, Frame(0, 0, 0, b""))
    first: queue.SimpleQueue[Any] = queue.SimpleQueue()
    service._read(iter([frame]), first)  # the stream delivers one frame, then ends
    assert runner._ack_upstream is None and runner._stop_upstream is None
    newer: list[tuple[int, int]] = []
    runner.set_upstream(lambda t, e: newer.append((t, e)), lambda m: None)  # a newer stream
    service._read(iter([]), queue.SimpleQueue())  # an older stream ending binds nothing
    assert runner._ack_upstream is not None, "an ending stream only unbinds its own callback"
