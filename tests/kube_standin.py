"""A stand-in Kubernetes API server for tests: the part of the API the operator and kubectl use.

No real API server can run on these machines, so the operator's and kubectl's tests talk to
this one on loopback. kmock 0.8 was considered first; its stateful mode sets no
resourceVersion, uid or generation, answers PUT with 404, ignores label selectors and watch
resourceVersions, registers nothing for a CRD and lists without `kind` (the issue lists every
gap), which is most of what the operator relies on, so this is a small server of its own,
tested against the documented API behaviour in tests/test_kube_standin.py.

What it honours (and nothing more):

* discovery (`/api`, `/apis`, `/api/v1`, `/apis/G/V`, `/version`) and a minimal `/openapi/v3`
  that tells kubectl the server validates fields itself (`fieldValidation`), so kubectl sends
  `fieldValidation=Strict` and relies on the server, as against a real 1.2x+ server;
* CRUD on core/v1 events, namespaces, services, configmaps, serviceaccounts, secrets, nodes;
  apps/v1 deployments and daemonsets; rbac/v1 roles, bindings and their cluster kinds;
  coordination.k8s.io/v1 leases; apiextensions.k8s.io/v1 CRDs; and every resource a
  registered CRD serves (built-in kinds are stored as given: no schema, no controllers);
* one global, increasing `resourceVersion`; PUT with a stale `metadata.resourceVersion` is
  409 Conflict; `uid`, `creationTimestamp`, `generation` set by the server;
* `generation` bumped only when something other than `metadata` and `status` changes;
* JSON merge patch (`application/merge-patch+json`; strategic merge patch is treated as a
  merge patch — good enough for the maps the tests patch, not for lists with merge keys) and
  JSON patch;
* the status subresource split (writes to the object ignore `status`, writes to `/status`
  change only `status`) and the scale subresource (`autoscaling/v1 Scale`);
* finalizers and `deletionTimestamp` (a delete with finalizers only marks the object; it goes
  when the last finalizer is removed; no finalizer may be added while deleting);
* label selectors (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`) and field selectors
  (`metadata.name`, `metadata.namespace`, `involvedObject.*`, `type`, `reason`);
* watch from a resourceVersion, with an in-stream `ERROR` 410 Expired when it is older than
  the retained history (`compact()` drops history, as etcd compaction does), BOOKMARKs when
  asked, and a list+watch from "now" without one;
* CRD registration: defaulting, pruning of unknown fields (400 under `fieldValidation=Strict`),
  validation of custom resources against the CRD's `openAPIV3Schema` (422 Invalid listing
  every cause), `x-kubernetes-list-type: set` uniqueness and `x-kubernetes-validations` CEL
  rules (evaluated with cel-python);
* server-side printing (`Accept: ...;as=Table`) from the CRD's `additionalPrinterColumns`.

Not modelled: authentication and authorization (RBAC is checked only as manifests), admission
webhooks, server-side apply, namespaces' existence and lifecycle, garbage collection by owner
references, built-in types' schemas (their bodies are stored as given), protobuf.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import celpy
import jsonschema
import yaml


class ApiError(Exception):
    """An API error answered as a `Status` object."""

    def __init__(
        self, code: int, reason: str, message: str, causes: list[dict[str, str]] | None = None
    ):
        super().__init__(message)
        self.code, self.reason, self.message, self.causes = code, reason, message, causes or []

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.causes:
            out["details"] = {"causes": self.causes}
        return out


@dataclass
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    schema: dict[str, Any] | None = None  # openAPIV3Schema of a CRD version
    status_subresource: bool = False
    scale: dict[str, str] | None = None  # specReplicasPath, statusReplicasPath, labelSelectorPath
    printer_columns: list[dict[str, Any]] = field(default_factory=list)
    crd: bool = False

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def discovery(self) -> list[dict[str, Any]]:
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        out = [
            {
                "name": self.plural,
                "singularName": self.singular or self.kind.lower(),
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": verbs,
                **({"shortNames": list(self.short_names)} if self.short_names else {}),
            }
        ]
        if self.status_subresource:
            out.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        if self.scale is not None:
            out.append(
                {
                    "name": f"{self.plural}/scale",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "group": "autoscaling",
                    "version": "v1",
                    "kind": "Scale",
                    "verbs": ["get", "patch", "update"],
                }
            )
        return out


BUILTINS = [
    Resource("", "v1", "namespaces", "Namespace", False, "namespace", ("ns",)),
    Resource("", "v1", "events", "Event", True, "event", ("ev",)),
    Resource("", "v1", "configmaps", "ConfigMap", True, "configmap", ("cm",)),
    Resource("", "v1", "services", "Service", True, "service", ("svc",)),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", True, "serviceaccount", ("sa",)),
    Resource("", "v1", "secrets", "Secret", True, "secret"),
    Resource("", "v1", "nodes", "Node", False, "node", ("no",)),
    Resource("apps", "v1", "deployments", "Deployment", True, "deployment", ("deploy",)),
    Resource("apps", "v1", "daemonsets", "DaemonSet", True, "daemonset", ("ds",)),
    Resource("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    Resource("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True, "lease"),
    Resource(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        "customresourcedefinition",
        ("crd", "crds"),
    ),
]


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, test, move, copy)."""
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)

    def parent(path: str) -> tuple[Any, str]:
        parts = _pointer(path)
        if not parts:
            raise ApiError(422, "Invalid", "cannot patch the document root")
        node = doc
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        return node, parts[-1]

    def get(path: str) -> Any:
        node = doc
        for p in _pointer(path):
            node = node[int(p)] if isinstance(node, list) else node[p]
        return node

    try:
        for op in ops:
            kind, path = op["op"], op["path"]
            if kind == "test":
                if get(path) != op["value"]:
                    raise ApiError(422, "Invalid", f"test failed at {path}")
                continue
            if kind in ("move", "copy"):
                value = copy.deepcopy(get(op["from"]))
                if kind == "move":
                    node, key = parent(op["from"])
                    del node[int(key) if isinstance(node, list) else key]
                kind, op = "add", {**op, "value": value}
            node, key = parent(path)
            if kind == "add":
                if isinstance(node, list):
                    node.insert(len(node) if key == "-" else int(key), copy.deepcopy(op["value"]))
                else:
                    node[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[int(key) if isinstance(node, list) else key]
            elif kind == "replace":
                if isinstance(node, list):
                    node[int(key)] = copy.deepcopy(op["value"])
                else:
                    if key not in node:
                        raise ApiError(422, "Invalid", f"replace: {path} does not exist")
                    node[key] = copy.deepcopy(op["value"])
            else:
                raise ApiError(400, "BadRequest", f"unknown JSON patch op {kind!r}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(422, "Invalid", f"JSON patch failed: {exc}") from None
    return doc


# --- selectors --------------------------------------------------------------------------------

_SET_EXPR = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def label_matcher(text: str) -> Callable[[dict[str, str]], bool]:
    """A Kubernetes label selector string as a predicate over a labels mapping."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for raw in _split_selector(text):
        term = raw.strip()
        m = _SET_EXPR.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                tests.append(lambda lab, k=key, vs=values: lab.get(k) in vs)
            else:
                tests.append(lambda lab, k=key, vs=values: lab.get(k) not in vs)
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            tests.append(lambda lab, k=key, v=value: lab.get(k) != v)
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            tests.append(lambda lab, k=key, v=value: lab.get(k) == v)
        elif term.startswith("!"):
            absent = term[1:].strip()
            tests.append(lambda lab, k=absent: k not in lab)
        elif re.fullmatch(r"[A-Za-z0-9./_-]+", term):
            tests.append(lambda lab, k=term: k in lab)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return lambda labels: all(t(labels) for t in tests)


def field_matcher(text: str) -> Callable[[dict[str, Any]], bool]:
    tests: list[Callable[[dict[str, Any]], bool]] = []
    for raw in _split_selector(text):
        term = raw.strip()
        negate = "!=" in term
        key, value = (s.strip() for s in re.split(r"!=|==|=", term, maxsplit=1))
        if not re.fullmatch(r"metadata\.(name|namespace)|involvedObject\.\w+|type|reason", key):
            raise ApiError(400, "BadRequest", f"field label not supported: {key}")

        def get(obj: dict[str, Any], k: str = key) -> str:
            node: Any = obj
            for p in k.split("."):
                node = node.get(p) if isinstance(node, dict) else None
            return "" if node is None else str(node)

        tests.append(
            (lambda o, g=get, v=value: g(o) != v)
            if negate
            else (lambda o, g=get, v=value: g(o) == v)
        )
    return lambda obj: all(t(obj) for t in tests)


# --- custom resource validation ---------------------------------------------------------------


def _schema_walk(schema: dict[str, Any], value: Any, path: str, visit: Callable[..., None]) -> None:
    visit(schema, value, path)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key in value:
                _schema_walk(sub, value[key], f"{path}.{key}" if path else key, visit)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                if key not in props:
                    _schema_walk(extra, item, f"{path}[{key}]", visit)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            _schema_walk(schema["items"], item, f"{path}[{i}]", visit)


def apply_defaults(schema: dict[str, Any], value: Any) -> None:
    """Structural defaulting, as the API server does before validation."""
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)


def prune(schema: dict[str, Any], value: Any, path: str, unknown: list[str]) -> None:
    """Drop fields the schema does not declare (recording them), as the API server prunes."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None and extra is not None:
            if isinstance(extra, dict):
                for item in value.values():
                    prune(extra, item, path, unknown)
            return
        for key in list(value):
            sub = (props or {}).get(key)
            where = f"{path}.{key}" if path else key
            if sub is None:
                if path.startswith("metadata") or where in ("apiVersion", "kind", "metadata"):
                    continue
                unknown.append(where)
                del value[key]
            else:
                prune(sub, value[key], where, unknown)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            prune(schema["items"], item, f"{path}[{i}]", unknown)


_cel_env = celpy.Environment()
_cel_cache: dict[str, Any] = {}


def _cel(rule: str) -> Any:
    if rule not in _cel_cache:
        _cel_cache[rule] = _cel_env.program(_cel_env.compile(rule))
    return _cel_cache[rule]


def validate_custom(schema: dict[str, Any], obj: dict[str, Any], kind: str) -> None:
    """Validate a custom resource against its CRD's schema: 422 Invalid listing every cause."""
    causes: list[dict[str, str]] = []
    validator = jsonschema.Draft4Validator(_for_jsonschema(schema))
    for err in validator.iter_errors(obj):
        where = ".".join(str(p) for p in err.absolute_path)
        causes.append(
            {
                "reason": "FieldValueInvalid",
                "message": f"Invalid value: {err.message}",
                "field": where,
            }
        )

    def visit(sub: dict[str, Any], value: Any, path: str) -> None:
        if sub.get("x-kubernetes-list-type") == "set" and isinstance(value, list):
            seen: list[Any] = []
            for i, item in enumerate(value):
                if item in seen:
                    causes.append(
                        {
                            "reason": "FieldValueDuplicate",
                            "message": f"Duplicate value: {json.dumps(item)}",
                            "field": f"{path}[{i}]",
                        }
                    )
                seen.append(item)
        for rule in sub.get("x-kubernetes-validations", ()):
            try:
                result = _cel(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
                ok = isinstance(result, celpy.celtypes.BoolType) and bool(result)
            except Exception as exc:  # a CEL runtime error rejects, as on a real server
                ok, detail = False, str(exc)
            else:
                detail = ""
            if not ok:
                message = rule.get("message") or f"failed rule: {rule['rule']}"
                causes.append(
                    {
                        "reason": "FieldValueInvalid",
                        "message": f"Invalid value: {message}{detail and f' ({detail})'}",
                        "field": path + rule.get("fieldPath", ""),
                    }
                )

    if not causes:  # CEL runs only over values of the right shape, as on a real server
        _schema_walk(schema, obj, "", visit)
    if causes:
        name = obj.get("metadata", {}).get("name", "")
        summary = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
        raise ApiError(
            422, "Invalid", f'{kind}.{""} "{name}" is invalid: {summary}'.replace(".{}", ""), causes
        )


def _for_jsonschema(node: Any) -> Any:
    """The openAPIV3Schema as JSON Schema: int-or-string and nullable spelled out."""
    if isinstance(node, dict):
        out = {
            k: _for_jsonschema(v)
            for k, v in node.items()
            if not k.startswith("x-kubernetes-validations")
        }
        if node.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [_for_jsonschema(v) for v in node]
    return node


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
OBJECT_META = {
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
}
_QUALIFIED = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _qualified_name(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_QUALIFIED.match(name))


def validate_object_meta(meta: dict[str, Any], kind: str) -> None:
    """ObjectMeta validation (apimachinery's ValidateObjectMeta): label and annotation keys
    are qualified names, label values at most 63 characters of the label alphabet."""
    causes = []
    for section in ("labels", "annotations"):
        for key, value in (meta.get(section) or {}).items():
            if not _qualified_name(key):
                causes.append(
                    {
                        "reason": "FieldValueInvalid",
                        "field": f"metadata.{section}",
                        "message": f"Invalid value: {key!r}: name part must consist of "
                        "alphanumeric characters, '-', '_' or '.'",
                    }
                )
            if section == "labels" and (len(str(value)) > 63 or not _LABEL_VALUE.match(str(value))):
                causes.append(
                    {
                        "reason": "FieldValueInvalid",
                        "field": "metadata.labels",
                        "message": f"Invalid value: {value!r}: a valid label must be an "
                        "empty string or consist of alphanumeric characters, '-', '_' or '.'",
                    }
                )
    if causes:
        summary = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
        raise ApiError(
            422, "Invalid", f'{kind} "{meta.get("name", "")}" is invalid: {summary}', causes
        )


def _check_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ApiError(
            422,
            "Invalid",
            f"{kind} is invalid: metadata.name: Required value: name or generateName is required",
            [
                {
                    "reason": "FieldValueRequired",
                    "field": "metadata.name",
                    "message": "Required value",
                }
            ],
        )
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        msg = (
            f'{kind} "{name}" is invalid: metadata.name: Invalid value: "{name}": '
            "a lowercase RFC 1123 "
            "subdomain must consist of lower case alphanumeric characters, '-' or '.'"
        )
        raise ApiError(
            422,
            "Invalid",
            msg,
            [{"reason": "FieldValueInvalid", "field": "metadata.name", "message": msg}],
        )


# --- age and printer columns ------------------------------------------------------------------


def human_age(timestamp: str) -> str:
    try:
        then = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except (TypeError, ValueError):
        return "<unknown>"
    s = max(0, int((dt.datetime.now(dt.UTC) - then).total_seconds()))
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 48 * 3600:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def json_path(obj: Any, path: str) -> Any:
    node = obj
    for part in path.strip().lstrip(".").split("."):
        if not part:
            continue
        node = node.get(part) if isinstance(node, dict) else None
    return node


# --- the store ----------------------------------------------------------------------------------


Key = tuple[str, str, str, str]  # group, plural, namespace, name


class State:
    """Objects, the resourceVersion counter, the watch history, under one condition."""

    def __init__(self, history: int = 1000) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.objects: dict[Key, dict[str, Any]] = {}
        self.events: list[
            tuple[int, str, str, str, dict[str, Any]]
        ] = []  # rv, type, group, plural, obj
        self.history = history
        self.oldest = self.rv  # watches from older resourceVersions get 410
        self.resources: dict[tuple[str, str, str], Resource] = {}
        for r in BUILTINS:
            self.register(r)
        self.closed = False

    def register(self, r: Resource) -> None:
        self.resources[(r.group, r.version, r.plural)] = r

    def bump(self) -> int:
        self.rv += 1
        return self.rv

    def record(self, kind: str, r: Resource, obj: dict[str, Any]) -> None:
        self.events.append((self.rv, kind, r.group, r.plural, copy.deepcopy(obj)))
        if len(self.events) > self.history:
            drop = len(self.events) - self.history
            self.oldest = self.events[drop - 1][0]
            del self.events[:drop]
        self.cond.notify_all()

    def compact(self) -> None:
        """Compact the history past every watcher, as etcd compaction can: the revision moves
        on and every watch (and every resourceVersion given before now) gets 410 Expired."""
        with self.cond:
            self.bump()
            self.oldest = self.rv
            self.events.clear()
            self.cond.notify_all()


class StandIn:
    """The server: `start()` binds a free loopback port; `url` is its address."""

    def __init__(self, history: int = 1000) -> None:
        self.state = State(history)
        self.requests: list[tuple[str, str]] = []  # method, path+query: what clients did
        self.faults: list[list[Any]] = []  # [remaining, code, path fragment]: see fail()
        handler = type("Handler", (_Handler,), {"standin": self})
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="kube-standin", daemon=True
        )

    def fail(self, count: int, code: int = 500, path_contains: str = "") -> None:
        """Answer the next `count` requests whose path contains `path_contains` with `code`
        (an overloaded or restarting API server)."""
        with self.state.cond:
            self.faults.append([count, code, path_contains])

    def _injected_fault(self, path: str) -> ApiError | None:
        with self.state.cond:
            for fault in self.faults:
                if fault[0] > 0 and fault[2] in path:
                    fault[0] -= 1
                    return ApiError(fault[1], "InternalError", "injected fault")
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> StandIn:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.state.cond:
            self.state.closed = True
            self.state.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, namespace: str = "default") -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "standin"}}],
            "contexts": [
                {
                    "name": "standin",
                    "context": {"cluster": "standin", "user": "tester", "namespace": namespace},
                }
            ],
            "current-context": "standin",
        }

    # --- the API ---------------------------------------------------------------------------

    def resource(self, group: str, version: str, plural: str) -> Resource:
        r = self.state.resources.get((group, version, plural))
        if r is None:
            raise ApiError(
                404,
                "NotFound",
                f"the server could not find the requested resource ({plural}.{group or 'core'})",
            )
        return r

    def list(
        self, r: Resource, ns: str, labels: str = "", fields: str = ""
    ) -> tuple[list[dict[str, Any]], int]:
        lm, fm = label_matcher(labels), field_matcher(fields)
        with self.state.cond:
            items = [
                copy.deepcopy(o)
                for (g, p, n, _), o in sorted(self.state.objects.items())
                if g == r.group
                and p == r.plural
                and (not ns or n == ns)
                and lm(o.get("metadata", {}).get("labels") or {})
                and fm(o)
            ]
            return items, self.state.rv

    def get(self, r: Resource, ns: str, name: str) -> dict[str, Any]:
        with self.state.cond:
            obj = self.state.objects.get((r.group, r.plural, ns, name))
            if obj is None:
                raise ApiError(
                    404,
                    "NotFound",
                    f'{r.plural}.{r.group or "core"} "{name}" not found'.replace(".core", ""),
                )
            return copy.deepcopy(obj)

    def _prepare(self, r: Resource, obj: dict[str, Any], strict: bool) -> list[str]:
        """Default, prune and validate a custom resource; return the pruned fields."""
        if r.schema is None:
            return []
        apply_defaults(r.schema, obj)
        unknown: list[str] = []
        prune(r.schema, obj, "", unknown)
        meta = obj.get("metadata")
        if isinstance(meta, dict):  # ObjectMeta is a typed struct: unknown fields are dropped
            for key in [k for k in meta if k not in OBJECT_META]:
                unknown.append(f"metadata.{key}")
                del meta[key]
        if unknown and strict:
            raise ApiError(
                400,
                "BadRequest",
                f'{r.kind} in version "{r.version}" cannot be handled as a {r.kind}: '
                + "strict decoding error: "
                + ", ".join(f'unknown field "{u}"' for u in unknown),
            )
        validate_object_meta(obj.get("metadata") or {}, r.kind)
        validate_custom(r.schema, obj, r.kind)
        return unknown

    def create(
        self, r: Resource, ns: str, obj: dict[str, Any], strict: bool = False
    ) -> dict[str, Any]:
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "the body must be an object with metadata")
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        _check_name(r.kind, meta.get("name"))
        if r.namespaced:
            if meta.get("namespace") not in (None, ns):
                raise ApiError(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the namespace on the request",
                )
            meta["namespace"] = ns
        obj["apiVersion"], obj["kind"] = r.group_version, r.kind
        if r.status_subresource:
            obj.pop("status", None)
        if r.crd:
            self._prepare(r, obj, strict)
        if r.plural == "customresourcedefinitions":
            self._register_crd(obj)
        with self.state.cond:
            key = (r.group, r.plural, ns if r.namespaced else "", meta["name"])
            if key in self.state.objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{r.plural}.{r.group or "core"} "{meta["name"]}" already exists'.replace(
                        ".core", ""
                    ),
                )
            meta.update(
                uid=str(uuid.uuid4()),
                creationTimestamp=now_rfc3339(),
                resourceVersion=str(self.state.bump()),
                generation=1,
            )
            for k in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                meta.pop(k, None)
            self.state.objects[key] = obj
            self.state.record("ADDED", r, obj)
            return copy.deepcopy(obj)

    def update(
        self,
        r: Resource,
        ns: str,
        name: str,
        new: dict[str, Any],
        sub: str = "",
        strict: bool = False,
        check_rv: bool = True,
    ) -> dict[str, Any]:
        """PUT semantics; patches come here with `check_rv` only when the patch names one."""
        with self.state.cond:
            key = (r.group, r.plural, ns if r.namespaced else "", name)
            old = self.state.objects.get(key)
            if old is None:
                raise ApiError(
                    404,
                    "NotFound",
                    f'{r.plural}.{r.group or "core"} "{name}" not found'.replace(".core", ""),
                )
            if not isinstance(new, dict):
                raise ApiError(400, "BadRequest", "the body must be an object")
            new = copy.deepcopy(new)
            meta = new.setdefault("metadata", {})
            if not isinstance(meta, dict):
                raise ApiError(400, "BadRequest", "metadata must be an object")
            if meta.get("name", name) != name:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the name of the object does not match the name on the request",
                )
            want = meta.get("resourceVersion")
            if check_rv and want not in (None, "") and want != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {r.plural}.{r.group or "core"} "{name}": '
                    "the object has been modified; please apply your changes to the latest "
                    "version and try again".replace(".core", ""),
                )
            if sub == "status":
                result = copy.deepcopy(old)
                if "status" in new:
                    result["status"] = new["status"]
                else:
                    result.pop("status", None)
            elif sub == "scale":
                result = copy.deepcopy(old)
                replicas = (new.get("spec") or {}).get("replicas")
                if not isinstance(replicas, int) or replicas < 0:
                    raise ApiError(
                        422,
                        "Invalid",
                        f'Scale.autoscaling "{name}" is invalid: spec.replicas: '
                        f"Invalid value: {replicas!r}",
                    )
                path = (
                    (r.scale or {}).get("specReplicasPath", ".spec.replicas").lstrip(".").split(".")
                )
                node = result
                for p in path[:-1]:
                    node = node.setdefault(p, {})
                node[path[-1]] = replicas
            else:
                result = new
                result["apiVersion"], result["kind"] = old["apiVersion"], old["kind"]
                if r.status_subresource:
                    if "status" in old:
                        result["status"] = copy.deepcopy(old["status"])
                    else:
                        result.pop("status", None)
                for k in (
                    "uid",
                    "creationTimestamp",
                    "namespace",
                    "generation",
                    "deletionTimestamp",
                ):
                    if k in old["metadata"]:
                        meta[k] = old["metadata"][k]
                    else:
                        meta.pop(k, None)
                meta["name"] = name
            rmeta = result["metadata"]
            deleting = "deletionTimestamp" in old["metadata"]
            if deleting:
                added = set(rmeta.get("finalizers") or []) - set(
                    old["metadata"].get("finalizers") or []
                )
                if added:
                    raise ApiError(
                        422,
                        "Forbidden",
                        f'{r.kind} "{name}" is invalid: metadata.finalizers: Forbidden: '
                        "no new finalizers can be added if the object is being deleted, "
                        f"found new finalizers {sorted(added)}",
                    )
            if r.crd and sub != "status":
                self._prepare(r, result, strict)
            if r.crd and sub == "status":
                validate_custom(r.schema or {}, result, r.kind)
            if r.plural == "customresourcedefinitions":
                self._register_crd(result)

            def body(o: dict[str, Any]) -> dict[str, Any]:
                return {k: v for k, v in o.items() if k not in ("metadata", "status")}

            if body(result) != body(old):
                rmeta["generation"] = old["metadata"].get("generation", 1) + 1
            if result == old:
                return copy.deepcopy(old)  # no-op writes do not bump the resourceVersion
            rmeta["resourceVersion"] = str(self.state.bump())
            if deleting and not rmeta.get("finalizers"):
                del self.state.objects[key]
                self.state.record("DELETED", r, result)
            else:
                self.state.objects[key] = result
                self.state.record("MODIFIED", r, result)
            return copy.deepcopy(result)

    def patch(
        self,
        r: Resource,
        ns: str,
        name: str,
        ctype: str,
        body: Any,
        sub: str = "",
        strict: bool = False,
    ) -> dict[str, Any]:
        with self.state.cond:  # read-modify-write under the lock: patches never conflict
            current = self.get(r, ns, name)
            if sub == "scale":
                current = self.scale_of(r, current)
            if "json-patch" in ctype:
                new = json_patch(current, body)
            elif "merge-patch" in ctype or "strategic-merge-patch" in ctype:
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be an object")
                new = merge_patch(current, body)
            elif "apply-patch" in ctype:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "server-side apply is not supported by the stand-in",
                )
            else:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types "
                    "include: application/json-patch+json, application/merge-patch+json; "
                    f"got {ctype}",
                )
            check_rv = isinstance(body, dict) and "resourceVersion" in (body.get("metadata") or {})
            result = self.update(r, ns, name, new, sub, strict, check_rv=check_rv)
            return self.scale_of(r, result) if sub == "scale" else result

    def delete(self, r: Resource, ns: str, name: str) -> dict[str, Any]:
        with self.state.cond:
            key = (r.group, r.plural, ns if r.namespaced else "", name)
            obj = self.state.objects.get(key)
            if obj is None:
                raise ApiError(
                    404,
                    "NotFound",
                    f'{r.plural}.{r.group or "core"} "{name}" not found'.replace(".core", ""),
                )
            meta = obj["metadata"]
            if meta.get("finalizers"):
                if "deletionTimestamp" not in meta:
                    meta["deletionTimestamp"] = now_rfc3339()
                    meta["deletionGracePeriodSeconds"] = 0
                    meta["resourceVersion"] = str(self.state.bump())
                    self.state.record("MODIFIED", r, obj)
                return copy.deepcopy(obj)
            del self.state.objects[key]
            meta["resourceVersion"] = str(self.state.bump())
            self.state.record("DELETED", r, obj)
            if r.plural == "customresourcedefinitions":
                spec = obj.get("spec", {})
                for v in spec.get("versions", []):
                    self.state.resources.pop(
                        (spec.get("group"), v.get("name"), spec.get("names", {}).get("plural")),
                        None,
                    )
            return copy.deepcopy(obj)

    def scale_of(self, r: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        if r.scale is None:
            raise ApiError(404, "NotFound", f"{r.plural} has no scale subresource")
        meta = obj["metadata"]
        status: dict[str, Any] = {
            "replicas": json_path(obj, r.scale.get("statusReplicasPath", ".status.replicas")) or 0
        }
        if r.scale.get("labelSelectorPath"):
            selector = json_path(obj, r.scale["labelSelectorPath"])
            if selector:
                status["selector"] = selector
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {
                "replicas": json_path(obj, r.scale.get("specReplicasPath", ".spec.replicas")) or 0
            },
            "status": status,
        }

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec")
        if not isinstance(spec, dict):
            raise ApiError(
                422, "Invalid", "CustomResourceDefinition is invalid: spec: Required value"
            )
        names, group = spec.get("names") or {}, spec.get("group", "")
        plural = names.get("plural", "")
        if crd.get("metadata", {}).get("name") != f"{plural}.{group}":
            raise ApiError(
                422,
                "Invalid",
                "CustomResourceDefinition.apiextensions.k8s.io "
                f'"{crd.get("metadata", {}).get("name")}" '
                "is invalid: metadata.name: Invalid value: "
                'must be spec.names.plural+"."+spec.group',
            )
        versions = spec.get("versions") or []
        if sum(1 for v in versions if v.get("storage")) != 1:
            raise ApiError(
                422,
                "Invalid",
                "CustomResourceDefinition is invalid: spec.versions: Invalid value: "
                "must have exactly one version marked as storage version",
            )
        for v in versions:
            schema = (v.get("schema") or {}).get("openAPIV3Schema")
            if schema is None:
                raise ApiError(
                    422,
                    "Invalid",
                    f"CustomResourceDefinition is invalid: spec.versions[{v.get('name')}]"
                    ".schema.openAPIV3Schema: Required value",
                )
            try:
                jsonschema.Draft4Validator.check_schema(_for_jsonschema(schema))
                for _, sub, _p in _iter_schemas(schema):
                    for rule in sub.get("x-kubernetes-validations", ()):
                        _cel(rule["rule"])
            except Exception as exc:
                raise ApiError(
                    422, "Invalid", f"CustomResourceDefinition is invalid: {exc}"
                ) from None
        crd["status"] = {
            "conditions": [
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "reason": "NoConflicts",
                    "lastTransitionTime": now_rfc3339(),
                    "message": "no conflicts found",
                },
                {
                    "type": "Established",
                    "status": "True",
                    "reason": "InitialNamesAccepted",
                    "lastTransitionTime": now_rfc3339(),
                    "message": "the initial names have been accepted",
                },
            ],
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in versions if v.get("storage")],
        }
        for v in versions:
            if not v.get("served", True):
                continue
            sub = v.get("subresources") or {}
            self.state.register(
                Resource(
                    group,
                    v["name"],
                    plural,
                    names.get("kind", ""),
                    spec.get("scope") == "Namespaced",
                    names.get("singular", ""),
                    tuple(names.get("shortNames") or ()),
                    schema=v["schema"]["openAPIV3Schema"],
                    status_subresource="status" in sub,
                    scale=sub.get("scale"),
                    printer_columns=list(v.get("additionalPrinterColumns") or []),
                    crd=True,
                )
            )

    def table(self, r: Resource, items: list[dict[str, Any]], rv: int) -> dict[str, Any]:
        columns = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "description": "Name",
                "priority": 0,
            }
        ]
        paths = []
        if r.crd and r.printer_columns:
            for c in r.printer_columns:
                columns.append(
                    {
                        "name": c["name"],
                        "type": c.get("type", "string"),
                        "format": c.get("format", ""),
                        "description": c.get("description", ""),
                        "priority": c.get("priority", 0),
                    }
                )
                paths.append((c["jsonPath"], c.get("type", "string")))
        else:
            columns.append(
                {"name": "Age", "type": "string", "format": "", "description": "", "priority": 0}
            )
            paths.append((".metadata.creationTimestamp", "date"))
        rows = []
        for o in items:
            cells: list[Any] = [o["metadata"]["name"]]
            for path, kind in paths:
                value = json_path(o, path)
                if kind == "date":
                    value = human_age(value) if value else "<unknown>"
                cells.append(value)
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o["metadata"],
                    },
                }
            )
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(rv)},
            "columnDefinitions": columns,
            "rows": rows,
        }

    def watch(
        self,
        r: Resource,
        ns: str,
        rv: str | None,
        labels: str,
        fields: str,
        timeout: float,
        bookmarks: bool,
    ) -> Iterator[dict[str, Any]]:
        lm, fm = label_matcher(labels), field_matcher(fields)

        def visible(o: dict[str, Any]) -> bool:
            meta = o.get("metadata", {})
            return (
                (not ns or meta.get("namespace", "") == ns)
                and lm(meta.get("labels") or {})
                and fm(o)
            )

        deadline = time.monotonic() + timeout
        expired: str | None = None
        with self.state.cond:
            if rv in (None, "", "0"):
                start = self.state.rv
                initial = self.list(r, ns, labels, fields)[0]
            else:
                try:
                    start = int(rv)
                except ValueError:
                    raise ApiError(400, "BadRequest", f"invalid resource version {rv!r}") from None
                initial = []
                if start < self.state.oldest:
                    expired = f"too old resource version: {start} ({self.state.oldest})"
        if expired is not None:
            yield {"type": "ERROR", "object": ApiError(410, "Expired", expired).status()}
            return
        for o in initial:
            yield {"type": "ADDED", "object": o}
        last = start
        while True:
            batch: list[tuple[int, str, str, str, dict[str, Any]]] = []
            with self.state.cond:
                if self.state.closed or time.monotonic() >= deadline:
                    return
                if last < self.state.oldest:
                    expired = f"too old resource version: {last} ({self.state.oldest})"
                else:
                    batch = [e for e in self.state.events if e[0] > last]
                    if not batch:
                        self.state.cond.wait(min(max(deadline - time.monotonic(), 0.0), 1.0))
                        if last < self.state.oldest:  # compacted while waiting
                            continue
                        batch = [e for e in self.state.events if e[0] > last]
            if expired is not None:
                yield {"type": "ERROR", "object": ApiError(410, "Expired", expired).status()}
                return
            for ev_rv, kind, g, p, obj in batch:
                last = ev_rv
                if g == r.group and p == r.plural and visible(obj):
                    yield {"type": kind, "object": obj}
            if bookmarks and not batch:
                yield {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": r.kind,
                        "apiVersion": r.group_version,
                        "metadata": {"resourceVersion": str(last)},
                    },
                }


