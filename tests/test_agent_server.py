"""The node agent end to end: real agent processes on loopback, real safetensors shards.

Every failure path must end with a clear gRPC status and leave the chip as it was: nothing
held, no load in flight, SRAM used back to its previous value.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_helpers import (
    ROOT,
    AgentCluster,
    AgentProcess,
    PausedStream,
    load,
    make_shard,
    make_virtual_shard,
    messages,
    read_line,
    run_in_threads,
    shard_id,
    wait_for,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orchestrator import agent_client
from protos import agent_pb2, load_stream

MiB = 1 << 20
DEV_SRAM = 2 * MiB


@pytest.fixture(scope="module")
def cluster(agent_cluster: AgentCluster) -> AgentCluster:
    return agent_cluster


@pytest.fixture(scope="module")
def nodes(cluster: AgentCluster) -> list[AgentProcess]:
    return [cluster.start("n0"), cluster.start("n1")]


@pytest.fixture
def n0(nodes: list[AgentProcess]) -> AgentProcess:
    return nodes[0]


@pytest.fixture(autouse=True)
def clean_chips(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: every chip of the shared agents healthy and empty, nothing in flight."""
    yield
    if "nodes" not in request.fixturenames:
        return
    for agent in request.getfixturevalue("nodes"):
        for chip in agent.status().chips:
            if chip.health != agent_pb2.CHIP_HEALTH_HEALTHY:
                agent.stub.MarkChipFailed(
                    agent_pb2.MarkChipFailedRequest(chip=chip.chip, recover=True)
                )
            for shard in chip.shards:
                agent.stub.UnloadShard(
                    agent_pb2.UnloadShardRequest(chip=chip.chip, shard_id=shard.shard_id)
                )
        wait_for(
            lambda a=agent: all(not c.loads and c.sram_used_bytes == 0 for c in a.status().chips),
            what="clean chips",
        )


def expect_error(code: grpc.StatusCode, call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


def assert_clean(agent: AgentProcess, chip: int, used_before: int = 0) -> None:
    status = agent.chip(chip)
    assert status.sram_used_bytes == used_before
    assert status.sram_loading_bytes == 0 and not status.loads
    assert status.sram_free_bytes == status.sram_capacity_bytes - used_before


# --- service plumbing ------------------------------------------------------------------------


def test_health_check_serving(n0: AgentProcess) -> None:
    stub = health_pb2_grpc.HealthStub(n0.channel)
    for service in ("", "lockstep.agent.v1.Agent"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_agent_service(n0: AgentProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(n0.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {s.name for s in reply.list_services_response.service}
    assert {"lockstep.agent.v1.Agent", "grpc.health.v1.Health"} <= names
    files = next(
        iter(
            stub.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="lockstep.agent.v1.Agent"
                        )
                    ]
                ),
                timeout=5,
            )
        )
    )
    assert files.file_descriptor_response.file_descriptor_proto


def test_status_reports_every_chip(n0: AgentProcess) -> None:
    status = n0.status()
    assert (status.node, status.profile, len(status.chips)) == ("n0", "dev", 8)
    for i, chip in enumerate(status.chips):
        assert chip.chip == i and chip.health == agent_pb2.CHIP_HEALTH_HEALTHY
        assert chip.sram_capacity_bytes == DEV_SRAM == chip.sram_free_bytes


# --- loading ---------------------------------------------------------------------------------


def test_load_status_unload_roundtrip(n0: AgentProcess) -> None:
    blob = make_shard(MiB, seed=1)
    reply = load(n0, blob, 2)
    assert (reply.already_loaded, reply.bytes_received, reply.chip) == (False, len(blob), 2)
    assert reply.shard_id == shard_id(blob) and reply.digest_algorithm == "blake3"
    chip = n0.chip(2)
    assert [s.shard_id for s in chip.shards] == [shard_id(blob)]
    assert chip.shards[0].size_bytes == len(blob) == chip.sram_used_bytes
    assert chip.sram_free_bytes == DEV_SRAM - len(blob)
    freed = n0.stub.UnloadShard(agent_pb2.UnloadShardRequest(chip=2, shard_id=shard_id(blob)))
    assert freed.freed_bytes == len(blob)
    assert_clean(n0, 2)


