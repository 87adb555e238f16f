"""When the controller must run a full reconcile pass, and when a cheap tick is enough.

Why: the controller ticks several times a second to move the batched heartbeats into the
store, and at 1,305 nodes a full pass reads every node and its 10,440 chips, builds the
planner's view of them and walks every deployment — about a tenth of a second of CPU, most
of the control plane's idle load when it ran on every tick. Yet on most ticks nothing the
reconciler looks at has changed. `reconcile(desired, observed, now)` is a pure function of
its inputs, so between two ticks its answer can change only when:

* the store changed (an apply, a delete, a registration, a cordon, an agent's report, the
  controller's own writes): the store's `revision`, which heartbeats do not move;
* a node's liveness flipped: a Ready node's last heartbeat grew older than
  `CoreSettings.heartbeat_timeout`, or a NotReady node was heard from again. Heartbeats that
  keep a live node live change nothing the reconciler decides;
* time passed a timer of the reconciler — a replica's retry backoff, a failover's backoff,
  the restart window. Those run only while a deployment is on its way somewhere (Placing ..
  Synchronizing, Degraded, Deleting); when every deployment is Ready, Failed or Pending (a
  Pending one waits for chips: a store change or a node coming back) no timer is pending;
* the controller itself has work outside the store (a node to ask for its `Status`, a
  pipeline reported stopped, a load that ended): it says so with `woken`.

While the controller's own loads are in flight (`loading`), the first two rules wait: those loads
are what moves the store (each node's report of what it now holds) and what the deployments in
progress wait for, and a pass per second in between only offered the same loads again — at 3,736
chips, 0.3 to 0.9 s a pass on a loaded machine, taken from the loads. The loads wake the controller
themselves (the last one to end, a failed one, one that frees a node's slot for a large blob), as
does anything else that changes the desired state (an apply, a delete, a registration); a liveness
flip and the periodic pass still count.

`PassGate` keeps what the last full pass saw and answers, per tick, why a full pass is due (or
None). A slow periodic full pass (`full_every`) is the safety net for anything outside these
rules (another process writing the store, a rule added later and forgotten here). Pure: the
caller passes the time and the store's revision in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from orchestrator.core.model import CoreSettings, Node, Phase

SETTLED_PHASES = frozenset({Phase.READY, Phase.FAILED, Phase.PENDING})
"""Phases in which a deployment has no reconciler timer running (module docstring)."""

FULL_EVERY = 5.0  # seconds: the periodic full pass


def settled(phases: Iterable[Phase]) -> bool:
    """Whether no deployment in these phases waits for a timer of the reconciler."""
    return all(p in SETTLED_PHASES for p in phases)


@dataclass
class PassGate:
    """What the last full pass saw; `due` says whether the next tick needs a full pass."""

    full_every: float = FULL_EVERY
    _ready: dict[str, bool] = field(default_factory=dict)
    _beats: dict[str, float] = field(default_factory=dict)
    _revision: int | None = None
    _settled: bool = False
    _last_full: float | None = None

    def full_pass(self, revision: int, now: float, nodes: Iterable[Node], settled: bool) -> None:
        """A full pass read the store at `revision` (before its own writes: they move the
        revision, so the pass after it is full too), saw `nodes` and, at the end, whether
        every deployment is `settled`."""
        self._revision = revision
        self._last_full = now
        self._settled = settled
        self._ready = {}
        for node in nodes:
            self._ready[node.name] = node.ready
            if node.last_heartbeat > self._beats.get(node.name, float("-inf")):
                self._beats[node.name] = node.last_heartbeat
        for name in [n for n in self._beats if n not in self._ready]:
            del self._beats[name]  # a node that is gone

    def beats(self, beats: Iterable[tuple[str, float]]) -> None:
        """Heartbeats written to the store since (node, time)."""
        known = self._beats
        for name, when in beats:
            if when > known.get(name, float("-inf")):
                known[name] = when

    def due(
        self,
        revision: int,
        now: float,
        settings: CoreSettings,
        *,
        woken: bool = False,
        loading: bool = False,
    ) -> str | None:
        """Why the tick at `now` needs a full pass, or None when nothing the reconciler
        decides on can have changed since the last one (module docstring). `loading`: the
        controller's loads are in flight (see `LOADING`)."""
        if self._revision is None or self._last_full is None:
            return "first pass"
        if woken:
            return "woken"
        if not loading and revision != self._revision:
            return "store changed"
        if not loading and not self._settled:
            return "deployments in progress"
        if now - self._last_full >= self.full_every:
            return "periodic"
        timeout = settings.heartbeat_timeout
        beats = self._beats
        for name, ready in self._ready.items():
            fresh = now - beats.get(name, float("-inf")) <= timeout
            if ready != fresh:
                return f"node {name} {'stopped' if ready else 'resumed'} beating"
        return None


__all__ = ["FULL_EVERY", "SETTLED_PHASES", "PassGate", "settled"]
