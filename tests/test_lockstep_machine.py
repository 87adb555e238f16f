"""The pure lockstep tick state machine: schedule, credits, barrier, epochs, hash chains."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.lockstep import (
    GENESIS,
    Frame,
    Phase,
    ProtocolError,
    Schedule,
    StageMachine,
    first_divergence,
)


def machines(stages: int, slots: int, window: int) -> list[StageMachine]:
    sched = Schedule(stages, slots)
    chips = frozenset(f"chip-{i}" for i in range(stages))
    ms = [StageMachine(i, sched, window, chips) for i in range(stages)]
    for m in ms:
        for chip in sorted(chips):
            m.confirm_ready(chip, 0)
    return ms


def simulate(stages: int, slots: int, window: int, ticks: int, seed: int | None):
    """Run a replica until every stage finished `ticks` ticks, delivering events in a random
    (seeded) order; kernels are pure functions of (stage, slot, input, per-slot state)."""
    rng = random.Random(seed)
    ms = machines(stages, slots, window)
    state: list[dict[int, bytes]] = [{} for _ in range(stages)]
    in_flight: list[tuple[str, int, object]] = []  # ("frame"|"ack", destination stage, item)
    steps = 0
    while any(m.next_tick < ticks for m in ms):
        steps += 1
        assert steps < 100_000, "deadlock"
        runnable = [m for m in ms if m.next_tick < ticks and m.ready() is not None]
        choices = len(runnable) + len(in_flight)
        assert choices, f"deadlock at ticks {[m.next_tick for m in ms]}"
        pick = rng.randrange(choices) if seed is not None else 0
        if pick < len(runnable):
            m = runnable[pick]
            run = m.ready()
            assert run is not None
            payload = run.input.payload if run.input else b""
            if run.slot is None:
                out = b""
            else:
                prior = state[m.stage].get(run.slot, b"")
                out = hashlib.sha256(bytes([m.stage, run.slot]) + prior + payload).digest()
                state[m.stage][run.slot] = out
            m.complete(run.tick, out)
            down = m.schedule.downstream(m.stage)
            in_flight.append(("frame", down, Frame(m.epoch, run.tick, run.slot, out)))
            if run.input is not None:
                up = m.schedule.upstream(m.stage)
                in_flight.append(("ack", up, run.input.tick))
        else:
            kind, dest, item = in_flight.pop(pick - len(runnable))
            if kind == "frame":
                ms[dest].on_frame(item)  # type: ignore[arg-type]
            else:
                ms[dest].on_ack(item, 0)  # type: ignore[arg-type]
    return [m.chain_log()[:ticks] for m in ms]


@pytest.mark.parametrize(
    ("stages", "slots", "window"),
    [(1, 1, 1), (1, 4, 2), (2, 2, 1), (4, 4, 1), (4, 8, 2), (8, 3, 1), (8, 8, 4), (3, 16, 1)],
)
def test_timing_never_changes_chains(stages: int, slots: int, window: int) -> None:
    reference = simulate(stages, slots, window, 40, seed=None)
    for seed in range(3):
        assert simulate(stages, slots, window, 40, seed=seed) == reference


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(1, 4), st.integers(0, 10**6))
def test_no_deadlock_and_same_chains(stages: int, slots: int, window: int, seed: int) -> None:
    assert simulate(stages, slots, window, 25, seed) == simulate(stages, slots, window, 25, None)


def test_schedule_slots_and_bubbles() -> None:
    sched = Schedule(stages=4, slots=2)
    assert sched.period == 4
    assert [sched.slot_at(0, t) for t in range(6)] == [0, 1, None, None, 0, 1]
    assert [sched.slot_at(2, t) for t in range(6)] == [None, None, 0, 1, None, None]
    # stage 0 at tick 4 works on slot 0 again, fed by the last stage's tick 3 output
    assert sched.input_tick(0, 4) == 3 and sched.slot_at(3, 3) == 0
    wide = Schedule(stages=2, slots=5)
    assert wide.input_tick(0, 5) == 5 - 1 - 3 and wide.slot_at(1, 1) == 0


def test_window_bounds_skew() -> None:
    m = machines(4, 8, window=2)[0]  # period 8: stage 0 needs no ring input before tick 5
    for tick in range(2):
        run = m.ready()
        assert run is not None and run.tick == tick
        m.complete(tick, b"x")
    assert m.ready() is None, "tick 2 needs downstream credit for tick 0"
    m.on_ack(0, 0)
    run = m.ready()
    assert run is not None and run.tick == 2


def test_barrier_holds_until_every_chip_is_ready() -> None:
    sched = Schedule(2, 2)
    m = StageMachine(0, sched, 1, frozenset({"a", "b"}))
    assert m.ready() is None
    assert not m.confirm_ready("a", 0)
    assert not m.confirm_ready("b", 1), "a confirmation for another epoch does not count"
    assert m.confirm_ready("b", 0) and m.phase is Phase.RUNNING
    with pytest.raises(ProtocolError):
        m.confirm_ready("z", 0)


def test_halt_and_resume_at_new_epoch_drops_old_frames() -> None:
    ms = machines(2, 2, 2)
    second = ms[1]
    second.on_frame(Frame(0, 0, 0, b"old"))
    assert second.halt() == -1 and second.ready() is None
    second.resume(epoch=1, tick=0)
    assert second.phase is Phase.BARRIER
    assert not second.on_frame(Frame(0, 0, 0, b"old")), "old epoch frames are dropped"
    second.confirm_ready("chip-0", 1)
    second.confirm_ready("chip-1", 1)
    run = second.ready()
    assert run is not None and run.tick == 0 and run.input is None  # tick 0 of stage 1: bubble
    second.complete(0, b"")
    assert second.ready() is None, "tick 1 waits for the new epoch's frame"
    second.on_frame(Frame(1, 0, 0, b"new"))
    run = second.ready()
    assert run is not None and run.input is not None and run.input.payload == b"new"
    with pytest.raises(ProtocolError):
        second.resume(epoch=1, tick=5)


def test_protocol_violations_are_named() -> None:
    m = machines(2, 2, 2)[1]
    m.on_frame(Frame(0, 0, 0, b"a"))
    with pytest.raises(ProtocolError, match="two different frames"):
        m.on_frame(Frame(0, 0, 0, b"b"))
    with pytest.raises(ProtocolError, match="epoch 3"):
        m.on_frame(Frame(3, 1, 0, b"a"))
    for tick in range(2):
        run = m.ready()
        assert run is not None
        m.complete(tick, b"o")
    with pytest.raises(ProtocolError, match="stale frame"):
        m.on_frame(Frame(0, 0, 0, b"a"))
    with pytest.raises(ProtocolError, match="expected 2"):
        m.complete(5, b"")


def test_divergence_names_the_tick() -> None:
    a = simulate(3, 3, 1, 12, None)[1]
    b = list(a)
    b[7] = (b[7][0], b"\x01" * 32)
    assert first_divergence(a, b) == a[7][0]
    assert first_divergence(a, a) is None


def test_resume_from_a_later_tick_needs_no_frame_from_before_it() -> None:
    """After `resume(epoch, tick)` every stage starts at `tick` with no upstream frame of an
    earlier tick: stage s > 0 runs its first tick as a bubble, stage 0 runs P - S + 1 ticks
    before the ring brings the last stage's first frame of the epoch back."""
    ms = machines(2, 3, 2)  # period 3
    for m in ms:
        m.halt()
        m.resume(epoch=1, tick=10)
        for chip in sorted(m.chips):
            m.confirm_ready(chip, 1)
    head, tail = ms
    for tick in (10, 11):
        run = head.ready()
        assert run is not None and run.tick == tick and run.input is None
        head.complete(tick, b"h")
    run = tail.ready()
    assert run is not None and run.tick == 10 and run.input is None
    tail.complete(10, b"t")
    head.on_ack(10, 1)
    assert head.ready() is None, "tick 12 waits for the last stage's tick 10"
    head.on_frame(Frame(1, 10, None, b"t"))
    run = head.ready()
    assert run is not None and run.tick == 12 and run.input is not None


