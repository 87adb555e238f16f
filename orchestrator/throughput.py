"""Tokens a second per deployment and per node, from the token counters agents send with
their heartbeats.

Every beat carries, for each replica whose token stream (stage 0) the agent serves, the tokens
generated since the agent started (`HeartbeatRequest.tokens`). `TokenRates` keeps a few
seconds of those samples per (node, deployment, replica) and answers the rate over the window:
(newest − oldest) / (their time apart). Why counters and not rates from the agent: a lost or
late beat loses nothing (the next counter covers it), and the window is the control plane's
choice. A counter that goes down (the agent restarted) starts the replica's samples afresh;
samples older than the window are dropped, so a replica that stopped generating, or an agent
that stopped beating, reads 0 after `WINDOW` seconds. Memory is bounded: at most one sample per
`MIN_SPACING` seconds per replica, and samples are kept only for the window.

In memory only: a rate is about the last seconds, a restarted control plane has it back after
one window. Thread-safe (beats land on the registry's event loop, reads come from the admin
API's threads).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable

WINDOW = 5.0  # seconds of samples a rate is computed over
MIN_SPACING = 0.2  # seconds between two kept samples of one replica

Key = tuple[str, str, int]  # node, deployment, replica


class TokenRates:
    """Token counters in, tokens a second out (see the module docstring)."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._samples: dict[Key, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def observe(self, node: str, counters: Iterable[tuple[str, int, int]], now: float) -> None:
        """`counters`: (deployment, replica, tokens generated so far) as one beat of `node`
        carried them."""
        with self._lock:
            for deployment, replica, total in counters:
                samples = self._samples.setdefault((node, deployment, replica), deque())
                if samples and total < samples[-1][1]:
                    samples.clear()  # the agent restarted: its counter began again
                if len(samples) >= 2 and now - samples[-2][0] < MIN_SPACING:
                    samples[-1] = (now, total)  # the newest reading replaces a close one
                else:
                    samples.append((now, total))
                while samples and samples[0][0] < now - self.window:
                    samples.popleft()

    def _rates(self, now: float) -> dict[Key, float]:
        out: dict[Key, float] = {}
        with self._lock:
            for key in list(self._samples):
                samples = self._samples[key]
                while samples and samples[0][0] < now - self.window:
                    samples.popleft()
                if not samples:
                    del self._samples[key]
                    continue
                if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
                    (t0, n0), (t1, n1) = samples[0], samples[-1]
                    out[key] = (n1 - n0) / (t1 - t0)
                else:
                    out[key] = 0.0
        return out

    def by_node(self, now: float) -> dict[str, float]:
        """Node -> tokens a second of the replicas whose token stream it serves."""
        out: dict[str, float] = {}
        for (node, _, _), rate in self._rates(now).items():
            out[node] = out.get(node, 0.0) + rate
        return out

    def by_deployment(self, now: float) -> dict[str, float]:
        """Deployment -> tokens a second over all its replicas."""
        out: dict[str, float] = {}
        for (_, deployment, _), rate in self._rates(now).items():
            out[deployment] = out.get(deployment, 0.0) + rate
        return out


__all__ = ["MIN_SPACING", "WINDOW", "TokenRates"]
