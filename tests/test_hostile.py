"""The hostile-client suite (issue 7): every attack of the issue against two agent processes
with mutual TLS, each case asserting its exact status code and then the invariants:

* Status still answers on both agents;
* SRAM accounting (per chip used / loading / free) and the shards held are as they were;
* the "ring" replica (tiny-llama, stage 0 on agent h0 chip 0, stage 1 on agent h1 chip 0) is
  still running without error, and — for every case that touches the pipeline, the links or
  the chips it runs on — a request served while the attack runs gets exactly the tokens of the
  single-process `ReferenceExecutor`.

Cases that must stop a replica stage (a frame of a future epoch, a corrupted checksum, a payload
that raises, ...) are sent to a sacrificial replica, "victim" (chip 1 of both agents, the same
shards), configured for the case and removed after it. Chips 2 and 3 are free: loads land there.

The agents run with short idle timeouts (`--load-idle-timeout 1 --link-idle-timeout 3`) so the
starvation cases see silent streams end at their timeouts within the suite's time budget, and
with small framed link port bounds (8 connections in all, 4 per peer) so that filling them is
cheap.

The last test sends 1,000 cheap hostile requests from several threads and checks that the
agent's RSS, thread count and open file descriptors stay flat after a warm-up round.

Many of these attacks are also covered, one by one, in tests/test_agent_*.py; this file is the
single place that runs them all against the same hardened agents with the invariant checks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import shutil
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from agent_helpers import (
    AgentCluster,
    AgentProcess,
    Waiting,
    credentials,
    load,
    make_shard,
    messages,
    sample_manifest,
    scrape,
    tiny_request,
    wait_for,
)
from cryptography import x509

from agents import wire
from agents.activation import ACTIVATION_KEY, ACTIVATION_VERSION, Activation
from agents.executor import ReferenceExecutor, load_shard
from agents.interconnect import (
    EXCHANGE,
    INCARNATION_KEY,
    TARGET_KEY,
    frame_checksum,
    link_frame,
    target_metadata,
)
from agents.lockstep import Frame
from agents.pipeline import encode_token, encode_work
from agents.sampling import Sampling
from agents.settings import DEFAULT_SETTINGS
from orchestrator import agent_client
from orchestrator.compiler import ShardRef, compile_plan
from orchestrator.serving import BringUpOptions, bring_up_replica, configure_requests
from orchestrator.weights import SeededWeights
from placement.models import MODEL_PRESETS
from placement.plan import Plan
from placement.planner import make_plan
from placement.topology import preset_topology
from protos import agent_pb2, agent_pb2_grpc, interconnect_pb2, load_stream
from security import certs
from security.identity import CONTROL_PLANE, LINK_SECRET_KEY, agent_identity
from security.tls import link_metadata, open_channel
from shardformat.address import shard_id_of
from shardformat.codec import encode_safetensors
from shardformat.manifest import MANIFEST_KEY

TINY = MODEL_PRESETS["tiny-llama"]
SEED = 21
RING, VICTIM = "ring", "victim"
RING_SECRET = hashlib.sha256(b"ring").digest()
VICTIM_SECRET = hashlib.sha256(b"victim").digest()
PROMPT = (5, 17, 1024, 3)
N_TOKENS = 5
LOAD_IDLE, LINK_IDLE = 1.0, 3.0
LINK_CONNECTIONS, LINK_CONNECTIONS_PER_PEER = 8, 4  # the framed link port's bounds here
PER_PEER = DEFAULT_SETTINGS.max_streams_per_peer
MAX_STREAMS = DEFAULT_SETTINGS.max_streams
DETAIL_LIMIT = 2000  # characters of an error detail (gRPC's metadata limit is 8 KiB)
CODE = grpc.StatusCode
FREE_CHIP = 2  # holds nothing: loads land here

# --- the world: two agents, a serving ring, a victim replica on demand -----------------------


ChipView = tuple[int, int, int, int, int, tuple[tuple[str, int, str], ...], int]


def chip_view(chip: agent_pb2.ChipStatus) -> ChipView:
    """What must not change under a refused request: health, SRAM accounting, held shards
    (id, reservation, digest) and the number of loads in flight."""
    held = tuple(sorted((s.shard_id, s.reserved_bytes, s.digest) for s in chip.shards))
    return (
        chip.health,
        chip.sram_used_bytes,
        chip.sram_loading_bytes,
        chip.sram_free_bytes,
        chip.sram_capacity_bytes,
        held,
        len(chip.loads),
    )


def view(agent: AgentProcess) -> list[ChipView]:
    return [chip_view(c) for c in agent.status().chips]


@dataclass
class World:
    plan: Plan
    refs: list[ShardRef]  # by stage
    blobs: dict[int, bytes]  # stage -> shard blob
    a: AgentProcess  # h0: ring stage 0 (chip 0), victim stage 0 (chip 1)
    b: AgentProcess  # h1: ring stage 1 (chip 0), victim stage 1 (chip 1)
    expected: tuple[int, ...]
    reference: ReferenceExecutor
    certs: Path  # the session's cluster CA and control-plane certificate
    baseline: dict[str, list[ChipView]] = field(default_factory=dict)
    _channels: dict[tuple[str, str], grpc.Channel] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @property
    def agents(self) -> tuple[AgentProcess, AgentProcess]:
        return self.a, self.b

    @property
    def nodes(self) -> dict[str, str]:
        return {x.address: x.node for x in self.agents}

    def channel(self, agent: AgentProcess, identity: str = CONTROL_PLANE) -> grpc.Channel:
        """A cached mutual-TLS channel to `agent`, dialling as `identity`."""
        key = (agent.address, identity)
        if key not in self._channels:
            self._channels[key] = agent.dial(identity=identity)
        return self._channels[key]

    def stub(self, agent: AgentProcess, identity: str = CONTROL_PLANE) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(self.channel(agent, identity))

    def request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def serve(self) -> tuple[int, ...]:
        request = agent_pb2.GenerateRequest(
            deployment=RING,
            request_id=self.request_id("probe"),
            prompt_ids=PROMPT,
            max_tokens=N_TOKENS,
        )
        return tuple(r.token for r in self.a.stub.Generate(request, timeout=60))

    def where(self, chip: int) -> dict[str, tuple[str, int]]:
        """Stage 0 on agent a, stage 1 on agent b, both on `chip`."""
        return {r.chip: (self.agents[r.binding.stage].address, chip) for r in self.refs}

    def configure_victim(self, *, window: int = 2) -> None:
        requests = configure_requests(
            self.plan,
            self.refs,
            self.where(1),
            deployment=VICTIM,
            window=window,
            nodes=self.nodes,
            link_secret=VICTIM_SECRET,
        )
        for agent in self.agents:
            agent.stub.ConfigureReplica(requests[agent.address], timeout=30)

    def remove_victim(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(grpc.RpcError):  # absent if configuring it failed
                agent.stub.RemoveReplica(
                    agent_pb2.RemoveReplicaRequest(deployment=VICTIM), timeout=30
                )

    @property
    def chip_names(self) -> list[str]:
        return [r.chip for r in self.refs]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def pipelines(agent: AgentProcess, deployment: str) -> list[agent_pb2.PipelineStatus]:
    return [p for c in agent.status().chips for p in c.pipelines if p.deployment == deployment]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, agent_cluster: AgentCluster) -> Iterator[World]:
    plan = make_plan(tiny_request(RING, stages=2), preset_topology(1, "dev-whole-ops"))
    refs = sorted(
        compile_plan(plan, TINY, SEED, tmp_path_factory.mktemp("store")),
        key=lambda r: r.binding.stage,
    )
    blobs = {r.binding.stage: r.path.read_bytes() for r in refs}
    flags = [
        "--sram-bytes",
        "64MiB",
        "--load-idle-timeout",
        str(LOAD_IDLE),
        "--link-idle-timeout",
        str(LINK_IDLE),
        "--link-max-connections",
        str(LINK_CONNECTIONS),
        "--link-max-connections-per-peer",
        str(LINK_CONNECTIONS_PER_PEER),
    ]
    a, b = (agent_cluster.start(f"h{i}", chips=4, extra=flags) for i in range(2))
    for stage, agent in ((0, a), (1, b)):
        for chip in (0, 1):
            load(agent, blobs[stage], chip)
    reference = ReferenceExecutor(
        TINY, SeededWeights(TINY, SEED, "F16"), max_batch=4, max_context=64
    )
    tokens = reference.generate(PROMPT, N_TOKENS).tokens
    w = World(plan, refs, blobs, a, b, tokens, reference, agent_cluster.certs)
    up = bring_up_replica(  # the shards are held already: this configures and starts
        plan,
        refs,
        w.where(0),
        {x.address: x.channel for x in w.agents},
        nodes=w.nodes,
        options=BringUpOptions(link_secret=RING_SECRET),
    )
    assert all(x.held for x in up.loads), up.loads
    assert w.serve() == w.expected  # the ring's links are open and bound
    w.baseline = {x.address: view(x) for x in (a, b)}
    try:
        yield w
    finally:
        w.close()  # the agent_cluster fixture stops the agents


def assert_invariants(w: World) -> None:
    """Both agents answer Status with the baseline chips; the ring runs without error; no
    victim is left over; no traceback reached an agent's log."""
    for agent in w.agents:
        # A refused load frees its reservation as its handler unwinds, a moment after the
        # client saw the status: poll briefly.
        wait_for(
            lambda agent=agent: view(agent) == w.baseline[agent.address],
            timeout=10,
            what=f"{agent.node}'s chips to be as before",
        )
        ring = pipelines(agent, RING)
        assert ring and all(p.phase == "running" and p.error == "" for p in ring), ring
        assert not pipelines(agent, VICTIM)
        assert "Traceback" not in agent.stderr()


@contextlib.contextmanager
def served_concurrently(w: World) -> Iterator[None]:
    """Serve one ring request while the body runs; it must get exactly the reference tokens."""
    got: list[tuple[int, ...] | BaseException] = []

    def serve() -> None:
        try:
            got.append(w.serve())
        except BaseException as exc:  # reported by the assertion below
            got.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield
    thread.join(60)
    assert got == [w.expected], f"the concurrently served request got {got}"


