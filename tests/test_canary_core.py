"""The canary's pure judgement (orchestrator.core.canary): which replica, stage, chip and tick
first computed a wrong output, and which reference decided it."""

from __future__ import annotations

import hashlib
from typing import Any

from orchestrator.core.canary import (
    ReplicaTrace,
    StageTrace,
    first_difference,
    first_tick_of,
    held_steps,
    judge,
    request_chain,
)

STAGES, STEPS, PERIOD = 3, 4, 4


def d(stage: int, step: int, salt: str = "") -> bytes:
    return hashlib.sha256(f"{stage}/{step}{salt}".encode()).digest()


def trace(
    replica: int,
    first_tick: int = 10,
    flip: tuple[int, int] | None = None,
    missing: tuple[int, int] | None = None,
) -> ReplicaTrace:
    """A clean trace; `flip` (stage, step) corrupts that output and, as a real corruption
    would, every later stage's output from that step on; `missing` drops one digest."""
    stages = []
    for s in range(STAGES):
        digests: list[bytes | None] = []
        for k in range(STEPS):
            bad = flip is not None and s >= flip[0] and k >= flip[1]
            digests.append(d(s, k, "!" if bad else ""))
        if missing is not None and missing[0] == s:
            digests[missing[1]] = None
        chips = (f"r{replica}/chip-{s}",)
        stages.append(StageTrace(s, chips, (f"shard-{s}",), tuple(digests)))
    return ReplicaTrace(replica, first_tick, PERIOD, tuple(stages))


def test_equal_traces_pass_with_a_majority_reference() -> None:
    verdict = judge([trace(0), trace(1, first_tick=57)])  # different ticks, same request
    assert verdict.passed
    assert set(verdict.references.values()) == {"majority"}
    assert set(verdict.agreed) == {(f"shard-{s}",) for s in range(STAGES)}


def test_the_first_wrong_output_in_tick_order_names_stage_chip_and_tick() -> None:
    verdict = judge([trace(0), trace(1, flip=(1, 2)), trace(2)])
    assert len(verdict.divergences) == 1
    (div,) = verdict.divergences
    # stage 2 differs too (its input was corrupted), but later: stage 1 at step 2 is first
    assert (div.replica, div.stage, div.chips, div.step) == (1, 1, ("r1/chip-1",), 2)
    assert div.tick == 10 + 1 + 2 * PERIOD
    assert not div.missing
    assert verdict.corrupted == (div,)
    assert "replica 1 stage 1 (chip r1/chip-1)" in div.describe()
    assert f"tick {div.tick}" in div.describe()


def test_two_replicas_that_disagree_are_unresolved_without_a_record() -> None:
    verdict = judge([trace(0), trace(1, flip=(2, 0))])
    assert not verdict.passed
    assert verdict.divergences == ()
    assert verdict.unresolved == (("shard-2",),)


def test_a_recorded_reference_breaks_the_tie() -> None:
    recorded = judge([trace(0), trace(1)]).agreed
    verdict = judge([trace(0), trace(1, flip=(2, 3))], recorded)
    assert [(x.replica, x.stage, x.step) for x in verdict.divergences] == [(1, 2, 3)]
    assert verdict.references[("shard-2",)] == "recorded"
    assert verdict.references[("shard-0",)] == "majority"


def test_a_second_run_outvotes_a_transient_flip() -> None:
    runs = [trace(0), trace(1, flip=(0, 1)), trace(0, first_tick=90), trace(1, first_tick=91)]
    verdict = judge(runs)
    assert [(x.replica, x.stage, x.tick) for x in verdict.divergences] == [(1, 0, 10 + PERIOD)]


def test_one_replica_is_recorded_on_first_use_then_checked() -> None:
    first = judge([trace(0)])
    assert first.passed and set(first.references.values()) == {"first run"}
    later = judge([trace(0, flip=(0, 3))], first.agreed)
    assert [(x.stage, x.step) for x in later.divergences] == [(0, 3)]


def test_a_missing_output_is_reported_but_is_no_corruption() -> None:
    verdict = judge([trace(0), trace(1, missing=(2, 1)), trace(2)])
    (div,) = verdict.divergences
    assert (div.stage, div.step, div.missing) == (2, 1, True)
    assert verdict.corrupted == ()
    assert "produced no output" in div.describe()


