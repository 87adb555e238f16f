"""The lockstep pipeline across agent processes: gRPC links, barrier, Generate, status.

tiny-llama cut into 4 whole-op stages runs on two agents (stages 0-1 on one, 2-3 on the
other), so the ring has in-process links (0→1, 2→3) and network links (1→2, and 3→0 back
round the ring). Tokens and logits streamed by `Generate` must be bit-identical to the
single-process reference executor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from agent_helpers import (
    AgentCluster,
    AgentProcess,
    load,
    run_in_threads,
    tiny_request,
    wait_for,
)

from agents.executor import ReferenceExecutor
from agents.interconnect import EXCHANGE, frame_checksum, target_metadata
from agents.sampling import Sampling
from orchestrator.agent_client import declared_bytes_of
from orchestrator.compiler import ShardRef, compile_plan
from orchestrator.serving import (
    BringUpError,
    BringUpOptions,
    ReplicaUp,
    bring_up_replica,
    configure_replica,
    configure_requests,
    load_shards,
    remove_replica,
    start_epoch,
)
from orchestrator.weights import SeededWeights
from placement.models import MODEL_PRESETS
from placement.plan import Plan
from placement.planner import make_plan
from placement.topology import preset_topology
from protos import agent_pb2, interconnect_pb2
from security.tls import link_metadata
from shardformat.layout import plan_layout

TINY = MODEL_PRESETS["tiny-llama"]
SEED = 5
DEPLOYMENT = "ring"


@dataclass
class Replica:
    plan: Plan
    refs: list[ShardRef]
    agents: list[AgentProcess]
    where: dict[str, tuple[str, int]]
    up: ReplicaUp

    @property
    def nodes(self) -> dict[str, str]:
        return {a.address: a.node for a in self.agents}

    @property
    def channels(self) -> dict[str, grpc.Channel]:
        return {a.address: a.channel for a in self.agents}

    @property
    def head(self) -> AgentProcess:
        return self.agents[0]


def placement(refs: list[ShardRef], agents: list[AgentProcess]) -> dict[str, tuple[str, int]]:
    """Stages 0-1 on the first agent, 2-3 on the second (chip index = stage % 2)."""
    return {r.chip: (agents[r.binding.stage // 2].address, r.binding.stage % 2) for r in refs}


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory, agent_cluster: AgentCluster) -> Replica:
    plan = make_plan(tiny_request(DEPLOYMENT, stages=4), preset_topology(1, "dev-whole-ops"))
    refs = compile_plan(plan, TINY, SEED, tmp_path_factory.mktemp("store"))
    agents = [agent_cluster.start(f"n{i}", extra=["--sram-bytes", "64MiB"]) for i in range(2)]
    where = placement(refs, agents)
    up = bring_up_replica(plan, refs, where, agent_cluster.channels(), nodes=agent_cluster.nodes())
    return Replica(plan, refs, agents, where, up)


@pytest.fixture(scope="module")
def reference() -> ReferenceExecutor:
    return ReferenceExecutor(TINY, SeededWeights(TINY, SEED, "F16"), max_batch=4, max_context=64)


def generate(
    agent: AgentProcess,
    rid: str,
    prompt: tuple[int, ...],
    n: int,
    sampling: Sampling | None = None,
    *,
    deployment: str = DEPLOYMENT,
    logits: bool = True,
    timeout: float = 60,
) -> tuple[tuple[int, ...], np.ndarray]:
    sampling = sampling or Sampling()
    request = agent_pb2.GenerateRequest(
        deployment=deployment,
        request_id=rid,
        prompt_ids=prompt,
        max_tokens=n,
        temperature=sampling.temperature,
        seed=sampling.seed,
        return_logits=logits,
    )
    replies = list(agent.stub.Generate(request, timeout=timeout))
    assert [r.index for r in replies] == list(range(n)) and replies[-1].finished
    rows = [np.frombuffer(r.logits, dtype="<f4") for r in replies] if logits else []
    return tuple(r.token for r in replies), np.stack(rows) if rows else np.zeros(0)


def test_generate_is_bit_identical_to_the_reference(
    replica: Replica, reference: ReferenceExecutor
) -> None:
    for rid, prompt, sampling in [
        ("g", (5, 17, 1024, 3, 4000), Sampling()),
        ("s", (9, 8, 7), Sampling(0.9, 77)),
    ]:
        tokens, logits = generate(replica.head, rid, prompt, 6, sampling)
        expected = reference.generate(prompt, 6, sampling)
        assert tokens == expected.tokens
        assert logits.tobytes() == expected.logits.astype("<f4").tobytes()


def test_a_resumed_request_continues_exactly_where_it_stopped(
    replica: Replica, reference: ReferenceExecutor
) -> None:
    """What the control plane's gateway sends after a failover: the prompt, the tokens the
    client already has (`resume_tokens`), the original max_tokens and sampling. The stream
    continues at the next index with the tokens (and logits) of an uninterrupted run —
    greedy and seeded alike, since sampling is indexed by the token's position."""
    for rid, sampling in [("rg", Sampling()), ("rs", Sampling(0.9, 77))]:
        prompt = (9, 8, 7)
        expected = reference.generate(prompt, 7, sampling)
        request = agent_pb2.GenerateRequest(
            deployment=DEPLOYMENT,
            request_id=rid,
            prompt_ids=prompt,
            max_tokens=7,
            temperature=sampling.temperature,
            seed=sampling.seed,
            return_logits=True,
            resume_tokens=expected.tokens[:3],
        )
        replies = list(replica.head.stub.Generate(request, timeout=60))
        assert [r.index for r in replies] == [3, 4, 5, 6] and replies[-1].finished
        assert tuple(r.token for r in replies) == expected.tokens[3:]
        rows = np.stack([np.frombuffer(r.logits, dtype="<f4") for r in replies])
        assert rows.tobytes() == expected.logits[3:].astype("<f4").tobytes()


