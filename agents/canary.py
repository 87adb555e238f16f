"""The agent's side of the silent-data-corruption canary: output digests and fault injection.

The control plane runs a canary request through every replica and compares, stage by stage,
the sha256 of each stage's output at the ticks the request occupied (`orchestrator.verify`).
A request that entered stage 0 at tick t0 is at stage s at ticks t0 + s + k * P (P the ring
period): the schedule is static, so the caller names the ticks and each stage answers from
its digest log (`agents.lockstep.StageMachine.output_digests`). Nothing here decides whether
a digest is right: the agent only reports what its chips computed.

A replica (or, for `inject_fault`, a stage) this agent does not host is NOT_FOUND
(`agents.replicas.replica_not_here`); a malformed request is INVALID_ARGUMENT.

`inject_fault` is the test door for that path: it flips one bit of one stage's output once,
and only on an agent started with `--allow-fault-injection` (`AgentSettings`), so a production
agent cannot be made to corrupt its own output by a stray call.
"""

from __future__ import annotations

from agents.errors import FailedPrecondition, InvalidArgument, NotFound
from agents.replicas import ReplicaHost
from agents.settings import AgentSettings
from protos import agent_pb2

MAX_PERIOD = 1 << 20  # a ring period larger than any schedule (maxBatch and stages are bounded)


def stage_digests(
    host: ReplicaHost, req: agent_pb2.StageDigestsRequest, settings: AgentSettings
) -> agent_pb2.StageDigestsResponse:
    """Every hosted stage's output digests at first_tick + stage + k * period, k < count."""
    if req.first_tick < 0:
        raise InvalidArgument(f"first_tick must not be negative, got {req.first_tick}")
    if not 1 <= req.period <= MAX_PERIOD:
        raise InvalidArgument(f"period must be 1..{MAX_PERIOD}, got {req.period}")
    if not 1 <= req.count <= settings.chain_log_limit:
        raise InvalidArgument(
            f"count must be 1..{settings.chain_log_limit} (the chain log), got {req.count}"
        )
    out = agent_pb2.StageDigestsResponse()
    for stage, runner, chips in host.stages(req.deployment, req.replica):
        ticks = [req.first_tick + stage + k * req.period for k in range(req.count)]
        status, digests = runner.output_digests(ticks)
        out.stages.append(
            agent_pb2.StageOutputDigests(
                stage=stage,
                chip_names=chips,
                epoch=status.epoch,
                digests=[d or b"" for d in digests],
                phase=status.phase,
            )
        )
    return out


def inject_fault(
    host: ReplicaHost, req: agent_pb2.InjectFaultRequest, settings: AgentSettings
) -> None:
    """Arm a one-time bit flip in one hosted stage's output (see the module docstring)."""
    if not settings.allow_fault_injection:
        raise FailedPrecondition(
            "fault injection is disabled on this agent (start it with --allow-fault-injection)"
        )
    if req.from_tick < 0:
        raise InvalidArgument(f"from_tick must not be negative, got {req.from_tick}")
    for stage, runner, _ in host.stages(req.deployment, req.replica):
        if stage == req.stage:
            runner.inject_fault(req.from_tick, req.bit)
            return
    raise NotFound(f"stage {req.stage} of replica {req.replica} is not hosted by this agent")
