"""The agent's RPC error mapping, in process: every failure becomes a named gRPC status (never
UNKNOWN) and leaves nothing reserved."""

from __future__ import annotations

import json
import logging
import queue
import struct
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from agent_helpers import make_shard, messages

from agents import server as server_mod
from agents.activation import ACTIVATION_KEY, ACTIVATION_VERSION, Activation
from agents.arena import SramArena
from agents.interconnect import LinkService, Target, link_frame
from agents.journal import Journal
from agents.lockstep import Frame, Schedule
from agents.pipeline import StageRunner
from agents.replicas import Replica
from agents.server import AgentService, HeldEntry
from agents.settings import AgentSettings
from protos import agent_pb2
from shardformat.codec import encode_safetensors

MiB = 1 << 20


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class FakeContext:
    """The parts of `grpc.ServicerContext` the service uses; `abort` marks the state aborted
    the way grpc's does."""

    def __init__(self) -> None:
        self._state = SimpleNamespace(aborted=False)

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self._state.aborted = True
        raise Aborted(code, message)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

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
    frame = link_frame("d", 0, 1, Frame(0, 0, None, b""))
    target = Target("d", 0, 1, 1)

    def first(tick: int, epoch: int) -> None:
        raise AssertionError("the first stream consumed nothing")

    assert runner.bind_upstream(1, first, lambda m: None, lambda m: None) is None
    service._read(iter([frame]), queue.SimpleQueue(), (target, runner), first, [0.0])
    assert runner._ack_upstream is None and runner._stop_upstream is None
    newer: list[tuple[int, int]] = []

    def second(tick: int, epoch: int) -> None:
        newer.append((tick, epoch))

    assert runner.bind_upstream(2, second, lambda m: None, lambda m: None) is None
    service._read(iter([]), queue.SimpleQueue(), (target, runner), first, [0.0])
    assert runner._ack_upstream is second, "an ending stream only unbinds its own callback"


# --- malformed fields and echoed strings (issue 7) -------------------------------------------


def hold_raising_shard(service: AgentService, chip_index: int = 0) -> None:
    chip = service.chips[chip_index]
    block = chip.arena.reserve("x", 16, 16)
    header = type("H", (), {"virtual": False, "label": "shard x", "reserved_bytes": 16})()
    entry = HeldEntry(header, block, "d", 0)  # type: ignore[arg-type]
    entry.program = RaisingProgram(AssertionError("never stepped"))  # type: ignore[assignment]
    chip.held["x"] = entry


@pytest.mark.parametrize("cursor", ["1e400", "-1e400", "NaN", '"a"', "[1e400, 0]", "{}"])
def test_an_execute_cursor_out_of_range_is_invalid_argument(
    service: AgentService, cursor: str
) -> None:
    """JSON numbers such as 1e400 parse to inf; int(inf) raises OverflowError, which used to
    escape as UNKNOWN."""
    hold_raising_shard(service)
    act = Activation.for_tokens([0], [0], [1])
    meta = f'{{"version": {ACTIVATION_VERSION}, "cursor": {cursor}}}'
    blob = encode_safetensors(act._arrays(), {ACTIVATION_KEY: meta})
    err = call(service.Execute, agent_pb2.ExecuteRequest(chip=0, shard_id="x", activation=blob))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT, err.message
    assert "activation" in err.message


def test_an_execute_input_over_the_bound_is_refused_before_parsing() -> None:
    svc = AgentService("t0", "dev", 1, 4 * MiB, settings=AgentSettings(max_execute_bytes=1000))
    try:
        hold_raising_shard(svc)
        request = agent_pb2.ExecuteRequest(chip=0, shard_id="x", activation=bytes(1001))
        err = call(svc.Execute, request)
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "exceeds 1000" in err.message
    finally:
        svc.close()


@pytest.mark.parametrize("chip", [2, 1 << 31, (1 << 32) - 1])
def test_a_chip_index_out_of_range_is_invalid_argument(service: AgentService, chip: int) -> None:
    for method, request in [
        (service.Execute, agent_pb2.ExecuteRequest(chip=chip, shard_id="x")),
        (service.UnloadShard, agent_pb2.UnloadShardRequest(chip=chip, shard_id="x")),
        (service.MarkChipFailed, agent_pb2.MarkChipFailedRequest(chip=chip)),
    ]:
        err = call(method, request)
        assert err.code is grpc.StatusCode.INVALID_ARGUMENT and "does not exist" in err.message


