"""Admission of streaming RPCs: at most N open per peer and M in all.

A streaming call holds one of the server's worker threads for as long as it is open, whether
or not its client sends anything; without a bound, a few dozen silent streams take every
worker and the agent stops answering even Status. `StreamGate` is the count; the server asks
it when a stream starts (before the handler can block) and refuses a stream over a bound at
once with RESOURCE_EXHAUSTED. Plain code over a lock: no gRPC, tested without a server.

Reserved peers (the control plane, under mutual TLS) have places of their own: their streams
count against `max_per_peer` but not against `max_total`, so the other agents of the cluster —
any of which may be compromised — cannot fill the agent-wide bound and lock the control plane
out of LoadShard and Generate. The worker pool is sized for both (`AgentSettings.workers`).
"""

from __future__ import annotations

import threading
from collections import Counter

from agents.errors import ResourceExhausted
from agents.text import quote


class StreamGate:
    """Counts open streams per peer and in all; `enter` refuses beyond the bounds."""

    def __init__(
        self, max_total: int, max_per_peer: int, reserved: frozenset[str] = frozenset()
    ) -> None:
        if max_total < 1 or max_per_peer < 1:
            raise ValueError("stream bounds must be at least 1")
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.reserved = reserved  # peers whose streams are outside `max_total`
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()
        self._total = 0
        self._refused: Counter[str] = Counter()  # method -> streams refused (for metrics)

    def enter(self, peer: str, method: str) -> None:
        """Admit one stream of `peer`, or raise `ResourceExhausted` naming the bound."""
        with self._lock:
            counted = peer not in self.reserved
            if counted and self._total >= self.max_total:
                self._refused[method] += 1
                raise ResourceExhausted(
                    f"{method}: {self._total} streams are open, the most this agent allows "
                    f"in all (max_streams {self.max_total}); retry when one ends"
                )
            if self._open[peer] >= self.max_per_peer:
                self._refused[method] += 1
                raise ResourceExhausted(
                    f"{method}: peer {quote(peer, 100)} has {self._open[peer]} streams open, "
                    f"the most one peer may (max_streams_per_peer {self.max_per_peer})"
                )
            self._open[peer] += 1
            self._total += counted

    def leave(self, peer: str) -> None:
        """One stream of `peer` ended (call exactly once per successful `enter`)."""
        with self._lock:
            self._open[peer] -= 1
            if self._open[peer] <= 0:
                del self._open[peer]
            self._total -= peer not in self.reserved

    @property
    def total(self) -> int:
        """Open streams counted against `max_total` (those of reserved peers are not)."""
        with self._lock:
            return self._total

    def refused(self) -> dict[str, int]:
        """Streams refused so far, by method (a copy)."""
        with self._lock:
            return dict(self._refused)

    def open_of(self, peer: str) -> int:
        with self._lock:
            return self._open[peer]
