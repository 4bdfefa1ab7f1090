"""When a bounded run ends (mtc75/core/bounds.py), without a broker and without a clock: times are passed in."""

from __future__ import annotations

from mtc75.core.bounds import Progress, RunBounds


def _p(processed: int = 0, in_flight: int = 0, delayed: int = 0, admitted_at: float = 0.0,
       finished_at: float = 0.0, blind: bool = False) -> Progress:
    return Progress(processed, in_flight, delayed, admitted_at, finished_at, blind)


def test_max_messages_ends_the_run_and_bounds_what_may_still_be_admitted() -> None:
    bounds = RunBounds(max_messages=10, idle_exit=None)
    assert bounds.budget(processed=3, in_flight=4) == 3  # finished and in flight both count
    assert bounds.budget(processed=6, in_flight=9) == 0
    assert bounds.ended(5.0, _p(processed=9)) is None
    assert bounds.ended(5.0, _p(processed=10)) == "handled 10 messages (max_messages reached)"
    assert RunBounds(None, None).budget(100, 100) is None


def test_idle_counts_from_the_first_assignment_and_from_the_last_message() -> None:
    bounds = RunBounds(max_messages=None, idle_exit=3.0)
    assert bounds.ended(100.0, _p()) is None  # no assignment yet: waiting for the group is not idle
    bounds.assigned(100.0)
    bounds.assigned(150.0)  # only the first counts
    assert bounds.ended(102.9, _p()) is None
    assert bounds.ended(103.0, _p()) == "no new message for 3.0s (idle_exit)"
    assert bounds.ended(104.0, _p(admitted_at=102.0)) is None  # a message 2 s ago


def test_a_blind_spell_is_not_idle_and_restarts_the_clock() -> None:
    bounds = RunBounds(None, 3.0)
    bounds.assigned(0.0)
    assert bounds.ended(10.0, _p(blind=True)) is None  # brokers down or a partition held: not idle
    assert bounds.ended(12.0, _p()) is None  # idle again from 10.0 only
    assert bounds.ended(13.0, _p()) is not None


def test_the_idle_clock_starts_when_a_long_blind_spell_ends_not_before() -> None:
    """The engine asks every loop turn: a spell of every broker down from 1 s to 10 s, then no message. The run
    may end ``idle_exit`` after the spell ended, never sooner (seen: 1 s after Kafka was reachable again)."""
    bounds = RunBounds(None, 3.0)
    bounds.assigned(0.0)
    for turn in range(10, 101):
        assert bounds.ended(turn / 10, _p(blind=True)) is None
    assert bounds.ended(12.9, _p()) is None
    assert bounds.ended(13.0, _p()) == "no new message for 3.0s (idle_exit)"


def test_running_handlers_keep_it_going_until_none_finished_for_as_long_but_retries_always_do() -> None:
    bounds = RunBounds(None, 3.0)
    bounds.assigned(0.0)
    assert bounds.ended(5.0, _p(in_flight=2, finished_at=4.0)) is None  # a handler finished 1 s ago
    assert bounds.ended(8.0, _p(in_flight=2, finished_at=4.0)) is not None  # hung for 4 s: ends
    assert bounds.ended(8.0, _p(in_flight=2, finished_at=4.0, delayed=1)) is None  # a retry will finish


def test_with_max_messages_admitted_handlers_that_finish_nothing_for_the_grace_end_the_run() -> None:
    """A hung handler among the N: the run ends once none finished for ``grace`` (shutdown bounds the rest)."""
    bounds = RunBounds(max_messages=5, idle_exit=None, grace=3.0)
    assert bounds.ended(10.0, _p(processed=4, in_flight=1, admitted_at=2.0, finished_at=8.0)) is None
    assert bounds.ended(11.0, _p(processed=4, in_flight=1, admitted_at=2.0, finished_at=8.0)) == (
        "handled 4 of max_messages 5; the other 1 finished nothing for 3.0s")
    assert bounds.ended(11.0, _p(processed=4, in_flight=1, admitted_at=9.0, finished_at=1.0)) is None  # just admitted
    assert bounds.ended(20.0, _p(processed=4, in_flight=1, delayed=1)) is None  # a retry will finish
    assert bounds.ended(20.0, _p(processed=3, in_flight=1)) is None  # not all admitted: more will come
