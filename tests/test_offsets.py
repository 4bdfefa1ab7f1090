"""OffsetTracker: only the contiguous completed prefix is committable."""

from __future__ import annotations

from mtc75.core.offsets import OffsetTracker, PartitionState, Pending

TP = ("t", 0)


def _add(tracker: OffsetTracker, tp: tuple[str, int], offset: int) -> PartitionState | None:
    """Admit one fetched offset as the ledger does; its state, or None (not ours, or a redelivery)."""
    state = tracker.get(tp)
    return state if state is not None and tracker.admit(state, offset) else None


def _pos(tracker: OffsetTracker) -> int | None:
    return tracker.state(TP).position


def _tracker(offsets: list[int]) -> tuple[OffsetTracker, dict[int, PartitionState]]:
    tracker = OffsetTracker()
    tracker.assign([TP])
    states = {}
    for o in offsets:
        state = _add(tracker, TP, o)
        assert state is not None
        states[o] = state
    return tracker, states


def test_out_of_order_completion_commits_only_contiguous_prefix() -> None:
    tracker, states = _tracker([0, 1, 2, 3])
    assert _pos(tracker) is None
    tracker.complete(states[2], 2)
    tracker.complete(states[1], 1)
    assert _pos(tracker) is None  # 0 still running: nothing is safe to commit
    tracker.complete(states[0], 0)
    assert _pos(tracker) == 3  # 0,1,2 done -> next to read is 3
    assert tracker.outstanding(TP) == [3]
    tracker.complete(states[3], 3)
    assert _pos(tracker) == 4
    assert tracker.in_flight() == 0


def test_gaps_in_offsets_do_not_block_the_watermark() -> None:
    # compaction or transaction markers leave holes: 5 follows 1
    tracker, states = _tracker([0, 1, 5, 6])
    for o in (6, 5, 0):
        tracker.complete(states[o], o)
    assert _pos(tracker) == 1
    tracker.complete(states[1], 1)
    assert _pos(tracker) == 7


def test_late_completion_after_revoke_is_dropped() -> None:
    tracker, states = _tracker([0, 1])
    tracker.revoke([TP])
    assert TP not in tracker
    assert tracker.complete(states[0], 0) is False


def test_completion_from_an_earlier_assignment_does_not_touch_the_new_one() -> None:
    tracker, states = _tracker([0, 1])
    tracker.revoke([TP])
    tracker.assign([TP])
    new = _add(tracker, TP, 0)
    assert new is not None
    assert tracker.complete(states[0], 0) is False  # the old assignment's handler finished late
    assert _pos(tracker) is None
    assert tracker.outstanding(TP) == [0]


def test_unowned_partition_and_redelivered_offsets_are_refused() -> None:
    tracker, states = _tracker([3, 4])
    assert _add(tracker, ("t", 9), 0) is None
    assert _add(tracker, TP, 4) is None  # already in flight
    tracker.complete(states[3], 3)
    tracker.complete(states[4], 4)
    assert _add(tracker, TP, 4) is None  # already completed
    assert _add(tracker, TP, 5) is not None


def test_duplicate_completion_is_harmless() -> None:
    tracker, states = _tracker([0, 1, 2])
    tracker.complete(states[1], 1)
    tracker.complete(states[1], 1)
    assert tracker.in_flight() == 2
    tracker.complete(states[0], 0)
    tracker.complete(states[0], 0)
    assert _pos(tracker) == 2
    assert tracker.in_flight() == 1


def test_abandoned_offsets_are_not_waited_for_and_block_the_watermark() -> None:
    tracker, states = _tracker([0, 1, 2, 3])
    tracker.abandon(states[2], 2)
    tracker.abandon(states[3], 3)
    assert tracker.outstanding(TP) == [0, 1]
    assert tracker.in_flight() == 2
    tracker.complete(states[0], 0)
    tracker.complete(states[1], 1)
    assert tracker.outstanding(TP) == []
    assert tracker.in_flight() == 0
    assert _pos(tracker) == 2  # never past a message that did not run


def test_admit_range_takes_a_contiguous_run_in_one_step() -> None:
    tracker = OffsetTracker()
    tracker.assign([TP])
    state = tracker.state(TP)
    assert tracker.admit_range(state, [0, 1, 2]) is None
    assert tracker.admit_range(state, [3, 4]) is None
    assert list(state.pending) == [0, 1, 2, 3, 4]


def test_admit_range_skips_offsets_already_in_flight_or_completed() -> None:
    tracker = OffsetTracker()
    tracker.assign([TP])
    state = tracker.state(TP)
    assert tracker.admit_range(state, [0, 1, 2]) is None
    # a redelivery overlapping what is in flight: only the new offsets are admitted
    assert tracker.admit_range(state, [1, 2, 3, 4]) == [False, False, True, True]
    for o in range(5):
        tracker.complete(state, o)
    assert state.position == 5 and not state.pending
    # after completion the floor is the watermark: 3 and 4 are done, 5 is new
    assert tracker.admit_range(state, [3, 4, 5]) == [False, False, True]
    assert list(state.pending) == [5]


def test_admit_range_with_gaps_or_disorder_goes_offset_by_offset() -> None:
    tracker = OffsetTracker()
    tracker.assign([TP])
    state = tracker.state(TP)
    assert tracker.admit_range(state, [0, 1, 5, 6]) == [True, True, True, True]  # compaction holes
    assert tracker.admit_range(state, [9, 8, 10]) == [True, False, True]  # 8 after 9: not ascending
    assert list(state.pending) == [0, 1, 5, 6, 9, 10]


