"""The Kubernetes operator: LPUDeployments in, the control plane's status out.

`python -m orchestrator.operator` (the image's entry point in manifests/operator/) is an
adapter around the same control plane `lpuctl up` runs (`orchestrator.control_plane`: store,
controller, admin API, node registry, optionally its own agents). It holds a leader-election
Lease before it starts anything; then:

* **Desired state in.** It lists LPUDeployments and watches them from the list's
  resourceVersion (bookmarks keep it fresh; a 410 Expired lists again; any other error backs
  off 0.2 s doubling to 10 s, then lists again). Each object is checked with the same code as
  `lpuctl apply` (`spec.deployment_from_manifest`) and stored with `store.apply_deployment`,
  exactly what the admin API's Apply does; the controller is woken. A spec the operator
  refuses (a `model.config` file it cannot read: what CEL cannot check) gets phase Failed,
  reason InvalidSpec and a Warning event. After a complete list, a stored deployment without
  an object is deleted (it was deleted while no operator ran).
* **Finalizer.** Every LPUDeployment gets `lpu.lockstep.dev/release`. A delete only marks the
  object (deletionTimestamp); the operator asks the control plane to delete (the controller
  unloads every shard and frees the chips), and removes the finalizer once the store has
  forgotten the deployment, so Kubernetes forgets it last.
* **Status out.** A sync pass (every `--sync-interval`, and at once after a change) builds the
  status of each object from the store (`deployment_status`, pure) and writes it only when it
  changed, as ONE merge patch of the status subresource. Store events of a deployment become
  core/v1 Events on its object (what `kubectl describe` shows).
* **Leader election** (`LeaderElector`, client-go's algorithm): a Lease names the holder and
  its renew time; another candidate takes over only when the record has not changed for the
  lease duration, measured on its own clock (no clock skew between hosts matters). The holder
  renews every retry period; if it cannot renew within the renew deadline it stops acting
  and exits 1 (the Deployment restarts it as a candidate). SIGTERM releases the Lease, so the
  standby takes over at once.

Objects are keyed by name in the control plane's store: two LPUDeployments of the same name
in different namespaces cannot both be served (the second gets phase Failed, reason
NameTaken). Only this module and `kube_gateway` know Kubernetes; only `kube_gateway` talks
to the API server.
"""

from __future__ import annotations

import argparse
import copy
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.control_plane import START_ERRORS, ControlPlane, add_arguments, from_arguments
from orchestrator.core import loading_progress
from orchestrator.core.model import ConditionType, DeploymentStatus, Phase, Replica
from orchestrator.deployments import store_deployment
from orchestrator.kube_gateway import (
    JSON,
    KubeConflict,
    KubeError,
    KubeExpired,
    KubeGateway,
    KubeNotFound,
    rfc3339,
    rfc3339_micro,
)
from orchestrator.spec import SpecError, deployment_from_manifest, strip_server_fields
from orchestrator.store import Conflict, DeploymentRecord, Store

log = logging.getLogger("lockstep.operator")

FINALIZER = "lpu.lockstep.dev/release"
COMPONENT = "lockstep-operator"


# --- pure: status from the store ----------------------------------------------------------------


def _racks_of(chips: Sequence[str]) -> list[str]:
    return sorted({chip.split("/", 1)[0] for chip in chips})


def predicted_tokens_per_second(plan: Mapping[str, Any] | None, replicas: int) -> float | None:
    """The plan's aggregate prediction scaled to `replicas`: a stored plan covers the replicas
    placed in one step (all of them at first, only the added ones after a scale-up)."""
    if not plan:
        return None
    predicted = plan.get("predicted")
    value = predicted.get("tokensPerSecond") if isinstance(predicted, Mapping) else None
    if not isinstance(value, int | float):
        return None
    planned = plan.get("replicas")
    per_replica = value / planned if isinstance(planned, int) and planned > 0 else value
    return round(per_replica * replicas, 1)


