"""PauseGate: pause only when saturated, stay paused an interval, never idle the pool."""

from __future__ import annotations

import pytest

from mtc75.core.gate import Load, PauseGate, Verdict


def test_no_pause_while_a_thread_is_free_or_backlog_is_short() -> None:
    gate = PauseGate(pause_interval=1.0, max_backlog=1000)
    low, high = gate.watermarks(limit=4)
    assert (low, high) == (4, 8)  # before any throughput is known
    assert gate.verdict(Load(active=3, limit=4, backlog=100, ready=100, delayed=0)) is Verdict.RUN
    assert gate.verdict(Load(active=4, limit=4, backlog=high - 1, ready=high - 1, delayed=0)) is Verdict.RUN
    assert gate.verdict(Load(active=4, limit=4, backlog=high, ready=high, delayed=0)) is Verdict.PAUSE_UNLESS_DRAINED


def test_the_gate_decides_the_whole_pause_free_threads_with_nothing_to_start_and_retries_alone() -> None:
    gate = PauseGate(pause_interval=1.0, max_backlog=1000)
    high = gate.watermarks(limit=4)[1]
    # ordered modes: a full backlog behind busy keys, the free threads may start only 1 of it
    assert gate.verdict(Load(active=2, limit=4, backlog=high, ready=1, delayed=0)) is Verdict.PAUSE_UNLESS_DRAINED
    assert gate.verdict(Load(active=2, limit=4, backlog=high, ready=3, delayed=0)) is Verdict.RUN
    # retries waiting out their backoff fill the backlog: the pool cannot drain it, pause at once
    assert gate.verdict(Load(active=0, limit=4, backlog=high, ready=0, delayed=high)) is Verdict.PAUSE
    # retries waiting out a backoff hold no thread: others are fetched for the pool, up to MAX_BACKLOG
    assert gate.verdict(Load(active=0, limit=4, backlog=high, ready=0, delayed=high, retrying=high)) is Verdict.RUN
    assert gate.verdict(Load(active=0, limit=4, backlog=gate.max_backlog, ready=0, delayed=gate.max_backlog,
                             retrying=gate.max_backlog)) is Verdict.PAUSE
    gate.start_pause(now=0.0)
    assert gate.verdict(Load(active=4, limit=4, backlog=high, ready=high, delayed=0)) is Verdict.RUN  # already


def test_pause_ends_when_the_backlog_drains_to_the_low_watermark() -> None:
    gate = PauseGate(pause_interval=1.0, max_backlog=1000)
    gate.start_pause(now=10.0)
    assert gate.pauses == 1
    assert not gate.should_resume(now=10.5, limit=4, backlog=5)  # above low (4): stay
    assert gate.should_resume(now=10.9, limit=4, backlog=4)  # drained: resume, even mid-interval
    assert gate.end_pause(now=10.9) == pytest.approx(0.9)
    assert gate.paused_seconds == pytest.approx(0.9)
    assert not gate.paused
    assert not gate.should_resume(now=11.0, limit=4, backlog=0)  # not paused: nothing to resume


def test_still_saturated_after_an_interval_stays_paused_another_interval() -> None:
    gate = PauseGate(pause_interval=1.0, max_backlog=1000)
    gate.start_pause(now=0.0)
    assert not gate.should_resume(now=0.5, limit=4, backlog=50)
    assert gate.extensions == 0
    assert not gate.should_resume(now=1.0, limit=4, backlog=50)
    assert gate.extensions == 1
    assert gate.next_check_in(now=1.2) == pytest.approx(0.8)
    assert not gate.should_resume(now=3.5, limit=4, backlog=50)
    assert gate.extensions == 3  # intervals ending at 1, 2 and 3 s
    assert gate.should_resume(now=3.6, limit=4, backlog=0)


def test_watermarks_follow_throughput_and_respect_the_cap() -> None:
    gate = PauseGate(pause_interval=0.5, max_backlog=3000)
    gate.observe(0.0, 0)
    gate.observe(1.0, 2000)  # 2000 msg/s
    assert gate.rate == pytest.approx(2000)
    low, high = gate.watermarks(limit=10)
    assert low == 100  # 50 ms of work to bridge the refetch
    assert high == 1100  # plus one pause interval of work
    gate.observe(2.0, 12000)  # 10 000 msg/s now -> smoothed 6000
    assert gate.rate == pytest.approx(6000)
    assert gate.watermarks(limit=10) == (300, 3000)  # high capped by max_backlog; low 50 ms of 6000/s
    small = PauseGate(pause_interval=0.5, max_backlog=200)
    small.observe(0.0, 0)
    small.observe(1.0, 6000)
    # max_backlog below 50 ms of work: the low watermark is capped too (a low one above the high one would
    # end each pause the moment it began)
    assert small.watermarks(limit=10) == (200, 200)


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="pause_interval must be > 0"):
        PauseGate(pause_interval=0, max_backlog=10)
    with pytest.raises(ValueError, match="max_backlog must be >= 1"):
        PauseGate(pause_interval=1, max_backlog=0)


def test_a_reserve_raises_the_low_watermark_but_never_to_the_high_one() -> None:
    gate = PauseGate(pause_interval=0.5, max_backlog=5000)
    gate.observe(0.0, 0)
    gate.observe(1.0, 200)  # 200 msg/s
    assert gate.rate == 200 and gate.watermarks(8) == (10, 110)
    gate.reserve = 100  # MAX_RATE=200 holding messages back: half a second of tokens kept at a resume
    assert gate.watermarks(8) == (100, 200)
    gate.reserve = 10**6  # a reserve past the bound: at most half of it, so pause and resume stay apart
    low, high = gate.watermarks(8)
    assert low == 2500 and high == 2600
