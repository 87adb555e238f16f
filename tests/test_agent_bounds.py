"""Nothing can hold the agent (issue 7): silent streams are bounded per peer and in all and
ended at their idle timeout; Status and health answer within 100 ms while 100 hostile streams
are open; malformed bytes and huge strings give INVALID_ARGUMENT with bounded messages.

Agents are real processes on loopback; every case checks that the agent still answers and
that its chips are as they were.
"""

from __future__ import annotations

import json
import statistics
import struct
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from agent_helpers import (
    AgentCluster,
    AgentProcess,
    credentials,
    load,
    make_shard,
    messages,
    shard_id,
    wait_for,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agents.interconnect import EXCHANGE
from agents.settings import DEFAULT_SETTINGS
from orchestrator import agent_client
from protos import agent_pb2, interconnect_pb2
from security.identity import agent_identity
from security.tls import open_channel

MiB = 1 << 20
PER_PEER = DEFAULT_SETTINGS.max_streams_per_peer


@pytest.fixture(scope="module")
def cluster(agent_cluster: AgentCluster) -> AgentCluster:
    return agent_cluster


class Silent:
    """A request iterator that sends nothing until `release` is set (then ends)."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def __iter__(self) -> Iterator[bytes]:
        self.release.wait(120)
        return
        yield b""  # a generator that yields nothing


def exchange(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    return channel.stream_stream(
        EXCHANGE,
        request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
        response_deserializer=interconnect_pb2.LinkAck.FromString,
    )


def assert_clean(agent: AgentProcess) -> None:
    for chip in agent.status().chips:
        assert chip.sram_used_bytes == 0 and chip.sram_loading_bytes == 0 and not chip.loads
        assert chip.sram_free_bytes == chip.sram_capacity_bytes


def test_status_and_health_answer_within_100ms_while_100_hostile_streams_are_open(
    cluster: AgentCluster,
) -> None:
    agent = cluster.start("hostile", chips=2)
    release = threading.Event()
    # Two authenticated peers: the control plane (loads) and another agent (links); each may
    # hold PER_PEER streams, so 2 x (50 - PER_PEER) of the 100 are refused at once.
    control = [agent.dial() for _ in range(5)]
    rogue = [agent.dial(identity=agent_identity("rogue")) for _ in range(5)]
    channels = [*control, *rogue]
    load_calls, link_calls = [], []
    try:
        for i in range(100):  # 50 loads that never send a header, 50 links that never send
            channel = control[i % 5] if i % 2 else rogue[i % 5]
            if i % 2:
                load_calls.append(
                    agent_client.load_call(channel).future(iter(Silent(release)), timeout=60)
                )
            else:
                link_calls.append(exchange(channel)(iter(Silent(release)), timeout=60))
        calls = [*load_calls, *link_calls]

        def refused() -> list[grpc.Future]:
            return [c for c in calls if c.done()]

        done = wait_for(
            lambda: len(refused()) >= 2 * (50 - PER_PEER) and refused(),
            timeout=30,
            what=f"{2 * (50 - PER_PEER)} streams to be refused",
        )
        assert len(done) == 2 * (50 - PER_PEER), "exactly the streams over the per-peer bound end"
        for call in done:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams" in str(call.details()), call.details()

        health = health_pb2_grpc.HealthStub(agent.channel)
        agent.status()  # warm the client's channel
        status_ms, health_ms = [], []
        for _ in range(30):
            t = time.perf_counter()
            reply = agent.stub.Status(agent_pb2.StatusRequest(), timeout=1)
            status_ms.append((time.perf_counter() - t) * 1e3)
            assert reply.node == "hostile"
            t = time.perf_counter()
            check = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            health_ms.append((time.perf_counter() - t) * 1e3)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
        print(
            f"Status p50 {statistics.median(status_ms):.2f} ms max {max(status_ms):.2f} ms; "
            f"health p50 {statistics.median(health_ms):.2f} ms max {max(health_ms):.2f} ms"
        )
        assert max(status_ms) < 100 and max(health_ms) < 100, (status_ms, health_ms)
    finally:
        release.set()
        for call in link_calls:
            call.cancel()
        for call in load_calls:
            call.cancel()
        for channel in channels:
            channel.close()
    # Every stream's count came back: a real load, then the agent is as it was.
    blob = make_shard(MiB, seed=3)
    wait_for(lambda: _loads(agent, blob), timeout=20, what="a load after the hostile streams")
    agent.stub.UnloadShard(agent_pb2.UnloadShardRequest(chip=0, shard_id=shard_id(blob)))
    assert_clean(agent)


def _loads(agent: AgentProcess, blob: bytes) -> bool:
    try:
        load(agent, blob, 0)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return False  # a stream of the hostile client is still being torn down
        raise
    return True


def test_a_load_that_sends_no_header_is_ended_and_frees_its_stream(
    cluster: AgentCluster,
) -> None:
    agent = cluster.start("silent", chips=1, extra=("--load-idle-timeout", "0.5"))
    release = threading.Event()
    try:
        first = [
            agent_client.load_call(agent.channel).future(iter(Silent(release)), timeout=30)
            for _ in range(PER_PEER + 4)
        ]
        for call in first:
            with pytest.raises(grpc.RpcError):
                call.result(timeout=20)
        codes = sorted(c.code().name for c in first)
        assert codes.count("DEADLINE_EXCEEDED") == PER_PEER, codes
        assert codes.count("RESOURCE_EXHAUSTED") == 4, codes
        timed_out = next(c for c in first if c.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
        assert "no LoadShard header within 0.5 s" in str(timed_out.details())
        # The ended streams gave their places back: as many silent streams fit again.
        second = [
            agent_client.load_call(agent.channel).future(iter(Silent(release)), timeout=30)
            for _ in range(PER_PEER)
        ]
        for call in second:
            with pytest.raises(grpc.RpcError):
                call.result(timeout=20)
            assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
    assert_clean(agent)
    assert "sent no header for 0.5 s" in agent.stderr()


# --- malformed blobs and huge strings ----------------------------------------------------------


def safetensors_blob(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture(scope="module")
def plain(cluster: AgentCluster) -> AgentProcess:
    return cluster.start("plain", chips=2)


@pytest.mark.parametrize(
    "blob",
    [
        safetensors_blob({"__metadata__": {"lockstep.manifest": "5"}}),
        safetensors_blob({"__metadata__": {"lockstep.manifest": "[1, 2]"}}),
        safetensors_blob({"__metadata__": ["not", "a", "mapping"]}),
        safetensors_blob(
            {"w": {"dtype": "U8", "shape": [1 << 64], "data_offsets": [0, 4]}}, b"abcd"
        ),
        safetensors_blob({"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 4]}}, b"abcd"),
        safetensors_blob([1, 2, 3]),
        struct.pack("<Q", 1 << 63) + b"{}",
    ],
    ids=[
        "manifest-number",
        "manifest-list",
        "metadata-list",
        "shape-2^64",
        "shape-neg",
        "list",
        "huge-length",
    ],
)
def test_malformed_blobs_are_invalid_argument_and_change_nothing(
    plain: AgentProcess, blob: bytes
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        agent_client.send_load(plain.channel, messages(blob, 1), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert_clean(plain)
    assert "Traceback" not in plain.stderr()


def test_a_4mb_deployment_name_gives_a_bounded_error_and_log_line(plain: AgentProcess) -> None:
    huge = "n" * (4 << 20)
    options = [("grpc.max_send_message_length", 16 << 20)]
    with open_channel(
        plain.address, credentials(plain.certs), peer=plain.identity, options=options
    ) as channel:
        from protos import agent_pb2_grpc

        stub = agent_pb2_grpc.AgentStub(channel)
        for call, request in [
            (stub.RemoveReplica, agent_pb2.RemoveReplicaRequest(deployment=huge)),
            (stub.Halt, agent_pb2.HaltRequest(deployment=huge)),
            (
                stub.ConfigureReplica,
                agent_pb2.ConfigureReplicaRequest(
                    deployment=huge,
                    stages=1,
                    max_batch=1,
                    max_context=2,
                    window=1,
                    assignments=[
                        agent_pb2.StageAssignment(
                            stage=0, chips=[0], shard_ids=["x"], chip_names=["c"]
                        )
                    ],
                    replica_chips=["c"],
                ),
            ),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=30)
            code = info.value.code()
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), code
            assert len(str(info.value.details())) < 2000
        with pytest.raises(grpc.RpcError) as info:
            list(
                stub.Generate(
                    agent_pb2.GenerateRequest(deployment=huge, prompt_ids=[1]), timeout=30
                )
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(str(info.value.details())) < 2000
    assert plain.status().node == "plain"
    assert max(len(line) for line in plain.stderr().splitlines()) < 2000
    assert_clean(plain)
