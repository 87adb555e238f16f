"""The one module that talks to the Kubernetes API server (kopf's rule: one layer does I/O).

`KubeGateway` wraps the `kubernetes` client for exactly what the operator needs: list and
watch LPUDeployments (raw watch lines, so a 410 Expired is seen as such, whether the server
sends it as an HTTP status or as an in-stream ERROR event), patch the status subresource,
set finalizers with optimistic concurrency, create core/v1 Events, and get/create/replace the
leader-election Lease. Every API error becomes one of four exceptions, so the operator never
sees the client's types: `KubeNotFound` (404), `KubeConflict` (409, or 422 on a write that
raced a delete), `KubeExpired` (410: re-list) and `KubeError` (anything else: back off).
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from orchestrator.crd import GROUP, PLURAL, VERSION

JSON = dict[str, Any]


class KubeError(Exception):
    """An API call failed (network, 5xx, refused): the caller backs off and retries."""


class KubeNotFound(KubeError):
    pass


class KubeConflict(KubeError):
    """A write lost a race (stale resourceVersion): read again and retry."""


class KubeExpired(KubeError):
    """The watch's resourceVersion is too old (410 Gone): list again."""


def _wrap(exc: ApiException) -> KubeError:
    status = getattr(exc, "status", 0) or 0
    body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else exc.body
    message = f"{status} {exc.reason}: {(body or '')[:300]}"
    if status == 404:
        return KubeNotFound(message)
    if status == 409:
        return KubeConflict(message)
    if status == 410:
        return KubeExpired(message)
    return KubeError(message)


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_micro(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: JSON

    @property
    def resource_version(self) -> str:
        return str(self.object.get("metadata", {}).get("resourceVersion", ""))


class KubeGateway:
    """All API calls of the operator. Objects go in and out as plain JSON dicts."""

    def __init__(self, api_client: client.ApiClient, request_timeout: float = 10.0) -> None:
        self.api = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self.timeout = request_timeout

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> KubeGateway:
        """From a kubeconfig file, else the in-cluster service account."""
        configuration = client.Configuration()
        if kubeconfig:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration
            )
        else:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        return cls(client.ApiClient(configuration))

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]

    def _request(self, method: str, path: str, body: Any, content_type: str, timeout: Any) -> Any:
        """Send one request through the client (auth, TLS, proxy from the kubeconfig); the
        response is not read yet."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            method, url, headers, body, post = self.api.param_serialize(
                method, path, header_params=headers, body=body, auth_settings=["BearerToken"]
            )
            return self.api.call_api(method, url, headers, body, post, _request_timeout=timeout)
        except ApiException as exc:
            raise _wrap(exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeError(f"{method} {path}: {exc}") from None

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "") -> JSON:
        """One request, JSON in and out; an error status raises (`_wrap`)."""
        response = self._request(method, path, body, content_type, self.timeout)
        try:
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeError(f"{method} {path}: {exc}") from None
        if not 200 <= response.status < 300:
            raise _wrap(ApiException(status=response.status, reason=response.reason, body=data))
        try:
            out = json.loads(data or b"{}")
        except ValueError:
            raise KubeError(f"{method} {path}: the answer is not JSON") from None
        return out if isinstance(out, dict) else {}

    @staticmethod
    def _collection(namespace: str) -> str:
        where = f"/namespaces/{namespace}" if namespace else ""
        return f"/apis/{GROUP}/{VERSION}{where}/{PLURAL}"

    # --- LPUDeployments ----------------------------------------------------------------------

    def list_deployments(self, namespace: str) -> tuple[list[JSON], str]:
        """Every LPUDeployment (of `namespace`, or all with ""), and the list's resourceVersion."""
        out = self._call("GET", self._collection(namespace))
        return list(out.get("items") or []), str(out.get("metadata", {}).get("resourceVersion", ""))

    def watch_deployments(
        self, namespace: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[WatchEvent]:
        """Changes after `resource_version`, until the server ends the watch.

        Raises `KubeExpired` for a 410 (the caller lists again), `KubeError` otherwise."""
        query = (
            f"?watch=true&resourceVersion={resource_version}&allowWatchBookmarks=true"
            f"&timeoutSeconds={timeout_seconds}"
        )
        rest = self._request(
            "GET",
            self._collection(namespace) + query,
            None,
            "",
            (self.timeout, timeout_seconds + 15),
        )
        response = rest.response
        try:
            if response.status == 410:
                raise KubeExpired("watch: 410 Gone")
            if response.status != 200:
                raise KubeError(f"watch: HTTP {response.status}: {response.read(300)!r}")
            buffer = b""
            for chunk in response.stream(4096, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield self._event(line)
            if buffer.strip():
                yield self._event(buffer)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeError(f"watch: {exc}") from None
        finally:
            response.release_conn()

    @staticmethod
    def _event(line: bytes) -> WatchEvent:
        try:
            event = json.loads(line)
        except ValueError:
            raise KubeError(f"watch: a line that is not JSON: {line[:200]!r}") from None
        obj = event.get("object") or {}
        if event.get("type") == "ERROR":
            if obj.get("code") == 410:
                raise KubeExpired(f"watch: {obj.get('message', '410 Gone')}")
            raise KubeError(f"watch: {obj.get('code')} {obj.get('message')}")
        return WatchEvent(str(event.get("type")), obj)

    def patch_status(self, namespace: str, name: str, status: JSON) -> JSON:
        """One merge patch of the status subresource."""
        return self._call(
            "PATCH",
            f"{self._collection(namespace)}/{name}/status",
            {"status": status},
            "application/merge-patch+json",
        )

    def set_finalizers(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> JSON:
        """Replace metadata.finalizers if the object is still at `resource_version` (else
        `KubeConflict`): a merge patch carrying the resourceVersion is a conditional write."""
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        return self._call(
            "PATCH",
            f"{self._collection(namespace)}/{name}",
            body,
            "application/merge-patch+json",
        )

    # --- core/v1 Events ----------------------------------------------------------------------

    def record_event(
        self,
        involved: JSON,
        kind: str,
        reason: str,
        message: str,
        when: float,
        component: str,
    ) -> None:
        meta = involved.get("metadata", {})
        namespace = meta.get("namespace") or "default"
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                # client-go's naming: NAME.<nanoseconds in hex>, so names sort by time
                "name": f"{meta.get('name')}.{time.time_ns():x}{uuid.uuid4().hex[:4]}",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": kind,
            "reason": reason[:128],
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": component,
            "firstTimestamp": rfc3339(when),
            "lastTimestamp": rfc3339(when),
            "eventTime": rfc3339_micro(when),
            "action": reason[:128],
            "count": 1,
        }
        self._call("POST", f"/api/v1/namespaces/{namespace}/events", event)

    # --- Lease -------------------------------------------------------------------------------

    def _lease_path(self, namespace: str, name: str = "") -> str:
        base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        return f"{base}/{name}" if name else base

    def get_lease(self, namespace: str, name: str) -> JSON:
        return self._call("GET", self._lease_path(namespace, name))

    def create_lease(self, namespace: str, name: str, spec: JSON) -> JSON:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        return self._call("POST", self._lease_path(namespace), body)

    def replace_lease(self, lease: JSON) -> JSON:
        """PUT with the lease's resourceVersion: `KubeConflict` if someone wrote it since."""
        meta = lease["metadata"]
        return self._call("PUT", self._lease_path(meta["namespace"], meta["name"]), lease)