def run_ticks(m: StageMachine, outputs: list[bytes]) -> None:
    """Complete ticks on a single-stage machine (its own input is the ring: feed it)."""
    for out in outputs:
        run = m.ready()
        assert run is not None
        m.complete(run.tick, out)
        m.on_frame(Frame(m.epoch, run.tick, run.slot, out))


def single(limit: int = 4096) -> StageMachine:
    m = StageMachine(0, Schedule(1, 1), 1, frozenset({"c"}), chain_log_limit=limit)
    m.confirm_ready("c", 0)
    return m


def test_resume_rewinds_the_chain_to_a_clean_runs() -> None:
    outputs = [bytes([i]) for i in range(8)]
    clean = single()
    run_ticks(clean, outputs)
    resumed = single()
    run_ticks(resumed, outputs[:6])
    resumed.halt()
    resumed.resume(epoch=1, tick=3)
    assert [t for t, _ in resumed.chain_log()] == [0, 1, 2], "no duplicate ticks"
    assert resumed.chain == clean.chain_log()[2][1]
    resumed.confirm_ready("c", 1)
    run_ticks(resumed, outputs[3:])
    assert resumed.chain_log() == clean.chain_log()
    assert resumed.chain == clean.chain
    assert first_divergence(resumed.chain_log(), clean.chain_log()) is None
    resumed.halt()
    resumed.resume(epoch=2, tick=0)
    assert resumed.chain_log() == [] and resumed.chain == GENESIS


def test_chain_log_is_bounded_and_resume_outside_it_is_refused() -> None:
    outputs = [bytes([i]) for i in range(10)]
    clean = single()
    run_ticks(clean, outputs)
    m = single(limit=4)
    run_ticks(m, outputs)
    assert [t for t, _ in m.chain_log()] == [6, 7, 8, 9]
    assert m.chain == clean.chain
    m.halt()
    with pytest.raises(ProtocolError, match="tick 5"):
        m.resume(epoch=1, tick=5)
    m.resume(epoch=1, tick=6)  # the head after tick 5 is the oldest the window still covers
    assert m.chain == clean.chain_log()[5][1] and m.chain_log() == []
    m.halt()
    m.resume(epoch=2, tick=6)
    assert m.chain == clean.chain_log()[5][1]


def test_first_divergence_names_the_tick_a_shorter_log_misses() -> None:
    a = [(0, b"a"), (1, b"b"), (2, b"c")]
    assert first_divergence(a, a[:2]) == 2
    assert first_divergence(a[:1], a) == 1
    assert first_divergence([], a) == 0


def test_complete_needs_running_and_acks_need_sent_ticks() -> None:
    m = machines(2, 2, 2)[0]
    with pytest.raises(ProtocolError, match="never sent"):
        m.on_ack(0, 0)
    m.complete(0, b"x")
    m.on_ack(0, 0)
    m.halt()
    with pytest.raises(ProtocolError, match="halted"):
        m.complete(1, b"y")
    fresh = StageMachine(0, Schedule(1, 1), 1, frozenset({"c"}))
    with pytest.raises(ProtocolError, match="barrier"):
        fresh.complete(0, b"")
