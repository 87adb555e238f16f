"""Hostile Link streams against agent processes: a frame is checked before it reaches a stage.

tiny-llama in 4 whole-op stages; every chip c of both agents holds stage c % 4's shard, so a
test can lay a replica out as it needs. "ring" (chips 0-3) serves throughout; each other test
configures its own replica on chips 4-7 and removes it. Status codes: see
`protos/interconnect.proto`.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agent_helpers import AgentCluster, AgentProcess, Waiting, load, tiny_request, wait_for

from agents.activation import Activation
from agents.executor import ReferenceExecutor, load_shard
from agents.interconnect import (
    EXCHANGE,
    LinkService,
    frame_checksum,
    handlers,
    link_frame,
    target_metadata,
)
from agents.lockstep import Frame, Schedule
from agents.pipeline import StageRunner, encode_work
from agents.sampling import Sampling
from orchestrator.compiler import ShardRef, compile_plan
from orchestrator.serving import (
    BringUpError,
    BringUpOptions,
    bring_up_replica,
    configure_replica,
    configure_requests,
    remove_replica,
)
from orchestrator.weights import SeededWeights
from placement.models import MODEL_PRESETS
from placement.plan import Plan
from placement.planner import make_plan
from placement.topology import preset_topology
from protos import agent_pb2, interconnect_pb2
from security.tls import link_metadata

TINY = MODEL_PRESETS["tiny-llama"]
SEED = 9
RING = "ring"


@dataclass
class Setup:
    plan: Plan
    refs: list[ShardRef]
    a: AgentProcess
    b: AgentProcess

    def where(self, layout: dict[int, tuple[AgentProcess, int]]) -> dict[str, tuple[str, int]]:
        """Stage -> (agent, chip) as the `where` map of `configure_requests`."""
        return {
            r.chip: (layout[r.binding.stage][0].address, layout[r.binding.stage][1])
            for r in self.refs
        }

    def configure(
        self, name: str, layout: dict[int, tuple[AgentProcess, int]], *, window: int = 2
    ) -> dict[str, agent_pb2.ConfigureReplicaRequest]:
        """Configure a replica (its barrier still closed: nothing runs)."""
        requests = configure_requests(
            self.plan,
            self.refs,
            self.where(layout),
            deployment=name,
            window=window,
            nodes=self.nodes,
            link_secret=secret_of(name),
        )
        configure_replica(self.channels, requests)
        return requests

    def remove(self, name: str, requests: Iterable[str]) -> None:
        remove_replica(self.channels, name, list(requests))

    def agent(self, address: str) -> AgentProcess:
        return self.a if address == self.a.address else self.b

    @property
    def nodes(self) -> dict[str, str]:
        return {x.address: x.node for x in (self.a, self.b)}

    @property
    def channels(self) -> dict[str, grpc.Channel]:
        return {x.address: x.channel for x in (self.a, self.b)}


def secret_of(deployment: str) -> bytes:
    """Each test replica's link secret (fixed, so a test stream can present it)."""
    return hashlib.sha256(deployment.encode()).digest()


# Agent address -> the other agent: a test stream speaks as the configured upstream of the
# stage it feeds (its certificate and the replica's secret), the way a faulty or compromised
# upstream would; what it sends is then up to the frame checks.
OTHER: dict[str, AgentProcess] = {}


def standard(s: Setup, base: int) -> dict[int, tuple[AgentProcess, int]]:
    """Stages 0-1 on agent a, 2-3 on agent b, on chips base..base+3."""
    return {st: (s.a if st < 2 else s.b, base + st) for st in range(4)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, agent_cluster: AgentCluster) -> Setup:
    plan = make_plan(tiny_request(RING, stages=4), preset_topology(1, "dev-whole-ops"))
    refs = compile_plan(plan, TINY, SEED, tmp_path_factory.mktemp("store"))
    by_stage = {r.binding.stage: r.path.read_bytes() for r in refs}
    a, b = (agent_cluster.start(f"k{i}", extra=["--sram-bytes", "64MiB"]) for i in range(2))
    for agent in (a, b):
        for chip in range(8):
            load(agent, by_stage[chip % 4], chip)
    s = Setup(plan, refs, a, b)
    OTHER.update({a.address: b, b.address: a})
    bring_up_replica(
        plan,
        refs,
        s.where(standard(s, 0)),
        s.channels,
        nodes=s.nodes,
        options=BringUpOptions(link_secret=secret_of(RING)),
    )
    return s


@pytest.fixture(scope="module")
def reference() -> ReferenceExecutor:
    return ReferenceExecutor(TINY, SeededWeights(TINY, SEED, "F16"), max_batch=4, max_context=64)


