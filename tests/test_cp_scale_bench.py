"""The heartbeat-to-state lag of `bench.cp_scale`: each beat's lag is from its send to the
first read of the store that shows it (or a later beat) for its node."""

from __future__ import annotations

import pytest

from bench.cp_scale import _lag


def test_lag_is_from_each_send_to_the_first_poll_that_shows_it() -> None:
    sends = {"a": [10.0, 11.0], "b": [10.5]}
    polls = [
        (10.05, {"a": 9.0, "b": 9.0}),
        (10.2, {"a": 10.01, "b": 9.0}),  # a's first beat (received at 10.01) shows at 10.2
        (10.9, {"a": 10.01, "b": 10.6}),  # b's shows at 10.9
        (11.3, {"a": 11.02, "b": 10.6}),  # a's second at 11.3
        (14.0, {"a": 11.02, "b": 10.6}),  # the last poll: beats after 12.0 are left out
    ]
    found = _lag(sends, polls)
    assert found["beats"] == 3 and found["unseen"] == 0
    assert found["max_ms"] == pytest.approx(400.0)
    assert found["p50_ms"] == pytest.approx(300.0)


def test_a_beat_no_poll_shows_is_counted_unseen() -> None:
    found = _lag({"a": [10.0]}, [(10.5, {"a": 9.0}), (13.0, {"a": 9.0})])
    assert found == {"beats": 0, "unseen": 1}