def test_sha256_verification_and_plain_protobuf_client(n0: AgentProcess) -> None:
    """sha256 mode verifies the audit digest (and the BLAKE3 id); the generated stub works."""
    blob = make_shard(300_000, seed=2)
    header = agent_client.make_header(blob, 1, algorithm="sha256")
    requests = [agent_pb2.LoadShardRequest(header=header)] + [
        agent_pb2.LoadShardRequest(chunk=blob[i : i + 100_000])
        for i in range(0, len(blob), 100_000)
    ]
    reply = n0.stub.LoadShard(iter(requests), timeout=30)
    assert reply.digest == hashlib.sha256(blob).hexdigest() and reply.digest_algorithm == "sha256"
    assert reply.shard_id == shard_id(blob)
    assert [s.shard_id for s in n0.chip(1).shards] == [shard_id(blob)]


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_tampered_blob_under_the_real_id_is_refused(n0: AgentProcess, algorithm: str) -> None:
    """Bytes that are not what the shard id says are DATA_LOSS and nothing is held, even when
    the header's own digest (sha256 of the tampered bytes) matches; the real blob then loads."""
    blob = make_shard(MiB, seed=30)
    tampered = bytearray(blob)
    tampered[-1] ^= 0xFF  # a weight byte: still a valid safetensors blob
    header = agent_client.make_header(
        bytes(tampered), 6, algorithm=algorithm, shard_id=shard_id(blob)
    )
    stream = load_stream.load_messages(header, bytes(tampered), 256 << 10)
    details = expect_error(grpc.StatusCode.DATA_LOSS, agent_client.send_load, n0.channel, stream)
    assert "the shard id" in details and "nothing was committed" in details
    assert_clean(n0, 6)
    assert not n0.chip(6).shards
    reply = load(n0, blob, 6)
    assert not reply.already_loaded and reply.shard_id == shard_id(blob)
    assert [s.shard_id for s in n0.chip(6).shards] == [shard_id(blob)]
    # "Already loaded" only for a header that describes the held shard.
    again = load(n0, blob, 6)
    assert again.already_loaded
    wrong = agent_client.make_header(blob, 6, virtual=True, declared_bytes=len(blob))
    details = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        agent_client.send_load,
        n0.channel,
        load_stream.load_messages(wrong, blob),
    )
    assert "virtual=False" in details and "virtual=True" in details
    assert n0.chip(6).sram_used_bytes == len(blob)


def test_concurrent_loads_to_many_chips_of_two_agents(nodes: list[AgentProcess]) -> None:
    jobs = [
        (agent, chip, make_shard(MiB + chip * 4096, seed=10 * n + chip))
        for n, agent in enumerate(nodes)
        for chip in range(8)
    ]

    def run(agent: AgentProcess, chip: int, blob: bytes) -> None:
        assert not load(agent, blob, chip).already_loaded

    run_in_threads(run, jobs)
    for agent, chip, blob in jobs:
        status = agent.chip(chip)
        assert [s.shard_id for s in status.shards] == [shard_id(blob)]
        assert status.sram_used_bytes == len(blob)


def test_idempotent_reload_returns_at_once(n0: AgentProcess) -> None:
    blob = make_shard(MiB, seed=3)
    first = load(n0, blob, 4)
    used = n0.chip(4).sram_used_bytes
    # The reload's stream is never consumed past the header.
    second = agent_client.send_load(n0.channel, PausedStream(messages(blob, 4), 1), timeout=10)
    assert (first.already_loaded, second.already_loaded) == (False, True)
    assert second.message == "already loaded" and second.bytes_received == 0
    assert n0.chip(4).sram_used_bytes == used and len(n0.chip(4).shards) == 1


def test_progress_visible_while_loading_and_commit_is_atomic(n0: AgentProcess) -> None:
    blob = make_shard(MiB, seed=4)
    stream = PausedStream(messages(blob, 5, chunk=128 << 10), pause_after=4)
    future = agent_client.load_call(n0.channel).future(iter(stream), timeout=30)
    try:
        chip = wait_for(
            lambda: (c := n0.chip(5)).loads and c.loads[0].bytes_loaded > 0 and c,
            what="load progress",
        )
        progress = chip.loads[0]
        assert progress.shard_id == shard_id(blob) and progress.bytes_total == len(blob)
        assert 0 < progress.bytes_loaded < len(blob)
        assert not chip.shards and chip.sram_used_bytes == 0
        assert chip.sram_loading_bytes == len(blob)
        assert chip.sram_free_bytes == DEV_SRAM - len(blob)
        expect_error(
            grpc.StatusCode.NOT_FOUND,
            n0.stub.Execute,
            agent_pb2.ExecuteRequest(chip=5, shard_id=shard_id(blob)),
        )
        # The same shard onto the same chip while the first load is in flight.
        details = expect_error(grpc.StatusCode.ABORTED, load, n0, blob, 5)
        assert "already being loaded" in details
    finally:
        stream.resume()
    assert future.result(timeout=30).bytes_received == len(blob)
    assert [s.shard_id for s in n0.chip(5).shards] == [shard_id(blob)]