def generate(agent: AgentProcess, rid: str, prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
    request = agent_pb2.GenerateRequest(
        deployment=RING, request_id=rid, prompt_ids=prompt, max_tokens=n
    )
    return tuple(r.token for r in agent.stub.Generate(request, timeout=60))


def try_exchange(
    agent: AgentProcess,
    frames: Iterable[interconnect_pb2.LinkFrame],
    target: tuple[str, int, int] | None,
    incarnation: int | None = None,
    sender: AgentProcess | None = None,
) -> grpc.RpcError | None:
    """Send `frames` on one Link stream as `sender` (default: the other agent), with the
    target replica's secret; the status the agent ended it with (None: OK)."""
    metadata: tuple[tuple[str, str], ...] = ()
    if target is not None:
        metadata = (
            *target_metadata(*target, incarnation or time.time_ns()),
            *link_metadata(secret_of(target[0])),
        )
    identity = (sender or OTHER[agent.address]).identity
    with agent.dial(identity=identity) as channel:
        call = channel.stream_stream(
            EXCHANGE,
            request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
            response_deserializer=interconnect_pb2.LinkAck.FromString,
        )(iter(frames), timeout=30, metadata=metadata)
        try:
            list(call)
        except grpc.RpcError as exc:
            return exc
    return None


def exchange(
    agent: AgentProcess,
    frames: Iterable[interconnect_pb2.LinkFrame],
    target: tuple[str, int, int] | None,
    incarnation: int | None = None,
    sender: AgentProcess | None = None,
) -> grpc.RpcError:
    error = try_exchange(agent, frames, target, incarnation, sender)
    assert error is not None, "the stream was not refused"
    return error


def held_open(frames: list[interconnect_pb2.LinkFrame], until: threading.Event) -> Iterator:
    """Frames, then keep the stream open (no end of stream) until `until` is set."""
    yield from frames
    until.wait(30)


def pipelines(agent: AgentProcess, deployment: str) -> list[agent_pb2.PipelineStatus]:
    return [p for c in agent.status().chips for p in c.pipelines if p.deployment == deployment]


def ring_healthy(s: Setup) -> None:
    for agent in (s.a, s.b):
        assert all(p.error == "" and p.phase == "running" for p in pipelines(agent, RING))


# --- tests ---------------------------------------------------------------------------------


def test_a_rogue_stream_with_a_valid_crc_cannot_inject_a_token(
    setup: Setup, reference: ReferenceExecutor
) -> None:
    prompt = (5, 17, 1024, 3)
    expected = reference.generate(prompt, 6).tokens
    assert generate(setup.a, "warm", prompt, 6) == expected  # the ring's links are bound
    token = link_frame(RING, 0, 0, Frame(0, 0, 0, b"\x07" + bytes(7) + bytes(4 * 4096)))
    served: list[tuple[int, ...]] = []
    worker = threading.Thread(target=lambda: served.append(generate(setup.a, "real", prompt, 6)))
    worker.start()
    older = exchange(setup.a, [token], (RING, 0, 0), incarnation=1)
    assert older.code() == grpc.StatusCode.FAILED_PRECONDITION, older.details()
    assert "does not replace" in str(older.details())
    local = exchange(  # stage 1's upstream, stage 0, is on the same agent
        setup.a, [link_frame(RING, 0, 1, Frame(0, 0, None, b""))], (RING, 0, 1), sender=setup.a
    )
    assert local.code() == grpc.StatusCode.PERMISSION_DENIED, local.details()
    assert "no remote upstream" in str(local.details())
    unknown = exchange(setup.a, [token], ("nope", 0, 0))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    bare = exchange(setup.a, [token], None)
    assert bare.code() == grpc.StatusCode.INVALID_ARGUMENT and "metadata" in str(bare.details())
    worker.join(60)
    assert served == [expected]
    ring_healthy(setup)


def test_a_frame_naming_another_target_than_its_stream_is_refused(setup: Setup) -> None:
    requests = setup.configure("named", standard(setup, 4))
    try:
        for frame in (
            link_frame(RING, 0, 2, Frame(0, 0, None, b"")),  # another deployment
            link_frame("named", 1, 2, Frame(0, 0, None, b"")),  # another replica
            link_frame("named", 0, 3, Frame(0, 0, None, b"")),  # another stage
        ):
            error = exchange(setup.b, [frame], ("named", 0, 2))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert "stream's target" in str(error.details())
        assert all(p.error == "" for p in pipelines(setup.b, "named"))
        ring_healthy(setup)
    finally:
        setup.remove("named", requests)


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        (Frame(7, 0, None, b""), grpc.StatusCode.FAILED_PRECONDITION, "epoch 7"),
        (Frame(0, 10**15, None, b""), grpc.StatusCode.OUT_OF_RANGE, "credit window"),
    ],
    ids=["future-epoch", "far-future-bubble"],
)
def test_a_frame_beyond_the_stage_stops_the_replica_and_aborts_its_clients_at_once(
    setup: Setup, frame: Frame, code: grpc.StatusCode, words: str
) -> None:
    requests = setup.configure("doomed", standard(setup, 4))
    try:
        client = Waiting(setup.a, "doomed")
        sent = time.monotonic()
        error = exchange(setup.a, [link_frame("doomed", 0, 0, frame)], ("doomed", 0, 0))
        assert error.code() == code and words in str(error.details()), error.details()
        failure, ended = client.result()
        assert failure is not None and failure.code() == grpc.StatusCode.ABORTED
        assert words in str(failure.details())
        assert ended - sent < 5, "the client was ended at once, not at its deadline"
        here = pipelines(setup.a, "doomed")
        assert {p.stage for p in here} == {0, 1}
        assert all(p.phase == "failed" and words in p.error for p in here), here
        late = agent_pb2.GenerateRequest(
            deployment="doomed", request_id="late", prompt_ids=[1], max_tokens=1
        )
        with pytest.raises(grpc.RpcError) as info:
            list(setup.a.stub.Generate(late, timeout=30))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "stopped" in str(info.value.details())
        ring_healthy(setup)
    finally:
        setup.remove("doomed", requests)