def test_a_wrong_output_outranks_an_earlier_missing_one() -> None:
    t = trace(1, flip=(2, 3), missing=(0, 0))
    verdict = judge([trace(0), t, trace(2)])
    (div,) = verdict.divergences
    assert (div.stage, div.step, div.missing) == (2, 3, False)


def test_stages_running_different_shards_are_not_compared() -> None:
    other = trace(1, flip=(0, 0))
    renamed = ReplicaTrace(
        1,
        other.first_tick,
        PERIOD,
        tuple(StageTrace(s.stage, s.chips, ("other", *s.key), s.digests) for s in other.stages),
    )
    verdict = judge([trace(0), renamed])
    assert verdict.passed  # each key has one trace: recorded on first use


def test_request_chain_and_first_difference() -> None:
    a = [d(0, k) for k in range(4)]
    assert len(request_chain(a)) == 4
    assert request_chain(a) == request_chain(list(a))
    assert first_difference(a, a) is None
    assert first_difference(a, [*a[:2], d(9, 9), a[3]]) == 2
    assert first_difference(a, a[:3]) == 3  # a step one lacks counts
    assert first_difference(a, [*a[:1], None, *a[2:]]) == 1


def test_first_tick_from_the_token_ticks() -> None:
    assert first_tick_of([14, 18, 22], 4) == 10
    assert first_tick_of([14, 19, 22], 4) is None  # replayed: spacing broken
    assert first_tick_of([], 4) is None
    assert first_tick_of([3], 4) is None  # before tick 0: impossible


def test_held_steps_tells_a_rolled_log_from_a_stopped_stage() -> None:
    """Leading steps without a digest, later ones with: the log rolled past them (`unheld`,
    still a missing divergence, never fenced); trailing ones: the stage stopped."""
    rolled = trace(1, missing=(1, 0))
    assert held_steps([trace(0), rolled]) == STEPS - 1
    assert held_steps([trace(0), trace(1, missing=(1, STEPS - 1))]) is None  # stopped
    assert held_steps([trace(0), trace(2)]) is None
    (div,) = judge([trace(0), rolled, trace(2)]).divergences
    assert (div.replica, div.stage, div.step, div.missing, div.unheld) == (1, 1, 0, True, True)
    assert "no longer held its output" in div.describe()
    (stopped,) = judge([trace(0), trace(1, missing=(1, 3)), trace(2)]).divergences
    assert stopped.missing and not stopped.unheld


# --- a ring longer than the fleet's 256-tick log, through the pure cores ---------------------

RING, SLOTS = 2000, 8  # ring period P = 2000
LOOKED_AT = (0, 1, 999, 1000, 1999)  # the stages simulated (each on its own; no links needed)
BUSY_TICKS = 100  # ticks other requests keep the ring going before StageDigests arrives


class RingStages:
    """Stage machines (`agents.lockstep.StageMachine`, the agent's pure tick core) of one
    replica's stages of a P = 2000 ring, completing ticks as the schedule has them: at the
    canary's ticks t0 + s + k * P the canary's output (a function of the request alone,
    corrupted from `flip` (stage, step) on), at every other tick this replica's own traffic."""

    def __init__(self, replica: int, log: int) -> None:
        from agents.lockstep import Schedule, StageMachine

        self.replica = replica
        self.machines = {}
        for s in LOOKED_AT:
            m = StageMachine(s, Schedule(RING, SLOTS), 2, frozenset({"c"}), chain_log_limit=log)
            m.confirm_ready("c", 0)
            self.machines[s] = m

    def canary(self, t0: int, tokens: int, flip: tuple[int, int] | None = None) -> None:
        """Run every stage through the canary (prefill at stage-0 tick t0, `tokens` tokens)
        and the ring's tail: the last token is back at stage 0 at t0 + tokens * P."""
        for s, m in self.machines.items():
            canary = {t0 + s + k * RING: k for k in range(tokens)}
            while m.next_tick <= t0 + tokens * RING + s + BUSY_TICKS:
                t = m.next_tick
                if t in canary:
                    bad = flip is not None and s >= flip[0] and canary[t] >= flip[1]
                    digest = d(s, canary[t], "!" if bad else "")
                else:
                    digest = bytes([self.replica]) + t.to_bytes(31, "little")
                m.complete(t, b"", digest)

    def stage_digests(self, t0: int, tokens: int) -> list[StageTrace]:
        """What the agent answers the control plane's StageDigests (`agents.canary`)."""
        from agents.canary import stage_digests
        from agents.settings import DEFAULT_SETTINGS
        from protos import agent_pb2

        class Runner:
            def __init__(self, machine: Any) -> None:
                self.machine = machine

            def output_digests(self, ticks: list[int]) -> tuple[Any, list[bytes | None]]:
                status = agent_pb2.PipelineStatus(epoch=0, phase="running")
                return status, self.machine.output_digests(ticks)

        class Host:
            def stages(_, deployment: str, replica: int) -> list[tuple[int, Any, list[str]]]:
                return [(s, Runner(m), [f"chip-{s}"]) for s, m in self.machines.items()]

        ask = agent_pb2.StageDigestsRequest(
            deployment="big", replica=self.replica, first_tick=t0, period=RING, count=tokens
        )
        reply = stage_digests(Host(), ask, DEFAULT_SETTINGS)  # type: ignore[arg-type]
        return [
            StageTrace(
                x.stage,
                tuple(x.chip_names),
                (f"shard-{x.stage}",),
                tuple(digest or None for digest in x.digests),
            )
            for x in reply.stages
        ]