def refused(call: Callable[[], object]) -> grpc.RpcError:
    """The status `call` was refused with (it must be refused); its details bounded."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    error = info.value
    assert len(str(error.details())) < DETAIL_LIMIT, len(str(error.details()))
    return error


def assert_refused(
    call: Callable[[], object], code: grpc.StatusCode, words: str = ""
) -> grpc.RpcError:
    error = refused(call)
    assert error.code() == code, (error.code(), error.details())
    assert words in str(error.details()), error.details()
    return error


# --- links ---------------------------------------------------------------------------------


def link_call(
    w: World,
    agent: AgentProcess,
    identity: str,
    frames: Iterable[interconnect_pb2.LinkFrame],
    metadata: tuple[tuple[str, str], ...],
    timeout: float = 20,
) -> Iterator[interconnect_pb2.LinkAck]:
    call: Iterator[interconnect_pb2.LinkAck] = w.channel(agent, identity).stream_stream(
        EXCHANGE,
        request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
        response_deserializer=interconnect_pb2.LinkAck.FromString,
    )(iter(frames), timeout=timeout, metadata=metadata)
    return call


def target(
    deployment: str, stage: int, secret: bytes | None, incarnation: int | None = None
) -> tuple[tuple[str, str], ...]:
    inc = time.time_ns() if incarnation is None else incarnation
    return (*target_metadata(deployment, 0, stage, inc), *(link_metadata(secret or b"")))


def bubble(deployment: str, stage: int, tick: int = 0) -> interconnect_pb2.LinkFrame:
    return link_frame(deployment, 0, stage, Frame(0, tick, None, b""))


def checksummed(**fields: Any) -> interconnect_pb2.LinkFrame:
    msg = interconnect_pb2.LinkFrame(**fields)
    msg.checksum = frame_checksum(msg)
    return msg


H0, H1 = agent_identity("h0"), agent_identity("h1")
ROGUE = agent_identity("h7")

# Ring stage 1 lives on agent b and is fed by agent a (h0); stage 0 on a is fed by b (h1).
LINK_CASES: list[tuple[str, int, str, Callable[[], Any], Callable[[], Any], CODE, str]] = [
    # (id, stage (0: agent a, 1: agent b), identity, metadata(), frames(), code, words)
    (
        "another-nodes-cert",
        1,
        H1,
        lambda: target(RING, 1, RING_SECRET),
        lambda: [bubble(RING, 1)],
        CODE.PERMISSION_DENIED,
        "configured upstream",
    ),
    (
        "rogue-node-cert",
        1,
        ROGUE,
        lambda: target(RING, 1, RING_SECRET),
        lambda: [bubble(RING, 1)],
        CODE.PERMISSION_DENIED,
        "configured upstream",
    ),
    (
        "control-plane-cert",
        1,
        CONTROL_PLANE,
        lambda: target(RING, 1, RING_SECRET),
        lambda: [bubble(RING, 1)],
        CODE.PERMISSION_DENIED,
        "may not call",
    ),
    (
        "missing-secret",
        1,
        H0,
        lambda: target(RING, 1, None),
        lambda: [bubble(RING, 1)],
        CODE.UNAUTHENTICATED,
        "link secret",
    ),
    (
        "wrong-secret",
        1,
        H0,
        lambda: target(RING, 1, bytes(32)),
        lambda: [bubble(RING, 1)],
        CODE.PERMISSION_DENIED,
        "wrong link secret",
    ),
    (
        "another-replicas-secret",
        1,
        H0,
        lambda: target(RING, 1, VICTIM_SECRET),
        lambda: [bubble(RING, 1)],
        CODE.PERMISSION_DENIED,
        "wrong link secret",
    ),
    (
        "secret-not-hex",
        1,
        H0,
        lambda: (*target(RING, 1, None), (LINK_SECRET_KEY, "zz-not-hex")),
        lambda: [bubble(RING, 1)],
        CODE.UNAUTHENTICATED,
        "link secret",
    ),
    (
        "upstream-of-the-other-stage",
        0,
        H0,  # agent a's own certificate into its stage 0 (fed by b)
        lambda: target(RING, 0, RING_SECRET),
        lambda: [bubble(RING, 0)],
        CODE.PERMISSION_DENIED,
        "configured upstream",
    ),
    (
        "older-incarnation",
        1,
        H0,  # the real upstream's certificate and secret, but an old sender
        lambda: target(RING, 1, RING_SECRET, incarnation=1),
        lambda: [bubble(RING, 1)],
        CODE.FAILED_PRECONDITION,
        "does not replace",
    ),
    (
        "target-malformed",
        1,
        H0,
        lambda: ((TARGET_KEY, "ring-no-slashes"), (INCARNATION_KEY, "1")),
        lambda: [bubble(RING, 1)],
        CODE.INVALID_ARGUMENT,
        TARGET_KEY,
    ),
    (
        "incarnation-not-a-number",
        1,
        H0,
        lambda: ((TARGET_KEY, "ring/0/1"), (INCARNATION_KEY, "soon")),
        lambda: [bubble(RING, 1)],
        CODE.INVALID_ARGUMENT,
        "integers",
    ),
    (
        "incarnation-negative",
        1,
        H0,
        lambda: ((TARGET_KEY, "ring/0/1"), (INCARNATION_KEY, "-5")),
        lambda: [bubble(RING, 1)],
        CODE.INVALID_ARGUMENT,
        "non-negative",
    ),
    (
        "incarnation-without-target",
        1,
        H0,
        lambda: ((INCARNATION_KEY, "1"),),
        lambda: [bubble(RING, 1)],
        CODE.INVALID_ARGUMENT,
        "without",
    ),
    (
        "unknown-deployment",
        1,
        H0,
        lambda: target("nobody", 1, RING_SECRET),
        lambda: [bubble("nobody", 1)],
        CODE.NOT_FOUND,
        "no stage 1",
    ),
    (
        "unknown-stage",
        1,
        H0,
        lambda: target(RING, 7, RING_SECRET),
        lambda: [bubble(RING, 7)],
        CODE.NOT_FOUND,
        "no stage 7",
    ),
    (
        "stage-frame-on-a-probe-stream",
        1,
        H0,
        lambda: (),
        lambda: [bubble(RING, 1)],
        CODE.INVALID_ARGUMENT,
        "metadata",
    ),
    (
        "target-replica-out-of-range",
        1,
        H0,
        lambda: ((TARGET_KEY, "ring/99999999999/1"), (INCARNATION_KEY, "1")),
        lambda: [bubble(RING, 1)],
        CODE.INVALID_ARGUMENT,
        "out of range",
    ),
    (
        "target-stage-negative",
        1,
        H0,
        lambda: ((TARGET_KEY, "ring/0/-1"), (INCARNATION_KEY, "1")),
        lambda: [bubble(RING, 1)],
        CODE.INVALID_ARGUMENT,
        "out of range",
    ),
    (
        "target-over-1kib",
        1,
        H0,
        lambda: ((TARGET_KEY, "r" * 2000 + "/0/1"), (INCARNATION_KEY, "1")),
        lambda: [bubble(RING, 1)],
        CODE.INVALID_ARGUMENT,
        "1 KiB",
    ),
    (
        "probe-with-a-bad-checksum",
        1,
        ROGUE,
        lambda: (),
        lambda: [interconnect_pb2.LinkFrame(tick=3, ping=True, payload=b"x", checksum=1)],
        CODE.DATA_LOSS,
        "checksum",
    ),
]


@pytest.mark.parametrize(
    ("stage", "identity", "metadata", "frames", "code", "words"),
    [case[1:] for case in LINK_CASES],
    ids=[case[0] for case in LINK_CASES],
)
def test_a_link_into_the_serving_ring_is_refused(
    world: World,
    stage: int,
    identity: str,
    metadata: Callable[[], tuple[tuple[str, str], ...]],
    frames: Callable[[], list[interconnect_pb2.LinkFrame]],
    code: grpc.StatusCode,
    words: str,
) -> None:
    agent = world.agents[stage]
    with served_concurrently(world):
        assert_refused(lambda: link_call(world, agent, identity, frames(), metadata()), code, words)
    assert_invariants(world)


# --- rogue frames from the configured upstream (into the victim replica) ----------------------


def token_payload(token: int, vocab: int = TINY.vocab_size) -> bytes:
    return encode_token(token, np.zeros(vocab, np.float32))


def corrupted(msg: interconnect_pb2.LinkFrame) -> interconnect_pb2.LinkFrame:
    msg.checksum ^= 0x5A5A
    return msg


V = VICTIM
# Frames into victim stage 0 (on agent a), sent as its configured upstream (h1) with its secret
# and a fresh incarnation. "stops": the stage must stop (error in Status, waiting clients
# ABORTED at once); otherwise the frame never reaches the stage.
FRAME_CASES: list[tuple[str, Callable[[], list[interconnect_pb2.LinkFrame]], CODE, str, bool]] = [
    (
        "other-deployment",
        lambda: [bubble(RING, 0)],
        CODE.INVALID_ARGUMENT,
        "stream's target",
        False,
    ),
    (
        "other-replica",
        lambda: [link_frame(V, 1, 0, Frame(0, 0, None, b""))],
        CODE.INVALID_ARGUMENT,
        "stream's target",
        False,
    ),
    (
        "other-stage",
        lambda: [bubble(V, 1)],
        CODE.INVALID_ARGUMENT,
        "stream's target",
        False,
    ),
    (
        "heartbeat-with-payload",
        lambda: [checksummed(deployment=V, to_stage=0, heartbeat=True, payload=b"x" * 100)],
        CODE.INVALID_ARGUMENT,
        "heartbeat",
        False,
    ),
    (
        "probe-on-a-stage-stream",
        lambda: [checksummed(deployment=V, to_stage=0, ping=True, tick=1)],
        CODE.INVALID_ARGUMENT,
        "probe",
        False,
    ),
    (
        "future-epoch",
        lambda: [link_frame(V, 0, 0, Frame(7, 0, None, b""))],
        CODE.FAILED_PRECONDITION,
        "epoch 7",
        True,
    ),
    (
        "far-future-tick",
        lambda: [bubble(V, 0, tick=10**15)],
        CODE.OUT_OF_RANGE,
        "credit window",
        True,
    ),
    (
        "far-future-tick-1mib",
        lambda: [link_frame(V, 0, 0, Frame(0, 10**9, None, bytes(1 << 20)))],
        CODE.OUT_OF_RANGE,
        "credit window",
        True,
    ),
    (
        "negative-tick",
        lambda: [bubble(V, 0, tick=-1)],
        CODE.OUT_OF_RANGE,
        "credit window",
        True,
    ),
    (
        "slot-the-schedule-does-not-give",
        lambda: [link_frame(V, 0, 0, Frame(0, 0, 3, b""))],
        CODE.FAILED_PRECONDITION,
        "schedule",
        True,
    ),
    (
        "corrupted-checksum",
        lambda: [corrupted(bubble(V, 0))],
        CODE.DATA_LOSS,
        "checksum",
        True,
    ),
    (
        "undecodable-token-payload",
        lambda: [link_frame(V, 0, 0, Frame(0, 0, None, b"garbage"))],
        CODE.INVALID_ARGUMENT,
        "token payload",
        True,
    ),
    (
        "token-outside-the-vocabulary",
        lambda: [link_frame(V, 0, 0, Frame(0, 0, None, token_payload(10**9)))],
        CODE.INVALID_ARGUMENT,
        "vocabulary",
        True,
    ),
    (
        "two-different-frames-for-a-tick",
        lambda: [bubble(V, 0), link_frame(V, 0, 0, Frame(0, 0, None, token_payload(1)))],
        CODE.FAILED_PRECONDITION,
        "two different frames",
        True,
    ),
]


@pytest.mark.parametrize(
    ("frames", "code", "words", "stops"),
    [case[1:] for case in FRAME_CASES],
    ids=[case[0] for case in FRAME_CASES],
)
def test_a_rogue_frame_from_the_upstream_is_rejected(
    world: World,
    frames: Callable[[], list[interconnect_pb2.LinkFrame]],
    code: grpc.StatusCode,
    words: str,
    stops: bool,
) -> None:
    world.configure_victim()
    try:
        with served_concurrently(world):
            client = Waiting(world.a, VICTIM)
            sent = time.monotonic()
            assert_refused(
                lambda: link_call(world, world.a, H1, frames(), target(VICTIM, 0, VICTIM_SECRET)),
                code,
                words,
            )
            here = pipelines(world.a, VICTIM)
            if stops:
                failure, ended = client.result()
                assert failure is not None and failure.code() == CODE.ABORTED, failure
                assert ended - sent < 5, "the waiting client was ended at once"
                assert here and all(p.phase == "failed" and words in p.error for p in here), here
            else:
                assert here and all(p.error == "" and p.phase == "barrier" for p in here), here
                client.cancel()
            assert all(p.error == "" for p in pipelines(world.b, VICTIM))
    finally:
        world.remove_victim()
    assert_invariants(world)


STAGE1_CASES: list[tuple[str, Callable[[], list[interconnect_pb2.LinkFrame]], CODE, str]] = [
    ("far-future-tick", lambda: [bubble(V, 1, tick=10**12)], CODE.OUT_OF_RANGE, "credit window"),
    ("beyond-the-window", lambda: [bubble(V, 1, tick=2)], CODE.OUT_OF_RANGE, "credit window"),
    ("corrupted-checksum", lambda: [corrupted(bubble(V, 1))], CODE.DATA_LOSS, "checksum"),
    (
        "future-epoch",
        lambda: [link_frame(V, 0, 1, Frame(3, 0, 0, b""))],
        CODE.FAILED_PRECONDITION,
        "epoch 3",
    ),
]


@pytest.mark.parametrize(
    ("frames", "code", "words"),
    [case[1:] for case in STAGE1_CASES],
    ids=[case[0] for case in STAGE1_CASES],
)
def test_a_rogue_frame_into_a_later_stage_stops_it(
    world: World,
    frames: Callable[[], list[interconnect_pb2.LinkFrame]],
    code: grpc.StatusCode,
    words: str,
) -> None:
    """Stage 1 (on b, fed by a) has its own credit window: upstream ticks up to its last
    acknowledgement + W (here W = 2, nothing acknowledged yet: ticks 0 and 1)."""
    world.configure_victim(window=2)
    try:
        with served_concurrently(world):
            assert_refused(
                lambda: link_call(world, world.b, H0, frames(), target(VICTIM, 1, VICTIM_SECRET)),
                code,
                words,
            )
        (stage,) = pipelines(world.b, VICTIM)
        assert stage.phase == "failed" and words in stage.error, stage
    finally:
        world.remove_victim()
    assert_invariants(world)


def test_execute_before_a_replica_binds_the_chips_leaves_it_nothing(world: World) -> None:
    """Execute runs on chips no replica is bound to, on the program a later replica will use:
    what it wrote into the KV cache (every slot, every position) must not reach that
    replica's tokens."""
    rng = np.random.default_rng(7)
    n = 64  # max_context: every position of every slot
    slots = [s for s in range(4) for _ in range(n)]
    positions = [p for _ in range(4) for p in range(n)]
    tokens = rng.integers(0, TINY.vocab_size, size=len(slots)).tolist()
    stage0 = world.a.stub.Execute(
        agent_pb2.ExecuteRequest(
            chip=1,
            shard_id=world.refs[0].shard_id,
            activation=Activation.for_tokens(slots, positions, tokens).to_bytes(),
        ),
        timeout=30,
    )
    world.b.stub.Execute(
        agent_pb2.ExecuteRequest(
            chip=1, shard_id=world.refs[1].shard_id, activation=stage0.activation
        ),
        timeout=30,
    )
    world.configure_victim()
    try:
        for agent in world.agents:
            agent.stub.StartEpoch(
                agent_pb2.StartEpochRequest(
                    deployment=VICTIM, epoch=0, tick=0, ready_chips=world.chip_names
                ),
                timeout=30,
            )
        request = agent_pb2.GenerateRequest(
            deployment=VICTIM, request_id="after-execute", prompt_ids=PROMPT, max_tokens=N_TOKENS
        )
        with served_concurrently(world):
            got = tuple(r.token for r in world.a.stub.Generate(request, timeout=60))
        assert got == world.expected
    finally:
        world.remove_victim()
    assert_invariants(world)


