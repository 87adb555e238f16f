"""Stage 0's journal: admission, continuous batching, bounds, replay."""

from __future__ import annotations

import pytest

from agents.journal import Journal, JournalError, QueueFull


def test_prefill_then_decode_then_free_slot_for_next() -> None:
    j = Journal(slots=1, max_context=64, queue_limit=4)
    j.submit("a", (1, 2, 3), max_tokens=2)
    j.submit("b", (9,), max_tokens=1)
    feed = j.feed(0)
    assert feed is not None and feed.prefill and feed.tokens == (1, 2, 3)
    assert feed.start_position == 0 and feed.sample_index == 3
    assert j.feed(0) is None, "waiting for the token: bubble"
    event = j.on_token(0, 7)
    assert (event.request_id, event.token, event.index, event.finished) == ("a", 7, 0, False)
    feed = j.feed(0)
    assert feed is not None and not feed.prefill
    assert feed.tokens == (7,) and feed.start_position == 3 and feed.sample_index == 4
    assert j.on_token(0, 8).finished
    feed = j.feed(0)
    assert feed is not None and feed.request_id == "b" and feed.prefill
    assert j.on_token(0, 5).finished and j.idle


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"request_id": "", "prompt": (1,), "max_tokens": 1}, "request_id"),
        ({"request_id": "x", "prompt": (), "max_tokens": 1}, "prompt is empty"),
        ({"request_id": "x", "prompt": (1,), "max_tokens": 0}, "max_tokens must be at least 1"),
        ({"request_id": "x", "prompt": (1,) * 10, "max_tokens": 7}, "exceeds maxContext 16"),
        (
            {"request_id": "x", "prompt": (99,), "max_tokens": 1, "vocab_size": 50},
            "outside the vocabulary",
        ),
        ({"request_id": "x", "prompt": (1,), "max_tokens": 1, "temperature": -1.0}, "temperature"),
    ],
)
def test_bad_requests(kwargs: dict[str, object], fragment: str) -> None:
    j = Journal(slots=2, max_context=16, queue_limit=2)
    with pytest.raises(JournalError, match=fragment):
        j.submit(**kwargs)  # type: ignore[arg-type]


def test_duplicate_live_id_refused_but_reusable_after_finish() -> None:
    j = Journal(slots=1, max_context=16, queue_limit=2)
    j.submit("a", (1,), 1)
    with pytest.raises(JournalError, match="already in flight"):
        j.submit("a", (1,), 1)
    j.feed(0)
    j.on_token(0, 3)
    j.submit("a", (1,), 1)


def test_queue_is_bounded() -> None:
    j = Journal(slots=2, max_context=16, queue_limit=1)
    j.submit("a", (1,), 3)
    j.submit("b", (1,), 3)  # both fit the free slots
    j.submit("c", (1,), 3)  # queued: one waiting
    with pytest.raises(QueueFull, match="queue limit 1"):
        j.submit("d", (1,), 3)


def test_replay_reprefills_prompt_and_tokens_in_slot_order() -> None:
    j = Journal(slots=2, max_context=32, queue_limit=4)
    j.submit("a", (1, 2), 5)
    j.submit("b", (3,), 5)
    j.submit("c", (4,), 5)
    j.feed(0), j.feed(1)
    j.on_token(0, 10)
    j.on_token(1, 20)
    j.feed(0)  # a's decode in flight when the pipeline fails
    replayed = j.replay()
    assert [e.request_id for e in replayed] == ["a", "b"]
    first = j.feed(1)
    assert first is not None and first.request_id == "a" and first.prefill
    assert first.tokens == (1, 2, 10) and first.sample_index == 3
    second = j.feed(0)
    assert second is not None and second.request_id == "b" and second.tokens == (3, 20)
    third = j.feed(2)
    assert third is not None and third.request_id == "c"


def test_token_for_idle_slot_is_an_error_and_cancel_frees() -> None:
    j = Journal(slots=1, max_context=16, queue_limit=2)
    with pytest.raises(JournalError, match="awaits none"):
        j.on_token(0, 1)
    j.submit("a", (1,), 4)
    j.submit("b", (2,), 4)
    assert j.cancel("b") and j.queued == 1
    j.feed(0)
    assert j.cancel("a")
    j.drop_cancelled(0)
    assert j.idle and not j.cancel("zzz")


def test_eos_finishes_early() -> None:
    j = Journal(slots=1, max_context=16, queue_limit=1, eos_token_id=2)
    j.submit("a", (1,), 8)
    j.feed(0)
    assert j.on_token(0, 2).finished


def test_a_cancelled_requests_token_is_dropped_when_it_comes_back() -> None:
    from agents.journal import Journal

    journal = Journal(slots=1, max_context=16, queue_limit=1)
    journal.submit("a", (1, 2), 3)
    feed = journal.feed(0)
    assert feed is not None and feed.prefill
    assert journal.cancel("a") and journal.cancelled(0) and not journal.idle
    journal.drop_cancelled(0)
    assert not journal.cancelled(0) and journal.idle
