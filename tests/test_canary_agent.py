"""The agent's side of the canary with real agent processes: per-request output digests are
equal across replicas whatever else they served, and an injected bit flip shows up at the
stage and tick it was injected (agents.canary, orchestrator.core.canary)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from agent_helpers import AgentCluster, AgentProcess, tiny_request

from orchestrator.compiler import compile_plan
from orchestrator.core.canary import ReplicaTrace, StageTrace, first_tick_of, judge
from orchestrator.serving import bring_up_replica
from placement.models import MODEL_PRESETS
from placement.planner import make_plan
from placement.topology import preset_topology
from protos import agent_pb2

TINY = MODEL_PRESETS["tiny-llama"]
SEED = 5
PROMPT = (7, 300, 12, 99, 4)
N_TOKENS = 6
STAGES, BATCH = 2, 4
PERIOD = max(STAGES, BATCH)
REPLICAS = ("ring-a", "ring-b")


@dataclass
class Rings:
    a: AgentProcess  # stage 0 of both replicas
    b: AgentProcess  # stage 1 of both replicas
    ids: Iterator[int]

    def serve(self, deployment: str, prompt: tuple[int, ...] = PROMPT) -> list[int]:
        """The ticks the request's tokens came back at."""
        request = agent_pb2.GenerateRequest(
            deployment=deployment,
            request_id=f"req-{next(self.ids)}",
            prompt_ids=prompt,
            max_tokens=N_TOKENS,
        )
        return [r.tick for r in self.a.stub.Generate(request, timeout=60)]

    def trace(self, deployment: str, ticks: list[int]) -> ReplicaTrace:
        first = first_tick_of(ticks, PERIOD)
        assert first is not None, ticks
        stages = []
        for agent in (self.a, self.b):
            reply = agent.stub.StageDigests(
                agent_pb2.StageDigestsRequest(
                    deployment=deployment, first_tick=first, period=PERIOD, count=len(ticks)
                ),
                timeout=30,
            )
            for s in reply.stages:
                digests = tuple(x or None for x in s.digests)
                stages.append(StageTrace(s.stage, tuple(s.chip_names), (str(s.stage),), digests))
        return ReplicaTrace(REPLICAS.index(deployment), first, PERIOD, tuple(stages))


@pytest.fixture(scope="module")
def rings(tmp_path_factory: pytest.TempPathFactory, agent_cluster: AgentCluster) -> Rings:
    plan = make_plan(tiny_request("ring", stages=STAGES), preset_topology(1, "dev-whole-ops"))
    refs = compile_plan(plan, TINY, SEED, tmp_path_factory.mktemp("store"))
    flags = ["--sram-bytes", "64MiB", "--allow-fault-injection"]
    a, b = (agent_cluster.start(f"c{i}", chips=2, extra=flags) for i in range(2))
    nodes = {x.address: x.node for x in (a, b)}
    channels = {x.address: x.channel for x in (a, b)}
    for chip, name in enumerate(REPLICAS):
        where = {r.chip: ((a, b)[r.binding.stage].address, chip) for r in refs}
        bring_up_replica(plan, refs, where, channels, nodes=nodes, deployment=name)
    return Rings(a, b, itertools.count())


def test_the_canary_digests_are_equal_across_replicas_that_served_other_traffic(
    rings: Rings,
) -> None:
    rings.serve("ring-b", (1, 2, 3))  # ring-b's ticks and chain move on; ring-a's do not
    ticks = {name: rings.serve(name) for name in REPLICAS}
    assert ticks["ring-a"] != ticks["ring-b"]
    traces = [rings.trace(name, ticks[name]) for name in REPLICAS]
    for trace in traces:
        assert len(trace.stages) == STAGES
        assert all(None not in s.digests and len(s.digests) == N_TOKENS for s in trace.stages)
    assert [s.digests for s in traces[0].stages] == [s.digests for s in traces[1].stages]
    assert judge(traces).passed


