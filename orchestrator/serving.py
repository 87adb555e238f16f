"""Bring a compiled replica up on its agents: bind stages, pass the barrier, start epoch 0.

The control-plane half of the lockstep pipeline (the agents' half is `agents.replicas`):
`configure_requests` turns a plan's shards and where their chips live into one
`ConfigureReplica` request per agent (stages, TP groups, downstream addresses — empty when the
next stage is on the same agent, which then links the two in process); `bring_up` sends them,
collects every chip's ready confirmation and hands the full set to each agent's `StartEpoch`
(the start barrier: no stage runs tick 0 before every chip of the replica confirmed).
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Mapping, Sequence

from orchestrator.compiler import ShardRef
from placement.plan import Plan
from protos import agent_pb2, agent_pb2_grpc
from security.identity import LINK_SECRET_BYTES, agent_identity


def configure_requests(
    plan: Plan,
    refs: Sequence[ShardRef],
    where: Mapping[str, tuple[str, int]],
    *,
    replica: int = 0,
    deployment: str | None = None,
    window: int = 2,
    epoch: int = 0,
    queue_limit: int = 0,
    jitter_ms: float = 0.0,
    jitter_seed: int = 0,
    nodes: Mapping[str, str] | None = None,
    link_secret: bytes | None = None,
) -> dict[str, agent_pb2.ConfigureReplicaRequest]:
    """One request per agent address; `where` maps each plan chip id to (address, index).

    `deployment` overrides the plan's name (a second replica set of the same shards).
    `nodes` maps each agent address to its node name: every stage then names the identity of
    its remote upstream agent (the only one whose Link it accepts) and downstream agent (whose
    certificate its link checks); without it agents with mutual TLS refuse every link. The
    replica's link secret is random (`secrets.token_bytes`) unless `link_secret` is given."""
    secret = secrets.token_bytes(LINK_SECRET_BYTES) if link_secret is None else link_secret

    def identity(address: str) -> str:
        return agent_identity(nodes[address]) if nodes is not None and address in nodes else ""

    mine = sorted(
        (r for r in refs if r.binding.replica == replica),
        key=lambda r: (r.binding.stage, r.binding.tp_rank),
    )
    stages = mine[0].binding.stages
    by_stage: dict[int, list[ShardRef]] = defaultdict(list)
    for ref in mine:
        by_stage[ref.binding.stage].append(ref)
    home = {}
    for stage, group in by_stage.items():
        addresses = {where[r.chip][0] for r in group}
        if len(addresses) != 1:
            raise ValueError(f"stage {stage}'s TP group spans agents {sorted(addresses)}")
        home[stage] = addresses.pop()
    requests: dict[str, agent_pb2.ConfigureReplicaRequest] = {}
    for stage in range(stages):
        address = home[stage]
        request = requests.setdefault(
            address,
            agent_pb2.ConfigureReplicaRequest(
                deployment=deployment or plan.deployment,
                replica=replica,
                stages=stages,
                max_batch=plan.max_batch,
                max_context=plan.max_context,
                window=window,
                epoch=epoch,
                replica_chips=[r.chip for r in mine],
                queue_limit=queue_limit,
                jitter_ms=jitter_ms,
                jitter_seed=jitter_seed,
                link_secret=secret,
            ),
        )
        down = home[(stage + 1) % stages]
        up = home[(stage - 1) % stages]
        request.assignments.append(
            agent_pb2.StageAssignment(
                stage=stage,
                chips=[where[r.chip][1] for r in by_stage[stage]],
                shard_ids=[r.shard_id for r in by_stage[stage]],
                chip_names=[r.chip for r in by_stage[stage]],
                downstream_address="" if down == address else down,
                upstream_identity="" if up == address else identity(up),
                downstream_identity="" if down == address else identity(down),
            )
        )
    return requests


def bring_up(
    stubs: Mapping[str, agent_pb2_grpc.AgentStub],
    requests: Mapping[str, agent_pb2.ConfigureReplicaRequest],
    *,
    timeout: float = 60.0,
) -> list[str]:
    """Configure every agent, then start the epoch with every chip's confirmation."""
    ready: list[str] = []
    for address, request in requests.items():
        ready += stubs[address].ConfigureReplica(request, timeout=timeout).chips_ready
    any_request = next(iter(requests.values()))
    for address in requests:
        stubs[address].StartEpoch(
            agent_pb2.StartEpochRequest(
                deployment=any_request.deployment,
                replica=any_request.replica,
                epoch=any_request.epoch,
                tick=0,
                ready_chips=ready,
            ),
            timeout=timeout,
        )
    return ready
