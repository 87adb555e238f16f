"""The agent tests' thread helper: a thread's exception or a stuck thread fails the test."""

from __future__ import annotations

import threading

import pytest
from agent_helpers import run_in_threads


def test_exceptions_in_threads_are_re_raised() -> None:
    def work(i: int) -> None:
        if i == 2:
            raise ValueError("thread 2 failed")

    with pytest.raises(ValueError, match="thread 2 failed"):
        run_in_threads(work, [(i,) for i in range(4)])


def test_a_thread_still_running_fails() -> None:
    release = threading.Event()
    try:
        with pytest.raises(AssertionError, match="still running"):
            run_in_threads(release.wait, [(30,)], timeout=0.2)
    finally:
        release.set()


def test_all_threads_finish() -> None:
    done: list[int] = []
    run_in_threads(done.append, [(i,) for i in range(5)])
    assert sorted(done) == list(range(5))