# --- failures: each leaves nothing behind ----------------------------------------------------


def test_corrupted_chunk_is_data_loss(n0: AgentProcess) -> None:
    blob = make_shard(MiB, seed=5)
    stream = messages(blob, 0)
    bad = bytearray(stream[3])
    bad[-1] ^= 0xFF
    stream[3] = bytes(bad)
    details = expect_error(grpc.StatusCode.DATA_LOSS, agent_client.send_load, n0.channel, stream)
    assert "chip 0" in details and "blake3" in details and "node n0" in details
    assert_clean(n0, 0)


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_wrong_digest_is_data_loss(n0: AgentProcess, algorithm: str) -> None:
    blob = make_shard(MiB, seed=6)
    other = make_shard(MiB, seed=7)
    header = agent_client.make_header(other, 0, algorithm=algorithm)  # digests of another blob
    header.size_bytes = len(blob)
    stream = load_stream.load_messages(header, blob, 256 << 10)
    details = expect_error(grpc.StatusCode.DATA_LOSS, agent_client.send_load, n0.channel, stream)
    assert "failed verification" in details
    assert_clean(n0, 0)


def test_short_and_long_streams_are_rejected(n0: AgentProcess) -> None:
    blob = make_shard(MiB, seed=8)
    short = messages(blob, 3)[:-1]
    details = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, agent_client.send_load, n0.channel, short
    )
    assert "stream ended after" in details
    long = [*messages(blob, 3), load_stream.frame_chunk(b"extra")]
    details = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, agent_client.send_load, n0.channel, long
    )
    assert "carries more" in details
    assert_clean(n0, 3)


def test_malformed_streams_are_invalid_argument(n0: AgentProcess) -> None:
    blob = make_shard(4096, seed=9)
    header = agent_client.make_header(blob, 0)
    cases = {
        "empty stream": [],
        "chunk first": [load_stream.frame_chunk(blob)],
        "unknown chip": load_stream.load_messages(agent_client.make_header(blob, 99), blob),
        "bad shard id": [
            load_stream.header_message(
                agent_pb2.LoadShardHeader(shard_id="not-a-digest", chip=0, size_bytes=len(blob))
            )
        ],
        "bad algorithm": [
            load_stream.header_message(
                agent_pb2.LoadShardHeader(
                    shard_id=header.shard_id, chip=0, size_bytes=len(blob), digest_algorithm="md5"
                )
            )
        ],
        "second header": [load_stream.header_message(header), load_stream.header_message(header)],
    }
    for name, stream in cases.items():
        details = expect_error(
            grpc.StatusCode.INVALID_ARGUMENT, agent_client.send_load, n0.channel, stream
        )
        assert details, name
    assert_clean(n0, 0)


def _raw_blob(header: object, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (
            _raw_blob({"w": {"dtype": "U8", "shape": [2**64], "data_offsets": [0, 8]}}, b"\0" * 8),
            "exceeds",
        ),
        (_raw_blob({"__metadata__": ["x"]}), "__metadata__ must be an object"),
        (_raw_blob({"__metadata__": {"lockstep.manifest": "7"}}), "got int"),
        (_raw_blob({"__metadata__": {"lockstep.manifest": "[]"}}), "got list"),
        (
            _raw_blob({"__metadata__": {"lockstep.manifest": '{"format": "lockstep.shard/9"}'}}),
            "unknown version",
        ),
        (_raw_blob([1, 2, 3]), "not an object"),
        (struct.pack("<Q", 2**40) + b"{}", "header length"),
    ],
    ids=[
        "shape-2**64",
        "metadata-list",
        "manifest-number",
        "manifest-list",
        "manifest-version",
        "header-list",
        "header-length",
    ],
)
def test_malformed_blobs_are_invalid_argument(n0: AgentProcess, blob: bytes, match: str) -> None:
    """Bytes that verify but are not a well-formed shard: INVALID_ARGUMENT naming the fault,
    nothing held, and the agent keeps serving."""
    details = expect_error(grpc.StatusCode.INVALID_ARGUMENT, load, n0, blob, 7)
    assert match in details, details
    assert_clean(n0, 7)
    assert not n0.chip(7).shards
    good = make_shard(4096, seed=40)
    assert load(n0, good, 7).shard_id == shard_id(good)


