"""The framed link transport (`agents.wire`): its encoding, and pipelines across agent processes.

The hostile cases on the link port (certificates, secrets, oversize, truncated, garbage,
slowloris, connection bounds) are in tests/test_hostile.py with the other attacks.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from agent_helpers import AgentCluster, AgentProcess, tiny_request, wait_for

from agents.executor import ReferenceExecutor
from agents.interconnect import LinkService, frame_checksum, link_frame
from agents.lockstep import Frame
from agents.settings import DEFAULT_SETTINGS
from agents.wire import (
    ACK,
    ACK_BODY,
    END,
    END_LIMIT,
    HEAD,
    HELLO,
    MAGIC,
    PING,
    REFUSALS_AT_ONCE,
    VERSION,
    Channel,
    Closed,
    PlainChannel,
    Reader,
    WireError,
    WireServer,
    checksum,
    connect,
    expect_accept,
    frame_message,
    hello,
    link_frame_of,
    message,
    parse_end,
    parse_hello,
)
from orchestrator.compiler import ShardRef, compile_plan
from orchestrator.serving import BringUpOptions, bring_up_replica, remove_replica
from orchestrator.weights import SeededWeights
from placement.models import MODEL_PRESETS
from placement.plan import Plan
from placement.planner import make_plan
from placement.topology import preset_topology
from protos import agent_pb2

TINY = MODEL_PRESETS["tiny-llama"]
SEED = 9
PROMPTS = [(5, 17, 1024, 3), (9, 8, 7, 6, 5, 4)]
N_TOKENS = 6

# --- encoding -------------------------------------------------------------------------------


def test_the_checksum_is_the_grpc_links_checksum() -> None:
    frame = Frame(7, 123, 2, bytes(range(256)) * 3)
    assert checksum("dep", 1, 3, 7, 123, 2, frame.payload) == frame_checksum(
        link_frame("dep", 1, 3, frame)
    )
    body = frame_message("dep", 1, 3, frame)[HEAD.size :]
    msg = link_frame_of("dep", body)
    assert msg == link_frame("dep", 1, 3, frame)
    # The deployment is the connection's: a frame checked against another fails its CRC.
    assert frame_checksum(link_frame_of("other", body)) != msg.checksum


def test_a_hello_round_trips_and_bad_ones_name_the_problem() -> None:
    body = hello("ring", 2, 5, 99, b"s" * 32)[HEAD.size :]
    parsed = parse_hello(body)
    assert parsed.target is not None
    assert (parsed.target.deployment, parsed.target.replica, parsed.target.stage) == ("ring", 2, 5)
    assert parsed.target.incarnation == 99 and parsed.secret == b"s" * 32
    assert parse_hello(hello("", 0, 0, 0, b"", probe=True)[HEAD.size :]).target is None
    cases = {
        "shorter": body[:5],
        "lengths say": body + b"x",
        "names no deployment": hello("", 0, 1, 1, b"")[HEAD.size :],
        "over 1024": hello("d" * 1025, 0, 1, 1, b"")[HEAD.size :],
        "non-negative int64": hello("ring", 0, 1, 2**63, b"")[HEAD.size :],
        "not UTF-8": hello("ring", 0, 1, 1, b"")[HEAD.size :].replace(b"ring", b"\xff\xfe\xfd\xfc"),
    }
    for words, bad in cases.items():
        with pytest.raises(WireError) as info:
            parse_hello(bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert words in info.value.message, (words, info.value.message)


_OPEN: list[socket.socket] = []  # peers kept open (a collected socket closes)


def reader_of(data: bytes, close: bool = True) -> Reader:
    ours, theirs = socket.socketpair()
    theirs.sendall(data)
    if close:
        theirs.close()
    else:
        _OPEN.append(theirs)
    return Reader(PlainChannel(ours))


def test_the_reader_bounds_every_message_before_reading_it() -> None:
    deadline = time.monotonic() + 5
    kind, body = reader_of(message(HELLO, b"abc")).read(deadline, 10)
    assert (kind, body) == (HELLO, b"abc")
    with pytest.raises(WireError) as info:
        reader_of(HEAD.pack(MAGIC, VERSION, HELLO, 1 << 30)).read(deadline, 1 << 20)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the limit" in info.value.message
    with pytest.raises(WireError) as info:
        reader_of(b"GET / HTTP/1.1\r\n\r\n").read(deadline, 1 << 20)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(Closed) as closed:
        reader_of(message(HELLO, b"abcdef")[:10]).read(deadline, 100)
    assert closed.value.partial
    with pytest.raises(Closed) as closed:
        reader_of(b"").read(deadline, 100)
    assert not closed.value.partial
    with pytest.raises(TimeoutError):
        reader_of(b"LW", close=False).read(time.monotonic() + 0.2, 100)


def test_the_transport_settings_are_checked() -> None:
    from agents.settings import AgentSettings

    for bad in (
        {"link_transport": "udp"},
        {"link_port": 70000},
        {"link_handshake_timeout": 0},
        {"link_max_connections_per_peer": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AgentSettings(**bad)  # type: ignore[arg-type]
    assert AgentSettings(link_port=None).link_port is None


# --- the global connection bound, in process (plaintext) --------------------------------------
#
# The hostile suite (tests/test_hostile.py) runs the same bound against an agent process over
# mutual TLS; here the server is in the test's process, so its counters are read directly and
# the refusals' own bound can be filled by hand.

LIMIT = 3


@pytest.fixture
def small_port() -> Iterator[WireServer]:
    settings = dataclasses.replace(
        DEFAULT_SETTINGS,
        link_max_connections=LIMIT,
        link_max_connections_per_peer=LIMIT + 2,  # plaintext peers are one peer: not this bound
        link_idle_timeout=120.0,
    )
    links = LinkService(lambda deployment, replica, stage: None, "n0")
    server = WireServer(links, lambda runner: None, None, settings)
    server.listen("127.0.0.1")
    try:
        yield server
    finally:
        server.close()


def probe(server: WireServer) -> Channel:
    """An accepted probe connection."""
    channel = connect("127.0.0.1", server.port, None, None)
    channel.send(hello("", 0, 0, 0, b"", probe=True))
    expect_accept(Reader(channel))
    return channel


def pinged(channel: Channel, tick: int) -> bool:
    """A ping on `channel` comes back (its ACK, with the tick)."""
    channel.send(frame_message("", 0, 0, Frame(0, tick, None, b"x"), PING))
    kind, body = Reader(channel).read(time.monotonic() + 30, END_LIMIT)
    return kind == ACK and ACK_BODY.unpack(body)[1] == tick


def test_a_connection_over_the_global_bound_is_told_why_and_changes_nothing(
    small_port: WireServer,
) -> None:
    server = small_port
    held = [probe(server) for _ in range(LIMIT)]
    try:
        assert server.open_connections() == LIMIT
        # One more: an END RESOURCE_EXHAUSTED naming the bound, as the per-peer bound says it.
        extra = connect("127.0.0.1", server.port, None, None)
        try:
            extra.send(hello("", 0, 0, 0, b"", probe=True))
            kind, body = Reader(extra).read(time.monotonic() + 30, END_LIMIT)
            assert kind == END
            code, text = parse_end(body)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, text
            assert "link_max_connections 3" in text and "node n0" in text, text
        finally:
            extra.shutdown()
        # Nothing changed: the held connections work, none more is counted open.
        assert all(pinged(channel, i) for i, channel in enumerate(held))
        assert server.open_connections() == LIMIT
        assert server.refused()["max_connections"] == 1
        # A slot frees when a connection closes; the next is accepted.
        held.pop().shutdown()
        wait_for(lambda: server.open_connections() == LIMIT - 1, what="the slot to free")
        held.append(probe(server))
        assert pinged(held[-1], 7)
        assert server.refused() == {
            "max_connections": 1,
            "max_connections_per_peer": 0,
            "tls_handshake": 0,
            "hello": 0,
        }
    finally:
        for channel in held:
            channel.shutdown()
    wait_for(lambda: server.open_connections() == 0, what="every connection to end")


def test_with_every_refusal_under_way_one_more_is_closed_at_accept(small_port: WireServer) -> None:
    """The refusals' own bound: when `REFUSALS_AT_ONCE` are being told (here: their places
    taken by hand), a connection over the bound is closed without a word, still counted."""
    server = small_port
    held = [probe(server) for _ in range(LIMIT)]
    taken = 0
    try:
        for _ in range(REFUSALS_AT_ONCE):
            assert server._refusers.acquire(blocking=False)
            taken += 1
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
            assert raw.recv(100) == b""  # closed, no END
        assert server.refused()["max_connections"] == 1
        assert server.open_connections() == LIMIT
        assert all(pinged(channel, i) for i, channel in enumerate(held))
    finally:
        for _ in range(taken):
            server._refusers.release()
        for channel in held:
            channel.shutdown()


def test_refused_hellos_are_counted(small_port: WireServer) -> None:
    server = small_port
    channel = connect("127.0.0.1", server.port, None, None)
    try:
        channel.send(hello("nobody", 0, 1, 1, b""))
        with pytest.raises(WireError) as info:
            expect_accept(Reader(channel))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        channel.shutdown()
    wait_for(lambda: server.refused()["hello"] == 1, what="the refused hello to be counted")
    assert server.refused()["max_connections"] == 0
    wait_for(lambda: server.open_connections() == 0, what="the connection to end")


# --- pipelines across agent processes ---------------------------------------------------------


def deploy(
    name: str,
    agents: list[AgentProcess],
    cluster: AgentCluster,
    store: object,
    transport: int,
    *,
    insecure: bool = False,
) -> tuple[Plan, list[ShardRef], list[str]]:
    """tiny-llama in 4 stages, 0-1 on agents[0] and 2-3 on agents[1]."""
    plan = make_plan(tiny_request(name, stages=4), preset_topology(1, "dev-whole-ops"))
    refs = compile_plan(plan, TINY, SEED, store)  # type: ignore[arg-type]
    where = {r.chip: (agents[r.binding.stage // 2].address, r.binding.stage % 2) for r in refs}
    up = bring_up_replica(
        plan,
        refs,
        where,
        {a.address: a.channel for a in agents},
        nodes=None if insecure else {a.address: a.node for a in agents},
        options=BringUpOptions(link_transport=transport),
    )
    return plan, refs, up.addresses


def serve_all(agent: AgentProcess, name: str) -> list[tuple[tuple[int, ...], bytes]]:
    """Both prompts at once (the ring carries two sequences); tokens and logits bytes. A
    request's failure is raised here."""
    out: dict[int, tuple[tuple[int, ...], bytes]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            replies = served(i)
        except BaseException as exc:  # raised below, in the test's thread
            errors.append(exc)
            return
        out[i] = (tuple(r.token for r in replies), b"".join(r.logits for r in replies))

    def served(i: int) -> list[agent_pb2.GenerateResponse]:
        return list(
            agent.stub.Generate(
                agent_pb2.GenerateRequest(
                    deployment=name,
                    request_id=f"{name}-{i}",
                    prompt_ids=PROMPTS[i],
                    max_tokens=N_TOKENS,
                    return_logits=True,
                ),
                timeout=120,
            )
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    if errors:
        raise errors[0]
    return [out[i] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def expected() -> list[tuple[tuple[int, ...], bytes]]:
    ref = ReferenceExecutor(TINY, SeededWeights(TINY, SEED, "F16"), max_batch=4, max_context=64)
    runs = [ref.generate(p, N_TOKENS) for p in PROMPTS]
    return [(tuple(r.tokens), np.asarray(r.logits, dtype="<f4").tobytes()) for r in runs]


@pytest.mark.parametrize("insecure", [False, True], ids=["mutual-tls", "insecure"])
def test_a_pipeline_over_framed_links_gives_the_reference_tokens(
    fresh_agent_cluster: AgentCluster,
    tmp_path: object,
    expected: list[tuple[tuple[int, ...], bytes]],
    insecure: bool,
) -> None:
    agents = [
        fresh_agent_cluster.start(
            f"w{i}", chips=4, extra=["--sram-bytes", "64MiB"], insecure=insecure
        )
        for i in range(2)
    ]
    assert all(a.status().link_port > 0 for a in agents)
    _, _, used = deploy(
        "framed",
        agents,
        fresh_agent_cluster,
        tmp_path,
        agent_pb2.LINK_TRANSPORT_FRAMED,
        insecure=insecure,
    )
    assert serve_all(agents[0], "framed") == expected
    if not insecure:
        # Idle links stay up: only heartbeats flow and nothing is acknowledged for longer than
        # any socket timeout of the transport (10 s to connect); then the ring serves again.
        time.sleep(12)
        assert serve_all(agents[0], "framed") == expected
        assert all("broke" not in a.stderr() for a in agents)
    # Both network hops (1 -> 2 on w0, 3 -> 0 on w1) went over the framed port.
    for agent in agents:
        assert "framed on port" in agent.stderr(), agent.stderr()[-2000:]
        assert "Traceback" not in agent.stderr()
    remove_replica({a.address: a.channel for a in agents}, "framed", used)
    # The same agents over gRPC links: the same tokens and logits.
    _, _, used = deploy(
        "grpc",
        agents,
        fresh_agent_cluster,
        tmp_path,
        agent_pb2.LINK_TRANSPORT_GRPC,
        insecure=insecure,
    )
    assert serve_all(agents[0], "grpc") == expected
    remove_replica({a.address: a.channel for a in agents}, "grpc", used)


def test_link_ping_over_the_framed_transport(fresh_agent_cluster: AgentCluster) -> None:
    a, b = (fresh_agent_cluster.start(f"p{i}", chips=1) for i in range(2))
    reply = a.stub.LinkPing(
        agent_pb2.LinkPingRequest(
            peer=b.address,
            count=50,
            payload_bytes=16 << 10,
            transport=agent_pb2.LINK_TRANSPORT_FRAMED,
        ),
        timeout=60,
    )
    assert len(reply.one_way_ms) == len(reply.round_trip_ms) == 50
    assert all(0 < o <= r for o, r in zip(reply.one_way_ms, reply.round_trip_ms, strict=True))


def test_auto_falls_back_to_grpc_when_the_downstream_serves_no_link_port(
    fresh_agent_cluster: AgentCluster,
    tmp_path: object,
    expected: list[tuple[tuple[int, ...], bytes]],
) -> None:
    a = fresh_agent_cluster.start("f0", chips=4, extra=["--sram-bytes", "64MiB"])
    b = fresh_agent_cluster.start(
        "f1", chips=4, extra=["--sram-bytes", "64MiB", "--link-port", "off"]
    )
    assert b.status().link_port == 0 and a.status().link_port > 0
    channels = {x.address: x.channel for x in (a, b)}
    _, _, used = deploy("auto", [a, b], fresh_agent_cluster, tmp_path, 0)  # agents' "auto"
    assert serve_all(a, "auto") == expected
    assert "at " + b.address + ": gRPC" in a.stderr()  # 1 -> 2 into b: gRPC
    assert "framed on port" in b.stderr()  # 3 -> 0 into a: framed
    remove_replica(channels, "auto", used)
    # Forced to the framed transport, the link into b cannot open: the replica stops, and
    # says why.
    _, _, used = deploy("forced", [a, b], fresh_agent_cluster, tmp_path, 2)
    with pytest.raises(grpc.RpcError) as info:
        serve_all(a, "forced")
    # ABORTED for a request in flight when the stage stopped, FAILED_PRECONDITION for one
    # that arrives after it: both name the reason.
    assert info.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION)
    assert "serves no framed link port" in str(info.value.details())
    remove_replica(channels, "forced", used)
    for agent in (a, b):
        assert "Traceback" not in agent.stderr()
