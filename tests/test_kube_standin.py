"""The stand-in API server (tests/kube_standin.py) against the behaviour the Kubernetes API
documents (API concepts: resource versions, watches, 410 Gone; finalizers; subresources;
CRD validation), through the `kubernetes` client and plain HTTP, and through the real kubectl.
"""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_standin import StandIn, gateway_for, label_matcher

from orchestrator import crd as crd_module
from orchestrator.kube_gateway import KubeConflict, KubeExpired, KubeNotFound

KUBECTL = "/usr/bin/kubectl"
NS = "default"


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = StandIn(history=50).start()
    yield server
    server.stop()


def http(
    server: StandIn,
    method: str,
    path: str,
    body: Any = None,
    ctype: str = "application/json",
    accept: str = "application/json",
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        server.url + path,
        data=data,
        method=method,
        headers={"Content-Type": ctype, "Accept": accept},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def install_crd(server: StandIn) -> None:
    code, body = http(
        server, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd_module.crd()
    )
    assert code == 201, body


LPUD = f"/apis/lpu.lockstep.dev/v1alpha1/namespaces/{NS}/lpudeployments"


def lpud(name: str = "demo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "lpu.lockstep.dev/v1alpha1",
        "kind": "LPUDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"preset": "llama-3-8b"}, **spec},
    }


def test_create_sets_server_fields_and_defaults(standin: StandIn) -> None:
    install_crd(standin)
    code, obj = http(standin, "POST", LPUD, lpud())
    assert code == 201
    meta = obj["metadata"]
    assert meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) > 0
    assert obj["spec"]["replicas"] == 1 and obj["spec"]["serving"]["maxContext"] == 2048  # defaults
    code, again = http(standin, "POST", LPUD, lpud())
    assert code == 409 and again["reason"] == "AlreadyExists"
    code, missing = http(standin, "GET", LPUD + "/nope")
    assert code == 404 and missing["kind"] == "Status" and missing["reason"] == "NotFound"