def _gv_path(gv: str) -> str:
    return "api/v1" if gv == "v1" else f"apis/{gv}"


def _iter_schemas(
    schema: dict[str, Any], path: str = ""
) -> Iterator[tuple[str, dict[str, Any], str]]:
    yield path, schema, path
    for key, sub in (schema.get("properties") or {}).items():
        yield from _iter_schemas(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _iter_schemas(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _iter_schemas(schema["additionalProperties"], f"{path}{{}}")


_PATH = re.compile(
    r"^/(?:api/(?P<cv>v1)|apis/(?P<g>[^/]+)/(?P<v>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status|scale))?$"
)


class _Handler(BaseHTTPRequestHandler):
    standin: StandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            return json.loads(raw, object_pairs_hook=_no_duplicates)
        except _DuplicateField as exc:
            raise ApiError(
                400, "BadRequest", f'strict decoding error: duplicate field "{exc}"'
            ) from None
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the body is not JSON: {exc}") from None

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        s = self.standin
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        s.requests.append((method, self.path))
        try:
            fault = s._injected_fault(self.path)
            if fault is not None:
                raise fault
            if method == "GET" and self._discovery(url.path):
                return
            m = _PATH.match(url.path)
            if m is None:
                raise ApiError(
                    404,
                    "NotFound",
                    f"the server could not find the requested resource ({url.path})",
                )
            group, version = (m["g"], m["v"]) if m["g"] else ("", m["cv"])
            r = s.resource(group, version, m["plural"])
            ns = m["ns"] or ""
            if ns and not _DNS_LABEL.match(ns):  # no such namespace can exist
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')
            if r.namespaced and not ns and m["name"]:
                raise ApiError(404, "NotFound", "a namespaced resource needs a namespace")
            name, sub = m["name"], m["sub"] or ""
            strict = query.get("fieldValidation", "").lower() == "strict"
            missing = (sub == "status" and not r.status_subresource) or (
                sub == "scale" and r.scale is None
            )
            if missing:
                raise ApiError(
                    404,
                    "NotFound",
                    f"the server could not find the requested resource ({r.plural}/{sub})",
                )
            if method == "GET" and name is None:
                if query.get("watch") in ("1", "true"):
                    self._watch(r, ns, query)
                    return
                items, rv = s.list(
                    r, ns, query.get("labelSelector", ""), query.get("fieldSelector", "")
                )
                if "as=Table" in (self.headers.get("Accept") or ""):
                    self._send(200, s.table(r, items, rv))
                else:
                    self._send(
                        200,
                        {
                            "kind": f"{r.kind}List",
                            "apiVersion": r.group_version,
                            "metadata": {"resourceVersion": str(rv)},
                            "items": items,
                        },
                    )
            elif method == "GET":
                obj = s.get(r, ns, name)
                if sub == "scale":
                    obj = s.scale_of(r, obj)
                if "as=Table" in (self.headers.get("Accept") or "") and not sub:
                    self._send(200, s.table(r, [obj], s.state.rv))
                else:
                    self._send(200, obj)
            elif method == "POST" and name is None:
                self._send(201, s.create(r, ns, self._body(), strict))
            elif method == "PUT" and name:
                body = self._body()
                if sub == "scale":
                    self._send(200, s.scale_of(r, s.update(r, ns, name, body, "scale", strict)))
                else:
                    self._send(200, s.update(r, ns, name, body, sub, strict))
            elif method == "PATCH" and name:
                self._send(
                    200,
                    s.patch(
                        r, ns, name, self.headers.get("Content-Type", ""), self._body(), sub, strict
                    ),
                )
            elif method == "DELETE" and name:
                self._body()
                self._send(200, s.delete(r, ns, name))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on {url.path}")
        except ApiError as exc:
            self._send(exc.code, exc.status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _discovery(self, path: str) -> bool:
        s = self.standin
        resources = list(s.state.resources.values())
        if path == "/version":
            self._send(
                200,
                {
                    "major": "1",
                    "minor": "32",
                    "gitVersion": "v1.32.0-lockstep-standin",
                    "platform": "linux/amd64",
                },
            )
        elif path == "/api":
            self._send(
                200,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}
                    ],
                },
            )
        elif path == "/apis":
            groups: dict[str, list[str]] = {}
            for r in resources:
                if r.group:
                    groups.setdefault(r.group, [])
                    if r.version not in groups[r.group]:
                        groups[r.group].append(r.version)
            self._send(
                200,
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": g,
                            "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                            "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                        }
                        for g, vs in sorted(groups.items())
                    ],
                },
            )
        elif path == "/api/v1" or re.fullmatch(r"/apis/[^/]+/[^/]+", path):
            gv = "v1" if path == "/api/v1" else path[len("/apis/") :]
            listed = [x for r in resources if r.group_version == gv for x in r.discovery()]
            if not listed:
                raise ApiError(
                    404, "NotFound", f"the server could not find the requested resource ({path})"
                )
            self._send(
                200,
                {
                    "kind": "APIResourceList",
                    "apiVersion": "v1",
                    "groupVersion": gv,
                    "resources": listed,
                },
            )
        elif path == "/openapi/v3":
            gvs = sorted({r.group_version for r in resources})
            self._send(
                200,
                {
                    "paths": {
                        ("api/v1" if gv == "v1" else f"apis/{gv}"): {
                            "serverRelativeURL": f"/openapi/v3/{_gv_path(gv)}?hash={s.state.rv}"
                        }
                        for gv in gvs
                    }
                },
            )
        elif path.startswith("/openapi/v3/"):
            gv = path[len("/openapi/v3/") :].removeprefix("api/").removeprefix("apis/")
            paths = {}
            for r in resources:
                if r.group_version != gv:
                    continue
                prefix = f"/api/{gv}" if not r.group else f"/apis/{gv}"
                where = (
                    f"{prefix}/namespaces/{{namespace}}/{r.plural}/{{name}}"
                    if r.namespaced
                    else f"{prefix}/{r.plural}/{{name}}"
                )
                gvk = {"group": r.group, "version": r.version, "kind": r.kind}
                op = {
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": [
                        {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
                    ],
                }
                paths[where] = {"patch": op, "put": op}
            if not paths:
                raise ApiError(404, "NotFound", f"no OpenAPI document for {gv}")
            self._send(
                200,
                {
                    "openapi": "3.0.0",
                    "info": {"title": "stand-in", "version": "v1.32"},
                    "paths": paths,
                    "components": {"schemas": {}},
                },
            )
        elif path == "/openapi/v2":
            raise ApiError(404, "NotFound", "the stand-in serves only /openapi/v3")
        else:
            return False
        return True

    def _watch(self, r: Resource, ns: str, query: dict[str, str]) -> None:
        timeout = float(query.get("timeoutSeconds") or 300)
        events = self.standin.watch(
            r,
            ns,
            query.get("resourceVersion"),
            query.get("labelSelector", ""),
            query.get("fieldSelector", ""),
            timeout,
            query.get("allowWatchBookmarks") in ("1", "true"),
        )
        first = next(events, None)  # errors before the stream starts are plain answers
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        try:
            if first is not None:
                chunk(json.dumps(first).encode() + b"\n")
                for event in events:
                    chunk(json.dumps(event).encode() + b"\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a killed operator) is not an error of the server."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _DuplicateField(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateField(key)
        out[key] = value
    return out


def gateway_for(server: StandIn) -> Any:
    """The operator's `KubeGateway` for `server`, configured by a kubeconfig as in production."""
    from orchestrator.kube_gateway import KubeGateway

    fd, name = tempfile.mkstemp(suffix=".kubeconfig")
    os.close(fd)
    Path(name).write_text(yaml.safe_dump(server.kubeconfig()))
    try:
        return KubeGateway.connect(name)
    finally:
        os.unlink(name)