def raising_payload(w: World) -> bytes:
    """Stage 0's real output with float positions: stage 1 indexing with them raises
    IndexError inside the kernel (a payload fault, not a frame-check one)."""
    act = load_shard(w.blobs[0]).step(Activation.for_tokens([0], [0], [5]))
    act.positions = act.positions.astype("float32")
    return encode_work(Sampling(), 1, act)


def test_a_payload_that_raises_stops_the_stage_visibly(world: World) -> None:
    """Only agent b's part of the victim passes the barrier, so its stage 1 runs; the test's
    stream (as b's configured upstream, h0) feeds it a payload its kernel cannot run."""
    world.configure_victim()
    try:
        world.b.stub.StartEpoch(
            agent_pb2.StartEpochRequest(
                deployment=VICTIM, epoch=0, tick=0, ready_chips=world.chip_names
            ),
            timeout=30,
        )
        frame = link_frame(VICTIM, 0, 1, Frame(0, 0, 0, raising_payload(world)))
        release = threading.Event()

        def frames() -> Iterator[interconnect_pb2.LinkFrame]:
            yield frame
            release.wait(20)  # keep the stream open: the stage's stop must end it

        with served_concurrently(world):
            try:
                assert_refused(
                    lambda: link_call(
                        world, world.b, H0, frames(), target(VICTIM, 1, VICTIM_SECRET)
                    ),
                    CODE.ABORTED,
                    "IndexError",
                )
            finally:
                release.set()
        (stage,) = pipelines(world.b, VICTIM)
        assert stage.phase == "failed" and "IndexError" in stage.error, stage
        assert world.b.status().node == "h1"
    finally:
        world.remove_victim()
    assert_invariants(world)


# --- certificates and the method table -----------------------------------------------------


def foreign_control_plane(tmp: Path) -> Any:
    directory = tmp / "foreign"
    certs.init_cluster(directory)
    return certs.load_control_plane(directory)


def expired_control_plane(tmp: Path, session: Path) -> Any:
    directory = tmp / "expired"
    directory.mkdir()
    for name in ("ca.crt", "ca.key"):
        shutil.copy(session / name, directory / name)
    certs.issue(directory, CONTROL_PLANE, days=-1)
    creds = certs.load_control_plane(directory)
    cert = x509.load_pem_x509_certificate(creds.cert_pem)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    return creds


def not_yet_valid_control_plane(tmp: Path, session: Path) -> Any:
    directory = tmp / "future"
    directory.mkdir()
    for name in ("ca.crt", "ca.key"):
        shutil.copy(session / name, directory / name)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    certs.issue(directory, CONTROL_PLANE, now=later, days=30)
    creds = certs.load_control_plane(directory)
    cert = x509.load_pem_x509_certificate(creds.cert_pem)
    assert cert.not_valid_before_utc > dt.datetime.now(dt.UTC)
    return creds


def _handshake_channels(w: World, tmp: Path) -> dict[str, Callable[[], grpc.Channel]]:
    a = w.a
    return {
        "plaintext": lambda: grpc.insecure_channel(a.address),
        "no-client-certificate": lambda: grpc.secure_channel(
            a.address,
            grpc.ssl_channel_credentials(root_certificates=credentials(w.certs).ca_pem),
            options=[("grpc.ssl_target_name_override", "h0.agent.lockstep")],
        ),
        "another-ca": lambda: open_channel(a.address, foreign_control_plane(tmp), peer=a.identity),
        "expired": lambda: open_channel(
            a.address, expired_control_plane(tmp, w.certs), peer=a.identity
        ),
        "not-yet-valid": lambda: open_channel(
            a.address, not_yet_valid_control_plane(tmp, w.certs), peer=a.identity
        ),
        "dialled-as-another-node": lambda: a.dial(node="h1"),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "plaintext",
        "no-client-certificate",
        "another-ca",
        "expired",
        "not-yet-valid",
        "dialled-as-another-node",
    ],
)
@pytest.mark.parametrize("service", ["Status", "Link"])
def test_a_client_without_a_cluster_certificate_fails_the_handshake(
    world: World, tmp_path: Path, kind: str, service: str
) -> None:
    with _handshake_channels(world, tmp_path)[kind]() as channel:

        def call() -> object:
            if service == "Status":
                return agent_pb2_grpc.AgentStub(channel).Status(
                    agent_pb2.StatusRequest(), timeout=10
                )
            return channel.stream_stream(
                EXCHANGE,
                request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
                response_deserializer=interconnect_pb2.LinkAck.FromString,
            )(iter([bubble(RING, 0)]), timeout=10, metadata=target(RING, 0, RING_SECRET))

        assert_refused(call, CODE.UNAVAILABLE)
    assert_invariants(world)


