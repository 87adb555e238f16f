"""Serve a Prometheus collector on /metrics over HTTPS with a cluster certificate.

Shared by the control plane (`orchestrator.metrics`) and the node agents (`agents.metrics`):
DESIGN.md has every port speak TLS, and both sides hold a certificate of the cluster CA, so a
scraper trusts `certs/ca.crt` for either. The server is prometheus-client's own (a threading
WSGI server on a daemon thread); this module only wires the collector into a registry of its
own — not the process-wide default one, whose process and platform collectors would differ
between the embedded runtimes — and the certificate into the TLS context.

Client certificates are not asked for: metrics are read-only counts, and scrapers (Prometheus,
an operator's curl) seldom carry a cluster identity.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import start_http_server
from prometheus_client.registry import Collector, CollectorRegistry


def serve_metrics(
    collector: Collector,
    host: str,
    port: int,
    certfile: str | None,
    keyfile: str | None,
) -> tuple[Any, int]:
    """Serve `collector` on `host:port` (0: any free port); (the server, its bound port).

    HTTPS with `certfile`/`keyfile`; plain HTTP only when both are None (an agent run with
    `--insecure`, which is loopback only). Stop with `server.shutdown()`.
    """
    if (certfile is None) != (keyfile is None):
        raise ValueError("serve_metrics needs both a certificate and its key, or neither")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(
        port, addr=host, registry=registry, certfile=certfile, keyfile=keyfile
    )
    return server, int(server.server_port)