def test_a_2000_stage_ring_is_compared_with_a_canary_its_logs_hold() -> None:
    """The fleet keeps 256 ticks per stage: with P = 2000 no canary output of any stage is
    still held when the control plane asks (the last token comes back a period after the
    last output). The agent's log for that ring (`AgentSettings.stage_log_limit`: one period
    more) holds the last output of every stage: a 4-token canary's first three are gone
    (`held_steps` 1, never judged on its tail), a 1-token canary fits, two replicas that
    served different traffic agree, and a corruption is found at its stage and tick."""
    from agents.settings import DEFAULT_SETTINGS, AgentSettings

    fleet = AgentSettings(chain_log_limit=256)
    log = fleet.stage_log_limit(RING, SLOTS)
    assert log == RING + fleet.stage_log_slack == 2256
    assert fleet.stage_log_limit(12, 4) == 12 + 256
    assert DEFAULT_SETTINGS.stage_log_limit(RING, SLOTS) == 4096  # the setting, if more
    assert fleet.stage_log_limit(1 << 20, 1) == fleet.max_stage_log  # memory cap

    old = RingStages(0, 256)
    old.canary(t0=37, tokens=4)
    assert held_steps([ReplicaTrace(0, 37, RING, tuple(old.stage_digests(37, 4)))]) == 0

    replicas = [RingStages(r, log) for r in range(3)]
    starts = (37, 501, 1234)  # each replica got the canary at its own tick
    traces = []
    for ring, t0 in zip(replicas, starts, strict=True):
        ring.canary(t0, tokens=4)
        traces.append(ReplicaTrace(ring.replica, t0, RING, tuple(ring.stage_digests(t0, 4))))
    assert held_steps(traces) == 1
    assert all(s.digests[:3] == (None,) * 3 and s.digests[3] for t in traces for s in t.stages)
    assert not judge(traces).passed  # a truncated history is never taken as a comparison

    again = []
    for ring in replicas:
        t0 = next(iter(ring.machines.values())).next_tick + 10 * ring.replica
        ring.canary(t0, tokens=1, flip=(999, 0) if ring.replica == 2 else None)
        again.append(ReplicaTrace(ring.replica, t0, RING, tuple(ring.stage_digests(t0, 1))))
    assert held_steps(again) is None
    verdict = judge(again)
    (div,) = verdict.divergences
    assert (div.replica, div.stage, div.step, div.missing) == (2, 999, 0, False)
    assert div.tick == again[2].first_tick + 999
    assert judge(again[:2]).passed


