"""manifests/: the kustomization builds with the real kubectl, and every manifest passes a schema
check of its kind; the CRD is the generated one and not stale; RBAC is least privilege.

The schema check of the built-in kinds uses the models of the `kubernetes` Python client
(generated from the Kubernetes OpenAPI document; pinned in pyproject.toml): every field must be
one the model declares (an unknown or misspelt field fails), and the model (pydantic,
`extra="forbid"`) checks types and required fields. The CRD is also registered with the
stand-in API server (tests/test_kube_standin.py), which compiles its CEL rules. The RayCluster
(ray.io/v1, no schema available offline) is checked for its pod templates with the same models
and for the fields KubeRay documents at its top level.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pydantic
import pytest
import yaml
from cryptography import x509

from orchestrator import crd as crd_module
from orchestrator.spec import crd_openapi_schema, load_deployment_file

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
KUBECTL = "/usr/bin/kubectl"

MODELS: dict[tuple[str, str], type] = {
    ("v1", "Namespace"): k8s.V1Namespace,
    ("v1", "ServiceAccount"): k8s.V1ServiceAccount,
    ("v1", "Service"): k8s.V1Service,
    ("apps/v1", "Deployment"): k8s.V1Deployment,
    ("apps/v1", "DaemonSet"): k8s.V1DaemonSet,
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): k8s.V1ClusterRole,
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): k8s.V1ClusterRoleBinding,
    ("rbac.authorization.k8s.io/v1", "Role"): k8s.V1Role,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): k8s.V1RoleBinding,
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): k8s.V1CustomResourceDefinition,
}

_LIST = re.compile(r"^List\[(.+)\]$")
_DICT = re.compile(r"^Dict\[str, (.+)\]$")


def check_model(value: Any, type_name: str, path: str) -> list[str]:
    """Problems of `value` against the client's model type `type_name` (empty: it conforms)."""
    if m := _LIST.match(type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [p for i, v in enumerate(value) for p in check_model(v, m[1], f"{path}[{i}]")]
    if m := _DICT.match(type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {value!r}"]
        return [p for k, v in value.items() for p in check_model(v, m[1], f"{path}.{k}")]
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str}
    if type_name in scalars:
        ok = isinstance(value, scalars[type_name]) and not (
            type_name == "int" and isinstance(value, bool)
        )
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    if type_name == "object":  # IntOrString, RawExtension, JSON
        return []
    cls = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping, got {value!r}"]
    by_key = {v: k for k, v in cls.attribute_map.items()}
    problems: list[str] = []
    for key, item in value.items():
        attr = by_key.get(key)
        if attr is None:
            problems.append(f"{path}.{key}: unknown field of {type_name}")
            continue
        problems += check_model(item, cls.openapi_types[attr], f"{path}.{key}")
    return problems


def check_kind(doc: dict[str, Any], cls: type, where: str) -> list[str]:
    """The client's model (pydantic, `extra="forbid"`): types, required fields, unknown fields;
    plus `check_model`, which accepts only the JSON names (pydantic also takes snake_case)."""
    problems = check_model(doc, cls.__name__, where)
    try:
        cls.model_validate(doc)  # type: ignore[attr-defined]
    except pydantic.ValidationError as exc:
        problems += [f"{where}: {e['loc']}: {e['msg']}" for e in exc.errors()]
    return problems


def kustomize_build() -> list[dict[str, Any]]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def all_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or "examples" in path.parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((str(path.relative_to(REPO)), doc))
    return docs


def test_kustomize_builds_every_component() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in kustomize_build())
    assert kinds == sorted(
        [
            ("Namespace", "lockstep-system"),
            ("CustomResourceDefinition", crd_module.CRD_NAME),
            ("ServiceAccount", "lockstep-operator"),
            ("ClusterRole", "lockstep-operator"),
            ("ClusterRoleBinding", "lockstep-operator"),
            ("Role", "lockstep-operator-leader-election"),
            ("RoleBinding", "lockstep-operator-leader-election"),
            ("ServiceAccount", "lockstep-agent"),
            ("ClusterRole", "lockstep-agent"),
            ("ClusterRoleBinding", "lockstep-agent"),
            ("Deployment", "lockstep-operator"),
            ("Service", "lockstep-control-plane"),
            ("DaemonSet", "lockstep-agent"),
        ]
    )


