"""Execute on agents: a compiled tiny-llama pipeline run through two agent processes.

The shards are compiled by `orchestrator.compiler`, streamed into the agents' SRAM arenas and
executed from there (weights are zero-copy views into the arena). The logits must be bit-
identical to running the same blobs' stage programs in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from agent_helpers import AgentCluster, AgentProcess, load, tiny_request

from agents.activation import Activation
from agents.executor import load_shard, run_pipeline
from orchestrator.compiler import ShardRef, compile_plan
from orchestrator.serving import load_shards
from placement.models import MODEL_PRESETS
from placement.planner import make_plan
from placement.topology import preset_topology
from protos import agent_pb2

TINY = MODEL_PRESETS["tiny-llama"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[ShardRef]:
    plan = make_plan(tiny_request("exec"), preset_topology(2, "dev"))
    refs = compile_plan(plan, TINY, 11, tmp_path_factory.mktemp("store"))
    return sorted(refs, key=lambda r: r.binding.stage)


@pytest.fixture(scope="module")
def agents(compiled: list[ShardRef], agent_cluster: AgentCluster) -> dict[str, AgentProcess]:
    nodes = sorted({ref.chip.rsplit("/", 1)[0] for ref in compiled})
    return {node: agent_cluster.start(f"n{i}") for i, node in enumerate(nodes)}


def where(ref: ShardRef, agents: dict[str, AgentProcess]) -> tuple[AgentProcess, int]:
    node, chip = ref.chip.rsplit("/", 1)
    return agents[node], int(chip.removeprefix("chip-"))


def test_pipeline_through_agents_matches_in_process(
    compiled: list[ShardRef], agents: dict[str, AgentProcess]
) -> None:
    places = {ref.chip: where(ref, agents) for ref in compiled}
    channels = {agent.address: agent.channel for agent in agents.values()}
    loads = load_shards(compiled, {k: (a.address, c) for k, (a, c) in places.items()}, channels)
    for ref, done in zip(compiled, loads, strict=True):
        declared = json.loads(_manifest_json(Path(ref.path).read_bytes()))["declared_bytes"]
        assert done.shard_id == ref.shard_id and not done.held
        assert done.bytes_loaded == ref.size_bytes
        assert done.reserved_bytes == max(declared, ref.size_bytes) > ref.size_bytes

    batch = Activation.for_tokens([0, 0, 0, 1], [0, 1, 2, 0], [5, 17, 3, 9])
    data = batch.to_bytes()
    for ref in compiled:
        agent, chip = where(ref, agents)
        reply = agent.stub.Execute(
            agent_pb2.ExecuteRequest(chip=chip, shard_id=ref.shard_id, activation=data), timeout=30
        )
        data = reply.activation
    remote = Activation.from_bytes(data)

    local_stages = [load_shard(Path(ref.path).read_bytes()) for ref in compiled]
    local = run_pipeline(local_stages, batch, via_bytes=True)
    assert remote.logits is not None and local.logits is not None
    assert remote.logits.shape == (4, TINY.vocab_size)
    np.testing.assert_array_equal(remote.logits, local.logits)  # bit-identical


def test_execute_rejects_a_bad_activation(
    compiled: list[ShardRef], agents: dict[str, AgentProcess]
) -> None:
    ref = compiled[0]
    agent, chip = where(ref, agents)
    if not any(s.shard_id == ref.shard_id for s in agent.chip(chip).shards):
        load(agent, Path(ref.path).read_bytes(), chip)
    with pytest.raises(grpc.RpcError) as info:
        agent.stub.Execute(
            agent_pb2.ExecuteRequest(
                chip=chip, shard_id=ref.shard_id, activation=b"not safetensors"
            ),
            timeout=30,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"chip {chip}" in str(info.value.details())


def _manifest_json(blob: bytes) -> str:
    from agents.executor import MANIFEST_KEY
    from shardformat.codec import parse_header

    return parse_header(blob, len(blob)).metadata[MANIFEST_KEY]
