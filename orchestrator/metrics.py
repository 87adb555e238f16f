"""Prometheus metrics of the control plane, read from the store when scraped.

A custom collector (no gauges to keep in step): every scrape reads the store once and reports
deployments by phase, ready replicas and bytes loaded per deployment, nodes by state, chips
by health and use, each node's heartbeat age, and the controller's reconcile passes and the
time they took. Served over HTTPS with the control plane's certificate (DESIGN.md: every port
speaks TLS); scrapers trust the cluster CA (`certs/ca.crt`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.core import CoreSettings, Phase, chip_id, loading_progress, node_state
from orchestrator.store import ControlStore
from placement.profiles import ChipProfile
from security import metrics_http


class PassStats:
    """What the controller reports about its passes (`Controller.stats`)."""

    def __init__(self) -> None:
        self.passes = 0
        self.seconds = 0.0
        self.failed_actions = 0
        self._lock = threading.Lock()  # loads fail on the controller's pool threads

    def record(self, seconds: float, failed: int) -> None:
        with self._lock:
            self.passes += 1
            self.seconds += seconds
            self.failed_actions += failed

    def action_failed(self) -> None:
        with self._lock:
            self.failed_actions += 1


class ControlPlaneCollector(Collector):
    def __init__(
        self,
        store: ControlStore,
        profile: ChipProfile,
        settings: CoreSettings,
        stats: PassStats,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.profile = profile
        self.settings = settings
        self.stats = stats
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        observed = self.store.observed(self.profile)
        phases = Counter(s.phase for s in observed.statuses.values())
        by_phase = GaugeMetricFamily(
            "lockstep_deployments", "Deployments by phase", labels=["phase"]
        )
        for phase in Phase:
            by_phase.add_metric([phase.value], phases.get(phase, 0))
        yield by_phase
        ready = GaugeMetricFamily(
            "lockstep_deployment_ready_replicas", "Ready replicas", labels=["deployment"]
        )
        loaded = GaugeMetricFamily(
            "lockstep_deployment_bytes_loaded", "Shard bytes on their chips", labels=["deployment"]
        )
        total = GaugeMetricFamily(
            "lockstep_deployment_bytes_total", "Shard bytes to load", labels=["deployment"]
        )
        for name, status in sorted(observed.statuses.items()):
            ready.add_metric([name], status.ready_replicas)
            done, want = loading_progress(name, observed)
            loaded.add_metric([name], done)
            total.add_metric([name], want)
        yield from (ready, loaded, total)
        nodes = GaugeMetricFamily("lockstep_nodes", "Nodes by state", labels=["state"])
        states = Counter(node_state(n, now, self.settings).value for n in observed.nodes)
        for state in ("Ready", "NotReady", "Cordoned"):
            nodes.add_metric([state], states.get(state, 0))
        yield nodes
        age = GaugeMetricFamily(
            "lockstep_node_heartbeat_age_seconds",
            "Seconds since the last heartbeat",
            labels=["node"],
        )
        for n in observed.nodes:
            age.add_metric([n.name], max(0.0, now - n.last_heartbeat))
        yield age
        used = {h.chip for h in observed.held}
        chips = Counter(
            (c.health.value, "used" if chip_id(n.rack, n.slot, c.index) in used else "free")
            for n in observed.nodes
            for c in n.chips
        )
        by_state = GaugeMetricFamily(
            "lockstep_chips", "Chips by health and use", labels=["health", "use"]
        )
        for (health, use), count in sorted(chips.items()):
            by_state.add_metric([health, use], count)
        yield by_state
        sram = GaugeMetricFamily("lockstep_sram_used_bytes", "SRAM reserved by shards, in all")
        sram.add_metric([], sum(h.reserved_bytes for h in observed.held))
        yield sram
        passes = CounterMetricFamily("lockstep_reconcile_passes", "Reconcile passes run")
        passes.add_metric([], self.stats.passes)
        seconds = CounterMetricFamily(
            "lockstep_reconcile_seconds", "Time spent in reconcile passes (executing included)"
        )
        seconds.add_metric([], self.stats.seconds)
        failed = CounterMetricFamily("lockstep_actions_failed", "Actions that failed")
        failed.add_metric([], self.stats.failed_actions)
        yield from (passes, seconds, failed)


def serve_metrics(
    collector: ControlPlaneCollector, listen_host: str, port: int, certfile: str, keyfile: str
) -> tuple[Any, int]:
    """Serve /metrics over HTTPS; (the server, its bound port). Stop with `server.shutdown()`.

    The HTTPS server is `security.metrics_http`'s, shared with the node agents."""
    return metrics_http.serve_metrics(collector, listen_host, port, certfile, keyfile)