def test_cancelled_stream_frees_everything(n0: AgentProcess) -> None:
    load(n0, make_shard(256 << 10, seed=11), 6)
    before = n0.chip(6).sram_used_bytes
    blob = make_shard(MiB, seed=12)
    stream = PausedStream(messages(blob, 6, chunk=128 << 10), pause_after=3)
    future = agent_client.load_call(n0.channel).future(iter(stream), timeout=30)
    try:
        wait_for(lambda: n0.chip(6).loads, what="the load to be in flight")
        future.cancel()
        wait_for(lambda: not n0.chip(6).loads, what="the cancelled load to be freed")
    finally:
        stream.resume()
    assert future.cancelled()
    assert_clean(n0, 6, used_before=before)
    assert len(n0.chip(6).shards) == 1


def test_killed_client_process_frees_its_load(n0: AgentProcess, session_certs: Path) -> None:
    """A client process dying mid-stream (connection reset) leaves nothing behind."""
    script = (
        "import sys, threading\n"
        "import grpc\n"
        "from agent_helpers import make_shard, messages, PausedStream\n"
        "from orchestrator import agent_client\n"
        "from security import certs, tls\n"
        "cp = certs.load_control_plane(sys.argv[2])\n"
        "ch = tls.open_channel(sys.argv[1], cp, peer=sys.argv[3],\n"
        "                      options=agent_client.channel_options())\n"
        "s = PausedStream(messages(make_shard(1 << 20, seed=13), 7, chunk=1 << 17), 3)\n"
        "f = agent_client.load_call(ch).future(iter(s))\n"
        "s.paused.wait(10)\n"
        "print('streaming', flush=True)\n"
        "threading.Event().wait(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, n0.address, str(session_certs), n0.identity],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"},
    )
    try:
        assert read_line(proc, 20) == "streaming"
        wait_for(lambda: n0.chip(7).loads, what="the client's load to be in flight")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not n0.chip(7).loads, what="the dead client's load to be freed")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert_clean(n0, 7)
    assert not n0.chip(7).shards


def test_over_capacity_is_resource_exhausted(n0: AgentProcess) -> None:
    held = make_shard(MiB + MiB // 2, seed=14)
    load(n0, held, 1)
    used = n0.chip(1).sram_used_bytes
    free = DEV_SRAM - used
    blob = make_shard(MiB, seed=15)
    details = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, load, n0, blob, 1)
    assert "chip 1" in details and f"needs {len(blob)} bytes" in details
    assert f"only {free} bytes free" in details and "node n0" in details
    too_big = make_shard(3 * MiB, seed=16)
    details = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, load, n0, too_big, 0)
    assert f"needs {len(too_big)} bytes" in details and f"{DEV_SRAM} bytes free" in details
    assert_clean(n0, 1, used_before=used)
    assert_clean(n0, 0)


def test_unknown_shard_is_not_found(n0: AgentProcess) -> None:
    unknown = "ab" * 32
    details = expect_error(
        grpc.StatusCode.NOT_FOUND,
        n0.stub.UnloadShard,
        agent_pb2.UnloadShardRequest(chip=0, shard_id=unknown),
    )
    assert "chip 0 does not hold" in details
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        n0.stub.Execute,
        agent_pb2.ExecuteRequest(chip=0, shard_id=unknown),
    )
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        n0.stub.UnloadShard,
        agent_pb2.UnloadShardRequest(chip=42, shard_id=unknown),
    )


def test_failed_chip_refuses_loads_and_executes(n0: AgentProcess) -> None:
    blob = make_shard(MiB, seed=17)
    load(n0, blob, 3)
    reply = n0.stub.MarkChipFailed(agent_pb2.MarkChipFailedRequest(chip=3, reason="ECC storm"))
    assert list(reply.shards_lost) == [shard_id(blob)]
    assert reply.chip.health == agent_pb2.CHIP_HEALTH_FAILED
    assert reply.chip.failure_reason == "ECC storm" and reply.chip.sram_used_bytes == 0
    details = expect_error(grpc.StatusCode.FAILED_PRECONDITION, load, n0, blob, 3)
    assert "chip 3 is failed (ECC storm)" in details
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        n0.stub.Execute,
        agent_pb2.ExecuteRequest(chip=3, shard_id=shard_id(blob)),
    )
    assert_clean(n0, 3)
    assert n0.chip(2).health == agent_pb2.CHIP_HEALTH_HEALTHY  # other chips unaffected
    n0.stub.MarkChipFailed(agent_pb2.MarkChipFailedRequest(chip=3, recover=True))
    assert not load(n0, blob, 3).already_loaded