def rss_bytes(agent: AgentProcess) -> int:
    for line in Path(f"/proc/{agent.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_future_frames_do_not_grow_the_agent(setup: Setup) -> None:
    payload = bytes(1 << 20)

    def flood(name: str, count: int) -> grpc.RpcError:
        frames = (link_frame(name, 0, 0, Frame(0, 10**9 + i, None, payload)) for i in range(count))
        return exchange(setup.a, frames, (name, 0, 0))

    requests = setup.configure("flood", standard(setup, 4))
    try:
        assert flood("flood", 5).code() == grpc.StatusCode.OUT_OF_RANGE  # warm up
        before = rss_bytes(setup.a)
        for _ in range(3):
            error = flood("flood", 300)
            assert error.code() in (
                grpc.StatusCode.OUT_OF_RANGE,
                grpc.StatusCode.FAILED_PRECONDITION,  # the stage already stopped
            ), error.details()
        grown = rss_bytes(setup.a) - before
        assert grown < 48 << 20, f"the agent grew by {grown >> 20} MiB"
        assert setup.a.status().node == "k0"
    finally:
        setup.remove("flood", requests)


def bad_positions_payload(s: Setup) -> bytes:
    """Stage 1's real output with float positions: indexing with them raises IndexError, an
    exception type the stage thread once did not catch (it died, Status said running)."""
    paths = {r.binding.stage: r.path for r in s.refs}
    act = Activation.for_tokens([0], [0], [5])
    for stage in (0, 1):
        act = load_shard(paths[stage].read_bytes()).step(act)
    act.positions = act.positions.astype("float32")
    return encode_work(Sampling(), 1, act)


def test_a_payload_that_raises_stops_the_stage_visibly_and_aborts_clients(setup: Setup) -> None:
    """Stages 0 and 2 on agent a, 1 and 3 on agent b; only a's barrier opens, so stage 2's
    upstream (stage 1) never sends and the test's stream feeds stage 2 instead."""
    layout = {0: (setup.a, 4), 1: (setup.b, 5), 2: (setup.a, 6), 3: (setup.b, 7)}
    requests = setup.configure("raises", layout, window=4)
    try:
        ready = [r.chip for r in setup.refs]
        setup.a.stub.StartEpoch(
            agent_pb2.StartEpochRequest(deployment="raises", epoch=0, tick=0, ready_chips=ready),
            timeout=30,
        )
        client = Waiting(setup.a, "raises")
        done = threading.Event()
        frames = [
            link_frame("raises", 0, 2, Frame(0, 0, None, b"")),
            link_frame("raises", 0, 2, Frame(0, 1, 0, bad_positions_payload(setup))),
        ]
        try:
            error = exchange(setup.a, held_open(frames, done), ("raises", 0, 2))
        finally:
            done.set()
        assert error.code() == grpc.StatusCode.ABORTED and "IndexError" in str(error.details())
        failure, _ = client.result()
        assert failure is not None and failure.code() == grpc.StatusCode.ABORTED
        here = {p.stage: p for p in pipelines(setup.a, "raises")}
        assert here[2].phase == "failed" and "IndexError" in here[2].error
        assert here[0].phase == "failed" and "IndexError" in here[0].error
        assert setup.a.status().node == "k0"
        ring_healthy(setup)
    finally:
        setup.remove("raises", requests)


def test_only_a_newer_incarnation_takes_over_a_stage(setup: Setup) -> None:
    requests = setup.configure("takeover", standard(setup, 4))
    target = ("takeover", 0, 2)
    bubble = link_frame("takeover", 0, 2, Frame(0, 0, None, b""))
    first_done, second_done = threading.Event(), threading.Event()
    ends: dict[str, grpc.RpcError | None] = {}

    def hold(name: str, frames: list[interconnect_pb2.LinkFrame], n: int) -> None:
        done = first_done if name == "first" else second_done
        ends[name] = try_exchange(setup.b, held_open(frames, done), target, incarnation=n)

    first = threading.Thread(target=hold, args=("first", [bubble], 100))
    second = threading.Thread(target=hold, args=("second", [], 200))
    try:
        first.start()

        def refused_as_older() -> grpc.RpcError | None:
            error = try_exchange(setup.b, [bubble], target, incarnation=50)
            ok = error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION
            return error if ok else None

        older = wait_for(refused_as_older, what="the first stream to bind")
        assert older is not None and "incarnation 100" in str(older.details())
        same = exchange(setup.b, [bubble], target, incarnation=100)
        assert same.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert first.is_alive(), "a refused stream does not end the bound one"
        second.start()
        first.join(30)
        replaced = ends.get("first")
        assert replaced is not None and replaced.code() == grpc.StatusCode.ABORTED
        assert "replaced" in str(replaced.details())
        assert all(p.error == "" for p in pipelines(setup.b, "takeover"))
    finally:
        first_done.set()
        second_done.set()
        first.join(30)
        if second.ident is not None:
            second.join(30)
        setup.remove("takeover", requests)


def test_removing_a_replica_ends_its_bound_link_streams(setup: Setup) -> None:
    """A removed stage must not stay referenced (program, KV cache) by a stream kept open."""
    setup.configure("gone", standard(setup, 4))
    bubble = link_frame("gone", 0, 2, Frame(0, 0, None, b""))
    done = threading.Event()
    ends: list[grpc.RpcError | None] = []
    holder = threading.Thread(
        target=lambda: ends.append(
            try_exchange(setup.b, held_open([bubble], done), ("gone", 0, 2), incarnation=7)
        )
    )
    holder.start()
    try:

        def bound() -> bool:
            error = try_exchange(setup.b, [bubble], ("gone", 0, 2), incarnation=3)
            return error is not None and "incarnation 7" in str(error.details())

        wait_for(bound, what="the stream to bind")
        setup.remove("gone", [setup.b.address])
        holder.join(30)
        assert ends and ends[0] is not None and ends[0].code() == grpc.StatusCode.ABORTED
        assert "removed" in str(ends[0].details())
    finally:
        done.set()
        holder.join(30)
        for agent in (setup.a, setup.b):
            with contextlib.suppress(BringUpError):  # b's part is gone unless a step failed
                setup.remove("gone", [agent.address])


# --- idle streams (an in-process Link service with a short idle timeout) ------------------------


class Idle:
    def step(self, batch: Activation) -> Activation:
        return batch


@pytest.fixture
def idle_link() -> Iterator[tuple[grpc.Channel, StageRunner]]:
    runner = StageRunner(
        label="idle",
        stage=1,
        schedule=Schedule(2, 2),
        window=2,
        replica_chips=["c"],
        stepper=Idle(),  # type: ignore[arg-type]
    )
    service = LinkService(lambda d, r, s: runner if d == "d" else None, "t", idle_timeout=0.5)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handlers(service),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, runner
    finally:
        channel.close()
        service.close()
        server.stop(0)


def open_stream(channel: grpc.Channel, frames: Iterator, incarnation: int) -> grpc.RpcError | None:
    call = channel.stream_stream(
        EXCHANGE,
        request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
        response_deserializer=interconnect_pb2.LinkAck.FromString,
    )(frames, timeout=20, metadata=target_metadata("d", 0, 1, incarnation))
    try:
        list(call)
    except grpc.RpcError as exc:
        return exc
    return None


def test_a_silent_link_stream_is_ended(idle_link: tuple[grpc.Channel, StageRunner]) -> None:
    channel, _ = idle_link
    never = threading.Event()
    started = time.monotonic()
    try:
        error = open_stream(channel, held_open([], never), 1)
    finally:
        never.set()
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


def test_heartbeats_keep_an_idle_link_open(idle_link: tuple[grpc.Channel, StageRunner]) -> None:
    channel, runner = idle_link

    def beats() -> Iterator[interconnect_pb2.LinkFrame]:
        for _ in range(12):  # 1.2 s, past the 0.5 s idle timeout
            beat = interconnect_pb2.LinkFrame(deployment="d", to_stage=1, heartbeat=True)
            beat.checksum = frame_checksum(beat)
            yield beat
            time.sleep(0.1)  # the pace of the heartbeats under test, not a synchronization

    assert open_stream(channel, beats(), 2) is None
    assert runner.error == ""
