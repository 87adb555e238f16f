"""From stored deployments to the reconciler's desired state.

The reconciler (`orchestrator.core`) reads no files, so the controller turns each stored
`DeploymentRecord` into a `DeploymentTarget` here: the stored manifest is checked again with
the same rules as a file (`spec.deployment_from_manifest` — a manifest written by an older
release, or a model config file that changed on disk, then fails loudly instead of being
planned half-understood) and reduced to the planner's `PlanRequest`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.core.model import DeploymentTarget
from orchestrator.deployments import plan_request_from_spec
from orchestrator.spec import DeploymentSpec, SpecError, deployment_from_manifest
from orchestrator.store import DeploymentRecord


def target_from_spec(
    spec: DeploymentSpec, generation: int, *, deleting: bool = False
) -> DeploymentTarget:
    return DeploymentTarget(
        name=spec.name,
        generation=generation,
        request=plan_request_from_spec(spec),
        max_restarts=spec.max_restarts,
        backoff_seconds=spec.backoff_seconds,
        deleting=deleting,
    )


def target_from_record(record: DeploymentRecord) -> DeploymentTarget:
    """Raises `SpecError` when the stored manifest no longer validates."""
    spec = deployment_from_manifest(record.manifest, source=f"stored deployment {record.name}")
    return target_from_spec(spec, record.generation, deleting=record.deleting)


@dataclass(frozen=True)
class Unreadable:
    """A stored deployment whose manifest no longer validates, and why."""

    name: str
    error: SpecError


def targets_from_records(
    records: Iterable[DeploymentRecord],
) -> tuple[list[DeploymentTarget], list[Unreadable]]:
    """Desired state of every stored deployment, and the ones that cannot be read.

    One bad record must not stop the others from being reconciled: the controller marks the
    unreadable ones Failed (reason InvalidSpec), passes their names to `reconcile(...,
    frozen=...)` so their running replicas are left alone, and goes on.
    """
    targets: list[DeploymentTarget] = []
    bad: list[Unreadable] = []
    for record in records:
        try:
            targets.append(target_from_record(record))
        except SpecError as exc:
            bad.append(Unreadable(record.name, exc))
    return targets, bad