@pytest.mark.parametrize(
    "where,doc", all_documents(), ids=lambda x: x if isinstance(x, str) else x["kind"]
)
def test_every_manifest_passes_the_schema_of_its_kind(where: str, doc: dict[str, Any]) -> None:
    kind = (doc["apiVersion"], doc["kind"])
    if kind == ("ray.io/v1", "RayCluster"):
        assert set(doc["spec"]) <= {
            "rayVersion",
            "authOptions",
            "headGroupSpec",
            "workerGroupSpecs",
            "enableInTreeAutoscaling",
            "autoscalerOptions",
            "headServiceAnnotations",
            "suspend",
        }
        templates = [doc["spec"]["headGroupSpec"]["template"]] + [
            g["template"] for g in doc["spec"]["workerGroupSpecs"]
        ]
        for group in doc["spec"]["workerGroupSpecs"]:
            assert set(group) <= {
                "groupName",
                "replicas",
                "minReplicas",
                "maxReplicas",
                "rayStartParams",
                "template",
                "scaleStrategy",
                "suspend",
                "numOfHosts",
                "idleTimeoutSeconds",
            }
            resources = json.loads(json.loads(group["rayStartParams"]["resources"]))
            assert any(k.startswith("lockstep-host:") for k in resources)
        problems = [p for t in templates for p in check_kind(t, k8s.V1PodTemplateSpec, where)]
    else:
        assert kind in MODELS, f"{where}: no schema check for {kind}"
        problems = check_kind(doc, MODELS[kind], where)
    assert problems == []


def test_the_schema_check_catches_mistakes() -> None:
    """The checker itself: a misspelt field, a wrong type and a missing required field fail."""
    deployment = next(d for _, d in all_documents() if d["kind"] == "Deployment")
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert any("imagePullPolcy: unknown field" in p for p in check_kind(bad, k8s.V1Deployment, ""))
    bad = json.loads(json.dumps(deployment))
    bad["spec"]["replicas"] = "two"
    assert any("valid integer" in p for p in check_kind(bad, k8s.V1Deployment, ""))
    bad = json.loads(json.dumps(deployment))
    del bad["spec"]["template"]["spec"]["containers"][0]["name"]
    assert any("'name')" in p and "required" in p for p in check_kind(bad, k8s.V1Deployment, ""))


def test_committed_crd_is_generated_and_not_stale(tmp_path: Path) -> None:
    assert crd_module.main(["--check"]) == 0
    committed = yaml.safe_load(crd_module.CRD_PATH.read_text())
    assert committed == crd_module.crd()
    # One source: the spec's properties are the file schema's, rule for rule.
    schema = committed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    generated = crd_openapi_schema()["properties"]["spec"]
    strip = {"x-kubernetes-validations", "x-kubernetes-list-type"}

    def plain(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items() if k not in strip}
        if isinstance(node, list):
            return [plain(v) for v in node]
        return node

    assert plain(schema["properties"]["spec"]) == generated
    # A stale file is detected.
    stale = tmp_path / "crd.yaml"
    stale.write_text(crd_module.render().replace("lpud", "lpux"))
    assert crd_module.main(["--check", "--out", str(stale)]) == 1


def test_crd_has_subresources_printer_columns_and_cel() -> None:
    version = crd_module.crd()["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert [c["name"].upper() for c in version["additionalPrinterColumns"]] == [
        "READY",
        "PHASE",
        "CHIPS",
        "RACKS",
        "TOKENS/S",
        "AGE",
    ]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["properties"]["model"]["x-kubernetes-validations"]]
    assert "has(self.preset) != has(self.config)" in rules
    assert spec["properties"]["placement"]["properties"]["racks"]["x-kubernetes-list-type"] == "set"