def test_concurrent_requests_equal_solo_runs(
    replica: Replica, reference: ReferenceExecutor
) -> None:
    prompts = {f"c{i}": tuple(range(i + 1, 2 * i + 3)) for i in range(6)}
    results: dict[str, tuple[int, ...]] = {}

    def one(rid: str) -> None:
        results[rid] = generate(replica.head, rid, prompts[rid], 4, logits=False)[0]

    run_in_threads(one, [(rid,) for rid in prompts])
    for rid, prompt in prompts.items():
        assert results[rid] == reference.generate(prompt, 4).tokens, rid


def test_status_shows_epoch_tick_and_chain_per_chip(replica: Replica) -> None:
    generate(replica.head, "status", (1, 2, 3), 2, logits=False)
    seen = []
    for agent in replica.agents:
        for chip in agent.status().chips[:2]:
            (p,) = chip.pipelines
            assert p.deployment == DEPLOYMENT and p.phase == "running" and p.error == ""
            assert p.epoch == 0 and p.tick > 0 and len(p.chain_head) == 32
            seen.append(p.stage)
    assert sorted(seen) == [0, 1, 2, 3]


def shifted(replica: Replica, offset: int) -> dict[str, tuple[str, int]]:
    """The replica's placement moved `offset` chips further on the same agents."""
    return {name: (address, chip + offset) for name, (address, chip) in replica.where.items()}


def copy_on_chips(replica: Replica, offset: int) -> dict[str, tuple[str, int]]:
    """Load the replica's shards again on the same agents, `offset` chips further, and return
    that placement: a chip serves one replica, so a second replica needs chips of its own."""
    where = shifted(replica, offset)
    load_shards(replica.refs, where, replica.channels)
    return where


