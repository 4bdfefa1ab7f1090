"""Retry policy and delay queue without a broker: attempt counting, capped exponential backoff, jitter."""

from __future__ import annotations

import pytest

from mtc75.core.retry import DelayQueue, RetryPolicy


def test_attempts_are_counted_up_to_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, base=0.1, cap=1.0)
    assert [policy.should_retry(n) for n in (1, 2, 3, 4)] == [True, True, False, False]
    assert not RetryPolicy(max_attempts=1, base=0.1, cap=1.0).should_retry(1)


def test_backoff_doubles_and_is_capped_without_jitter() -> None:
    policy = RetryPolicy(max_attempts=10, base=0.1, cap=1.0, jitter=0.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.delay(10_000) == 1.0  # a huge attempt number neither overflows nor passes the cap


@pytest.mark.parametrize(("rand", "factor"), [(0.0, 1.0), (1.0, 0.5), (0.5, 0.75)])
def test_jitter_scales_the_delay_within_its_bounds(rand: float, factor: float) -> None:
    policy = RetryPolicy(max_attempts=5, base=0.4, cap=10.0, jitter=0.5, rand=lambda: rand)
    assert policy.delay(2) == pytest.approx(0.8 * factor)


def test_real_jitter_stays_between_half_and_full_delay() -> None:
    policy = RetryPolicy(max_attempts=5, base=1.0, cap=10.0)
    delays = {policy.delay(3) for _ in range(200)}
    assert all(2.0 <= d <= 4.0 for d in delays)
    assert len(delays) > 1  # really jittered


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_attempts": 0}, "max_attempts must be >= 1, got 0"),
        ({"base": -1.0}, "base must be >= 0"),
        ({"cap": -1.0}, "cap must be >= 0"),
        ({"jitter": 2.0}, "jitter must be between 0 and 1"),
    ],
)
def test_bad_policy_arguments_are_precise_errors(kwargs: dict[str, float], fragment: str) -> None:
    args: dict[str, float] = {"max_attempts": 3, "base": 0.1, "cap": 1.0, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        RetryPolicy(**args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        RetryPolicy(3, 0.1, 1.0).delay(0)


def test_delay_queue_releases_items_in_due_order_only_when_due() -> None:
    queue: DelayQueue[str] = DelayQueue()
    queue.push(5.0, "late")
    queue.push(1.0, "early")
    queue.push(1.0, "early-too")  # same due time: insertion order, items never compared
    assert len(queue) == 3 and queue.next_due() == 1.0
    assert queue.pop_due(0.5) == []
    assert queue.pop_due(1.0) == ["early", "early-too"]
    assert queue.next_due() == 5.0
    assert queue.pop_due(10.0) == ["late"]
    assert len(queue) == 0 and queue.next_due() is None


def test_delay_queue_remove_if_keeps_the_rest_ordered() -> None:
    queue: DelayQueue[int] = DelayQueue()
    for due, item in [(3.0, 3), (1.0, 1), (2.0, 2), (4.0, 4)]:
        queue.push(due, item)
    assert sorted(queue.remove_if(lambda i: i % 2 == 0)) == [2, 4]
    assert sorted(queue.items()) == [1, 3]
    assert queue.pop_due(10.0) == [1, 3]