def test_rbac_is_least_privilege() -> None:
    docs = [d for _, d in all_documents()]
    roles = {
        (d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("ClusterRole", "Role")
    }
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], role
            assert "secrets" not in rule["resources"], role
            assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(
                rule["verbs"]
            )
    operator = roles[("ClusterRole", "lockstep-operator")]["rules"]
    assert {(tuple(r["resources"]), tuple(r["verbs"])) for r in operator} == {
        (("lpudeployments",), ("get", "list", "watch", "update", "patch")),
        (("lpudeployments/status",), ("get", "update", "patch")),
        (("lpudeployments/finalizers",), ("update",)),
        (("events",), ("create", "patch")),
    }
    lease = roles[("Role", "lockstep-operator-leader-election")]
    assert lease["metadata"]["namespace"] == "lockstep-system"
    assert lease["rules"][0]["resourceNames"] == ["lockstep-operator"]
    assert roles[("ClusterRole", "lockstep-agent")]["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}
    ]


def test_operator_and_agent_workloads() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in all_documents()}
    operator = docs[("Deployment", "lockstep-operator")]["spec"]
    assert operator["replicas"] == 2
    args = operator["template"]["spec"]["containers"][0]["args"]
    assert "--lease-name=lockstep-operator" in args and "--identity=$(POD_NAME)" in args
    agent = docs[("DaemonSet", "lockstep-agent")]["spec"]["template"]["spec"]
    assert agent["nodeSelector"] == {"lpu.lockstep.dev/lpu": "true"}
    command = " ".join(agent["containers"][0]["command"])
    assert "--control-plane lockstep-control-plane.lockstep-system.svc:7444" in command
    assert "topology.lockstep.dev/" in " ".join(agent["initContainers"][0]["command"])
    service = docs[("Service", "lockstep-control-plane")]["spec"]
    ports = {p["name"]: p["port"] for p in service["ports"]}
    assert f"--registry-listen=0.0.0.0:{ports['registry']}" in args
    assert f"--admin-listen=0.0.0.0:{ports['admin']}" in args


@pytest.mark.parametrize(
    "name",
    sorted(
        p.name for p in (MANIFESTS / "examples").glob("*.yaml") if p.name != "topology-dev.yaml"
    ),
)
def test_examples_are_valid_deployments(name: str) -> None:
    spec = load_deployment_file(MANIFESTS / "examples" / name)
    assert spec.name


def test_kubectl_apply_k_installs_cleanly_and_again_changes_nothing(tmp_path: Path) -> None:
    """`kubectl apply -k manifests/` against the stand-in API server: every object is created,
    a second apply changes nothing, and the CRD then serves the example deployment."""
    from kube_standin import StandIn

    server = StandIn().start()
    try:
        config = tmp_path / "kubeconfig"
        config.write_text(yaml.safe_dump(server.kubeconfig()))
        env = {**os.environ, "KUBECONFIG": str(config), "HOME": str(tmp_path)}

        def kubectl(*args: str) -> str:
            out = subprocess.run(
                [KUBECTL, *args], capture_output=True, text=True, timeout=120, env=env
            )
            assert out.returncode == 0, out.stderr
            return out.stdout

        first = kubectl("apply", "-k", str(MANIFESTS)).splitlines()
        assert len(first) == len(kustomize_build())
        assert all(line.endswith(" created") for line in first), first
        again = kubectl("apply", "-k", str(MANIFESTS)).splitlines()
        assert all(line.endswith(" unchanged") for line in again), again
        example = MANIFESTS / "examples" / "tiny-llama.yaml"
        assert "created" in kubectl("apply", "-f", str(example))
    finally:
        server.stop()


