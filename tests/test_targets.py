"""Stored manifests to the reconciler's desired state."""

from __future__ import annotations

from pathlib import Path

from orchestrator.core import Phase
from orchestrator.spec import load_deployment_file
from orchestrator.store import Store
from orchestrator.targets import target_from_record, targets_from_records

EXAMPLE = Path(__file__).resolve().parent.parent / "manifests" / "examples" / "tiny-llama.yaml"


def test_a_stored_manifest_becomes_a_target(tmp_path: Path) -> None:
    spec = load_deployment_file(EXAMPLE)
    with Store(tmp_path / "s.db") as store:
        store.apply_deployment(spec.name, spec.to_manifest(), now=1.0)
        record = store.deployment(spec.name)
        assert record is not None and record.status.phase is Phase.PENDING
        target = target_from_record(record)
        assert (target.name, target.generation, target.deleting) == ("tiny-llama", 1, False)
        assert target.request.replicas == 2 and target.request.max_context == 256
        assert target.request.model.name == "tiny-llama"
        # The replica count is not part of the template; precision is.
        scaled = spec.to_manifest()
        scaled["spec"]["replicas"] = 3
        store.apply_deployment(spec.name, scaled, now=2.0)
        record = store.deployment(spec.name)
        assert record is not None
        scaled_target = target_from_record(record)
        assert scaled_target.generation == 2 and scaled_target.template == target.template
        int8 = spec.to_manifest()
        int8["spec"]["precision"] = "int8"
        store.apply_deployment(spec.name, int8, now=3.0)
        record = store.deployment(spec.name)
        assert record is not None and target_from_record(record).template != target.template


def test_an_unreadable_record_does_not_stop_the_others(tmp_path: Path) -> None:
    spec = load_deployment_file(EXAMPLE)
    with Store(tmp_path / "s.db") as store:
        store.apply_deployment(spec.name, spec.to_manifest(), now=1.0)
        broken = spec.to_manifest()
        broken["metadata"]["name"] = "broken"
        broken["spec"]["model"] = {"preset": "no-such-model"}
        store.apply_deployment("broken", broken, now=1.0)
        targets, bad = targets_from_records(store.deployments())
        assert [t.name for t in targets] == ["tiny-llama"]
        assert [b.name for b in bad] == ["broken"] and "no-such-model" in str(bad[0].error)
