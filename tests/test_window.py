"""WindowHolds: a partition whose span reaches the bound is held alone; the gate's pauses are respected."""

from __future__ import annotations

from mtc75.core.offsets import OffsetTracker
from mtc75.core.window import WindowHolds

A, B = ("t", 0), ("t", 1)


def _tracker() -> OffsetTracker:
    tracker = OffsetTracker()
    tracker.assign([A, B])
    return tracker


def _take(tracker: OffsetTracker, tp: tuple[str, int], offsets: range) -> None:
    for o in offsets:
        assert tracker.admit(tracker.state(tp), o)


def test_a_stuck_partition_is_held_alone_and_released_with_hysteresis() -> None:
    tracker, holds = _tracker(), WindowHolds(100)
    _take(tracker, A, range(0, 100))  # 0 stuck, 1..99 done: span 100
    for o in range(1, 100):
        tracker.complete(tracker.state(A), o)
    _take(tracker, B, range(0, 50))
    assert holds.update(tracker, set()) == ([A], [])
    assert A in holds and B not in holds
    assert holds.update(tracker, set()) == ([], [])  # already held: no second pause
    tracker.complete(tracker.state(A), 0)  # the stuck one finished: span 0
    assert holds.update(tracker, set()) == ([], [A])
    assert A not in holds


def test_released_only_below_resume_at() -> None:
    tracker, holds = _tracker(), WindowHolds(8)  # resume at 6
    _take(tracker, A, range(0, 8))
    holds.update(tracker, set())
    state = tracker.state(A)
    tracker.complete(state, 0)
    tracker.complete(state, 1)  # span 6: released
    tracker2, holds2 = _tracker(), WindowHolds(8)
    _take(tracker2, A, range(0, 8))
    holds2.update(tracker2, set())
    tracker2.complete(tracker2.state(A), 0)  # span 7 > 6: still held
    assert holds2.update(tracker2, set()) == ([], [])
    assert holds.update(tracker, set()) == ([], [A])


def test_the_gate_paused_partitions_are_neither_paused_again_nor_resumed() -> None:
    tracker, holds = _tracker(), WindowHolds(10)
    _take(tracker, A, range(0, 10))
    assert holds.update(tracker, {A, B}) == ([], [])  # held, but the gate's pause already stops it
    assert A in holds
    tracker.complete(tracker.state(A), 0)
    for o in range(1, 10):
        tracker.complete(tracker.state(A), o)
    assert holds.update(tracker, {A, B}) == ([], [])  # released, but the gate resumes it, not the window
    assert A not in holds


def test_revoked_or_reassigned_partitions_are_forgotten() -> None:
    tracker, holds = _tracker(), WindowHolds(5)
    _take(tracker, A, range(0, 5))
    holds.update(tracker, set())
    assert holds.forget([A, B]) == [A]  # the revoke resumes A
    assert A not in holds
    tracker.revoke([A])
    _take(tracker, B, range(0, 5))
    holds.update(tracker, set())
    tracker.revoke([B])
    assert holds.update(tracker, set()) == ([], [])  # not ours any more: dropped without a resume
    assert len(holds) == 0


def test_only_partitions_that_took_offsets_are_checked_for_a_new_hold() -> None:
    tracker, holds = _tracker(), WindowHolds(10)
    _take(tracker, A, range(0, 10))  # span 10: at the bound
    _take(tracker, B, range(0, 10))
    assert holds.update(tracker, set(), admitted={B}) == ([B], [])  # A took nothing since: not scanned
    assert holds.update(tracker, set(), admitted={A}) == ([A], [])
    tracker.complete(tracker.state(B), 0)
    for o in range(1, 10):
        tracker.complete(tracker.state(B), o)
    assert holds.update(tracker, set(), admitted=()) == ([], [B])  # held ones are re-checked every time
