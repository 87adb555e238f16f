"""The pure full-pass gate (`orchestrator.core.passes`): which ticks need a full pass."""

from __future__ import annotations

from dataclasses import replace

from core_world import make_nodes

from orchestrator.core import CoreSettings, Phase
from orchestrator.core.passes import PassGate, settled

SETTINGS = CoreSettings(heartbeat_interval=0.5, heartbeat_timeout=2.5)


def gate_after_full_pass(now: float = 100.0, *, quiet: bool = True) -> PassGate:
    gate = PassGate(full_every=5.0)
    nodes = make_nodes(2, 3, now=now).values()
    gate.full_pass(revision=7, now=now, nodes=nodes, settled=quiet)
    return gate


def test_the_first_tick_is_a_full_pass() -> None:
    assert PassGate().due(0, 0.0, SETTINGS) == "first pass"


def test_nothing_changed_is_no_full_pass_until_the_periodic_one() -> None:
    gate = gate_after_full_pass()
    for t in (100.25, 101.0, 102.0, 104.9):
        gate.beats((f"rack-{r}/node-{s}", t) for r in range(2) for s in range(3))
        assert gate.due(7, t, SETTINGS) is None
    assert gate.due(7, 105.0, SETTINGS) == "periodic"


def test_a_store_write_a_wake_or_work_in_progress_means_a_full_pass() -> None:
    gate = gate_after_full_pass()
    assert gate.due(8, 100.25, SETTINGS) == "store changed"
    assert gate.due(7, 100.25, SETTINGS, woken=True) == "woken"
    busy = gate_after_full_pass(quiet=False)
    assert busy.due(7, 100.25, SETTINGS) == "deployments in progress"


def test_own_loads_in_flight_hold_store_changes_and_timers_but_not_wakes_or_liveness() -> None:
    busy = gate_after_full_pass(quiet=False)
    assert busy.due(8, 100.25, SETTINGS, loading=True) is None  # its loads' own reports
    assert busy.due(8, 100.25, SETTINGS, loading=True, woken=True) == "woken"
    assert busy.due(8, 105.0, SETTINGS, loading=True) == "periodic"
    assert busy.due(8, 100.25, SETTINGS) == "store changed"  # the loads ended
    live = [f"rack-{r}/node-{s}" for r in range(2) for s in range(3) if (r, s) != (0, 0)]
    busy.beats((name, 102.0) for name in live)
    assert busy.due(7, 102.6, SETTINGS, loading=True) == "node rack-0/node-0 stopped beating"


def test_a_silent_node_is_a_full_pass_once_its_heartbeat_times_out() -> None:
    gate = gate_after_full_pass()
    live = [f"rack-{r}/node-{s}" for r in range(2) for s in range(3) if (r, s) != (1, 2)]
    gate.beats((name, 102.0) for name in live)
    assert gate.due(7, 102.5, SETTINGS) is None  # 2.5 s old: not past the timeout yet
    assert gate.due(7, 102.6, SETTINGS) == "node rack-1/node-2 stopped beating"


def test_a_notready_node_heard_from_again_is_a_full_pass() -> None:
    nodes = make_nodes(1, 2, now=100.0)
    dead = replace(nodes["rack-0/node-1"], ready=False, last_heartbeat=90.0)
    gate = PassGate()
    gate.full_pass(3, 100.0, [nodes["rack-0/node-0"], dead], settled=True)
    assert gate.due(3, 100.1, SETTINGS) is None  # NotReady and still silent: as decided
    gate.beats([("rack-0/node-1", 100.2)])
    assert gate.due(3, 100.25, SETTINGS) == "node rack-0/node-1 resumed beating"


def test_a_late_beat_never_moves_a_node_back_and_gone_nodes_are_forgotten() -> None:
    gate = gate_after_full_pass()
    gate.beats([("rack-0/node-0", 50.0)])  # older than what the pass saw
    assert gate.due(7, 102.0, SETTINGS) is None
    one = make_nodes(1, 1, now=103.0).values()
    gate.full_pass(8, 103.0, one, settled=True)  # the other nodes left the store
    assert gate.due(8, 103.5, SETTINGS) is None


def test_settled_phases() -> None:
    assert settled([])
    assert settled([Phase.READY, Phase.FAILED, Phase.PENDING])
    for busy in (Phase.LOADING, Phase.DEGRADED, Phase.DELETING, Phase.PLACING):
        assert not settled([Phase.READY, busy])