def test_bring_up_loaded_every_shard_and_started_every_stage(replica: Replica) -> None:
    up = replica.up
    assert up.deployment == DEPLOYMENT and up.epoch == 0
    assert sorted(up.addresses) == sorted(a.address for a in replica.agents)
    assert sorted(up.ready_chips) == sorted(r.chip for r in replica.refs)
    assert [(x.shard_id, x.held, x.already_loaded) for x in up.loads] == [
        (r.shard_id, False, False) for r in replica.refs
    ]
    assert [x.bytes_loaded for x in up.loads] == [r.size_bytes for r in replica.refs]
    budgets = [declared_bytes_of(r.path) for r in replica.refs]
    assert [x.reserved_bytes for x in up.loads] == [
        max(r.size_bytes, b) for r, b in zip(replica.refs, budgets, strict=True)
    ]
    assert len({bytes(r.link_secret) for r in up.requests.values()}) == 1


def test_load_shards_skips_the_shards_a_chip_holds(replica: Replica) -> None:
    """Loading the same placement twice sends nothing the second time (Status says the chips
    hold the shards), and every chip holds its shard once."""
    where = shifted(replica, 6)
    first = load_shards(
        replica.refs, where, replica.channels, options=BringUpOptions(digest_algorithm="sha256")
    )
    by_address = {a.address: a for a in replica.agents}
    for done in first:
        (held,) = by_address[done.address].chip(done.chip).shards
        assert held.shard_id == done.shard_id
        if not done.held:  # loaded now: with the sha256 audit digest on top of the BLAKE3 id
            assert held.digest_algorithm == "sha256" and done.bytes_loaded > 0
    used = {a.address: [c.sram_used_bytes for c in a.status().chips] for a in replica.agents}
    again = load_shards(replica.refs, where, replica.channels)
    assert [(x.held, x.bytes_loaded) for x in again] == [(True, 0)] * len(replica.refs)
    for agent in replica.agents:
        assert [c.sram_used_bytes for c in agent.status().chips] == used[agent.address]
    for ref in replica.refs:
        address, chip = where[ref.chip]
        agent = next(a for a in replica.agents if a.address == address)
        assert [s.shard_id for s in agent.chip(chip).shards] == [ref.shard_id]


def test_a_failed_load_names_the_step_the_agent_and_the_status(replica: Replica) -> None:
    where = {name: (address, chip + 40) for name, (address, chip) in replica.where.items()}
    with pytest.raises(BringUpError) as info:
        bring_up_replica(replica.plan, replica.refs, where, replica.channels, deployment="x")
    error = info.value
    assert error.step == "load" and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.address == replica.agents[0].address and "chip 40" in error.details
    assert not any(
        p.deployment == "x" for a in replica.agents for c in a.status().chips for p in c.pipelines
    )


def invalid(agent: AgentProcess, **fields: object) -> grpc.RpcError:
    request = agent_pb2.GenerateRequest(
        **(
            {"deployment": DEPLOYMENT, "request_id": "bad", "prompt_ids": [1, 2], "max_tokens": 2}
            | fields
        )
    )
    with pytest.raises(grpc.RpcError) as info:
        list(agent.stub.Generate(request, timeout=30))
    return info.value