def deployment_status(
    record: DeploymentRecord | None,
    replicas: Sequence[Replica],
    plan: Mapping[str, Any] | None,
    progress: tuple[int, int],
    desired: int,
    generation_of: Callable[[int], int | None],
) -> JSON:
    """The LPUDeployment's `status` (manifests/crd: STATUS_SCHEMA) from the control plane's
    record. `generation_of` maps a store generation to the object's metadata.generation."""
    if record is None:
        return {
            "phase": Phase.PENDING.value,
            "replicas": desired,
            "readyReplicas": 0,
            "ready": f"0/{desired}",
        }
    status: DeploymentStatus = record.status
    live = [r for r in replicas if not r.removing]
    chips = [c for r in live for c in r.chips]
    loaded, total = progress
    out: JSON = {
        "phase": Phase.DELETING.value if record.deleting else status.phase.value,
        "reason": status.reason,
        "message": status.message,
        "replicas": desired,
        "readyReplicas": status.ready_replicas,
        "ready": f"{status.ready_replicas}/{desired}",
        "chips": len(chips),
        "racks": len(_racks_of(chips)),
        "rackNames": _racks_of(chips),
        "bytesLoaded": loaded,
        "bytesTotal": total,
        "loadedPercent": int(100 * loaded / total) if total else 0,
    }
    observed = generation_of(status.observed_generation)
    if observed is not None:
        out["observedGeneration"] = observed
    tokens = predicted_tokens_per_second(plan, desired)
    if tokens is not None:
        out["predictedTokensPerSecond"] = tokens
        latency = (plan or {}).get("predicted", {}).get("latencyMsPerToken")
        if isinstance(latency, int | float):
            out["predictedLatencyMsPerToken"] = round(float(latency), 3)
    conditions = []
    for c in status.conditions:
        cond: JSON = {
            "type": c.type.value,
            "status": c.status.value,
            "reason": c.reason or c.type.value,
            "message": c.message,
            "lastTransitionTime": rfc3339(c.last_transition_time),
        }
        gen = generation_of(c.observed_generation)
        if gen is not None:
            cond["observedGeneration"] = gen
        conditions.append(cond)
    order = [t.value for t in ConditionType]
    out["conditions"] = sorted(conditions, key=lambda c: order.index(c["type"]))
    return out


def refused_status(reason: str, message: str, desired: int, generation: int, since: float) -> JSON:
    """Status of an object the operator does not serve (invalid spec, name taken)."""
    return {
        "phase": Phase.FAILED.value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "replicas": desired,
        "readyReplicas": 0,
        "ready": f"0/{desired}",
        "conditions": [
            {
                "type": ConditionType.READY.value,
                "status": "False",
                "reason": reason,
                "message": message[:32768],
                "lastTransitionTime": rfc3339(since),
                "observedGeneration": generation,
            }
        ],
    }


# --- leader election ----------------------------------------------------------------------------


