"""From a validated deployment spec to the store and to the planner's request."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.spec import DeploymentSpec
from orchestrator.store import ApplyResult, ControlStore
from placement.models import ModelConfig, model_from_hf_config, model_preset
from placement.planner import PlanRequest


def model_for_spec(spec: DeploymentSpec) -> ModelConfig:
    """The model a spec names: a preset, or the Hugging Face config it points at (as the
    validator already read it, so the file is parsed once)."""
    if spec.model is not None:
        return spec.model
    if spec.model_preset:
        return model_preset(spec.model_preset)
    assert spec.model_config_path is not None  # the validator requires one of the two
    return model_from_hf_config(spec.model_config_path)


def plan_request_from_spec(spec: DeploymentSpec) -> PlanRequest:
    return PlanRequest(
        name=spec.name,
        model=model_for_spec(spec),
        precision=spec.precision,
        replicas=spec.replicas,
        max_context=spec.max_context,
        max_batch=spec.max_batch,
        tensor_parallel=spec.tensor_parallel,
        pipeline_stages=spec.pipeline_stages,
        spread=spec.spread,
        spares_per_rack=spec.spares_per_rack,
        racks=spec.racks,
    )


def store_deployment(
    store: ControlStore,
    spec: DeploymentSpec,
    now: float,
    wake: Callable[[], None],
    *,
    generation: int | None = None,
) -> ApplyResult:
    """The one way a validated spec enters the control plane (the admin API's Apply and the
    Kubernetes operator): store it; when it changed, record an Applied event and wake the
    controller. `generation` names the user's generation in the event (the operator's
    `metadata.generation`; default the store's). Raises `store.Conflict` while a delete of the
    same name is in progress."""
    result = store.apply_deployment(spec.name, spec.manifest, now)
    if result.changed:
        what = "created" if result.created else "spec changed"
        shown = result.generation if generation is None else generation
        store.add_event(
            now, "Normal", "Applied", f"{what}: generation {shown}", deployment=result.name
        )
        wake()
    return result