def crafted_channel(w: World, uris: list[str]) -> grpc.Channel:
    """A channel to agent a with a certificate the cluster CA really signed, carrying `uris`
    as its URI SANs: it passes the handshake, so only the authorization can refuse it."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = w.certs
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crafted")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    names: list[x509.GeneralName] = [x509.DNSName("crafted.lockstep")]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    cert = builder.add_extension(x509.SubjectAlternativeName(names), critical=False).sign(
        ca_key, hashes.SHA256()
    )
    creds = grpc.ssl_channel_credentials(
        root_certificates=(directory / "ca.crt").read_bytes(),
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_chain=cert.public_bytes(serialization.Encoding.PEM),
    )
    return grpc.secure_channel(
        w.a.address, creds, options=[("grpc.ssl_target_name_override", "h0.agent.lockstep")]
    )


CRAFTED_CASES: list[tuple[str, list[str], CODE]] = [
    ("no-identity", [], CODE.UNAUTHENTICATED),
    ("another-trust-domain", ["spiffe://evil/control-plane"], CODE.UNAUTHENTICATED),
    ("two-identities", [CONTROL_PLANE, agent_identity("h1")], CODE.UNAUTHENTICATED),
    ("path-escape", ["spiffe://lockstep/agent/../control-plane"], CODE.PERMISSION_DENIED),
    ("upper-case", ["spiffe://lockstep/CONTROL-PLANE"], CODE.PERMISSION_DENIED),
    ("trailing-segment", [CONTROL_PLANE + "/x"], CODE.PERMISSION_DENIED),
    ("unknown-role", ["spiffe://lockstep/viewer"], CODE.PERMISSION_DENIED),
]


@pytest.mark.parametrize(
    ("uris", "code"), [c[1:] for c in CRAFTED_CASES], ids=[c[0] for c in CRAFTED_CASES]
)
def test_a_cluster_signed_certificate_without_the_control_plane_identity_is_refused(
    world: World, uris: list[str], code: grpc.StatusCode
) -> None:
    """Halt would stop the ring; Status needs an identity too."""
    with crafted_channel(world, uris) as channel, served_concurrently(world):
        stub = agent_pb2_grpc.AgentStub(channel)
        assert_refused(
            lambda: stub.Halt(agent_pb2.HaltRequest(deployment=RING), timeout=10), code, "Halt"
        )
        assert_refused(lambda: stub.Status(agent_pb2.StatusRequest(), timeout=10), code, "Status")
    assert_invariants(world)


def _admin_calls(w: World) -> dict[str, Callable[[agent_pb2_grpc.AgentStub], object]]:
    return {
        "LoadShard": lambda s: s.LoadShard(iter([]), timeout=10),
        "UnloadShard": lambda s: s.UnloadShard(
            agent_pb2.UnloadShardRequest(chip=0, shard_id=w.refs[0].shard_id), timeout=10
        ),
        "Execute": lambda s: s.Execute(agent_pb2.ExecuteRequest(chip=0), timeout=10),
        "MarkChipFailed": lambda s: s.MarkChipFailed(
            agent_pb2.MarkChipFailedRequest(chip=0, reason="owned"), timeout=10
        ),
        "ConfigureReplica": lambda s: s.ConfigureReplica(
            agent_pb2.ConfigureReplicaRequest(deployment="thief"), timeout=10
        ),
        "StartEpoch": lambda s: s.StartEpoch(
            agent_pb2.StartEpochRequest(deployment=RING, epoch=9), timeout=10
        ),
        "Halt": lambda s: s.Halt(agent_pb2.HaltRequest(deployment=RING), timeout=10),
        "RemoveReplica": lambda s: s.RemoveReplica(
            agent_pb2.RemoveReplicaRequest(deployment=RING), timeout=10
        ),
        "Generate": lambda s: s.Generate(
            agent_pb2.GenerateRequest(
                deployment=RING, request_id="x", prompt_ids=[1], max_tokens=1
            ),
            timeout=10,
        ),
        "LinkPing": lambda s: s.LinkPing(
            agent_pb2.LinkPingRequest(peer=w.b.address, count=1), timeout=10
        ),
        "StageDigests": lambda s: s.StageDigests(
            agent_pb2.StageDigestsRequest(deployment=RING, period=4, count=1), timeout=10
        ),
        "InjectFault": lambda s: s.InjectFault(
            agent_pb2.InjectFaultRequest(deployment=RING, stage=0), timeout=10
        ),
    }


ADMIN_METHODS = [
    "LoadShard",
    "UnloadShard",
    "Execute",
    "MarkChipFailed",
    "ConfigureReplica",
    "StartEpoch",
    "Halt",
    "RemoveReplica",
    "Generate",
    "LinkPing",
    "StageDigests",
    "InjectFault",
]


@pytest.mark.parametrize("method", ADMIN_METHODS)
def test_an_agent_certificate_may_not_call_an_admin_rpc(world: World, method: str) -> None:
    """h1 is a real member of the cluster (it serves the ring's stage 1): its certificate
    still may not drive h0 — each of these calls would have changed the served replica."""
    stub = world.stub(world.a, H1)
    with served_concurrently(world):
        error = assert_refused(
            lambda: _admin_calls(world)[method](stub), CODE.PERMISSION_DENIED, f"Agent/{method}"
        )
        assert H1 in str(error.details())
    assert len(stub.Status(agent_pb2.StatusRequest(), timeout=10).chips) == 4  # Status is open
    assert_invariants(world)


# --- shard poisoning and malformed loads ------------------------------------------------------


def tampered(blob: bytes) -> bytes:
    """The same size, one byte flipped near the end (inside the weights, not the header)."""
    return blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:]


def header_messages(w: World, **fields: Any) -> list[bytes]:
    """A load of the stage-0 blob onto the free chip, header fields overridden."""
    blob = w.blobs[0]
    header = agent_client.make_header(blob, FREE_CHIP)
    for name, value in fields.items():
        setattr(header, name, value)
    return load_stream.load_messages(header, blob)


def lie_about(w: World, blob: bytes, chip: int, **fields: Any) -> list[bytes]:
    """A load of `blob` onto `chip` whose header claims the stage-0 shard id."""
    header = agent_client.make_header(blob, chip, shard_id=w.refs[0].shard_id)
    for name, value in fields.items():
        setattr(header, name, value)
    return load_stream.load_messages(header, blob)


def safetensors_blob(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def manifest_with(**changes: Any) -> str:
    """A valid manifest's JSON with fields replaced by values of the wrong type."""
    from shardformat.manifest import TensorInfo

    info = TensorInfo("U8", (4,), "w", None, (0, 0), hashlib.sha256(b"abcd").hexdigest())
    data = json.loads(sample_manifest({"w": info}).to_json())
    data.update(changes)
    return json.dumps(data)


def blob_load(blob: bytes) -> Callable[[World], list[bytes]]:
    return lambda w: messages(blob, FREE_CHIP)


W_ENTRY = {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}

LOAD_CASES: list[tuple[str, Callable[[World], list[bytes]], CODE, str]] = [
    # Poisoning: the bytes must be what the shard id says.
    (
        "tampered-blob-under-the-real-id",
        lambda w: lie_about(w, tampered(w.blobs[0]), FREE_CHIP),
        CODE.DATA_LOSS,
        "blake3",
    ),
    (
        "another-shards-bytes-under-the-id",
        lambda w: lie_about(w, w.blobs[1], FREE_CHIP),
        CODE.DATA_LOSS,
        "blake3",
    ),
    (
        "sha256-mode-wrong-sha256",
        lambda w: header_messages(w, digest_algorithm="sha256", digest="0" * 64),
        CODE.DATA_LOSS,
        "sha256",
    ),
    (
        "sha256-mode-right-sha256-of-tampered-bytes",
        lambda w: lie_about(
            w,
            tampered(w.blobs[0]),
            FREE_CHIP,
            digest_algorithm="sha256",
            digest=hashlib.sha256(tampered(w.blobs[0])).hexdigest(),
        ),
        CODE.DATA_LOSS,
        "blake3",
    ),
    (
        "sha256-mode-without-digest",
        lambda w: header_messages(w, digest_algorithm="sha256", digest=""),
        CODE.INVALID_ARGUMENT,
        "header.digest",
    ),
    (
        "blake3-mode-digest-not-the-id",
        lambda w: header_messages(w, digest="ab" * 32),
        CODE.INVALID_ARGUMENT,
        "not the shard id",
    ),
    (
        "unknown-digest-algorithm",
        lambda w: header_messages(w, digest_algorithm="md5"),
        CODE.INVALID_ARGUMENT,
        "digest_algorithm",
    ),
    (
        "shard-id-uppercase",
        lambda w: header_messages(w, shard_id=w.refs[0].shard_id.upper()),
        CODE.INVALID_ARGUMENT,
        "shard_id",
    ),
    (
        "header-size-disagrees-with-the-held-shard",
        lambda w: lie_about(w, w.blobs[0] + b"\0", 0),
        CODE.INVALID_ARGUMENT,
        "holds",
    ),
    (
        "header-virtual-disagrees-with-the-held-shard",
        lambda w: lie_about(w, w.blobs[0], 0, virtual=True),
        CODE.INVALID_ARGUMENT,
        "holds",
    ),
    (
        "header-virtual-manifest-not",
        lambda w: header_messages(w, virtual=True),
        CODE.INVALID_ARGUMENT,
        "virtual",
    ),
    # Malformed messages.
    ("garbage-message", lambda w: [b"\xff\xff\xff\xff"], CODE.INVALID_ARGUMENT, "malformed"),
    ("empty-stream", lambda w: [], CODE.INVALID_ARGUMENT, "header"),
    (
        "header-missing",
        lambda w: header_messages(w)[1:],
        CODE.INVALID_ARGUMENT,
        "must be the header",
    ),
    (
        "two-headers",
        lambda w: [header_messages(w)[0], *header_messages(w)],
        CODE.INVALID_ARGUMENT,
        "expected a chunk",
    ),
    (
        "chunk-with-a-broken-length",
        lambda w: [header_messages(w)[0], b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"],
        CODE.INVALID_ARGUMENT,
        "malformed",
    ),
    ("chip-out-of-range", lambda w: header_messages(w, chip=4), CODE.INVALID_ARGUMENT, "chip 4"),
    (
        "chip-2^32-1",
        lambda w: header_messages(w, chip=2**32 - 1),
        CODE.INVALID_ARGUMENT,
        "does not exist",
    ),
    ("size-zero", lambda w: header_messages(w, size_bytes=0), CODE.INVALID_ARGUMENT, "size"),
    (
        "size-2^64-1",
        lambda w: header_messages(w, size_bytes=2**64 - 1),
        CODE.RESOURCE_EXHAUSTED,
        "",
    ),
    (
        "declared-bytes-2^64-1",
        lambda w: header_messages(w, declared_bytes=2**64 - 1),
        CODE.RESOURCE_EXHAUSTED,
        "",
    ),
    (
        "chunk-beyond-the-declared-size",
        lambda w: header_messages(w, size_bytes=len(w.blobs[0]) - 100),
        CODE.INVALID_ARGUMENT,
        "carries more",
    ),
    (
        "fewer-bytes-than-declared",
        lambda w: header_messages(w, size_bytes=len(w.blobs[0]) + 100),
        CODE.INVALID_ARGUMENT,
        "ended after",
    ),
    # Malformed blobs (their shard ids are right: only the contents are wrong).
    (
        "shape-2^64",
        blob_load(
            safetensors_blob(
                {"w": {"dtype": "U8", "shape": [1 << 64], "data_offsets": [0, 4]}}, b"abcd"
            )
        ),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "shape-negative",
        blob_load(
            safetensors_blob({"w": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 4]}}, b"abcd")
        ),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "offsets-beyond-the-blob",
        blob_load(
            safetensors_blob(
                {"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 400]}}, b"abcd"
            )
        ),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "metadata-a-list",
        blob_load(safetensors_blob({"__metadata__": ["not", "a", "mapping"]})),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "manifest-a-number",
        blob_load(safetensors_blob({"__metadata__": {MANIFEST_KEY: "5"}})),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "manifest-not-json",
        blob_load(safetensors_blob({"__metadata__": {MANIFEST_KEY: "{oops"}})),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "manifest-stage-a-string",
        blob_load(
            safetensors_blob(
                {"__metadata__": {MANIFEST_KEY: manifest_with(stage="zero")}, "w": W_ENTRY},
                b"abcd",
            )
        ),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "manifest-tensors-a-list",
        blob_load(
            safetensors_blob(
                {"__metadata__": {MANIFEST_KEY: manifest_with(tensors=[1, 2])}, "w": W_ENTRY},
                b"abcd",
            )
        ),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "manifest-max-batch-huge",
        blob_load(
            safetensors_blob(
                {"__metadata__": {MANIFEST_KEY: manifest_with(max_batch=10**30)}, "w": W_ENTRY},
                b"abcd",
            )
        ),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    ("header-a-list", blob_load(safetensors_blob([1, 2, 3])), CODE.INVALID_ARGUMENT, ""),
    (
        "header-length-2^63",
        blob_load(struct.pack("<Q", 1 << 63) + b"{}"),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    ("not-safetensors", blob_load(b"PK\x03\x04 a zip file"), CODE.INVALID_ARGUMENT, ""),
]


@pytest.mark.parametrize(
    ("stream", "code", "words"),
    [case[1:] for case in LOAD_CASES],
    ids=[case[0] for case in LOAD_CASES],
)
def test_a_hostile_load_is_refused_and_changes_nothing(
    world: World, stream: Callable[[World], list[bytes]], code: grpc.StatusCode, words: str
) -> None:
    with served_concurrently(world):
        assert_refused(
            lambda: agent_client.send_load(world.a.channel, stream(world), timeout=30), code, words
        )
    assert_invariants(world)


def test_tampered_bytes_under_a_held_id_are_never_read(world: World) -> None:
    """ "Already loaded" is answered for a shard id the chip holds — every held shard was
    verified under its id — so the tampered bytes are never taken, and the ring serves on."""
    with served_concurrently(world):
        reply = agent_client.send_load(
            world.a.channel, lie_about(world, tampered(world.blobs[0]), 0), timeout=30
        )
    assert reply.already_loaded and reply.bytes_received == 0
    assert_invariants(world)


# --- starvation -------------------------------------------------------------------------------


class Silent:
    """A request iterator that sends `first` then nothing until `release` is set."""

    def __init__(self, release: threading.Event, first: Iterable[Any] = ()) -> None:
        self.release = release
        self.first = list(first)

    def __iter__(self) -> Iterator[Any]:
        yield from self.first
        self.release.wait(60)


def test_silent_loads_end_at_the_load_idle_timeout(world: World) -> None:
    """Loads that never send a header, or stop after it, are ended with DEADLINE_EXCEEDED and
    free their reservation; the ring serves meanwhile."""
    release = threading.Event()
    headers = [  # distinct shards: one load of a shard per chip at a time
        load_stream.header_message(agent_client.make_header(make_shard(1024, seed=i), FREE_CHIP))
        for i in range(8)
    ]
    started = time.monotonic()
    try:
        with served_concurrently(world):
            calls = [
                agent_client.load_call(world.a.channel).future(
                    iter(Silent(release, [headers[i]] if i % 2 else [])), timeout=30
                )
                for i in range(8)
            ]
            errors = [refused(lambda c=c: c.result(timeout=20)) for c in calls]
    finally:
        release.set()
    assert all(e.code() == CODE.DEADLINE_EXCEEDED for e in errors), [e.code() for e in errors]
    details = sorted(str(e.details()) for e in errors)
    assert sum("no LoadShard header within" in d for d in details) == 4, details
    assert sum("no data for" in d for d in details) == 4, details
    assert time.monotonic() - started < LOAD_IDLE + 8
    assert_invariants(world)


def probe_streams(
    w: World, agent: AgentProcess, identity: str, count: int, release: threading.Event
) -> list[Any]:
    """`count` Link streams that name no target and send nothing."""
    channel = w.channel(agent, identity)
    return [
        channel.stream_stream(
            EXCHANGE,
            request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
            response_deserializer=interconnect_pb2.LinkAck.FromString,
        )(iter(Silent(release)), timeout=30)
        for _ in range(count)
    ]


def status_ms(agent: AgentProcess, n: int = 10) -> float:
    worst = 0.0
    for _ in range(n):
        t = time.perf_counter()
        assert agent.stub.Status(agent_pb2.StatusRequest(), timeout=1).node == agent.node
        worst = max(worst, (time.perf_counter() - t) * 1e3)
    return worst


def ended(calls: list[Any]) -> list[Any]:
    return [c for c in calls if c.done()]


def test_silent_link_streams_are_bounded_per_peer_and_end_at_the_idle_timeout(
    world: World,
) -> None:
    release = threading.Event()
    rogue = agent_identity("h8")
    started = time.monotonic()
    try:
        with served_concurrently(world):
            calls = probe_streams(world, world.a, rogue, PER_PEER + 3, release)
            over = wait_for(
                lambda: len(ended(calls)) >= 3 and ended(calls),
                timeout=10,
                what="the streams over the bound",
            )
            assert time.monotonic() - started < LINK_IDLE, "refused at once, not at the timeout"
            assert len(over) == 3
            for call in over:
                assert call.code() == CODE.RESOURCE_EXHAUSTED
                assert "max_streams_per_peer" in str(call.details())
            worst = status_ms(world.a)
            print(f"Status worst {worst:.1f} ms with {PER_PEER} silent link streams open")
            assert worst < 100
        wait_for(lambda: len(ended(calls)) == len(calls), timeout=LINK_IDLE + 8, what="idle end")
        timed_out = [c for c in calls if c.code() == CODE.DEADLINE_EXCEEDED]
        assert len(timed_out) == PER_PEER, [c.code() for c in calls]
        assert f"no frame for {LINK_IDLE} s" in str(timed_out[0].details())
    finally:
        release.set()
        for call in calls:
            call.cancel()
    assert_invariants(world)


def test_health_watch_and_reflection_streams_cannot_be_held_forever(world: World) -> None:
    """The open services (health, reflection) take streams from any agent certificate; a
    Watch or a silent reflection stream carries nothing the agent must keep open, so it ends
    after the link idle timeout instead of holding a stream place and a worker for good."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    release = threading.Event()
    rogue = agent_identity("h11")
    channel = world.channel(world.b, rogue)
    started = time.monotonic()
    calls: list[Any] = []
    try:
        watches = [
            health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            for _ in range(PER_PEER - 1)
        ]
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter(Silent(release, [reflection_pb2.ServerReflectionRequest(list_services="")])),
            timeout=30,
        )
        calls += [*watches, reflection]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert next(reflection).list_services_response.service
        over = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert_refused(lambda: list(over), CODE.RESOURCE_EXHAUSTED, "max_streams_per_peer")
        wait_for(lambda: len(ended(calls)) == len(calls), timeout=LINK_IDLE + 8, what="ends")
        assert all(c.code() == CODE.DEADLINE_EXCEEDED for c in calls), [c.code() for c in calls]
        assert time.monotonic() - started >= LINK_IDLE * 0.9
    finally:
        release.set()
        for call in calls:
            call.cancel()
    assert_invariants(world)


def test_silent_streams_are_bounded_in_all_and_leave_the_control_plane_its_places(
    world: World,
) -> None:
    """Three rogue agent certificates together go past the agent-wide bound: the streams over
    it are refused at once (whichever peer's they are: the order the agent sees them in is
    the network's) and Status still answers fast. The control plane's streams have places of
    their own: while every other place is held it still loads a shard and serves the ring."""
    release = threading.Event()
    calls: list[Any] = []
    # The ring's link from h0 into stage 1 runs on b's framed link port (agents.wire, the
    # default transport), not in one of b's stream places.
    ring_links = 0
    over = 2 * PER_PEER + 3 + ring_links - MAX_STREAMS
    blob = make_shard(4096, seed=99)
    try:
        for node, count in (("h8", PER_PEER), ("h9", PER_PEER), ("h10", 3)):
            calls += probe_streams(world, world.b, agent_identity(node), count, release)
        early = wait_for(
            lambda: len(ended(calls)) >= over and ended(calls),
            timeout=LINK_IDLE - 0.5,  # before the first idle end
            what=f"{over} refusals",
        )
        assert len(early) == over, [c.code() for c in early]
        for call in early:
            assert call.code() == CODE.RESOURCE_EXHAUSTED, call.details()
            assert "in all" in str(call.details())
        worst = status_ms(world.b)
        print(f"Status worst {worst:.1f} ms with {MAX_STREAMS} streams open")
        assert worst < 100
        # The control plane, meanwhile: a load on b (a stream) and a request (a stream on a,
        # whose tokens travel the ring through b).
        assert load(world.b, blob, FREE_CHIP).reserved_bytes == len(blob)
        world.b.stub.UnloadShard(
            agent_pb2.UnloadShardRequest(chip=FREE_CHIP, shard_id=shard_id_of(blob)), timeout=10
        )
        assert world.serve() == world.expected
        assert not [c for c in calls if c.done() and c not in early], "nothing else ended yet"
        wait_for(lambda: len(ended(calls)) == len(calls), timeout=LINK_IDLE + 8, what="idle end")
        assert sum(c.code() == CODE.DEADLINE_EXCEEDED for c in calls) == len(calls) - over
    finally:
        release.set()
        for call in calls:
            call.cancel()
    assert world.serve() == world.expected
    assert_invariants(world)


# --- Execute, Generate, the replica RPCs, LinkPing -------------------------------------------


def activation_with_cursor(cursor: str) -> bytes:
    act = Activation.for_tokens([0], [0], [5])
    meta = f'{{"version": {ACTIVATION_VERSION}, "cursor": {cursor}}}'
    return encode_safetensors(act._arrays(), {ACTIVATION_KEY: meta})


def activation_with(**arrays: np.ndarray) -> bytes:
    """A stage-0 activation blob whose arrays are replaced (wrong dtypes, shapes)."""
    act = Activation.for_tokens([0], [0], [5])
    meta = json.dumps({"version": ACTIVATION_VERSION, "cursor": [0, 0]})
    return encode_safetensors({**act._arrays(), **arrays}, {ACTIVATION_KEY: meta})


def execute(chip: int, activation: bytes, shard: int = 0) -> Callable[[World], object]:
    return lambda w: w.a.stub.Execute(
        agent_pb2.ExecuteRequest(chip=chip, shard_id=w.refs[shard].shard_id, activation=activation),
        timeout=30,
    )


def generate(agent: int = 0, **fields: Any) -> Callable[[World], object]:
    def call(w: World) -> object:
        request = agent_pb2.GenerateRequest(
            **{
                "deployment": RING,
                "request_id": w.request_id("hostile"),
                "prompt_ids": [1, 2],
                "max_tokens": 2,
                **fields,
            }
        )
        return w.agents[agent].stub.Generate(request, timeout=30)

    return call


def big_stub(w: World) -> agent_pb2_grpc.AgentStub:
    """A control-plane stub that may send 16 MiB messages (the agent's bound is its own)."""
    key = (w.a.address, "big")
    if key not in w._channels:
        w._channels[key] = open_channel(
            w.a.address,
            credentials(w.certs),
            peer=w.a.identity,
            options=[("grpc.max_send_message_length", 16 << 20)],
        )
    return agent_pb2_grpc.AgentStub(w._channels[key])


HUGE = "n" * (4 << 20)


def configure(**fields: Any) -> Callable[[World], object]:
    """Agent a's ConfigureReplica of a replica "thief" on the free chip, fields overridden
    (`a_NAME`: the first stage assignment's list NAME)."""

    def call(w: World) -> object:
        request = configure_requests(
            w.plan,
            w.refs,
            w.where(FREE_CHIP),
            deployment="thief",
            nodes=w.nodes,
            link_secret=bytes(32),
        )[w.a.address]
        stage = request.assignments[0]
        for name, value in fields.items():
            if name.startswith("a_"):
                del getattr(stage, name[2:])[:]
                getattr(stage, name[2:]).extend(value(w) if callable(value) else value)
            else:
                setattr(request, name, value)
        return big_stub(w).ConfigureReplica(request, timeout=30)

    return call


def unary(method: str, request: Any) -> Callable[[World], object]:
    return lambda w: getattr(big_stub(w), method)(request, timeout=30)


RPC_CASES: list[tuple[str, Callable[[World], object], CODE, str]] = [
    # Execute
    (
        "execute-cursor-1e400",
        execute(1, activation_with_cursor("1e400")),
        CODE.INVALID_ARGUMENT,
        "activation",
    ),
    (
        "execute-cursor-nan",
        execute(1, activation_with_cursor("NaN")),
        CODE.INVALID_ARGUMENT,
        "activation",
    ),
    ("execute-garbage", execute(1, b"garbage" * 10), CODE.INVALID_ARGUMENT, "activation"),
    ("execute-empty", execute(1, b""), CODE.INVALID_ARGUMENT, "activation"),
    (
        "execute-over-the-agents-bound",  # no shard id: the request just fits gRPC's limit
        lambda w: big_stub(w).Execute(
            agent_pb2.ExecuteRequest(
                chip=1, activation=bytes(DEFAULT_SETTINGS.max_execute_bytes + 1)
            ),
            timeout=30,
        ),
        CODE.INVALID_ARGUMENT,
        "exceeds",
    ),
    (
        "execute-over-the-message-limit",  # refused by gRPC before the agent sees it
        lambda w: big_stub(w).Execute(
            agent_pb2.ExecuteRequest(chip=1, activation=bytes(load_stream.MAX_MESSAGE_BYTES)),
            timeout=30,
        ),
        CODE.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    (
        "execute-on-a-chip-bound-to-a-replica",
        execute(0, Activation.for_tokens([0], [0], [5]).to_bytes()),
        CODE.FAILED_PRECONDITION,
        "serves replica",
    ),
    ("execute-shard-not-held", execute(1, b"", shard=1), CODE.NOT_FOUND, "does not hold"),
    ("execute-chip-out-of-range", execute(4, b""), CODE.INVALID_ARGUMENT, "does not exist"),
    (
        "execute-slot-out-of-range",
        execute(1, Activation.for_tokens([99], [0], [5]).to_bytes()),
        CODE.INVALID_ARGUMENT,
        "slot",
    ),
    (
        "execute-position-beyond-the-context",
        execute(1, Activation.for_tokens([0], [10**6], [5]).to_bytes()),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "execute-token-beyond-the-vocabulary",
        execute(1, Activation.for_tokens([0], [0], [10**6]).to_bytes()),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "execute-slots-of-floats",
        execute(1, activation_with(slots=np.zeros(1, np.float32))),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    # Generate
    ("temperature-1e-310", generate(temperature=1e-310), CODE.INVALID_ARGUMENT, "temperature"),
    ("temperature-nan", generate(temperature=float("nan")), CODE.INVALID_ARGUMENT, "temperature"),
    ("temperature-inf", generate(temperature=float("inf")), CODE.INVALID_ARGUMENT, "temperature"),
    ("temperature-negative", generate(temperature=-1.0), CODE.INVALID_ARGUMENT, "temperature"),
    (
        "prompt-text-and-ids",
        generate(prompt_text="hello"),
        CODE.INVALID_ARGUMENT,
        "not both",
    ),
    (
        "prompt-text-without-tokenizer",
        generate(prompt_ids=[], prompt_text="hello"),
        CODE.INVALID_ARGUMENT,
        "tokenizer",
    ),
    ("empty-prompt", generate(prompt_ids=[]), CODE.INVALID_ARGUMENT, ""),
    ("token-negative", generate(prompt_ids=[-1]), CODE.INVALID_ARGUMENT, ""),
    ("token-beyond-vocab", generate(prompt_ids=[TINY.vocab_size]), CODE.INVALID_ARGUMENT, ""),
    ("max-tokens-zero", generate(max_tokens=0), CODE.INVALID_ARGUMENT, ""),
    # Failover resumption (the gateway's resume_tokens): never more than max_tokens - 1, and
    # every resumed token is checked like a prompt token.
    (
        "resume-all-max-tokens",
        generate(resume_tokens=[3, 4], max_tokens=2),
        CODE.INVALID_ARGUMENT,
        "resume_tokens",
    ),
    (
        "resume-token-beyond-vocab",
        generate(resume_tokens=[TINY.vocab_size], max_tokens=3),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "resume-token-negative",
        generate(resume_tokens=[-5], max_tokens=3),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    (
        "resume-a-million-tokens",
        generate(resume_tokens=[1] * 10**5, max_tokens=3),
        CODE.INVALID_ARGUMENT,
        "resume_tokens",
    ),
    ("over-the-context", generate(max_tokens=10_000), CODE.INVALID_ARGUMENT, ""),
    (
        "a-million-token-prompt",
        lambda w: big_stub(w).Generate(
            agent_pb2.GenerateRequest(
                deployment=RING, request_id="big", prompt_ids=[1] * 10**6, max_tokens=1
            ),
            timeout=30,
        ),
        CODE.INVALID_ARGUMENT,
        "",
    ),
    ("unknown-deployment", generate(deployment="nobody"), CODE.NOT_FOUND, "nobody"),
    ("unknown-replica", generate(replica=3), CODE.NOT_FOUND, "replica 3"),
    ("not-stage-0", generate(agent=1), CODE.INVALID_ARGUMENT, "stage 0"),
    (
        "4mb-deployment-name",
        lambda w: big_stub(w).Generate(
            agent_pb2.GenerateRequest(deployment=HUGE, prompt_ids=[1], max_tokens=1), timeout=30
        ),
        CODE.NOT_FOUND,
        "nnn",
    ),
    # The replica RPCs
    (
        "configure-a-chip-bound-to-another-replica",
        configure(a_chips=[0]),
        CODE.ALREADY_EXISTS,
        "bound to replica 'ring'/replica-0",
    ),
    ("configure-the-ring-again", configure(deployment=RING), CODE.ALREADY_EXISTS, "already"),
    ("configure-chip-out-of-range", configure(a_chips=[9]), CODE.INVALID_ARGUMENT, "chip 9"),
    (
        "configure-link-transport-unknown",
        configure(link_transport=99),
        CODE.INVALID_ARGUMENT,
        "link_transport 99",
    ),
    ("configure-shard-not-held", configure(), CODE.NOT_FOUND, "does not hold"),
    (
        "configure-another-stages-shard",
        configure(a_chips=[1], a_shard_ids=lambda w: [w.refs[1].shard_id]),
        CODE.NOT_FOUND,
        "does not hold",
    ),
    ("configure-4mb-name", configure(deployment=HUGE), CODE.NOT_FOUND, "does not hold"),
    ("configure-no-stages", configure(stages=0), CODE.INVALID_ARGUMENT, "stages"),
    # A well-formed request naming a replica not configured here: NOT_FOUND (the control
    # plane's removal takes it as already gone); an empty deployment name: INVALID_ARGUMENT.
    (
        "start-epoch-unknown-replica",
        unary("StartEpoch", agent_pb2.StartEpochRequest(deployment="nobody")),
        CODE.NOT_FOUND,
        "not configured",
    ),
    (
        "start-epoch-empty-deployment",
        unary("StartEpoch", agent_pb2.StartEpochRequest(epoch=1)),
        CODE.INVALID_ARGUMENT,
        "must not be empty",
    ),
    (
        "halt-unknown-replica",
        unary("Halt", agent_pb2.HaltRequest(deployment=RING, replica=1)),
        CODE.NOT_FOUND,
        "not configured",
    ),
    (
        "halt-empty-deployment",
        unary("Halt", agent_pb2.HaltRequest()),
        CODE.INVALID_ARGUMENT,
        "must not be empty",
    ),
    (
        "remove-unknown-replica",
        unary("RemoveReplica", agent_pb2.RemoveReplicaRequest(deployment="nobody")),
        CODE.NOT_FOUND,
        "not configured",
    ),
    (
        "remove-another-replica-of-the-ring",
        unary("RemoveReplica", agent_pb2.RemoveReplicaRequest(deployment=RING, replica=7)),
        CODE.NOT_FOUND,
        "replica 7 is not configured",
    ),
    (
        "remove-empty-deployment",
        unary("RemoveReplica", agent_pb2.RemoveReplicaRequest()),
        CODE.INVALID_ARGUMENT,
        "must not be empty",
    ),
    (
        "remove-4mb-name",
        unary("RemoveReplica", agent_pb2.RemoveReplicaRequest(deployment=HUGE)),
        CODE.NOT_FOUND,
        "nnn",
    ),
    (
        "unload-chip-out-of-range",
        unary("UnloadShard", agent_pb2.UnloadShardRequest(chip=2**32 - 1, shard_id="x")),
        CODE.INVALID_ARGUMENT,
        "does not exist",
    ),
    (
        "unload-shard-not-held",
        unary("UnloadShard", agent_pb2.UnloadShardRequest(chip=FREE_CHIP, shard_id="0" * 64)),
        CODE.NOT_FOUND,
        "does not hold",
    ),
    (
        "mark-failed-chip-out-of-range",
        unary("MarkChipFailed", agent_pb2.MarkChipFailedRequest(chip=4)),
        CODE.INVALID_ARGUMENT,
        "does not exist",
    ),
    # StageDigests, InjectFault (the canary)
    (
        "digests-negative-first-tick",
        unary(
            "StageDigests",
            agent_pb2.StageDigestsRequest(deployment=RING, first_tick=-1, period=4, count=1),
        ),
        CODE.INVALID_ARGUMENT,
        "first_tick",
    ),
    (
        "digests-period-zero",
        unary("StageDigests", agent_pb2.StageDigestsRequest(deployment=RING, count=1)),
        CODE.INVALID_ARGUMENT,
        "period",
    ),
    (
        "digests-period-huge",
        unary(
            "StageDigests",
            agent_pb2.StageDigestsRequest(deployment=RING, period=2**32 - 1, count=1),
        ),
        CODE.INVALID_ARGUMENT,
        "period",
    ),
    (
        "digests-count-zero",
        unary("StageDigests", agent_pb2.StageDigestsRequest(deployment=RING, period=4)),
        CODE.INVALID_ARGUMENT,
        "count",
    ),
    (
        "digests-count-over-the-chain-log",
        unary(
            "StageDigests",
            agent_pb2.StageDigestsRequest(deployment=RING, period=4, count=2**32 - 1),
        ),
        CODE.INVALID_ARGUMENT,
        "chain log",
    ),
    (
        "digests-unknown-replica",
        unary(
            "StageDigests",
            agent_pb2.StageDigestsRequest(deployment=HUGE, period=4, count=1),
        ),
        CODE.NOT_FOUND,
        "not configured",
    ),
    (
        "digests-empty-deployment",
        unary("StageDigests", agent_pb2.StageDigestsRequest(period=4, count=1)),
        CODE.INVALID_ARGUMENT,
        "must not be empty",
    ),
    (
        "inject-fault-without-the-flag",  # production agents refuse it, even to the control plane
        unary("InjectFault", agent_pb2.InjectFaultRequest(deployment=RING, stage=0, bit=9)),
        CODE.FAILED_PRECONDITION,
        "--allow-fault-injection",
    ),
    # LinkPing
    (
        "ping-count-zero",
        lambda w: w.a.stub.LinkPing(agent_pb2.LinkPingRequest(peer=w.b.address), timeout=30),
        CODE.INVALID_ARGUMENT,
        "count",
    ),
    (
        "ping-count-over-the-cap",
        lambda w: w.a.stub.LinkPing(
            agent_pb2.LinkPingRequest(peer=w.b.address, count=10**6), timeout=30
        ),
        CODE.INVALID_ARGUMENT,
        "count",
    ),
    (
        "ping-512mib-payload",
        lambda w: w.a.stub.LinkPing(
            agent_pb2.LinkPingRequest(peer=w.b.address, count=1, payload_bytes=512 << 20),
            timeout=30,
        ),
        CODE.INVALID_ARGUMENT,
        "payload_bytes",
    ),
    (
        "ping-no-peer",
        lambda w: w.a.stub.LinkPing(agent_pb2.LinkPingRequest(count=1), timeout=30),
        CODE.INVALID_ARGUMENT,
        "peer",
    ),
    (
        "ping-to-a-closed-port",
        lambda w: w.a.stub.LinkPing(
            agent_pb2.LinkPingRequest(peer="127.0.0.1:1", count=1), timeout=30
        ),
        CODE.UNAVAILABLE,
        "127.0.0.1:1",
    ),
    # Found by this suite: fields of ConfigureReplica the agent took without a bound.
    (
        "configure-jitter-1e300-ms",
        configure(a_chips=[1], jitter_ms=1e300),
        CODE.INVALID_ARGUMENT,
        "jitter_ms",
    ),
    (
        "configure-jitter-nan",
        configure(a_chips=[1], jitter_ms=float("nan")),
        CODE.INVALID_ARGUMENT,
        "jitter_ms",
    ),
    (
        "configure-window-2^32-1",
        configure(a_chips=[1], window=2**32 - 1),
        CODE.INVALID_ARGUMENT,
        "window",
    ),
    (
        "configure-stages-disagree-with-the-shards",
        configure(a_chips=[1], stages=3),
        CODE.FAILED_PRECONDITION,
        "stages",
    ),
    (
        "4mb-request-id-past-its-deadline",
        lambda w: big_stub(w).Generate(
            agent_pb2.GenerateRequest(
                deployment=RING, request_id=HUGE, prompt_ids=[1, 2], max_tokens=2, deadline_ms=1
            ),
            timeout=30,
        ),
        CODE.DEADLINE_EXCEEDED,
        "nnn",
    ),
]


@pytest.mark.parametrize(
    ("call", "code", "words"),
    [case[1:] for case in RPC_CASES],
    ids=[case[0] for case in RPC_CASES],
)
def test_a_hostile_rpc_is_refused_with_its_code(
    world: World, call: Callable[[World], object], code: grpc.StatusCode, words: str
) -> None:
    try:
        with served_concurrently(world):
            assert_refused(lambda: call(world), code, words)
    finally:
        with contextlib.suppress(grpc.RpcError):  # only there if a configure was taken
            world.a.stub.RemoveReplica(agent_pb2.RemoveReplicaRequest(deployment="thief"))
    assert_invariants(world)


def test_digests_of_ticks_far_beyond_the_ring_are_empty_not_an_overflow(world: World) -> None:
    """The largest ticks a caller can name (first_tick near 2**63, the largest period and
    count) are answered with empty digests: no arithmetic overflow, nothing allocated per
    tick beyond the reply."""
    with served_concurrently(world):
        reply = big_stub(world).StageDigests(
            agent_pb2.StageDigestsRequest(
                deployment=RING,
                first_tick=2**63 - 2**40,
                period=2**20,
                count=DEFAULT_SETTINGS.chain_log_limit,
            ),
            timeout=30,
        )
    assert [s.stage for s in reply.stages] == [0]
    assert len(reply.stages[0].digests) == DEFAULT_SETTINGS.chain_log_limit
    assert not any(reply.stages[0].digests)
    assert_invariants(world)


LONG = 40  # tokens: long enough for a second request to arrive while the first streams


def long_request(request_id: str) -> agent_pb2.GenerateRequest:
    return agent_pb2.GenerateRequest(
        deployment=RING, request_id=request_id, prompt_ids=PROMPT, max_tokens=LONG
    )


def test_a_request_id_in_flight_cannot_be_taken_over(world: World) -> None:
    """A second request under the id of one being served is refused, and does not cancel or
    steal the first one's tokens."""
    expected = world.reference.generate(PROMPT, LONG).tokens
    call = world.a.stub.Generate(long_request("shared-id"), timeout=60)
    first = next(call)
    assert_refused(
        lambda: world.a.stub.Generate(long_request("shared-id"), timeout=10),
        CODE.INVALID_ARGUMENT,
        "already in flight",
    )
    assert (first.token, *(r.token for r in call)) == expected
    assert_invariants(world)


def test_a_client_that_leaves_mid_stream_does_not_disturb_the_ring(world: World) -> None:
    with served_concurrently(world):
        call = world.a.stub.Generate(long_request(world.request_id("leaver")), timeout=60)
        next(call)
        call.cancel()
        assert call.code() == CODE.CANCELLED
    assert world.serve() == world.expected
    assert_invariants(world)


def test_a_client_that_never_reads_does_not_hold_the_ring(world: World) -> None:
    """A request whose client never reads its stream (with logits: the flow-control window
    fills after a token) must not stall the pipeline for the others."""
    request = long_request(world.request_id("stalled"))
    request.return_logits = True
    call = world.a.stub.Generate(request, timeout=60)
    try:
        with served_concurrently(world):
            pass
        assert world.serve() == world.expected
    finally:
        call.cancel()
    assert_invariants(world)


# --- the framed link port (agents.wire) -------------------------------------------------------
#
# The same attacks on the port of the framed transport: every refusal is an END message with
# the gRPC status code the Link stream would end with (or, when no TLS session exists, the
# connection closed), and the invariants hold after each.


def wire_channel(w: World, agent: AgentProcess, creds: certs.Credentials) -> wire.Channel:
    """A handshaken TLS channel to `agent`'s link port, dialling with `creds`."""
    return wire.connect("127.0.0.1", agent.status().link_port, creds, agent.identity)


PROBE_HELLO = wire.hello("", 0, 0, 0, b"", probe=True)


def wire_end(
    channel: wire.Channel, timeout: float = 20, *, accepted: bool = False
) -> tuple[grpc.StatusCode, str]:
    """The END the server answers with (anything else before it fails the test; `accepted`:
    the hello was a probe's, which the server ACCEPTs first)."""
    reader = wire.Reader(channel)
    kind, body = reader.read(time.monotonic() + timeout, wire.END_LIMIT)
    if accepted:
        assert kind == wire.ACCEPT, f"expected ACCEPT, got {wire.KINDS[kind]}"
        kind, body = reader.read(time.monotonic() + timeout, wire.END_LIMIT)
    assert kind == wire.END, f"expected END, got {wire.KINDS[kind]}"
    code, text = wire.parse_end(body)
    assert len(text) < DETAIL_LIMIT
    return code, text


def wire_refused(
    w: World,
    agent: AgentProcess,
    identity: str,
    data: bytes,
    code: grpc.StatusCode,
    words: str,
    *,
    close_write: bool = False,
) -> None:
    channel = wire_channel(w, agent, credentials(w.certs, identity))
    try:
        channel.send(data)
        if close_write:  # the peer's end arrives in the middle of a message
            assert isinstance(channel, wire.TlsChannel)
            channel.sock.shutdown(socket.SHUT_WR)
        got, text = wire_end(channel, accepted=data.startswith(PROBE_HELLO))
        assert (got, words in text) == (code, True), (got, text)
    finally:
        channel.shutdown()


def wire_hello(deployment: str, stage: int, secret: bytes, incarnation: int | None = None) -> bytes:
    return wire.hello(
        deployment, 0, stage, time.time_ns() if incarnation is None else incarnation, secret
    )


WIRE_CASES: list[tuple[str, int, str, Callable[[], bytes], CODE, str]] = [
    # (id, stage (0: agent a, 1: agent b), identity, bytes sent, code, words)
    (
        "another-nodes-cert",
        1,
        H1,
        lambda: wire_hello(RING, 1, RING_SECRET),
        CODE.PERMISSION_DENIED,
        "configured upstream",
    ),
    (
        "rogue-node-cert",
        1,
        ROGUE,
        lambda: wire_hello(RING, 1, RING_SECRET),
        CODE.PERMISSION_DENIED,
        "configured upstream",
    ),
    (
        "control-plane-cert",
        1,
        CONTROL_PLANE,
        lambda: wire_hello(RING, 1, RING_SECRET),
        CODE.PERMISSION_DENIED,
        "may not call",
    ),
    (
        "missing-secret",
        1,
        H0,
        lambda: wire_hello(RING, 1, b""),
        CODE.UNAUTHENTICATED,
        "link secret",
    ),
    (
        "wrong-secret",
        1,
        H0,
        lambda: wire_hello(RING, 1, bytes(32)),
        CODE.PERMISSION_DENIED,
        "wrong link secret",
    ),
    (
        "another-replicas-secret",
        1,
        H0,
        lambda: wire_hello(RING, 1, VICTIM_SECRET),
        CODE.PERMISSION_DENIED,
        "wrong link secret",
    ),
    (
        "upstream-of-the-other-stage",
        0,
        H0,
        lambda: wire_hello(RING, 0, RING_SECRET),
        CODE.PERMISSION_DENIED,
        "configured upstream",
    ),
    (
        "older-incarnation",
        1,
        H0,
        lambda: wire_hello(RING, 1, RING_SECRET, incarnation=1),
        CODE.FAILED_PRECONDITION,
        "does not replace",
    ),
    (
        "unknown-deployment",
        1,
        H0,
        lambda: wire_hello("nobody", 1, RING_SECRET),
        CODE.NOT_FOUND,
        "no stage 1",
    ),
    (
        "incarnation-over-int64",
        1,
        H0,
        lambda: wire_hello(RING, 1, RING_SECRET, incarnation=2**63),
        CODE.INVALID_ARGUMENT,
        "non-negative",
    ),
    (
        "hello-lengths-lie",
        1,
        H0,
        lambda: wire.message(wire.HELLO, wire_hello(RING, 1, RING_SECRET)[wire.HEAD.size :] + b"x"),
        CODE.INVALID_ARGUMENT,
        "lengths",
    ),
    (
        "oversize-length-prefix",
        1,
        H0,
        lambda: wire.HEAD.pack(wire.MAGIC, wire.VERSION, wire.HELLO, 2**32 - 1),
        CODE.RESOURCE_EXHAUSTED,
        "over the limit",
    ),
    (
        "garbage",
        1,
        H0,
        lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        CODE.INVALID_ARGUMENT,
        "not a Lockstep link message",
    ),
    (
        "frame-before-hello",
        1,
        H0,
        lambda: wire.frame_message(RING, 0, 1, Frame(0, 0, None, b"")),
        CODE.INVALID_ARGUMENT,
        "must be a HELLO",
    ),
    (
        "stage-frame-on-a-probe",
        1,
        ROGUE,
        lambda: (
            wire.hello("", 0, 0, 0, b"", probe=True)
            + wire.frame_message(RING, 0, 1, Frame(0, 0, None, b""))
        ),
        CODE.INVALID_ARGUMENT,
        "metadata",
    ),
    (
        "probe-with-a-bad-checksum",
        1,
        ROGUE,
        lambda: (
            wire.hello("", 0, 0, 0, b"", probe=True)
            + corrupt_crc(wire.frame_message("", 0, 0, Frame(0, 3, None, b"x"), wire.PING))
        ),
        CODE.DATA_LOSS,
        "checksum",
    ),
]


def corrupt_crc(data: bytes) -> bytes:
    """A FRAME message with its CRC-32 field flipped."""
    at = wire.HEAD.size + struct.calcsize("<IIQqiB")
    return data[:at] + bytes(b ^ 0x5A for b in data[at : at + 4]) + data[at + 4 :]


@pytest.mark.parametrize(
    ("stage", "identity", "data", "code", "words"),
    [case[1:] for case in WIRE_CASES],
    ids=[case[0] for case in WIRE_CASES],
)
def test_a_framed_link_into_the_serving_ring_is_refused(
    world: World,
    stage: int,
    identity: str,
    data: Callable[[], bytes],
    code: grpc.StatusCode,
    words: str,
) -> None:
    with served_concurrently(world):
        wire_refused(world, world.agents[stage], identity, data(), code, words)
    assert_invariants(world)


def test_a_truncated_hello_is_refused(world: World) -> None:
    with served_concurrently(world):
        data = wire_hello(RING, 1, RING_SECRET)
        wire_refused(
            world, world.b, H0, data[:-7], CODE.INVALID_ARGUMENT, "truncated", close_write=True
        )
    assert_invariants(world)


VICTIM_WIRE_CASES: list[tuple[str, Callable[[], bytes], CODE, str, bool]] = [
    # (id, bytes after an accepted hello into victim stage 1, code, words, half-close after)
    (
        "oversize-frame",
        lambda: wire.HEAD.pack(wire.MAGIC, wire.VERSION, wire.FRAME, 2**31),
        CODE.RESOURCE_EXHAUSTED,
        "over the limit",
        False,
    ),
    (
        "truncated-frame",
        lambda: wire.frame_message(VICTIM, 0, 1, Frame(0, 0, None, bytes(4096)))[:-100],
        CODE.INVALID_ARGUMENT,
        "truncated",
        True,
    ),
    (
        "garbage-after-hello",
        lambda: b"\x00" * 64,
        CODE.INVALID_ARGUMENT,
        "not a Lockstep link message",
        False,
    ),
    (
        "a-second-hello",
        lambda: wire_hello(VICTIM, 1, VICTIM_SECRET),
        CODE.INVALID_ARGUMENT,
        "only FRAME",
        False,
    ),
    (
        "frame-for-another-stage",
        lambda: wire.frame_message(VICTIM, 0, 0, Frame(0, 0, None, b"")),
        CODE.INVALID_ARGUMENT,
        "the stream's target",
        False,
    ),
    (
        "corrupted-checksum",
        lambda: corrupt_crc(wire.frame_message(VICTIM, 0, 1, Frame(0, 0, None, b""))),
        CODE.DATA_LOSS,
        "checksum",
        False,
    ),
    (
        "beyond-the-window",
        lambda: wire.frame_message(VICTIM, 0, 1, Frame(0, 2, None, b"")),
        CODE.OUT_OF_RANGE,
        "credit window",
        False,
    ),
    (
        "unknown-flags",
        lambda: wire.frame_message(VICTIM, 0, 1, Frame(0, 0, None, b""), flags=0x80),
        CODE.INVALID_ARGUMENT,
        "unknown frame flags",
        False,
    ),
]


@pytest.mark.parametrize(
    ("data", "code", "words", "close_write"),
    [case[1:] for case in VICTIM_WIRE_CASES],
    ids=[case[0] for case in VICTIM_WIRE_CASES],
)
def test_a_hostile_frame_from_the_upstream_on_the_framed_port_is_refused(
    world: World, data: Callable[[], bytes], code: grpc.StatusCode, words: str, close_write: bool
) -> None:
    world.configure_victim()
    try:
        with served_concurrently(world):
            channel = wire_channel(world, world.b, credentials(world.certs, H0))
            try:
                channel.send(wire_hello(VICTIM, 1, VICTIM_SECRET))
                wire.expect_accept(wire.Reader(channel))
                channel.send(data())
                if close_write:
                    assert isinstance(channel, wire.TlsChannel)
                    channel.sock.shutdown(socket.SHUT_WR)
                got, text = wire_end(channel)
                assert (got, words in text) == (code, True), (got, text)
            finally:
                channel.shutdown()
    finally:
        world.remove_victim()
    assert_invariants(world)


def test_a_foreign_or_expired_certificate_fails_the_framed_handshake(
    world: World, tmp_path: Path
) -> None:
    ca = credentials(world.certs).ca_pem
    for creds in (
        foreign_control_plane(tmp_path),
        expired_control_plane(tmp_path, world.certs),
    ):
        # Trusting the agent's CA, presenting a certificate it must refuse.
        client = certs.Credentials(creds.identity, creds.cert_pem, creds.key_pem, ca)
        with served_concurrently(world), pytest.raises((ssl.SSLError, wire.Closed, OSError)):
            channel = wire_channel(world, world.b, client)
            try:  # TLS 1.3: the client's handshake ends first; the refusal is the next read
                channel.send(wire_hello(RING, 1, RING_SECRET))
                wire.Reader(channel).read(time.monotonic() + 20, wire.END_LIMIT)
            finally:
                channel.shutdown()
    assert_invariants(world)


def closed_by_peer(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer closes `sock` (fails past `timeout`)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(4096):
            pass
    return time.monotonic() - started


def test_plaintext_and_silence_on_the_framed_port_are_cut_off(world: World) -> None:
    port = world.b.status().link_port
    with served_concurrently(world):
        # Garbage where a TLS ClientHello should be: the handshake fails, the port closes.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"\x00" * 64 + b"GET / HTTP/1.1\r\n\r\n")
            assert closed_by_peer(sock, 20) < 20
        # A connection that never says anything: closed after the handshake timeout.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            took = closed_by_peer(sock, 30)
            assert LINK_IDLE * 0.8 < took < LINK_IDLE + 15, took
    assert_invariants(world)


def test_a_slowloris_on_the_framed_port_ends_at_its_timeouts(world: World) -> None:
    """Bytes dribbled into a hello do not reset its deadline; an accepted but silent link
    ends after the idle timeout."""
    hello_bytes = wire_hello(RING, 1, RING_SECRET)
    with served_concurrently(world):
        channel = wire_channel(world, world.b, credentials(world.certs, ROGUE))
        try:
            started = time.monotonic()
            with contextlib.suppress(OSError):
                for byte in hello_bytes[:-1]:
                    channel.send(bytes([byte]))
                    time.sleep(0.25)  # the attack itself: a byte at a time
                    if time.monotonic() - started > LINK_IDLE + 10:
                        break
            got, text = wire_end(channel)
            assert (got, "no hello" in text) == (CODE.DEADLINE_EXCEEDED, True), (got, text)
            assert time.monotonic() - started < LINK_IDLE + 15
        finally:
            channel.shutdown()
    world.configure_victim()
    try:
        channel = wire_channel(world, world.b, credentials(world.certs, H0))
        try:
            channel.send(wire_hello(VICTIM, 1, VICTIM_SECRET))
            reader = wire.Reader(channel)
            wire.expect_accept(reader)
            kind, body = reader.read(time.monotonic() + LINK_IDLE + 15, wire.END_LIMIT)
            assert kind == wire.END
            got, text = wire.parse_end(body)
            assert (got, "no frame for" in text) == (CODE.DEADLINE_EXCEEDED, True), (got, text)
        finally:
            channel.shutdown()
    finally:
        world.remove_victim()
    assert_invariants(world)


class HeldLinks:
    """Probe connections to an agent's link port, kept open with pings (the idle timeout is
    short here) until `close`."""

    def __init__(self, w: World, agent: AgentProcess) -> None:
        self.w, self.agent = w, agent
        self.channels: list[wire.Channel] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper = threading.Thread(target=self._keep_alive, daemon=True)
        self._keeper.start()

    def open(self, identity: str) -> wire.Channel:
        channel = wire_channel(self.w, self.agent, credentials(self.w.certs, identity))
        try:
            channel.send(PROBE_HELLO)
            wire.expect_accept(wire.Reader(channel))
        except BaseException:
            channel.shutdown()
            raise
        with self._lock:  # pinged from now on (after the ACCEPT: a reader starts at an ACK)
            self.channels.append(channel)
        return channel

    def drop(self) -> None:
        with self._lock:
            channel = self.channels.pop()
        channel.shutdown()

    def _keep_alive(self) -> None:
        ping = wire.frame_message("", 0, 0, Frame(0, 0, None, b""), wire.PING)
        while not self._stop.wait(0.5):
            with self._lock:
                channels = list(self.channels)
            for channel in channels:
                with contextlib.suppress(OSError):
                    channel.send(ping)

    def close(self) -> None:
        self._stop.set()
        self._keeper.join(10)
        with self._lock:
            channels, self.channels = self.channels, []
        for channel in channels:
            channel.shutdown()


def framed_figures(w: World, agent: AgentProcess) -> tuple[int, dict[str, int]]:
    """The agent's framed link port from its metrics: connections open, refusals by reason."""
    m = scrape(agent, w.certs)
    refused = {
        labels[0]: int(value)
        for (name, labels), value in m.items()
        if name == "lockstep_agent_framed_link_connections_refused_total"
    }
    return int(m[("lockstep_agent_framed_link_connections_open", ())]), refused


def framed_open(w: World, agent: AgentProcess) -> int:
    return framed_figures(w, agent)[0]


def test_framed_connections_are_bounded_per_peer(world: World) -> None:
    """One identity holds at most `link_max_connections_per_peer` connections (probe links,
    kept alive with pings); the next is refused with RESOURCE_EXHAUSTED; the configured
    upstreams' links are untouched."""
    held = HeldLinks(world, world.b)
    try:
        with served_concurrently(world):
            _, before = framed_figures(world, world.b)
            for _ in range(LINK_CONNECTIONS_PER_PEER):
                held.open(ROGUE)
            extra = wire_channel(world, world.b, credentials(world.certs, ROGUE))
            try:
                got, text = wire_end(extra)
                assert (got, "max_streams_per_peer" in text) == (CODE.RESOURCE_EXHAUSTED, True)
            finally:
                extra.shutdown()
            _, after = framed_figures(world, world.b)
            assert after["max_connections_per_peer"] == before["max_connections_per_peer"] + 1
            assert after["max_connections"] == before["max_connections"]
    finally:
        held.close()
    assert_invariants(world)


# The ring's link from h0 into stage 1: the one framed connection open on b between cases.
RING_LINKS_INTO_B = 1


def test_framed_connections_are_bounded_in_all(world: World) -> None:
    """At most `link_max_connections` connections are open on the port, whoever holds them;
    the next is told RESOURCE_EXHAUSTED in an END after its handshake (as over the per-peer
    bound), is not counted open and changes nothing: the ring's link and the held ones keep
    working. A slot frees when a connection closes. The port's metrics count all of it."""
    b = world.b
    wait_for(
        lambda: framed_open(world, b) == RING_LINKS_INTO_B,
        timeout=30,
        interval=0.2,
        what="only the ring's link open on b's framed port",
    )
    _, before = framed_figures(world, b)
    held = HeldLinks(world, b)
    fillers = [ROGUE, H1]  # neither is over the per-peer bound: the global one refuses
    try:
        with served_concurrently(world):
            for i in range(LINK_CONNECTIONS - RING_LINKS_INTO_B):
                held.open(fillers[i // LINK_CONNECTIONS_PER_PEER])
            assert framed_open(world, b) == LINK_CONNECTIONS
            for identity in (agent_identity("late"), H0):  # a new peer; the ring's upstream
                extra = wire_channel(world, b, credentials(world.certs, identity))
                try:
                    extra.send(PROBE_HELLO)
                    got, text = wire_end(extra)
                    assert got == CODE.RESOURCE_EXHAUSTED, (got, text)
                    assert f"link_max_connections {LINK_CONNECTIONS}" in text, text
                finally:
                    extra.shutdown()
            # Nothing changed: the held connections answer pings, none more is open.
            probe = held.channels[0]
            probe.send(wire.frame_message("", 0, 0, Frame(0, 99, None, b"x"), wire.PING))
            reader = wire.Reader(probe)
            while True:  # the keeper's pings were acknowledged too; ours comes after them
                kind, body = reader.read(time.monotonic() + 20, wire.END_LIMIT)
                assert kind == wire.ACK, wire.KINDS[kind]
                if wire.ACK_BODY.unpack(body)[1] == 99:
                    break
            opened, after = framed_figures(world, b)
            assert opened == LINK_CONNECTIONS
            assert after["max_connections"] == before["max_connections"] + 2
            assert after["max_connections_per_peer"] == before["max_connections_per_peer"]
            # A slot frees when a connection closes: the next one is accepted.
            held.drop()
            wait_for(
                lambda: framed_open(world, b) == LINK_CONNECTIONS - 1,
                timeout=30,
                interval=0.1,
                what="the closed connection's slot to free",
            )
            held.open(agent_identity("late"))
            assert framed_open(world, b) == LINK_CONNECTIONS
    finally:
        held.close()
    wait_for(
        lambda: framed_open(world, b) == RING_LINKS_INTO_B,
        timeout=30,
        interval=0.2,
        what="the held connections to end",
    )
    assert_invariants(world)


def test_log_lines_stay_bounded(world: World) -> None:
    """After every case above (4 MB names included) no log line of either agent is long."""
    for agent in world.agents:
        longest = max(len(line) for line in agent.stderr().splitlines())
        assert longest < DETAIL_LIMIT, (agent.node, longest)


# --- 1,000 hostile requests leave the agent flat ------------------------------------------------


def proc_figures(pid: int) -> tuple[int, int, int]:
    """(RSS bytes, threads, open file descriptors) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    rss = int(fields["VmRSS"].split()[0]) * 1024  # kB
    return rss, int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd"))


def hostile_mix(w: World, tmp: Path) -> list[tuple[str, Callable[[], object], CODE]]:
    """Cheap hostile requests against agent a, each with the code it must get."""
    a = w.a
    agent_stub = w.stub(a, H1)
    garbage = [b"\xff\xff\xff\xff"]
    foreign = foreign_control_plane(tmp)
    activation = activation_with_cursor("1e400")

    def foreign_status() -> object:
        with open_channel(a.address, foreign, peer=a.identity) as channel:
            return agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.StatusRequest(), timeout=10)

    return [
        (
            "agent-cert-halt",
            lambda: agent_stub.Halt(agent_pb2.HaltRequest(deployment=RING), timeout=10),
            CODE.PERMISSION_DENIED,
        ),
        ("bad-temperature", lambda: generate(temperature=1e-310)(w), CODE.INVALID_ARGUMENT),
        ("both-prompts", lambda: generate(prompt_text="x")(w), CODE.INVALID_ARGUMENT),
        ("execute-cursor", lambda: execute(1, activation)(w), CODE.INVALID_ARGUMENT),
        ("execute-bound-chip", lambda: execute(0, b"")(w), CODE.FAILED_PRECONDITION),
        (
            "garbage-load",
            lambda: agent_client.send_load(a.channel, garbage, timeout=10),
            CODE.INVALID_ARGUMENT,
        ),
        (
            "link-wrong-secret",
            lambda: link_call(w, a, H1, [bubble(RING, 0)], target(RING, 0, bytes(32))),
            CODE.PERMISSION_DENIED,
        ),
        (
            "link-unknown-target",
            lambda: link_call(w, a, H1, [bubble("x", 0)], target("x", 0, RING_SECRET)),
            CODE.NOT_FOUND,
        ),
        (
            "remove-unknown",
            lambda: a.stub.RemoveReplica(
                agent_pb2.RemoveReplicaRequest(deployment="nobody"), timeout=10
            ),
            CODE.NOT_FOUND,
        ),
        ("claim-bound-chip", lambda: configure(a_chips=[0])(w), CODE.ALREADY_EXISTS),
        (
            "ping-too-big",
            lambda: a.stub.LinkPing(
                agent_pb2.LinkPingRequest(peer=w.b.address, count=1, payload_bytes=1 << 30),
                timeout=10,
            ),
            CODE.INVALID_ARGUMENT,
        ),
        ("foreign-ca", foreign_status, CODE.UNAVAILABLE),
    ]


def hammer(
    mix: list[tuple[str, Callable[[], object], CODE]], total: int, threads: int = 4
) -> dict[str, int]:
    """Send `total` requests of `mix` round-robin from `threads` threads; every one must get
    its code. Returns how many of each were sent. A fresh TLS connection (foreign-ca) is one
    in 25 requests: the handshakes are the expensive part."""
    plan = []
    cheap = [m for m in mix if m[0] != "foreign-ca"]
    costly = [m for m in mix if m[0] == "foreign-ca"]
    for i in range(total):
        plan.append(costly[0] if i % 25 == 24 else cheap[i % len(cheap)])
    wrong: list[str] = []
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def work(part: list[tuple[str, Callable[[], object], CODE]]) -> None:
        for name, call, code in part:
            try:
                result = call()
                if isinstance(result, Iterator):
                    list(result)
                got = "OK"
            except grpc.RpcError as exc:
                got = exc.code().name
            with lock:
                counts[name] = counts.get(name, 0) + 1
                if got != code.name:
                    wrong.append(f"{name}: {got}")

    workers = [
        threading.Thread(target=work, args=(plan[i::threads],), daemon=True) for i in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join(300)
    assert not any(t.is_alive() for t in workers)
    assert not wrong, wrong[:10]
    assert sum(counts.values()) == total
    return counts


def test_1000_hostile_requests_leave_rss_threads_and_fds_flat(world: World, tmp_path: Path) -> None:
    mix = hostile_mix(world, tmp_path)
    pid = world.a.pid
    hammer(mix, 200)  # warm-up: thread pool, channels, caches, allocator arenas
    settle = proc_figures(pid)
    wait_for(
        lambda: proc_figures(pid)[1] <= settle[1], timeout=10, what="the warm-up's threads to end"
    )
    before = proc_figures(pid)
    started = time.monotonic()
    counts = hammer(mix, 1000)
    seconds = time.monotonic() - started
    rss_slack, thread_slack, fd_slack = 16 << 20, 2, 4

    def flat() -> tuple[int, int, int] | None:
        now = proc_figures(pid)
        ok = (
            now[0] - before[0] <= rss_slack
            and now[1] - before[1] <= thread_slack
            and now[2] - before[2] <= fd_slack
        )
        return now if ok else None

    after = proc_figures(pid)
    print(
        f"1000 hostile requests in {seconds:.1f} s ({counts}); agent {world.a.node}: "
        f"RSS {before[0] / 2**20:.1f} -> {after[0] / 2**20:.1f} MiB, threads {before[1]} -> "
        f"{after[1]}, fds {before[2]} -> {after[2]} (slack {rss_slack >> 20} MiB, "
        f"{thread_slack} threads, {fd_slack} fds)"
    )
    settled = wait_for(flat, timeout=10, what=f"flat figures (before {before}, last {after})")
    print(f"settled: RSS {settled[0] / 2**20:.1f} MiB, threads {settled[1]}, fds {settled[2]}")
    with served_concurrently(world):
        pass
    assert_invariants(world)
