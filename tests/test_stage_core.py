"""The pure stage core: events in, actions out, no threads, clocks or I/O."""

from __future__ import annotations

import numpy as np
import pytest

from agents.journal import Journal, JournalError
from agents.lockstep import Frame, ProtocolError, Schedule
from agents.sampling import MIN_TEMPERATURE, Sampling, check_sampling, sample_token
from agents.stage_core import (
    TOKEN,
    AckArrived,
    Cancel,
    ChipsReady,
    EndRequest,
    Execute,
    Fail,
    FrameArrived,
    Halt,
    RejectCode,
    RejectFrame,
    ReportStop,
    Resume,
    SendAck,
    SendFrame,
    StageCore,
    Stopped,
    StreamToken,
    Submit,
    TickExecuted,
    TickFailed,
)

VOCAB = 8


def core(stage: int, *, stages: int = 2, slots: int = 2, window: int = 2) -> StageCore:
    c = StageCore(
        f"stage {stage}",
        stage,
        Schedule(stages, slots),
        window,
        frozenset({"a", "b"}),
        journal=Journal(slots, 32, 4) if stage == 0 else None,
        vocab_size=VOCAB,
    )
    assert c.handle(ChipsReady(("a", "b"), 0)) == [] or stage > 0
    return c


def only(actions: list[object], kind: type) -> list[object]:
    return [a for a in actions if isinstance(a, kind)]


def token_payload(token: int, vocab: int = VOCAB) -> bytes:
    return TOKEN.pack(token) + np.arange(vocab, dtype="<f4").tobytes()


def test_a_middle_stage_runs_one_tick_at_a_time_and_acknowledges_what_it_consumed() -> None:
    c = StageCore("s1", 1, Schedule(2, 2), 2, frozenset({"a"}))
    assert c.handle(ChipsReady(("a",), 0)) == [Execute(0, 0, None, None, b"")]
    assert c.executing
    assert c.handle(FrameArrived(Frame(0, 0, 0, b"x"))) == []  # tick 0 still running
    out = c.handle(TickExecuted(0, 0, b"bubble"))
    assert out[0] == SendFrame(Frame(0, 0, None, b"bubble"))
    assert not only(out, SendAck), "tick 0 consumed no upstream frame"
    assert out[-1] == Execute(1, 0, 0, None, b"x")
    out = c.handle(TickExecuted(1, 0, b"y"))
    assert out == [SendFrame(Frame(0, 1, 0, b"y")), SendAck(0, 0)]


def test_frames_of_an_older_epoch_are_dropped_and_a_newer_one_stops_the_stage() -> None:
    c = StageCore("s1", 1, Schedule(2, 2), 2, frozenset({"a"}), epoch=1)
    assert c.handle(FrameArrived(Frame(0, 0, 0, b"x"))) == []
    assert c.error == ""
    out = c.handle(FrameArrived(Frame(2, 0, 0, b"x")))
    (reject,) = only(out, RejectFrame)
    assert isinstance(reject, RejectFrame) and reject.code is RejectCode.FAILED_PRECONDITION
    assert "epoch 2 while in epoch 1" in reject.reason
    assert only(out, ReportStop) and c.phase == "failed" and "epoch 2" in c.error
    again = c.handle(FrameArrived(Frame(1, 0, 0, b"x")))
    assert only(again, RejectFrame), "a stopped stage admits nothing"
    assert not c.machine._inputs, "no rejected frame reached the machine"


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        (Frame(0, 10**12, None, b""), RejectCode.OUT_OF_RANGE, "credit window"),
        (Frame(0, 3, 0, b""), RejectCode.OUT_OF_RANGE, "credit window"),  # limit is -1 + 2
        (Frame(0, 1, 0, b""), RejectCode.FAILED_PRECONDITION, "slot 0"),  # the schedule says 1
        (Frame(0, -1, None, b""), RejectCode.OUT_OF_RANGE, "credit window"),
    ],
)
def test_frames_outside_the_window_or_schedule_are_refused(
    frame: Frame, code: RejectCode, words: str
) -> None:
    c = StageCore("s1", 1, Schedule(2, 2), 2, frozenset({"a"}))
    out = c.handle(FrameArrived(frame))
    (reject,) = only(out, RejectFrame)
    assert isinstance(reject, RejectFrame) and reject.code is code and words in reject.reason
    assert c.error and not c.machine._inputs


def test_the_window_bounds_what_a_stage_buffers() -> None:
    """Stage 1 has acknowledged nothing: upstream may be at most W ticks ahead, so at most
    W + 1 frames are held whatever a peer sends."""
    c = StageCore("s1", 1, Schedule(2, 4), 2, frozenset({"a"}))
    schedule = Schedule(2, 4)
    for tick in range(2):
        assert c.handle(FrameArrived(Frame(0, tick, schedule.slot_at(0, tick), b""))) == []
    out = c.handle(FrameArrived(Frame(0, 2, schedule.slot_at(0, 2), b"")))
    assert only(out, RejectFrame) and len(c.machine._inputs) == 2


def test_a_duplicate_frame_with_other_bytes_is_refused() -> None:
    c = StageCore("s1", 1, Schedule(2, 2), 2, frozenset({"a"}))
    c.handle(FrameArrived(Frame(0, 0, 0, b"x")))
    out = c.handle(FrameArrived(Frame(0, 0, 0, b"y")))
    (reject,) = only(out, RejectFrame)
    assert isinstance(reject, RejectFrame) and "two different frames" in reject.reason