class Ring:
    """One replica as a ring of the agent's pure stage cores (`agents.stage_core.StageCore`),
    driven synchronously: frames, acknowledgements and executions (the timing-only fleet's
    synthetic outputs) are delivered in order until the ring is idle."""

    def __init__(self, stages: int, slots: int, log: int) -> None:
        from agents.journal import Journal
        from agents.lockstep import Schedule
        from agents.stage_core import ChipsReady, StageCore

        self.schedule = Schedule(stages, slots)
        self.cores = [
            StageCore(
                f"stage {s}",
                s,
                self.schedule,
                2,
                frozenset({"c"}),
                journal=Journal(slots, 64, 4) if s == 0 else None,
                vocab_size=16,
                chain_log_limit=log,
            )
            for s in range(stages)
        ]
        self.queue: list[tuple[int, Any]] = [(s, ChipsReady(("c",), 0)) for s in range(stages)]
        self.tokens: dict[str, list[int]] = {}

    def generate(self, request_id: str, prompt: tuple[int, ...], tokens: int) -> list[int]:
        """Serve one request until the ring is idle; the stage-0 ticks its tokens came at."""
        from agents.stage_core import (
            AckArrived,
            Execute,
            FrameArrived,
            SendAck,
            SendFrame,
            StreamToken,
            Submit,
            TickExecuted,
        )
        from agents.virtual_pipeline import synthetic_output

        self.queue.append((0, Submit(request_id, prompt, tokens)))
        while self.queue:
            stage, event = self.queue.pop(0)
            core = self.cores[stage]
            for action in core.handle(event):
                if isinstance(action, Execute):
                    out = synthetic_output(f"shard-{stage}", action, core.is_last, 16)
                    self.queue.append((stage, TickExecuted(action.tick, action.epoch, out)))
                elif isinstance(action, SendFrame):
                    down = self.schedule.downstream(stage)
                    self.queue.append((down, FrameArrived(action.frame)))
                elif isinstance(action, SendAck):
                    up = self.schedule.upstream(stage)
                    self.queue.append((up, AckArrived(action.tick, action.epoch)))
                elif isinstance(action, StreamToken):
                    self.tokens.setdefault(action.event.request_id, []).append(action.tick)
        return self.tokens[request_id]

    def trace(self, replica: int, ticks: list[int]) -> ReplicaTrace:
        """What StageDigests answers for the request's ticks, from each stage's digest log."""
        period = self.schedule.period
        first = first_tick_of(ticks, period)
        assert first is not None, ticks
        stages = []
        for s, core in enumerate(self.cores):
            asked = [first + s + k * period for k in range(len(ticks))]
            held = core.machine.output_digests(asked)
            stages.append(StageTrace(s, (f"r{replica}/chip-{s}",), (f"shard-{s}",), tuple(held)))
        return ReplicaTrace(replica, first, period, tuple(stages))


def test_the_ticks_a_canary_needs_held_through_the_real_stage_cores() -> None:
    """The geometry `stage_log_limit` relies on, checked with the real stage cores: on a ring
    of P = 40 stages whose logs keep 8 ticks, or one period plus 4, a canary's last output
    at every stage is held when the ring has gone idle, its earlier ones are not; a one-token
    canary is held whole and compares equal across replicas that served other traffic."""
    from agents.settings import AgentSettings

    settings = AgentSettings(chain_log_limit=8, stage_log_slack=4)
    log = settings.stage_log_limit(40, 4)
    assert log == 44
    a, b = Ring(40, 4, log), Ring(40, 4, log)
    b.generate("other", (5, 6, 7), 3)  # replica b's ticks move on
    prompt = (1, 2, 3)
    long = [a.trace(0, a.generate("c3", prompt, 3)), b.trace(1, b.generate("c3", prompt, 3))]
    assert long[0].first_tick != long[1].first_tick
    assert held_steps(long) == 1
    # idle, every stage is exactly 3 periods past its first output for the canary
    ages = {c.machine.next_tick - 1 - (long[0].first_tick + s) for s, c in enumerate(a.cores)}
    assert ages == {3 * 40}
    short = [a.trace(0, a.generate("c1", prompt, 1)), b.trace(1, b.generate("c1", prompt, 1))]
    assert held_steps(short) is None
    assert all(None not in s.digests for t in short for s in t.stages)
    assert judge(short).passed and judge(short).references[("shard-0",)] == "majority"
    # the 8-tick log alone holds no output of the canary on any stage
    c = Ring(40, 4, 8)
    traces = [c.trace(0, c.generate("c1", prompt, 1))]
    assert held_steps(traces) == 0
