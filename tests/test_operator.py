"""The Kubernetes operator (orchestrator/operator.py) against the stand-in API server.

Unit level: the status built from the store, leader election on a Lease with a fake clock, and
the operator's reconcile loop over a real SQLite store without agents (finalizer, invalid
spec, delete through the finalizer, re-list after 410, a name taken in another namespace).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import wait_for
from kube_standin import StandIn, gateway_for

from orchestrator import crd as crd_module
from orchestrator.core.model import (
    Condition,
    ConditionStatus,
    ConditionType,
    DeploymentStatus,
    Phase,
)
from orchestrator.operator import (
    FINALIZER,
    LeaderElector,
    Operator,
    deployment_status,
    predicted_tokens_per_second,
)
from orchestrator.store import DeploymentRecord, Store
from placement.profiles import get_profile

LPUD = "/apis/lpu.lockstep.dev/v1alpha1/namespaces/{ns}/lpudeployments"


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = StandIn().start()
    server.create(
        server.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"),
        "",
        crd_module.crd(),
    )
    yield server
    server.stop()


def lpud_resource(server: StandIn) -> Any:
    return server.resource("lpu.lockstep.dev", "v1alpha1", "lpudeployments")


def manifest(name: str = "demo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lpu.lockstep.dev/v1alpha1",
        "kind": "LPUDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"preset": "tiny-llama"}, "serving": {"maxContext": 256}, **spec},
    }


# --- status from the store ----------------------------------------------------------------------


def test_status_from_record() -> None:
    cond = Condition(ConditionType.READY, ConditionStatus.TRUE, "Ready", "2 of 2", 0.0, 3)
    record = DeploymentRecord(
        name="demo",
        generation=3,
        manifest={},
        deleting=False,
        created=0.0,
        updated=0.0,
        status=DeploymentStatus(Phase.READY, "Ready", "2 of 2 ready", 2, 3, (cond,)),
    )
    status = deployment_status(
        record,
        [],
        {"replicas": 2, "predicted": {"tokensPerSecond": 100.0}},
        (50, 200),
        2,
        {3: 7}.get,
    )
    assert status["phase"] == "Ready" and status["ready"] == "2/2" and status["readyReplicas"] == 2
    assert status["observedGeneration"] == 7  # the object's generation, not the store's
    assert status["conditions"][0]["observedGeneration"] == 7
    assert status["conditions"][0]["lastTransitionTime"] == "1970-01-01T00:00:00Z"
    assert status["loadedPercent"] == 25 and status["predictedTokensPerSecond"] == 100.0
    deleting = deployment_status(
        DeploymentRecord(**{**record.__dict__, "deleting": True}), [], None, (0, 0), 2, {}.get
    )
    assert deleting["phase"] == "Deleting" and "observedGeneration" not in deleting


def test_predicted_tokens_scale_with_replicas() -> None:
    plan = {"replicas": 2, "predicted": {"tokensPerSecond": 300.0}}
    assert predicted_tokens_per_second(plan, 1) == 150.0
    assert predicted_tokens_per_second(plan, 3) == 450.0
    assert predicted_tokens_per_second(None, 3) is None


# --- leader election -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_only_one_candidate_holds_the_lease_and_takeover_waits_out_the_duration(
    standin: StandIn,
) -> None:
    clock = FakeClock()
    gw = gateway_for(standin)
    a = LeaderElector(gw, "default", "lock", "a", duration=10.0, clock=clock)
    b = LeaderElector(gw, "default", "lock", "b", duration=10.0, clock=clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    for _ in range(5):  # a renews: b never gets it, however long it waits
        clock.now += 4
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew()
    clock.now += 9.9  # a stopped renewing: not yet expired for b
    assert not b.try_acquire_or_renew()
    clock.now += 0.2
    assert b.try_acquire_or_renew()
    lease = gw.get_lease("default", "lock")["spec"]
    assert lease["holderIdentity"] == "b" and lease["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew()  # a sees b's fresh record
    b.release()
    assert a.try_acquire_or_renew()  # released: taken at once


# --- the reconcile loop, no agents ---------------------------------------------------------------


@pytest.fixture
def operator(standin: StandIn, tmp_path: Path) -> Iterator[tuple[Operator, Store, list[str]]]:
    store = Store(tmp_path / "store.db")
    woken: list[str] = []
    op = Operator(
        gateway_for(standin),
        store,
        lambda: woken.append("wake"),
        get_profile("dev"),
        namespace="",
        sync_interval=0.1,
        watch_timeout=5,
    )
    op.start()
    yield op, store, woken
    op.stop()
    store.close()


def get(server: StandIn, name: str, ns: str = "default") -> dict[str, Any] | None:
    try:
        return server.get(lpud_resource(server), ns, name)
    except Exception:
        return None


def test_apply_finalizer_status_and_delete(standin: StandIn, operator: Any) -> None:
    _op, store, woken = operator
    r = lpud_resource(standin)
    standin.create(r, "default", manifest(replicas=2))
    obj = wait_for(
        lambda: (o := get(standin, "demo")) and o.get("status") and o,
        timeout=30,
        interval=0.05,
        what="status",
    )
    assert FINALIZER in obj["metadata"]["finalizers"]
    record = wait_for(lambda: store.deployment("demo"), timeout=30, interval=0.05)
    assert record.manifest["spec"]["replicas"] == 2 and woken
    assert obj["status"]["ready"] == "0/2"
    events = standin.resource("", "v1", "events")
    wait_for(
        lambda: any(
            e["reason"] == "Applied" and e["involvedObject"]["uid"] == obj["metadata"]["uid"]
            for e in standin.list(events, "default")[0]
        ),
        timeout=30,
        interval=0.05,
        what="an Applied event on the object",
    )
    # scale: a new generation reaches the store
    standin.patch(
        r, "default", "demo", "application/merge-patch+json", {"spec": {"replicas": 3}}, "scale"
    )
    wait_for(
        lambda: store.deployment("demo").manifest["spec"]["replicas"] == 3,
        timeout=30,
        interval=0.05,
    )
    # delete: held by the finalizer until the control plane forgets the deployment
    standin.delete(r, "default", "demo")
    wait_for(lambda: store.deployment("demo").deleting, timeout=30, interval=0.05, what="deleting")
    assert get(standin, "demo") is not None
    store.delete_deployment("demo")  # what the controller does once chips are free
    wait_for(lambda: get(standin, "demo") is None, timeout=30, interval=0.05, what="object gone")


def test_invalid_spec_is_reported_not_stored(standin: StandIn, operator: Any) -> None:
    _op, store, _ = operator
    standin.create(
        lpud_resource(standin), "default", manifest(model={"config": "/nonexistent/config.json"})
    )
    obj = wait_for(
        lambda: (o := get(standin, "demo")) and o.get("status", {}).get("phase") == "Failed" and o,
        timeout=30,
        interval=0.05,
    )
    assert obj["status"]["reason"] == "InvalidSpec"
    assert "model config file not found" in obj["status"]["message"]
    assert store.deployment("demo") is None
    events = standin.resource("", "v1", "events")
    wait_for(
        lambda: (
            [e["type"] for e in standin.list(events, "default")[0] if e["reason"] == "InvalidSpec"]
            == ["Warning"]
        ),
        timeout=30,
        interval=0.05,
    )


def test_same_name_in_two_namespaces(standin: StandIn, operator: Any) -> None:
    _, store, _ = operator
    r = lpud_resource(standin)
    standin.create(r, "default", manifest())
    wait_for(lambda: store.deployment("demo"), timeout=30, interval=0.05)
    standin.create(r, "other", manifest())
    obj = wait_for(
        lambda: (o := get(standin, "demo", "other")) and o.get("status", {}).get("reason") and o,
        timeout=30,
        interval=0.05,
    )
    assert obj["status"]["reason"] == "NameTaken" and obj["status"]["phase"] == "Failed"


def test_relists_after_410_and_misses_nothing(standin: StandIn, operator: Any) -> None:
    op, store, _ = operator
    r = lpud_resource(standin)
    standin.create(r, "default", manifest("first"))
    wait_for(lambda: store.deployment("first"), timeout=30, interval=0.05)
    before = op.relists
    standin.state.compact()  # the watch's resourceVersion is now too old
    standin.create(r, "default", manifest("second"))
    wait_for(
        lambda: store.deployment("second"),
        timeout=30,
        interval=0.05,
        what="second applied after the re-list",
    )
    assert op.relists > before


def test_stored_deployment_without_object_is_deleted(standin: StandIn, tmp_path: Path) -> None:
    store = Store(tmp_path / "store.db")
    store.apply_deployment("orphan", manifest("orphan"), 0.0)
    op = Operator(
        gateway_for(standin),
        store,
        lambda: None,
        get_profile("dev"),
        sync_interval=0.1,
        watch_timeout=5,
    )
    op.start()
    try:
        wait_for(
            lambda: store.deployment("orphan").deleting,
            timeout=30,
            interval=0.05,
            what="orphan deleting",
        )
    finally:
        op.stop()
        store.close()


def test_status_is_one_patch_per_change(standin: StandIn, operator: Any) -> None:
    standin.create(lpud_resource(standin), "default", manifest())
    wait_for(
        lambda: (o := get(standin, "demo")) and "chips" in o.get("status", {}), timeout=30
    )  # stored
    count = sum(1 for m, p in standin.requests if m == "PATCH" and p.endswith("/status"))
    # the sync loop runs every 0.1 s; nothing changes, so nothing more is written
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
    after = sum(1 for m, p in standin.requests if m == "PATCH" and p.endswith("/status"))
    assert after == count
    assert json.dumps(get(standin, "demo")["status"])  # and it is there


def test_backs_off_on_api_errors_and_lists_again(standin: StandIn, operator: Any) -> None:
    op, store, _ = operator
    r = lpud_resource(standin)
    standin.create(r, "default", manifest("first"))
    wait_for(lambda: store.deployment("first"), timeout=30, interval=0.05)
    lists = op.relists
    standin.fail(4, 500, "lpudeployments")  # the API server answers 500 four times
    standin.state.compact()  # the watch ends with 410; the re-lists meet the errors
    standin.create(r, "default", manifest("second"))
    wait_for(lambda: store.deployment("second"), timeout=60, interval=0.05, what="recovered")
    assert op.relists == lists + 1  # the failed lists do not count; one succeeded
    assert all(f[0] == 0 for f in standin.faults)  # every injected fault was met


def test_a_deployment_lost_by_the_control_plane_is_applied_again(
    standin: StandIn, operator: Any
) -> None:
    _, store, _ = operator
    standin.create(lpud_resource(standin), "default", manifest())
    wait_for(lambda: store.deployment("demo"), timeout=30, interval=0.05)
    store.delete_deployment("demo")  # e.g. `lpuctl delete` behind Kubernetes' back
    wait_for(lambda: store.deployment("demo"), timeout=30, interval=0.05, what="applied again")


def test_a_freed_name_is_served_to_the_waiting_object(standin: StandIn, operator: Any) -> None:
    _, store, _ = operator
    r = lpud_resource(standin)
    standin.create(r, "default", manifest())
    wait_for(lambda: store.deployment("demo"), timeout=30, interval=0.05)
    standin.create(r, "other", manifest(replicas=3))
    wait_for(
        lambda: (
            (get(standin, "demo", "other") or {}).get("status", {}).get("reason") == "NameTaken"
        ),
        timeout=30,
        interval=0.05,
    )
    standin.delete(r, "default", "demo")
    wait_for(lambda: store.deployment("demo").deleting, timeout=30, interval=0.05)
    store.delete_deployment("demo")  # the controller's part, done
    wait_for(
        lambda: (d := store.deployment("demo")) and d.manifest["spec"]["replicas"] == 3,
        timeout=30,
        interval=0.05,
        what="the other namespace's object served",
    )