# -- offset map (issue 9) -----------------------------------------------------------------------------


def _mapped(committed: int, ranges: list[tuple[int, int]]) -> tuple[OffsetTracker, object]:
    from mtc75.core.offsetmap import FinishedOffsets

    tracker = OffsetTracker()
    tracker.assign([TP], {TP: FinishedOffsets(committed, ranges)})
    return tracker, tracker.state(TP)


def test_mapped_offsets_complete_at_once_and_the_rest_run() -> None:
    tracker, state = _mapped(10, [(12, 14), (16, 17)])  # 12, 13, 16 finished under the earlier owner
    ran = []
    for o in range(10, 19):
        assert tracker.admit(state, o)
        if not tracker.skip_finished(state, o):
            ran.append(o)
    assert ran == [10, 11, 14, 15, 17, 18]
    assert state.finished is None  # dropped once an offset at or past its end (17) was admitted
    assert _pos(tracker) is None  # 10 still runs: the map never moves the watermark past it
    for o in (10, 11, 14, 15):
        tracker.complete(state, o)
    assert _pos(tracker) == 17
    assert tracker.outstanding(TP) == [17, 18]


def test_no_map_runs_everything_and_a_redelivery_below_the_map_is_not_skipped() -> None:
    tracker, states = _tracker([5, 6])
    assert not tracker.skip_finished(states[5], 5) and not tracker.skip_finished(states[6], 6)
    tracker2, state = _mapped(10, [(12, 13)])
    tracker2.admit(state, 11)
    assert not tracker2.skip_finished(state, 11)  # 11 is not in the map


def test_span_is_next_offset_minus_first_unfinished() -> None:
    tracker, states = _tracker([3, 4, 5, 9])
    state = tracker.state(TP)
    assert tracker.span(state) == (3, 10)
    tracker.complete(states[3], 3)
    assert tracker.span(state) == (4, 10)
    for o in (4, 5, 9):
        tracker.complete(states[o], o)
    assert tracker.span(state) == (10, 10)


def test_step_over_moves_an_idle_partition_past_records_no_handler_gets() -> None:
    # a transaction of 0..2 and its marker at 3: the client's position is 4 once it read the marker
    tracker, states = _tracker([0, 1, 2])
    state = tracker.state(TP)
    tracker.complete(states[0], 0)
    tracker.complete(states[2], 2)
    assert not tracker.step_over(state, 4)  # 1 still running: never past it
    assert _pos(tracker) == 1
    tracker.complete(states[1], 1)
    assert _pos(tracker) == 3
    assert not tracker.step_over(state, None) and not tracker.step_over(state, 3)  # unknown, or nothing to step
    assert not tracker.step_over(state, 2)  # never backwards
    assert tracker.step_over(state, 4)
    assert tracker.watermark(state) == 4  # the commit point
    assert _add(tracker, TP, 3) is None  # the marker's offset is never handed out afterwards
    assert _add(tracker, TP, 4) is not None  # the next transaction's first record is
    assert not tracker.step_over(state, 9)  # and in flight again: nothing moves


def test_step_over_with_nothing_handed_out_since_the_assignment() -> None:
    # the committed offset pointed at a marker: the client read only that
    tracker = OffsetTracker()
    tracker.assign([TP])
    assert tracker.step_over(tracker.state(TP), 8)
    assert tracker.watermark(tracker.state(TP)) == 8


def test_pending_keeps_runs_and_reads_as_its_offsets() -> None:
    pending = Pending()
    assert not pending and len(pending) == 0
    pending.add(0, 3)
    pending.add(3, 2)  # follows on: the same run
    pending.add(7)  # a gap: a new run
    pending.add(8, 2)
    assert repr(pending) == "Pending([(0, 5), (7, 10)])"
    assert list(pending) == [0, 1, 2, 3, 4, 7, 8, 9] and len(pending) == 8
    assert (pending[0], pending[-1], pending[5]) == (0, 9, 7)
    assert not pending.pop_head(1, 2)  # not the oldest: refused, nothing removed
    assert not pending.pop_head(0, 6)  # longer than the head run
    assert pending.pop_head(0, 2) and list(pending) == [2, 3, 4, 7, 8, 9]
    assert pending.popleft() == 2
    done = {3, 4, 7, 9}
    assert pending.pop_done(done) == 7  # 3, 4, then across the gap 7; 8 is not done
    assert list(pending) == [8, 9] and done == {9} and len(pending) == 2
    assert pending.pop_done(done) is None
    assert pending.popleft() == 8 and pending.pop_done(done) == 9 and not pending and not done


def test_complete_range_above_the_oldest_waits_for_it_then_the_watermark_passes_all() -> None:
    tracker = OffsetTracker()
    tracker.assign([TP])
    state = tracker.state(TP)
    assert tracker.admit_range(state, list(range(10))) is None
    assert tracker.complete_range(state, 4, 3)  # 4-6 while 0 runs: done, no commit yet
    assert state.position is None and state.done == {4, 5, 6}
    assert tracker.complete_range(state, 0, 4)  # the oldest chunk: the watermark passes it and 4-6
    assert state.position == 7 and not state.done and list(state.pending) == [7, 8, 9]
    assert tracker.complete_range(state, 8, 2) and state.position == 7  # 7 still runs
    tracker.complete(state, 7)
    assert state.position == 10 and not state.pending
    assert tracker.outstanding(TP) == []