def test_agent_init_container_lays_out_topology_and_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DaemonSet's init container script, run against the stand-in (its /etc/lockstep
    paths moved under tmp_path, in-cluster config replaced by a kubeconfig): it writes the
    node's rack and slot from its labels, and lays out the node's certificate from the flat
    Secret keys so that the agent's loader (`security.certs.ensure_agent`) accepts it."""
    import kubernetes.config
    from kube_standin import StandIn

    from security import certs

    issued = tmp_path / "issued"
    certs.init_ca(issued)
    certs.issue(issued, certs.agent_identity("lpu-a"))
    secret = tmp_path / "etc" / "secret"  # the Secret volume: flat keys
    secret.mkdir(parents=True)
    (secret / "ca.crt").write_bytes((issued / "ca.crt").read_bytes())
    for suffix in ("crt", "key"):
        (secret / f"lpu-a.{suffix}").write_bytes(
            (issued / "agents" / f"lpu-a.{suffix}").read_bytes()
        )
    (tmp_path / "etc" / "topology").mkdir()

    server = StandIn().start()
    try:
        nodes = server.resource("", "v1", "nodes")
        labels = {"topology.lockstep.dev/rack": "rack-3", "topology.lockstep.dev/slot": "5"}
        server.create(nodes, "", {"metadata": {"name": "lpu-a", "labels": labels}})
        config = tmp_path / "kubeconfig"
        config.write_text(yaml.safe_dump(server.kubeconfig()))
        monkeypatch.setattr(
            kubernetes.config,
            "load_incluster_config",
            lambda: kubernetes.config.load_kube_config(config_file=str(config)),
        )
        monkeypatch.setenv("NODE_NAME", "lpu-a")
        daemonset = next(d for _, d in all_documents() if d["kind"] == "DaemonSet")
        script = daemonset["spec"]["template"]["spec"]["initContainers"][0]["command"][2]
        exec(script.replace("/etc/lockstep", str(tmp_path / "etc")), {})
    finally:
        server.stop()
    assert (tmp_path / "etc" / "topology" / "rack").read_text() == "rack-3"
    assert (tmp_path / "etc" / "topology" / "slot").read_text() == "5"
    laid_out = tmp_path / "etc" / "certs"
    assert (laid_out / "agents" / "lpu-a.key").stat().st_mode & 0o777 == 0o600
    creds = certs.ensure_agent(laid_out, "lpu-a")  # what the agent does at start
    assert creds.identity == certs.agent_identity("lpu-a")
    assert not (laid_out / "ca.key").exists()  # the node never holds the CA key


def test_operator_init_container_brings_the_agents_ca(tmp_path: Path) -> None:
    """The operator's init container copies the CA from its Secret into the state directory;
    the control plane then issues its own certificate from it, so agents with certificates
    from that CA and the control plane trust each other."""
    from orchestrator.control_plane import prepare_state
    from security import certs

    issued = tmp_path / "issued"  # where the platform engineer ran `lpuctl certs init`
    certs.init_ca(issued)
    certs.issue(issued, certs.agent_identity("lpu-a"))
    etc = tmp_path / "etc" / "ca"
    etc.mkdir(parents=True)
    for name in ("ca.crt", "ca.key"):
        (etc / name).write_bytes((issued / name).read_bytes())
    deployment = next(d for _, d in all_documents() if d["kind"] == "Deployment")
    script = deployment["spec"]["template"]["spec"]["initContainers"][0]["command"][2]
    state = tmp_path / "state"
    exec(
        script.replace("/etc/lockstep", str(tmp_path / "etc")).replace(
            "/var/lib/lockstep", str(state)
        ),
        {},
    )
    assert (state / "certs" / "ca.key").stat().st_mode & 0o777 == 0o600
    paths = prepare_state(state, ("lockstep-control-plane.lockstep-system.svc",))
    control_plane = certs.load_control_plane(paths.certs)
    agent = certs.load_agent(issued, "lpu-a")
    assert control_plane.ca_pem == agent.ca_pem  # one CA: mutual TLS holds
    ca = x509.load_pem_x509_certificate(agent.ca_pem)
    x509.load_pem_x509_certificate(control_plane.cert_pem).verify_directly_issued_by(ca)
