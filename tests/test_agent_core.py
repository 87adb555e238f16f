"""The agent's small pure parts: the status-code table, stream admission, settings, clipping,
the chip tables and binding — and that `lpuctl plan` stays free of gRPC and BLAS settings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import grpc
import pytest

from agents import errors
from agents.arena import ArenaExhausted
from agents.chips import make_chips
from agents.journal import JournalError, QueueFull
from agents.lockstep import ProtocolError
from agents.settings import AgentSettings
from agents.stage_core import Stopped
from agents.status_codes import MESSAGE_LIMIT, status_of
from agents.streams import StreamGate
from agents.text import clip, quote
from shardformat.errors import ExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPECTED = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


@pytest.mark.parametrize(("cls", "code"), EXPECTED.items())
def test_every_agent_error_maps_to_its_code(cls: type[errors.AgentError], code: object) -> None:
    assert status_of(cls("what went wrong")) == (code, "what went wrong")


def test_every_agent_error_class_is_in_the_table() -> None:
    assert set(errors.AgentError.__subclasses__()) == set(EXPECTED)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ArenaExhausted(0, "shard x", 10, 5, 10), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (QueueFull("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (JournalError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (Stopped("the pipeline is stopped"), grpc.StatusCode.FAILED_PRECONDITION),
        (ExecutionError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (ProtocolError("old epoch"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_domain_errors_map_to_their_codes(exc: Exception, code: object) -> None:
    assert status_of(exc)[0] == code


def test_an_unknown_exception_is_internal_one_line_traceback_at_debug_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lockstep.agent")
    try:
        raise ZeroDivisionError("first\nsecond")
    except ZeroDivisionError as exc:
        code, message = status_of(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert message == "internal error: ZeroDivisionError: first"
    [record] = caplog.records
    assert record.levelno == logging.DEBUG and record.exc_info is not None


def test_status_messages_are_bounded() -> None:
    code, message = status_of(errors.NotFound("x" * (4 << 20)))
    assert code == grpc.StatusCode.NOT_FOUND and len(message) < MESSAGE_LIMIT + 50


def test_clip_and_quote() -> None:
    assert clip("short") == "short"
    long = clip("a" * 1000, 10)
    assert long.startswith("a" * 10) and "990 more characters" in long and len(long) < 50
    assert quote("b" * 1000, 5).startswith("'bbbbb")


def test_stream_gate_bounds_per_peer_and_in_all() -> None:
    gate = StreamGate(max_total=3, max_per_peer=2)
    gate.enter("a", "LoadShard")
    gate.enter("a", "LoadShard")
    with pytest.raises(errors.ResourceExhausted, match="max_streams_per_peer 2"):
        gate.enter("a", "LoadShard")
    gate.enter("b", "Exchange")
    with pytest.raises(errors.ResourceExhausted, match="max_streams 3"):
        gate.enter("c", "Exchange")
    gate.leave("a")
    gate.enter("c", "Exchange")
    assert gate.total == 3 and gate.open_of("a") == 1 and gate.open_of("c") == 1
    assert gate.refused() == {"LoadShard": 1, "Exchange": 1}  # for the agent's metrics
    for peer in ("a", "b", "c"):
        gate.leave(peer)
    assert gate.total == 0 and gate.open_of("a") == 0


def test_a_reserved_peer_has_places_outside_the_total() -> None:
    gate = StreamGate(max_total=2, max_per_peer=2, reserved=frozenset({"cp"}))
    gate.enter("a", "Exchange")
    gate.enter("b", "Exchange")
    with pytest.raises(errors.ResourceExhausted, match="max_streams 2"):
        gate.enter("c", "Exchange")
    gate.enter("cp", "LoadShard")  # the total is full, the reserved peer still gets in
    gate.enter("cp", "Generate")
    with pytest.raises(errors.ResourceExhausted, match="max_streams_per_peer 2"):
        gate.enter("cp", "Generate")
    assert gate.total == 2 and gate.open_of("cp") == 2
    for peer in ("a", "b", "cp", "cp"):
        gate.leave(peer)
    assert gate.total == 0 and gate.open_of("cp") == 0


def test_stream_gate_counts_exactly_under_contention() -> None:
    gate = StreamGate(max_total=1000, max_per_peer=1000)

    def churn() -> None:
        for _ in range(500):
            gate.enter("p", "m")
            gate.leave("p")

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert gate.total == 0


def test_settings_are_frozen_validated_and_size_the_pool() -> None:
    s = AgentSettings()
    assert s.workers > s.max_streams >= s.max_streams_per_peer
    with pytest.raises(AttributeError):
        s.window = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="max_streams"):
        AgentSettings(max_streams=0)
    with pytest.raises(ValueError, match="load_idle_timeout"):
        AgentSettings(load_idle_timeout=0)


def test_a_chip_is_bound_to_one_replica_at_a_time() -> None:
    [chip] = make_chips(1, 1 << 20)
    chip.bind("'a'/replica-0")
    chip.bind("'a'/replica-0")  # the same replica again: fine
    with pytest.raises(errors.AlreadyExists, match=r"chip 0 is bound to replica 'a'/replica-0"):
        chip.bind("'b'/replica-0")
    chip.release("'b'/replica-0")  # not the holder: no effect
    assert chip.bound_to == "'a'/replica-0"
    chip.release("'a'/replica-0")
    chip.bind("'b'/replica-0")
    assert chip.snapshot().bound_to == "'b'/replica-0"


def test_chip_fail_frees_everything_and_recover_clears_the_reason() -> None:
    [chip] = make_chips(1, 1 << 20)
    lost, snap = chip.fail("x" * 10)
    assert lost == [] and snap.failed_reason == "x" * 10 and snap.used == 0
    with pytest.raises(errors.FailedPrecondition, match="is failed"):
        chip.entry_for("s", "execute")
    assert chip.recover().failed_reason is None
    with pytest.raises(errors.NotFound, match="does not hold"):
        chip.entry_for("s", "execute")


def test_lpuctl_plan_imports_no_grpc_and_sets_no_blas_threads() -> None:
    """`lpuctl plan` is a pure planning command: it must not pull in gRPC (the agent's server)
    nor change the process's BLAS threading (which the agent sets for itself)."""
    script = (
        "import os, sys\n"
        "from orchestrator.cli import main\n"
        "code = main(['plan', '-f', 'manifests/examples/tiny-llama.yaml', '-o', 'json'])\n"
        "assert code == 0, code\n"
        "bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.'))\n"
        "assert not bad, bad\n"
        "blas = [v for v in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS')"
        " if v in os.environ]\n"
        "assert not blas, blas\n"
        "print('clean', file=sys.stderr)\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "clean" in done.stderr


def test_a_replica_not_configured_here_is_not_found_and_an_empty_name_is_invalid() -> None:
    """StartEpoch, Halt, RemoveReplica, StageDigests and InjectFault on an empty agent: a
    well-formed request naming no replica here is NOT_FOUND (the control plane's removal takes
    it as already gone), an empty deployment name INVALID_ARGUMENT; Generate too (its gateway
    resumes the request on another replica)."""
    from agents import canary
    from agents.replicas import ReplicaHost
    from protos import agent_pb2

    host = ReplicaHost(make_chips(1, 1 << 20), AgentSettings(allow_fault_injection=True))
    digests = {"first_tick": 0, "period": 4, "count": 1}
    calls = {
        "StartEpoch": lambda d: host.start_epoch(agent_pb2.StartEpochRequest(deployment=d)),
        "Halt": lambda d: host.halt(agent_pb2.HaltRequest(deployment=d, replica=2)),
        "RemoveReplica": lambda d: host.remove(d, 2),
        "StageDigests": lambda d: canary.stage_digests(
            host, agent_pb2.StageDigestsRequest(deployment=d, **digests), host.settings
        ),
        "InjectFault": lambda d: canary.inject_fault(
            host, agent_pb2.InjectFaultRequest(deployment=d), host.settings
        ),
    }
    for name, call in calls.items():
        with pytest.raises(errors.AgentError) as info:
            call("nobody")
        code, message = status_of(info.value)
        assert code == grpc.StatusCode.NOT_FOUND, (name, code)
        assert "'nobody'" in message and "is not configured on this agent" in message, message
        with pytest.raises(errors.AgentError) as info:
            call("")
        code, message = status_of(info.value)
        assert (code, message) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "deployment must not be empty",
        ), name
    generate = agent_pb2.GenerateRequest(deployment="nobody", prompt_ids=[1], max_tokens=2)
    with pytest.raises(errors.AgentError) as info:
        next(iter(host.generate(generate, None)))  # type: ignore[arg-type]
    code, message = status_of(info.value)
    assert code == grpc.StatusCode.NOT_FOUND
    assert "is not configured on this agent" in message