def test_bad_requests_are_invalid_argument(replica: Replica) -> None:
    error = invalid(replica.head, deployment="nope")  # well-formed, no such replica here
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "not configured" in str(error.details())
    for fields, words in [
        ({"prompt_ids": []}, "empty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 63}, "maxContext"),
        ({"prompt_ids": [], "prompt_text": "hi"}, "tokenizer"),
        ({"prompt_ids": [TINY.vocab_size]}, "vocabulary"),
        ({"prompt_text": "hi"}, "not both"),  # prompt_ids [1, 2] as well
        ({"temperature": 1e-310}, "temperature"),  # its softmax is NaN
        ({"temperature": float("nan")}, "temperature"),
    ]:
        error = invalid(replica.head, **fields)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert words in str(error.details()), (fields, error.details())


def test_deadline_full_queue_and_corruption(replica: Replica) -> None:
    """A second replica of the same shards, configured but never started: requests wait."""
    requests = configure_requests(
        replica.plan,
        replica.refs,
        copy_on_chips(replica, 4),
        deployment="held",
        queue_limit=1,
        nodes=replica.nodes,
    )
    configure_replica(replica.channels, requests)
    head = replica.head
    try:
        late = invalid(head, deployment="held", request_id="late", deadline_ms=300)
        assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED, late.details()
        calls = []
        for i in range(5):  # 4 slots + 1 queued
            call = head.stub.Generate(
                agent_pb2.GenerateRequest(
                    deployment="held", request_id=f"w{i}", prompt_ids=[1], max_tokens=1
                ),
                timeout=30,
            )
            call.initial_metadata()  # admitted
            calls.append(call)
        error = invalid(head, deployment="held", request_id="over")
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in calls:
            call.cancel()

        second = replica.agents[1]
        frame = interconnect_pb2.LinkFrame(
            deployment="held", to_stage=2, epoch=0, tick=0, slot=-1, payload=b"x"
        )
        frame.checksum = frame_checksum(frame) ^ 1
        # As stage 2's configured upstream (the first agent), with the replica's link secret.
        upstream = second.dial(identity=head.identity)
        secret = link_metadata(requests[head.address].link_secret)
        with upstream, pytest.raises(grpc.RpcError) as info:
            list(
                upstream.stream_stream(
                    EXCHANGE,
                    request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
                    response_deserializer=interconnect_pb2.LinkAck.FromString,
                )(
                    iter([frame]),
                    timeout=30,
                    metadata=(*target_metadata("held", 0, 2, time.time_ns()), *secret),
                )
            )
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        assert "tick 0" in str(info.value.details())
        held = wait_for(
            lambda: [
                p
                for c in second.status().chips
                for p in c.pipelines
                if p.deployment == "held" and p.error
            ],
            what="the corruption in status",
        )[0]
        assert "checksum" in held.error and replica.refs[2].chip in held.error
    finally:
        remove_replica(replica.channels, "held", list(requests))


def test_halt_and_resume_at_a_new_epoch(replica: Replica, reference: ReferenceExecutor) -> None:
    stubs = [a.stub for a in replica.agents]
    last = max(
        s.Halt(agent_pb2.HaltRequest(deployment=DEPLOYMENT), timeout=30).last_tick for s in stubs
    )
    ready = [r.chip for r in replica.refs]
    for chips in ([], ready):  # every stage enters epoch 1, then the barrier opens
        for stub in stubs:
            reply = stub.StartEpoch(
                agent_pb2.StartEpochRequest(
                    deployment=DEPLOYMENT, epoch=1, tick=last + 1, ready_chips=chips
                ),
                timeout=30,
            )
            assert reply.running == bool(chips)
    tokens, _ = generate(replica.head, "after", (3, 1, 4, 1, 5), 5, logits=False)
    assert tokens == reference.generate((3, 1, 4, 1, 5), 5).tokens
    for agent in replica.agents:
        assert all(c.pipelines[0].epoch == 1 for c in agent.status().chips[:2])


def settled_chains(replica: Replica, deployment: str) -> dict[int, tuple[int, bytes]] | None:
    """Per stage (last tick, chain head) once the replica drained after its last request:
    stage 0 stopped for lack of work, and stage s completed exactly s ticks more."""
    found = {
        p.stage: (p.tick, p.chain_head)
        for a in replica.agents
        for c in a.status().chips
        for p in c.pipelines
        if p.deployment == deployment
    }
    ticks = [found[s][0] for s in sorted(found)]
    return found if all(t == ticks[0] + s for s, t in enumerate(ticks)) else None


def test_jittered_network_links_change_no_token_and_no_chain(
    replica: Replica, reference: ReferenceExecutor
) -> None:
    """Three fresh replicas of the same shards, every link (in-process and gRPC) delaying
    frames by up to 3 ms with a different seed: same tokens, same chains on every chip."""
    work = [((5, 17, 1024), Sampling()), ((8, 9), Sampling(0.7, 3))]
    runs = []
    where = shifted(replica, 6)
    for seed in range(3):
        name = f"jitter-{seed}"
        up = bring_up_replica(
            replica.plan,
            replica.refs,
            where,
            replica.channels,
            nodes=replica.nodes,
            deployment=name,
            options=BringUpOptions(jitter_ms=3.0, jitter_seed=seed),
        )
        try:
            tokens = [
                generate(
                    replica.head, f"{name}-{i}", prompt, 4, sampling, deployment=name, logits=False
                )[0]
                for i, (prompt, sampling) in enumerate(work)
            ]
            chains = wait_for(
                lambda name=name: settled_chains(replica, name),
                timeout=30,
                what="the jittered replica to drain",
            )
            runs.append((tokens, chains))
        finally:
            remove_replica(replica.channels, name, up.addresses)
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert runs[0][0] == [reference.generate(p, 4, s).tokens for p, s in work]
    assert all(tick > 8 for tick, _ in runs[0][1].values())


def test_tensor_parallel_stages_across_agents(
    replica: Replica, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """TP = 2, two stages: each stage's TP group inside one agent (chips 2-3), the stages on
    different agents. Bit-identical to the reference run with the plan's layout; both chips
    of a group report their stage's chain."""
    plan = make_plan(tiny_request("tp", tp=2, stages=2), preset_topology(1, "dev-whole-ops"))
    refs = compile_plan(plan, TINY, SEED, tmp_path_factory.mktemp("tp-store"))
    agents = replica.agents
    where = {r.chip: (agents[r.binding.stage].address, 2 + r.binding.tp_rank) for r in refs}
    up = bring_up_replica(plan, refs, where, replica.channels, nodes=replica.nodes)
    try:
        layout = ReferenceExecutor(
            TINY,
            SeededWeights(TINY, SEED, "F16"),
            max_batch=4,
            max_context=64,
            layout=plan_layout(TINY, plan),
        )
        tokens, logits = generate(agents[0], "tp-1", (4, 8, 15, 16), 5, deployment="tp")
        expected = layout.generate((4, 8, 15, 16), 5)
        assert tokens == expected.tokens
        assert logits.tobytes() == expected.logits.astype("<f4").tobytes()
        for agent in agents:
            heads = {p.chain_head for c in agent.status().chips[2:4] for p in c.pipelines}
            assert len(heads) == 1
    finally:
        remove_replica(replica.channels, "tp", up.addresses)


# --- isolation: a chip serves one replica (issue 7) ------------------------------------------


def test_a_chip_bound_to_a_replica_is_refused_to_another(replica: Replica) -> None:
    """Configuring a second replica on the serving chips names the chip and the holder and
    changes nothing; once the holder is removed the same request succeeds (chips released)."""
    requests = configure_requests(replica.plan, replica.refs, replica.where, deployment="intruder")
    head = replica.head
    with pytest.raises(BringUpError) as info:
        configure_replica(replica.channels, requests)
    assert info.value.step == "configure" and info.value.address == head.address
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS and info.value.done == []
    assert "chip 0 is bound to replica 'ring'/replica-0" in info.value.details
    assert {p.deployment for c in head.status().chips for p in c.pipelines} == {DEPLOYMENT}
    tokens, _ = generate(head, "still-served", (2, 7, 1), 3, logits=False)
    assert len(tokens) == 3


def test_a_removed_replica_releases_its_chips(replica: Replica) -> None:
    where = shifted(replica, 4)
    ready = []
    for name in ("first", "second"):  # the second binds the chips the first released
        up = bring_up_replica(replica.plan, replica.refs, where, replica.channels, deployment=name)
        ready.append(sorted(up.ready_chips))
        remove_replica(replica.channels, name, up.addresses)
    assert ready[0] and ready[1] == ready[0], "the second replica got every chip of the first"


def test_execute_on_a_serving_chip_is_refused_and_changes_no_token(
    replica: Replica, reference: ReferenceExecutor
) -> None:
    """Execute would step the replica's program and KV cache; on a bound chip it is refused
    (FAILED_PRECONDITION naming the replica), and the served tokens stay the reference's."""
    from agents.activation import Activation

    head = replica.head
    prompt = (9, 9, 2, 6)
    before, _ = generate(head, "iso-before", prompt, 4, logits=False)
    stage0 = next(r for r in replica.refs if r.binding.stage == 0)
    chip = replica.where[stage0.chip][1]
    shard = load(head, stage0.path.read_bytes(), chip).shard_id  # already held: its id
    for slot in range(4):  # every KV slot a request could be using
        act = Activation.for_tokens([slot], [0], [5]).to_bytes()
        with pytest.raises(grpc.RpcError) as info:
            head.stub.Execute(
                agent_pb2.ExecuteRequest(chip=chip, shard_id=shard, activation=act), timeout=30
            )
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "serves replica 'ring'/replica-0" in str(info.value.details())
    after, _ = generate(head, "iso-after", prompt, 4, logits=False)
    assert before == after == reference.generate(prompt, 4).tokens


def test_concurrent_configures_of_one_replica_configure_it_once(replica: Replica) -> None:
    where = copy_on_chips(replica, 4)
    requests = configure_requests(replica.plan, replica.refs, where, deployment="race")
    head = replica.head
    codes: list[str] = []

    def configure() -> None:
        try:
            head.stub.ConfigureReplica(requests[head.address], timeout=30)
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)

    run_in_threads(configure, [()] * 6)
    try:
        assert sorted(codes) == ["ALREADY_EXISTS"] * 5 + ["OK"], codes
        stages = [
            p.stage for c in head.status().chips for p in c.pipelines if p.deployment == "race"
        ]
        assert sorted(stages) == sorted({a.stage for a in requests[head.address].assignments})
    finally:
        head.stub.RemoveReplica(agent_pb2.RemoveReplicaRequest(deployment="race"), timeout=30)


def test_configure_at_a_newer_epoch_replaces_the_replica_and_the_same_epoch_does_not(
    replica: Replica, reference: ReferenceExecutor
) -> None:
    """A failover's new epoch is one ConfigureReplica per agent: an agent running the replica
    at an older epoch drops that pipeline and binds the new one; the same epoch again is
    ALREADY_EXISTS and changes nothing."""
    where = copy_on_chips(replica, 4)
    name = "epochs"
    nodes = replica.nodes
    first = configure_requests(replica.plan, replica.refs, where, deployment=name, nodes=nodes)
    try:
        start_epoch(replica.channels, first, configure_replica(replica.channels, first))
        with pytest.raises(BringUpError) as info:
            configure_replica(replica.channels, first)
        assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
        # a newer epoch whose request is malformed is refused before the old one goes
        bad = configure_requests(
            replica.plan, replica.refs, where, deployment=name, nodes=nodes, epoch=2, window=10**6
        )
        with pytest.raises(BringUpError) as info:
            configure_replica(replica.channels, bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        tokens, _ = generate(replica.head, "kept", (3, 1, 4, 1), 2, logits=False, deployment=name)
        assert len(tokens) == 2, "the running epoch still serves"
        newer = configure_requests(
            replica.plan, replica.refs, where, deployment=name, nodes=nodes, epoch=3
        )
        ready = configure_replica(replica.channels, newer)
        assert sorted(ready) == sorted(r.chip for r in replica.refs)
        epochs = {
            p.epoch
            for a in replica.agents
            for c in a.status().chips
            for p in c.pipelines
            if p.deployment == name
        }
        assert epochs == {3}, "every agent runs the new epoch's pipeline only"
        start_epoch(replica.channels, newer, ready)
        prompt = (3, 1, 4, 1)
        tokens, _ = generate(
            replica.head, "after-replace", prompt, 4, logits=False, deployment=name
        )
        assert tokens == reference.generate(prompt, 4).tokens
    finally:
        remove_replica(replica.channels, name, list(replica.channels))
