"""Adopting what the agents still run after a control-plane restart.

A control plane killed with SIGKILL leaves its agents serving. The one started after it on the
same store asks each node's agent for its `Status` before deciding anything (the controller's
first refresh of every stored node). The shards an agent reports are written as held, by shard
id — the reconciler then counts them committed and loads only what is missing. What this module
adds is the check of the *replicas*: the store says a replica runs at epoch e (configured and
started), and the agents must say so too. When every chip of the replica on the node runs the
replica's stage at epoch e (phase `running`), the replica is adopted as it is: no Configure, no
StartEpoch, no reload. When one does not (a stage missing, halted, still at the barrier, or at
another epoch — the old control plane died between steps, or the agent restarted meanwhile),
the replica moves to a new epoch (`BumpEpoch`) and resynchronizes through the usual steps: a
pipeline never resumes an epoch some of its chips do not share.

Only replicas the store records as running are checked: a replica that was mid-bring-up already
continues with the step it was at (a Configure or StartEpoch replaces whatever the agents hold).
"""

from __future__ import annotations

from collections.abc import Iterable

from orchestrator.core import BumpEpoch, Node, Replica, chip_id
from protos import agent_pb2

RUNNING = "running"


def unadoptable(
    node: Node, status: agent_pb2.StatusResponse, replicas: Iterable[Replica]
) -> list[BumpEpoch]:
    """A `BumpEpoch` for each replica the store says runs at its epoch on `node`'s chips while
    the node's agent (`status`) does not run it there at that epoch (module docstring)."""
    stages: dict[str, dict[tuple[str, int], agent_pb2.PipelineStatus]] = {}
    for chip in status.chips:
        stages[chip_id(node.rack, node.slot, chip.chip)] = {
            (p.deployment, p.replica): p for p in chip.pipelines
        }
    mine = chip_id(node.rack, node.slot, 0).rsplit("/", 1)[0]
    bumps: list[BumpEpoch] = []
    for replica in replicas:
        if (
            replica.removing
            or not replica.epoch == replica.running_epoch == replica.configured_epoch
        ):
            continue
        for chip in replica.chips:
            if chip.rsplit("/", 1)[0] != mine:
                continue  # another node's chip
            stage = stages.get(chip, {}).get((replica.deployment, replica.index))
            if stage is None:
                why = f"{chip} does not run it"
            elif stage.epoch != replica.epoch:
                why = f"{chip} runs epoch {stage.epoch}"
            elif stage.phase != RUNNING:
                why = f"{chip} is {stage.phase}" + (f" ({stage.error})" if stage.error else "")
            else:
                continue
            bumps.append(
                BumpEpoch(
                    replica.deployment,
                    replica.index,
                    replica.epoch + 1,
                    f"after a control-plane restart the store says epoch {replica.epoch} runs, "
                    f"but {why}; resynchronizing at epoch {replica.epoch + 1}",
                )
            )
            break
    return bumps


__all__ = ["unadoptable"]