def test_chip_failing_mid_load_aborts_the_load(n0: AgentProcess) -> None:
    blob = make_shard(MiB, seed=18)
    stream = PausedStream(messages(blob, 2, chunk=128 << 10), pause_after=3)
    future = agent_client.load_call(n0.channel).future(iter(stream), timeout=30)
    try:
        wait_for(lambda: n0.chip(2).loads, what="the load to be in flight")
        n0.stub.MarkChipFailed(agent_pb2.MarkChipFailedRequest(chip=2, reason="test"))
    finally:
        stream.resume()
    with pytest.raises(grpc.RpcError) as info:
        future.result(timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert_clean(n0, 2)
    assert not n0.chip(2).shards


def test_virtual_shard_accounts_declared_bytes(n0: AgentProcess) -> None:
    declared = MiB + MiB // 2
    blob = make_virtual_shard(declared)
    reply = load(n0, blob, 4, virtual=True, declared_bytes=declared)
    assert reply.reserved_bytes == declared and reply.bytes_received == len(blob) < 4096
    chip = n0.chip(4)
    assert chip.sram_used_bytes == declared and chip.shards[0].virtual
    assert chip.shards[0].size_bytes == len(blob)
    second = make_virtual_shard(MiB, seed=1)
    details = expect_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED, load, n0, second, 4, virtual=True, declared_bytes=MiB
    )
    assert f"needs {MiB} bytes" in details
    details = expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        n0.stub.Execute,
        agent_pb2.ExecuteRequest(chip=4, shard_id=shard_id(blob)),
    )
    assert "virtual" in details
    # The header must agree with the manifest.
    details = expect_error(grpc.StatusCode.INVALID_ARGUMENT, load, n0, second, 5)
    assert "virtual" in details
    assert_clean(n0, 5)
    n0.stub.UnloadShard(agent_pb2.UnloadShardRequest(chip=4, shard_id=shard_id(blob)))
    assert_clean(n0, 4)


def test_stalled_client_is_cancelled_after_the_idle_timeout(cluster: AgentCluster) -> None:
    agent = cluster.start("idle", chips=1, extra=("--load-idle-timeout", "0.3"))
    blob = make_shard(MiB, seed=19)
    stream = PausedStream(messages(blob, 0, chunk=128 << 10), pause_after=2)
    future = agent_client.load_call(agent.channel).future(iter(stream), timeout=30)
    try:
        wait_for(lambda: agent.chip(0).loads, what="the load to be in flight")
        wait_for(lambda: not agent.chip(0).loads, timeout=10, what="the idle load to be reaped")
        with pytest.raises(grpc.RpcError) as info:
            future.result(timeout=10)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no data for 0.3 s" in str(info.value.details())
    finally:
        stream.resume()
    assert_clean(agent, 0)
    assert "idle for 0.3 s" in agent.stderr()


def test_load_from_a_file_on_disk(n0: AgentProcess, tmp_path: Path) -> None:
    blob = make_shard(3 * MiB // 2, seed=20)
    path = tmp_path / f"{shard_id(blob)}.safetensors"
    path.write_bytes(blob)
    header = agent_client.make_file_header(path, 0, shard_id=shard_id(blob))
    assert header.digest == agent_client.blob_digest(blob, "blake3")
    reply = agent_client.send_load(n0.channel, agent_client.file_messages(header, path), timeout=30)
    assert reply.bytes_received == len(blob) and n0.chip(0).sram_used_bytes == len(blob)


# --- process lifecycle -----------------------------------------------------------------------


def test_sigterm_stops_gracefully_with_exit_zero(cluster: AgentCluster) -> None:
    agent = cluster.start("lifecycle", chips=2)
    assert agent.status().node == "lifecycle"
    agent.proc.send_signal(signal.SIGTERM)
    # A hang fails here; how fast it stops under load is not this test's business.
    assert agent.proc.wait(timeout=30) == 0
    assert agent.proc.stdout is not None and agent.proc.stdout.read() == ""  # one line only


def test_bad_flags_exit_2_with_a_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agents.main", "--node", "x", "--profile", "dev", "--chips", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "--chips" in done.stderr and not done.stdout