def test_traffic_served_at_the_same_time_does_not_change_the_canary(rings: Rings) -> None:
    """Other requests share the ring with the canary (continuous batching): each tick works on
    one slot, so the canary's outputs stay its own."""
    import threading

    quiet = {name: rings.serve(name) for name in REPLICAS}
    reference = [rings.trace(name, quiet[name]) for name in REPLICAS]
    busy: dict[str, list[int]] = {}
    others = [
        threading.Thread(target=rings.serve, args=("ring-b", (9, 8, 7, 6, 5, 4))) for _ in range(2)
    ]
    for t in others:
        t.start()
    busy["ring-b"] = rings.serve("ring-b")
    for t in others:
        t.join(60)
    trace = rings.trace("ring-b", busy["ring-b"])
    assert [s.digests for s in trace.stages] == [s.digests for s in reference[0].stages]
    assert judge([*reference, trace]).passed


def test_an_injected_bit_flip_is_found_at_its_stage_and_tick(rings: Rings) -> None:
    clean = [rings.trace(n, rings.serve(n)) for n in REPLICAS]
    recorded = judge(clean).agreed
    status = rings.b.status().chips[1].pipelines[0]
    assert status.deployment == "ring-b"
    rings.b.stub.InjectFault(
        agent_pb2.InjectFaultRequest(
            deployment="ring-b", replica=0, stage=1, from_tick=status.tick + 1, bit=9
        ),
        timeout=30,
    )
    traces = [rings.trace(n, rings.serve(n)) for n in REPLICAS]
    verdict = judge(traces, recorded)
    (div,) = verdict.corrupted
    assert (div.replica, div.stage, div.step) == (1, 1, 0)
    assert div.chips == ("rack-0/node-0/chip-1",) or div.chips[0].endswith("chip-1")
    assert div.tick == traces[1].first_tick + 1
    # one flip, once: the next canary is clean again
    again = [rings.trace(n, rings.serve(n)) for n in REPLICAS]
    assert judge(again, recorded).passed


def test_a_fault_in_a_stage_or_replica_not_hosted_here_is_not_found(rings: Rings) -> None:
    """Agent b hosts stage 1 of ring-b replica 0 only: stage 0 there, or replica 1, is
    NOT_FOUND (well-formed, just not here); an empty deployment name is INVALID_ARGUMENT.
    Nothing is armed: the canary stays clean."""
    for request, code, words in [
        (
            agent_pb2.InjectFaultRequest(deployment="ring-b", stage=0, bit=9),
            grpc.StatusCode.NOT_FOUND,
            "stage 0 of replica 0 is not hosted",
        ),
        (
            agent_pb2.InjectFaultRequest(deployment="ring-b", replica=1, stage=1),
            grpc.StatusCode.NOT_FOUND,
            "replica 1 is not configured",
        ),
        (
            agent_pb2.InjectFaultRequest(stage=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "must not be empty",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            rings.b.stub.InjectFault(request, timeout=30)
        assert info.value.code() == code, info.value.details()
        assert words in str(info.value.details())
    clean = [rings.trace(n, rings.serve(n)) for n in REPLICAS]
    assert judge(clean).passed


def test_the_request_digest_leaves_out_the_slot_and_a_flip_lands_in_float_values() -> None:
    import numpy as np

    from agents.activation import Activation
    from agents.pipeline import decode_work, encode_work, flip_bit, request_digest
    from agents.sampling import GREEDY

    def payload(slot: int, value: float = 1.0) -> bytes:
        hidden = np.full((2, 4), value, dtype=np.float32)
        act = Activation(
            slots=np.array([slot, slot], dtype=np.int32),
            positions=np.array([0, 1], dtype=np.int32),
            tokens=np.array([5, 6], dtype=np.int32),
            hidden=hidden,
        )
        return encode_work(GREEDY, 3, act)

    assert payload(0) != payload(3)
    assert request_digest(payload(0), False) == request_digest(payload(3), False)
    assert request_digest(payload(0), False) != request_digest(payload(0, 2.0), False)
    flipped = decode_work(flip_bit(payload(1), 9, False))[2]
    assert flipped.tokens.tolist() == [5, 6] and flipped.slots.tolist() == [1, 1]
    assert np.count_nonzero(flipped.hidden != 1.0) == 1
    last = bytes(8) + np.ones(4, dtype="<f4").tobytes()  # token, then logits
    changed = np.frombuffer(flip_bit(last, 9, True)[8:], dtype="<f4")
    assert np.count_nonzero(changed != 1.0) == 1
    assert request_digest(last, True) != request_digest(flip_bit(last, 9, True), True)