@dataclass
class LeaderElector:
    """client-go's Lease algorithm over `KubeGateway` (see the module docstring)."""

    gateway: KubeGateway
    namespace: str
    name: str
    identity: str
    duration: float = 15.0
    clock: Callable[[], float] = time.monotonic
    _observed: tuple[Any, ...] = ()
    _observed_at: float = 0.0
    _lease: JSON = field(default_factory=dict)

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the Lease afterwards."""
        now = rfc3339_micro(time.time())
        mine = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration)),
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        }
        try:
            lease = self.gateway.get_lease(self.namespace, self.name)
        except KubeNotFound:
            try:
                self._lease = self.gateway.create_lease(self.namespace, self.name, mine)
            except KubeError:
                return False
            self._seen(self._lease)
            return True
        except KubeError as exc:
            log.warning("leader election: reading the lease: %s", exc)
            return False
        spec = lease.get("spec") or {}
        self._seen(lease)
        holder = spec.get("holderIdentity") or ""
        if holder and holder != self.identity and self.clock() < self._observed_at + self.duration:
            return False
        new = copy.deepcopy(lease)
        new_spec = new.setdefault("spec", {})
        new_spec.update(
            holderIdentity=self.identity,
            renewTime=now,
            leaseDurationSeconds=mine["leaseDurationSeconds"],
        )
        if holder != self.identity:
            new_spec["acquireTime"] = now
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        try:
            self._lease = self.gateway.replace_lease(new)
        except KubeError:
            return False
        self._seen(self._lease)
        return True

    def _seen(self, lease: JSON) -> None:
        spec = lease.get("spec") or {}
        record = (
            spec.get("holderIdentity"),
            spec.get("renewTime"),
            lease.get("metadata", {}).get("resourceVersion"),
        )
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()

    def release(self) -> None:
        """Give the Lease up (on a clean stop) so a standby takes over at once."""
        if (
            not self._lease
            or (self._lease.get("spec") or {}).get("holderIdentity") != self.identity
        ):
            return
        lease = copy.deepcopy(self._lease)
        lease["spec"]["holderIdentity"] = ""
        lease["spec"]["leaseDurationSeconds"] = 1
        try:
            self.gateway.replace_lease(lease)
        except KubeError as exc:
            log.warning("leader election: releasing the lease: %s", exc)


# --- the operator -------------------------------------------------------------------------------


@dataclass
class _Tracked:
    obj: JSON
    generations: dict[int, int] = field(default_factory=dict)  # store gen -> metadata.generation
    refused: tuple[str, str] | None = None  # (reason, message) when not served
    refused_at: float = 0.0


class Operator:
    """Reconciles LPUDeployments through the control plane's store and controller."""

    def __init__(
        self,
        gateway: KubeGateway,
        store: Store,
        wake: Callable[[], None],
        profile: Any,
        *,
        namespace: str = "",
        sync_interval: float = 0.5,
        watch_timeout: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateway, self.store, self.wake, self.profile = gateway, store, wake, profile
        self.namespace = namespace
        self.sync_interval, self.watch_timeout, self.clock = sync_interval, watch_timeout, clock
        self.lock = threading.RLock()
        self.tracked: dict[tuple[str, str], _Tracked] = {}
        self.owner: dict[str, tuple[str, str]] = {}  # store name -> (namespace, name)
        self.written: dict[tuple[str, str], JSON] = {}
        events = store.events(limit=1_000_000)
        self.last_event = events[-1].id if events else 0
        self.stopping = threading.Event()
        self.changed = threading.Event()
        self.relists = 0
        self.threads: list[threading.Thread] = []

    # lifecycle

    def start(self) -> None:
        for target, name in ((self._watch_loop, "kube-watch"), (self._sync_loop, "kube-sync")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        self.changed.set()
        for thread in self.threads:
            thread.join(5)

    # desired state in

    def _watch_loop(self) -> None:
        backoff = 0.2
        while not self.stopping.is_set():
            try:
                items, rv = self.gateway.list_deployments(self.namespace)
                self.relists += 1
                self._relisted(items)
                backoff = 0.2
                while not self.stopping.is_set():
                    for event in self.gateway.watch_deployments(
                        self.namespace, rv, self.watch_timeout
                    ):
                        if event.resource_version:
                            rv = event.resource_version
                        if event.type in ("ADDED", "MODIFIED"):
                            self.handle(event.object)
                        elif event.type == "DELETED":
                            self._forget(event.object)
                        if self.stopping.is_set():
                            return
            except KubeExpired as exc:
                log.info("watch expired (%s): listing again", exc)
            except KubeError as exc:
                log.warning("watching LPUDeployments: %s; again in %.1f s", exc, backoff)
                if self.stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, 10.0)

    def _relisted(self, items: list[JSON]) -> None:
        seen = set()
        for obj in items:
            seen.add(self._key(obj))
            self.handle(obj)
        with self.lock:
            for key in [k for k in self.tracked if k not in seen]:
                self._forget(self.tracked[key].obj)
            owned = {name for name, key in self.owner.items() if key in seen}
        for record in self.store.deployments():
            if record.name not in owned and not record.deleting:
                log.info("deployment %s has no LPUDeployment any more: deleting it", record.name)
                self._request_delete(record.name, "its LPUDeployment is gone")

    @staticmethod
    def _key(obj: JSON) -> tuple[str, str]:
        meta = obj.get("metadata", {})
        return str(meta.get("namespace", "")), str(meta.get("name", ""))

    def _forget(self, obj: JSON) -> None:
        key = self._key(obj)
        with self.lock:
            self.tracked.pop(key, None)
            self.written.pop(key, None)
            if self.owner.get(key[1]) == key:
                del self.owner[key[1]]

    def handle(self, obj: JSON) -> None:
        """One observed version of an LPUDeployment."""
        key = self._key(obj)
        ns, name = key
        meta = obj.get("metadata", {})
        with self.lock:
            tracked = self.tracked.setdefault(key, _Tracked(obj))
            tracked.obj = obj
            holder = self.owner.setdefault(name, key)
        finalizers = list(meta.get("finalizers") or [])
        if meta.get("deletionTimestamp"):
            if FINALIZER in finalizers and holder == key:
                record = self.store.deployment(name)
                if record is not None and not record.deleting:
                    self._request_delete(name, "the LPUDeployment was deleted")
            self.changed.set()
            return
        if holder != key:
            self._refuse(
                tracked,
                "NameTaken",
                f"an LPUDeployment named {name} in namespace {holder[0]} is served already",
            )
            return
        if FINALIZER not in finalizers:
            try:
                obj = self.gateway.set_finalizers(
                    ns, name, [*finalizers, FINALIZER], str(meta.get("resourceVersion", ""))
                )
                tracked.obj = obj
            except (KubeConflict, KubeNotFound):
                return  # a newer version is on its way through the watch
            except KubeError as exc:
                log.warning("adding the finalizer to %s/%s: %s", ns, name, exc)
                return
        self._apply(tracked)

    def _apply(self, tracked: _Tracked) -> None:
        obj = tracked.obj
        ns, name = self._key(obj)
        generation = int(obj.get("metadata", {}).get("generation") or 0)
        manifest = strip_server_fields(obj)
        manifest.get("metadata", {}).pop("annotations", None)  # kubectl's bookkeeping
        try:
            spec = deployment_from_manifest(manifest, source=f"LPUDeployment {ns}/{name}")
        except SpecError as exc:
            self._refuse(tracked, "InvalidSpec", str(exc))
            return
        try:
            result = store_deployment(
                self.store, spec, self.clock(), self.wake, generation=generation
            )
        except Conflict as exc:  # the previous object of this name is still being deleted
            log.info("%s/%s: %s", ns, name, exc)
            return
        with self.lock:
            tracked.refused = None
            tracked.generations[result.generation] = generation
        self.changed.set()

    def _refuse(self, tracked: _Tracked, reason: str, message: str) -> None:
        with self.lock:
            first = tracked.refused != (reason, message)
            if tracked.refused is None:
                tracked.refused_at = self.clock()
            tracked.refused = (reason, message)
        if first:
            self._event(tracked.obj, "Warning", reason, message)
        self.changed.set()

    def _request_delete(self, name: str, why: str) -> None:
        if self.store.mark_deleting(name, self.clock()):
            self.store.add_event(self.clock(), "Normal", "DeleteRequested", why, deployment=name)
            self.wake()

    # status out

    def _sync_loop(self) -> None:
        while not self.stopping.is_set():
            self.changed.wait(self.sync_interval)
            self.changed.clear()
            if self.stopping.is_set():
                return
            try:
                self.sync()
            except KubeError as exc:
                log.warning("writing status: %s", exc)
            except Exception:  # one bad pass must not end the loop; say what it was
                log.exception("status pass failed")

    def sync(self) -> None:
        """Write every changed status (one patch each), release deleted objects, mirror events."""
        with self.lock:
            tracked = list(self.tracked.items())
        observed = None
        for key, t in tracked:
            ns, name = key
            meta = t.obj.get("metadata", {})
            desired = int((t.obj.get("spec") or {}).get("replicas") or 1)
            record = self.store.deployment(name) if self.owner.get(name) == key else None
            deleting = bool(meta.get("deletionTimestamp"))
            if deleting and record is None and FINALIZER in (meta.get("finalizers") or []):
                self._release(t)
                continue
            if not deleting and record is None:
                if t.refused is None and self.owner.get(name) == key:
                    # Served but not stored: it waited for the delete of an older object of
                    # the same name, or was deleted behind Kubernetes' back: apply it again.
                    self._apply(t)
                    record = self.store.deployment(name)
                elif (
                    t.refused is not None and t.refused[0] == "NameTaken" and name not in self.owner
                ):
                    self.handle(t.obj)  # the name is free now
                    continue
            if t.refused is not None:
                reason, message = t.refused
                generation = int(meta.get("generation") or 0)
                status = refused_status(reason, message, desired, generation, t.refused_at)
            else:
                if observed is None:
                    observed = self.store.observed(self.profile)
                plans = self.store.plans(name) if record is not None else []
                status = deployment_status(
                    record,
                    self.store.replicas(name) if record is not None else [],
                    plans[-1] if plans else None,
                    loading_progress(name, observed) if record is not None else (0, 0),
                    desired,
                    t.generations.get,
                )
            if self.written.get(key) == status:
                continue
            try:
                self.gateway.patch_status(ns, name, status)
            except KubeNotFound:
                continue
            self.written[key] = status
        self._mirror_events()

    def _release(self, tracked: _Tracked) -> None:
        """The control plane forgot the deployment: drop the finalizer, Kubernetes deletes."""
        ns, name = self._key(tracked.obj)
        meta = tracked.obj["metadata"]
        rest = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        self._mirror_events()
        try:
            tracked.obj = self.gateway.set_finalizers(ns, name, rest, str(meta["resourceVersion"]))
        except (KubeConflict, KubeNotFound):
            return
        log.info("%s/%s: chips and shards released; finalizer removed", ns, name)

    def _mirror_events(self) -> None:
        for event in self.store.events(after=self.last_event, limit=1000):
            self.last_event = event.id
            with self.lock:
                key = self.owner.get(event.deployment or "")
                tracked = self.tracked.get(key) if key else None
            if tracked is not None:
                self._event(tracked.obj, event.kind, event.reason, event.message, event.time)

    def _event(
        self, obj: JSON, kind: str, reason: str, message: str, when: float | None = None
    ) -> None:
        try:
            self.gateway.record_event(obj, kind, reason, message, when or self.clock(), COMPONENT)
        except KubeError as exc:
            log.warning("recording event %s: %s", reason, exc)


# --- the process ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.operator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster service account)"
    )
    parser.add_argument("--namespace", default="", help="watch this namespace only (default: all)")
    parser.add_argument(
        "--identity", required=True, help="this replica's name in the Lease (the pod name)"
    )
    parser.add_argument("--lease-namespace", default="lockstep-system")
    parser.add_argument("--lease-name", default="lockstep-operator")
    parser.add_argument("--lease-duration", type=float, default=15.0)
    parser.add_argument("--renew-deadline", type=float, default=10.0)
    parser.add_argument("--retry-period", type=float, default=2.0)
    parser.add_argument("--sync-interval", type=float, default=0.5)
    add_arguments(
        parser,
        racks=0,
        racks_help="racks of agents the control plane starts itself (0: agents register, "
        "e.g. from the DaemonSet)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if not 0 < args.retry_period < args.renew_deadline < args.lease_duration:
        print(
            "operator: need 0 < --retry-period < --renew-deadline < --lease-duration",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        gateway = KubeGateway.connect(args.kubeconfig)
    except Exception as exc:  # the client raises several types for a bad kubeconfig
        print(f"operator: cannot load the Kubernetes configuration: {exc}", file=sys.stderr)
        return 2
    elector = LeaderElector(
        gateway, args.lease_namespace, args.lease_name, args.identity, args.lease_duration
    )
    log.info(
        "%s: waiting for the lease %s/%s", args.identity, args.lease_namespace, args.lease_name
    )
    while not elector.try_acquire_or_renew():
        if stop.wait(args.retry_period):
            return 0
    log.info("%s: leading", args.identity)
    lost = threading.Event()

    def renew() -> None:
        """Renew from the moment the lease is held (starting the control plane takes a while);
        a holder that cannot renew within the deadline stops acting at once."""
        renewed = time.monotonic()
        while not stop.wait(args.retry_period):
            if elector.try_acquire_or_renew():
                renewed = time.monotonic()
            elif time.monotonic() - renewed > args.renew_deadline:
                log.error("%s: lost the lease: stopping", args.identity)
                lost.set()
                stop.set()

    renewer = threading.Thread(target=renew, name="lease-renewer", daemon=True)
    renewer.start()
    plane: ControlPlane | None = None
    operator: Operator | None = None
    code = 0
    try:
        plane = from_arguments(args)
        plane.start()
        operator = Operator(
            gateway,
            plane.store,
            plane.controller.wake,
            plane.profile,
            namespace=args.namespace,
            sync_interval=args.sync_interval,
        )
        operator.start()
        print(f"leading as {args.identity}; control plane admin {plane.admin_address}", flush=True)
        stop.wait()
    except START_ERRORS as exc:
        print(f"operator: cannot start the control plane: {exc}", file=sys.stderr)
        code = 1
    finally:
        stop.set()
        if operator is not None:
            operator.stop()
        if plane is not None:
            plane.stop()
        renewer.join(args.retry_period + 15)
        if lost.is_set():
            code = 1
        else:
            elector.release()
        gateway.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