HUGE = "d" * (4 << 20)


def test_a_4mb_name_is_clipped_in_errors_and_logs(
    service: AgentService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lockstep")
    calls = [
        (service.RemoveReplica, agent_pb2.RemoveReplicaRequest(deployment=HUGE)),
        (service.Halt, agent_pb2.HaltRequest(deployment=HUGE)),
        (service.StartEpoch, agent_pb2.StartEpochRequest(deployment=HUGE)),
        (service.UnloadShard, agent_pb2.UnloadShardRequest(chip=0, shard_id=HUGE)),
        (service.Execute, agent_pb2.ExecuteRequest(chip=0, shard_id=HUGE)),
    ]
    for method, request in calls:
        err = call(method, request)
        assert err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert "ddd" in err.message and len(err.message) < 2000, len(err.message)
    with pytest.raises(Aborted) as info:
        service.Generate(agent_pb2.GenerateRequest(deployment=HUGE, prompt_ids=[1]), FakeContext())
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert len(info.value.message) < 2000
    assert caplog.records and max(len(r.getMessage()) for r in caplog.records) < 2000


def test_a_4mb_failure_reason_is_clipped_in_status(service: AgentService) -> None:
    reply = service.MarkChipFailed(
        agent_pb2.MarkChipFailedRequest(chip=1, reason=HUGE), FakeContext()
    )
    assert reply.chip.failure_reason.startswith("ddd")
    assert len(reply.chip.failure_reason) < 300
    status = service.Status(agent_pb2.StatusRequest(), FakeContext())
    assert len(status.chips[1].failure_reason) < 300


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"peer": "127.0.0.1:1", "count": 10_001}, "count from 1 to 10000"),
        ({"peer": "127.0.0.1:1", "count": 0}, "count from 1 to 10000"),
        ({"peer": "", "count": 1}, "needs a peer"),
        ({"peer": "127.0.0.1:1", "count": 1, "payload_bytes": (1 << 20) + 1}, "payload_bytes"),
        ({"peer": "127.0.0.1:1", "count": 1, "payload_bytes": 512 << 20}, "payload_bytes"),
    ],
)
def test_link_ping_is_capped(service: AgentService, fields: dict[str, Any], words: str) -> None:
    err = call(service.LinkPing, agent_pb2.LinkPingRequest(**fields))
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and words in err.message


def test_an_unexpected_exception_is_internal_with_one_line(
    service: AgentService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(index: int) -> Any:
        raise RuntimeError("surprise\nsecond line")

    monkeypatch.setattr(service.replicas, "chip_status", broken)
    caplog.set_level(logging.WARNING, logger="lockstep")
    err = call(service.Status, agent_pb2.StatusRequest())
    assert err.code is grpc.StatusCode.INTERNAL
    assert "RuntimeError: surprise" in err.message and "second line" not in err.message
    assert "Traceback" not in caplog.text and "second line" not in caplog.text


def test_an_exception_while_streaming_tokens_maps_through_the_table(
    service: AgentService, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_replica(service)

    def broken(*args: Any) -> Iterator[Any]:
        raise RuntimeError("stream broke")
        yield

    monkeypatch.setattr(service.replicas, "_stream_tokens", broken)
    err = generate(service, FakeContext(), max_tokens=2)
    assert err.code is grpc.StatusCode.INTERNAL and "RuntimeError: stream broke" in err.message


def test_link_ping_to_nowhere_is_unavailable_and_holds_a_stream_place(
    service: AgentService,
) -> None:
    request = agent_pb2.LinkPingRequest(peer="127.0.0.1:1", count=1)
    err = call(service.LinkPing, request)
    assert err.code is grpc.StatusCode.UNAVAILABLE and "127.0.0.1:1" in err.message
    assert service.streams.total == 0, "the ping gave its place back"
    for _ in range(service.settings.max_streams_per_peer):
        service.streams.enter("ipv4:127.0.0.1", "LoadShard")
    err = call(service.LinkPing, request)
    assert err.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams_per_peer" in err.message