def test_put_with_stale_resource_version_is_409(standin: StandIn) -> None:
    install_crd(standin)
    _, obj = http(standin, "POST", LPUD, lpud())
    first = json.loads(json.dumps(obj))
    obj["spec"]["replicas"] = 2
    code, updated = http(standin, "PUT", LPUD + "/demo", obj)
    assert code == 200 and updated["metadata"]["generation"] == 2
    assert int(updated["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    first["spec"]["replicas"] = 3
    code, status = http(standin, "PUT", LPUD + "/demo", first)
    assert code == 409 and status["reason"] == "Conflict"


def test_status_subresource_split_and_generation(standin: StandIn) -> None:
    install_crd(standin)
    _, obj = http(standin, "POST", LPUD, {**lpud(), "status": {"phase": "Ready"}})
    assert "status" not in obj  # status is dropped on create
    code, obj = http(
        standin,
        "PATCH",
        LPUD + "/demo/status",
        {"status": {"phase": "Loading"}, "spec": {"replicas": 9}},
        "application/merge-patch+json",
    )
    assert code == 200 and obj["status"]["phase"] == "Loading"
    assert obj["spec"]["replicas"] == 1 and obj["metadata"]["generation"] == 1
    code, obj = http(
        standin,
        "PATCH",
        LPUD + "/demo",
        {"status": {"phase": "Failed"}, "metadata": {"labels": {"a": "b"}}},
        "application/merge-patch+json",
    )
    assert obj["status"]["phase"] == "Loading"  # the main resource ignores status
    assert obj["metadata"]["generation"] == 1  # metadata changes do not bump generation
    code, obj = http(
        standin, "PATCH", LPUD + "/demo", {"spec": {"replicas": 2}}, "application/merge-patch+json"
    )
    assert obj["metadata"]["generation"] == 2


def test_scale_subresource(standin: StandIn) -> None:
    install_crd(standin)
    http(standin, "POST", LPUD, lpud())
    code, scale = http(standin, "GET", LPUD + "/demo/scale")
    assert code == 200 and scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1
    code, scale = http(
        standin,
        "PATCH",
        LPUD + "/demo/scale",
        {"spec": {"replicas": 3}},
        "application/merge-patch+json",
    )
    assert code == 200 and scale["spec"]["replicas"] == 3
    _, obj = http(standin, "GET", LPUD + "/demo")
    assert obj["spec"]["replicas"] == 3 and obj["metadata"]["generation"] == 2


def test_custom_resources_are_validated_against_the_crd_schema(standin: StandIn) -> None:
    install_crd(standin)
    code, status = http(standin, "POST", LPUD, lpud(replicas=0, precision="int4"))
    assert code == 422 and status["reason"] == "Invalid"
    fields = {c["field"] for c in status["details"]["causes"]}
    assert fields == {"spec.replicas", "spec.precision"}
    # CEL: exactly one of preset or config
    body = lpud()
    body["spec"]["model"]["config"] = "x.json"
    code, status = http(standin, "POST", LPUD, body)
    assert code == 422 and "exactly one of preset or config" in status["message"]
    # list-type set: duplicate racks
    code, status = http(standin, "POST", LPUD, lpud(placement={"racks": ["rack-0", "rack-0"]}))
    assert code == 422 and status["details"]["causes"][0]["reason"] == "FieldValueDuplicate"
    # unknown fields: pruned, or 400 under fieldValidation=Strict
    code, obj = http(standin, "POST", LPUD, lpud(name="pruned", extra=1))
    assert code == 201 and "extra" not in obj["spec"]
    code, status = http(standin, "POST", LPUD + "?fieldValidation=Strict", lpud(name="s", extra=1))
    assert code == 400 and 'unknown field "spec.extra"' in status["message"]


def test_finalizers_hold_a_delete(standin: StandIn) -> None:
    install_crd(standin)
    body = lpud()
    body["metadata"]["finalizers"] = ["x/y"]
    http(standin, "POST", LPUD, body)
    code, obj = http(standin, "DELETE", LPUD + "/demo")
    assert code == 200 and obj["metadata"]["deletionTimestamp"]
    code, obj = http(standin, "GET", LPUD + "/demo")
    assert code == 200  # still there
    code, _ = http(
        standin,
        "PATCH",
        LPUD + "/demo",
        {"metadata": {"finalizers": ["x/y", "new/one"]}},
        "application/merge-patch+json",
    )
    assert code == 422  # no new finalizers while deleting
    code, _ = http(
        standin,
        "PATCH",
        LPUD + "/demo",
        {"metadata": {"finalizers": None}},
        "application/merge-patch+json",
    )
    assert code == 200
    assert http(standin, "GET", LPUD + "/demo")[0] == 404


def test_label_and_field_selectors(standin: StandIn) -> None:
    install_crd(standin)
    for name, tier in (("a", "gold"), ("b", "silver"), ("c", None)):
        body = lpud(name)
        if tier:
            body["metadata"]["labels"] = {"tier": tier}
        http(standin, "POST", LPUD, body)

    def names(query: str) -> list[str]:
        _, out = http(standin, "GET", LPUD + "?" + query)
        assert out["kind"] == "LPUDeploymentList"
        return [o["metadata"]["name"] for o in out["items"]]

    assert names("labelSelector=tier%3Dgold") == ["a"]
    assert names("labelSelector=tier%20in%20(gold,silver)") == ["a", "b"]
    assert names("labelSelector=!tier") == ["c"]
    assert names("labelSelector=tier%21%3Dgold") == ["b", "c"]
    assert names("fieldSelector=metadata.name%3Db") == ["b"]
    assert label_matcher("a=1,b notin (2,3)")({"a": "1", "b": "4"})


def test_watch_from_a_resource_version_and_410(standin: StandIn) -> None:
    install_crd(standin)
    gw = gateway_for(standin)
    _, obj = http(standin, "POST", LPUD, lpud("a"))
    rv = obj["metadata"]["resourceVersion"]
    http(standin, "POST", LPUD, lpud("b"))
    http(standin, "PATCH", LPUD + "/a", {"spec": {"replicas": 2}}, "application/merge-patch+json")
    events = []
    bookmarks = []
    for event in gw.watch_deployments(NS, rv, timeout_seconds=2):
        if event.type == "BOOKMARK":
            bookmarks.append(event.resource_version)
        else:
            events.append((event.type, event.object["metadata"]["name"]))
    assert events == [("ADDED", "b"), ("MODIFIED", "a")]
    assert bookmarks and int(bookmarks[-1]) > int(rv)  # asked for, and they move forward
    standin.state.compact()
    with pytest.raises(KubeExpired):
        list(gw.watch_deployments(NS, rv, timeout_seconds=1))


def test_watch_streams_live_changes(standin: StandIn) -> None:
    install_crd(standin)
    gw = gateway_for(standin)
    _, rv = gw.list_deployments(NS)
    got: list[str] = []
    done = threading.Event()

    def watch() -> None:
        for event in gw.watch_deployments(NS, rv, timeout_seconds=5):
            if event.type != "BOOKMARK":
                got.append(event.type)
            if event.type == "DELETED":
                done.set()
                return

    thread = threading.Thread(target=watch)
    thread.start()
    http(standin, "POST", LPUD, lpud("live"))
    http(standin, "DELETE", LPUD + "/live")
    assert done.wait(10)
    thread.join(10)
    assert got == ["ADDED", "DELETED"]


def test_gateway_maps_errors(standin: StandIn) -> None:
    install_crd(standin)
    gw = gateway_for(standin)
    with pytest.raises(KubeNotFound):
        gw.get_lease(NS, "nope")
    lease = gw.create_lease(NS, "l", {"holderIdentity": "a"})
    assert gw.replace_lease(lease) == lease  # a no-op write keeps the resourceVersion
    lease["spec"]["holderIdentity"] = "b"
    newer = gw.replace_lease(lease)
    assert int(newer["metadata"]["resourceVersion"]) > int(lease["metadata"]["resourceVersion"])
    lease["spec"]["holderIdentity"] = "c"
    with pytest.raises(KubeConflict):
        gw.replace_lease(lease)  # written from a stale resourceVersion


def kubectl(
    kubeconfig: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBECTL, f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_kubectl_discovery_table_and_strict_validation(standin: StandIn, tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(yaml.safe_dump(standin.kubeconfig()))
    out = kubectl(config, "apply", "-f", str(crd_module.CRD_PATH))
    assert out.returncode == 0, out.stderr
    out = kubectl(config, "api-resources", "--api-group=lpu.lockstep.dev")
    assert "lpud" in out.stdout and "LPUDeployment" in out.stdout
    doc = yaml.safe_dump(lpud("demo"))
    assert kubectl(config, "apply", "-f", "-", stdin=doc).returncode == 0
    out = kubectl(config, "get", "lpud")
    columns = [c["name"].upper() for c in crd_module.PRINTER_COLUMNS]
    assert out.stdout.split("\n")[0].split() == ["NAME", *columns]
    bad = doc.replace("preset: llama-3-8b", "preset: llama-3-8b\n    presett: x")
    out = kubectl(config, "apply", "-f", "-", stdin=bad)
    assert out.returncode != 0 and 'unknown field "spec.model.presett"' in out.stderr
    # kubectl asked for server-side strict field validation
    assert any("fieldValidation=Strict" in path for _, path in standin.requests)


def test_json_patch_and_deleted_event_after_the_last_finalizer(standin: StandIn) -> None:
    install_crd(standin)
    body = lpud()
    body["metadata"]["finalizers"] = ["x/y"]
    _, obj = http(standin, "POST", LPUD, body)
    code, obj = http(
        standin,
        "PATCH",
        LPUD + "/demo",
        [
            {"op": "test", "path": "/spec/replicas", "value": 1},
            {"op": "replace", "path": "/spec/replicas", "value": 4},
        ],
        "application/json-patch+json",
    )
    assert code == 200 and obj["spec"]["replicas"] == 4 and obj["metadata"]["generation"] == 2
    code, _ = http(
        standin,
        "PATCH",
        LPUD + "/demo",
        [{"op": "test", "path": "/spec/replicas", "value": 1}],
        "application/json-patch+json",
    )
    assert code == 422  # a failed test changes nothing
    gw = gateway_for(standin)
    _, rv = gw.list_deployments(NS)
    http(standin, "DELETE", LPUD + "/demo")
    http(
        standin,
        "PATCH",
        LPUD + "/demo",
        [{"op": "remove", "path": "/metadata/finalizers"}],
        "application/json-patch+json",
    )
    kinds = [
        e.type for e in gw.watch_deployments(NS, rv, timeout_seconds=1) if e.type != "BOOKMARK"
    ]
    assert kinds == ["MODIFIED", "DELETED"]  # deletionTimestamp set, then gone
