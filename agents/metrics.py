"""Prometheus metrics of one node agent, read from the service when scraped.

A custom collector, as on the control plane (`orchestrator.metrics`): nothing is counted for
Prometheus on the hot paths. The counters are plain integers the agent keeps anyway, each
written where a lock is already held or by one thread only — `Chip.bytes_loaded` at commit
(chip lock), a stage's `ticks` by its own thread and `tokens` under its lock, stream refusals
under the `StreamGate` lock, frame rejections (which end their stream) under the link
service's, framed link port refusals under its server's — and a scrape reads them. Gauges
(SRAM, shards held, framed link connections open) come from snapshots.

Served over HTTPS with the agent's own certificate (`security.metrics_http`, shared with the
control plane): a scraper trusts the cluster CA. The port is `lpuctl agent --metrics-port`
and is advertised in `StatusResponse.metrics_port`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from security import metrics_http
from security.certs import paths_for
from security.identity import agent_identity

if TYPE_CHECKING:
    from agents.server import AgentServer, AgentService


class AgentCollector(Collector):
    """Every metric of one agent, computed from `service` at each scrape."""

    def __init__(self, service: AgentService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        info = GaugeMetricFamily(
            "lockstep_agent_info", "This agent's node and profile", labels=["node", "profile"]
        )
        info.add_metric([service.node, service.profile], 1)
        yield info

        capacity = GaugeMetricFamily(
            "lockstep_agent_sram_capacity_bytes", "SRAM of the chip", labels=["chip"]
        )
        used = GaugeMetricFamily(
            "lockstep_agent_sram_used_bytes", "SRAM reserved by held shards", labels=["chip"]
        )
        loading = GaugeMetricFamily(
            "lockstep_agent_sram_loading_bytes", "SRAM reserved by loads in flight", labels=["chip"]
        )
        held = GaugeMetricFamily("lockstep_agent_shards_held", "Shards held", labels=["chip"])
        healthy = GaugeMetricFamily(
            "lockstep_agent_chip_healthy", "1 if the chip is healthy, 0 if failed", labels=["chip"]
        )
        loaded = CounterMetricFamily(
            "lockstep_agent_loaded_bytes", "Shard bytes loaded and committed", labels=["chip"]
        )
        loads = CounterMetricFamily(
            "lockstep_agent_shard_loads", "Shard loads committed", labels=["chip"]
        )
        for chip in service.chips:
            snap = chip.snapshot()
            label = [str(snap.index)]
            capacity.add_metric(label, snap.capacity)
            used.add_metric(label, snap.used)
            loading.add_metric(label, snap.loading)
            held.add_metric(label, len(snap.held))
            healthy.add_metric(label, 0 if snap.failed_reason is not None else 1)
            loaded.add_metric(label, chip.bytes_loaded)
            loads.add_metric(label, chip.loads_committed)
        yield from (capacity, used, loading, held, healthy, loaded, loads)

        ticks = CounterMetricFamily(
            "lockstep_agent_stage_ticks",
            "Ticks a replica stage executed (bubbles included)",
            labels=["deployment", "replica", "stage"],
        )
        tokens = CounterMetricFamily(
            "lockstep_agent_tokens_generated",
            "Tokens streamed to Generate requests by a replica's stage 0",
            labels=["deployment", "replica"],
        )
        for deployment, replica, stage, n_ticks, n_tokens in service.replicas.stage_counters():
            ticks.add_metric([deployment, str(replica), str(stage)], n_ticks)
            if stage == 0:
                tokens.add_metric([deployment, str(replica)], n_tokens)
        yield from (ticks, tokens)

        rejected = CounterMetricFamily(
            "lockstep_agent_link_frames_rejected",
            "Link frames refused (their stream ended), by status code",
            labels=["code"],
        )
        for code, count in sorted(service.links.frames_rejected().items()):
            rejected.add_metric([code], count)
        refused = CounterMetricFamily(
            "lockstep_agent_streams_refused",
            "Streaming calls refused at admission (RESOURCE_EXHAUSTED), by method",
            labels=["method"],
        )
        for method, count in sorted(service.streams.refused().items()):
            refused.add_metric([method], count)
        yield from (rejected, refused)

        framed_open = GaugeMetricFamily(
            "lockstep_agent_framed_link_connections_open",
            "Connections open on the framed link port (admitted, counted against "
            "link_max_connections)",
        )
        framed_open.add_metric([], service.wire.open_connections())
        framed_refused = CounterMetricFamily(
            "lockstep_agent_framed_link_connections_refused",
            "Connections the framed link port refused, by reason (max_connections, "
            "max_connections_per_peer, tls_handshake, hello)",
            labels=["reason"],
        )
        for reason, count in sorted(service.wire.refused().items()):
            framed_refused.add_metric([reason], count)
        yield from (framed_open, framed_refused)


def metrics_host(listen: str) -> str:
    """The host part of the agent's `--listen HOST:PORT`: /metrics binds the same address."""
    return listen.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"


def attach_metrics(agent: AgentServer, listen: str, port: int, certs: str | None) -> int:
    """Serve the agent's metrics on `listen`'s host at `port` (0: any); the bound port.

    HTTPS with the node's certificate from the directory `certs` (the one its gRPC port
    serves with); plain HTTP when `certs` is None (`--insecure`, loopback only). The port is
    recorded on the service (for `Status`) and the server on `agent` (`AgentServer.stop`
    stops it). Raises OSError when the port cannot be bound."""
    service = agent.service
    certfile = keyfile = None
    if certs is not None:
        cert, key = paths_for(Path(certs), agent_identity(service.node))
        certfile, keyfile = str(cert), str(key)
    server, bound = metrics_http.serve_metrics(
        AgentCollector(service), metrics_host(listen), port, certfile, keyfile
    )
    service.metrics_port = bound
    agent.metrics = server
    return bound