def test_stage0_feeds_prompts_samples_at_the_sequence_position_and_streams_after_the_tick() -> None:
    c = StageCore("s0", 0, Schedule(1, 1), 1, frozenset({"a"}), journal=Journal(1, 32, 4))
    c.handle(ChipsReady(("a",), 0))
    assert c.handle(Halt()) == [] and c.handle(Resume(1, 0)) == []
    c.handle(ChipsReady(("a",), 1))
    (run,) = c.handle(Submit("r", (3, 4, 5), 2, Sampling(0.5, 9)))
    assert isinstance(run, Execute) and run.work is not None
    assert run.work.tokens == (3, 4, 5) and run.work.start_position == 0
    assert run.work.sample_index == 3, "the position of the token sampled (as the reference)"
    out = c.handle(TickExecuted(0, 1, token_payload(6)))
    (frame,) = only(out, SendFrame)
    assert isinstance(frame, SendFrame)
    (run,) = only(c.handle(FrameArrived(frame.frame)), Execute)
    assert isinstance(run, Execute) and run.work is not None
    assert run.work.tokens == (6,) and run.work.start_position == 3
    assert run.work.sample_index == 4
    out = c.handle(TickExecuted(1, 1, token_payload(7)))
    (streamed,) = only(out, StreamToken)  # the token of tick 1's input, after tick 1 ran
    assert isinstance(streamed, StreamToken) and streamed.event.token == 6


def test_stage0_is_idle_without_work() -> None:
    c = core(0)
    assert c.handle(AckArrived(-1, 0)) == []
    assert not c.executing


def test_temperatures_whose_softmax_cannot_be_computed_are_refused_changing_nothing() -> None:
    c = core(0)
    for temperature in (1e-310, float("nan"), float("inf"), -1.0, MIN_TEMPERATURE / 2):
        with pytest.raises(JournalError, match="temperature"):
            c.handle(Submit("r", (1,), 1, Sampling(temperature, 0)))
    assert c.journal is not None and c.journal.idle and not c.executing
    check_sampling(Sampling(MIN_TEMPERATURE, 0))
    with pytest.raises(ValueError, match="temperature"):
        sample_token(np.zeros(4, np.float32), Sampling(1e-310, 0), 0)


def test_a_failed_tick_stops_the_stage_and_ends_every_request_at_once() -> None:
    c = core(0)
    c.handle(Submit("a", (1,), 3))
    c.handle(Submit("b", (2,), 3))
    c.handle(Submit("c", (2,), 3))  # queued
    out = c.handle(TickFailed(0, 0, "TypeError: bad payload"))
    ends = only(out, EndRequest)
    assert sorted(e.request_id for e in ends if isinstance(e, EndRequest)) == ["a", "b", "c"]
    assert all(isinstance(e, EndRequest) and "TypeError" in e.reason for e in ends)
    assert only(out, ReportStop) and c.phase == "failed"
    with pytest.raises(Stopped):
        c.handle(Submit("d", (1,), 1))
    assert c.handle(Fail("again")) == [], "a stop is reported once"


def test_a_new_epoch_clears_the_stop_and_replays() -> None:
    c = core(0)
    c.handle(Submit("a", (1,), 3))
    c.handle(TickFailed(0, 0, "boom"))
    c.handle(Resume(1, 0))
    assert c.error == "" and c.phase == "barrier"
    c.handle(ChipsReady(("a", "b"), 1))
    c.handle(Submit("b", (1,), 1))
    (run,) = only(c.handle(TickExecuted(0, 0, b"")), Execute)  # the old epoch's tick ended
    assert isinstance(run, Execute) and run.epoch == 1


def test_a_tick_finished_after_a_halt_never_happened() -> None:
    c = core(1)
    c.handle(Halt())
    assert c.handle(TickExecuted(0, 0, b"x")) == []
    assert c.machine.next_tick == 0


def test_cancel_ends_the_stream_as_cancelled() -> None:
    c = core(0)
    c.handle(Submit("a", (1,), 3))
    out = c.handle(Cancel("a"))
    assert out == [EndRequest("a", "request 'a' was cancelled", True)]


def test_a_token_payload_that_is_not_a_token_is_refused() -> None:
    for payload in (b"\x01", token_payload(VOCAB), token_payload(1, VOCAB + 1)):
        c = core(0)
        c.handle(Submit("r", (1,), 2))
        c.handle(TickExecuted(0, 0, b"work"))  # tick 0 done: the ring may bring tick 1
        out = c.handle(FrameArrived(Frame(0, 1, 0, payload)))
        (reject,) = only(out, RejectFrame)
        assert isinstance(reject, RejectFrame) and reject.code is RejectCode.INVALID_ARGUMENT
        assert "token" in reject.reason


def test_ready_for_a_chip_outside_the_replica_is_refused_and_changes_nothing() -> None:
    c = StageCore("s1", 1, Schedule(2, 2), 2, frozenset({"a"}))
    with pytest.raises(ProtocolError, match="nope"):
        c.handle(ChipsReady(("a", "nope"), 0))
    assert c.phase == "barrier" and c.error == ""
