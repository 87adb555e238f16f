"""The canary's pure judgement (orchestrator.core.canary): which replica, stage, chip and tick
first computed a wrong output, and which reference decided it."""

from __future__ import annotations

import hashlib

from orchestrator.core.canary import (
    ReplicaTrace,
    StageTrace,
    first_difference,
    first_tick_of,
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
