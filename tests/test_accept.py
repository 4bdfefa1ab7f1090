"""The poll thread's intake and settling without a broker: the ledger (mtc75/engine/ledger.py).

Fetched messages become Works per partition run, in fetch order, each with its own assignment; finished
Works move the watermark; a completion of an assignment that ended is dropped as late.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from confluent_kafka import KafkaError, Message

from mtc75.core.work import Work
from mtc75.engine.ledger import Ledger


def _ledger(partitions: list[tuple[str, int]], errors: list[int] | None = None) -> Ledger:
    ledger = Ledger(lambda msg: (errors if errors is not None else []).append(msg.error().code()))
    ledger.tracker.assign(partitions)
    return ledger


def _msgs(*spec: tuple[str, int, int]) -> list[Any]:
    return [Message(topic=t, partition=p, offset=o, value=b"v") for t, p, o in spec]


def _singles(works: list[Work]) -> list[Work]:
    return [single for work in works for single in work.split(1)]


def test_runs_of_partitions_and_topics_keep_fetch_order_and_their_own_state() -> None:
    ledger = _ledger([("t", 0), ("t", 1), ("u", 0)])
    works = _singles(ledger.admit(
        _msgs(("t", 0, 0), ("t", 0, 1), ("t", 1, 7), ("u", 0, 3), ("t", 0, 2), ("t", 1, 8))))
    assert [(w.state.tp, w.offset) for w in works] == [
        (("t", 0), 0), (("t", 0), 1), (("t", 1), 7), (("u", 0), 3), (("t", 0), 2), (("t", 1), 8),
    ]
    assert [w.message.offset() for w in works] == [w.offset for w in works]
    assert list(ledger.tracker.state(("t", 0)).pending) == [0, 1, 2]
    assert list(ledger.tracker.state(("u", 0)).pending) == [3]
    assert ledger.touched == {("t", 0), ("t", 1), ("u", 0)}


def test_unowned_partitions_and_redeliveries_are_not_queued_twice() -> None:
    ledger = _ledger([("t", 0)])
    first = _singles(ledger.admit(_msgs(("t", 0, 0), ("t", 0, 1), ("t", 5, 0))))  # partition 5 is not ours
    again = _singles(ledger.admit(_msgs(("t", 0, 1), ("t", 0, 2))))  # 1 is still in flight
    assert [w.offset for w in first + again] == [0, 1, 2]
    assert list(ledger.tracker.state(("t", 0)).pending) == [0, 1, 2]


def test_completions_move_the_watermark_and_count() -> None:
    ledger = _ledger([("t", 0)])
    works = _singles(ledger.admit(_msgs(("t", 0, 0), ("t", 0, 1), ("t", 0, 2))))
    assert ledger.settle(deque([works[1], works[0]])) == 2
    assert ledger.processed == 2
    assert ledger.tracker.state(("t", 0)).position == 2
    ledger.tracker.revoke([("t", 0)])
    assert ledger.settle(deque([works[2]])) == 0  # finished after its partition was revoked
    assert ledger.processed == 2 and ledger.dropped_late == 1


def test_each_partition_run_becomes_one_work_of_consecutive_offsets() -> None:
    ledger = _ledger([("t", 0), ("t", 1)])
    works = ledger.admit(_msgs(*[("t", 0, o) for o in range(5)], *[("t", 1, o) for o in range(10, 13)], ("t", 0, 5)))
    assert [(w.state.tp, w.offset, w.size) for w in works] == [(("t", 0), 0, 5), (("t", 1), 10, 3), (("t", 0), 5, 1)]
    assert [m.offset() for m in works[0].messages] == [0, 1, 2, 3, 4]


def test_an_error_event_among_the_messages_is_handled_in_place_and_the_runs_around_it_are_kept() -> None:
    seen: list[int] = []
    ledger = _ledger([("t", 0)], seen)
    eof = Message(topic="t", partition=0, offset=2, error=KafkaError(KafkaError._PARTITION_EOF))
    works = _singles(ledger.admit([*_msgs(("t", 0, 0), ("t", 0, 1)), eof, *_msgs(("t", 0, 2), ("t", 0, 3))]))
    assert seen == [KafkaError._PARTITION_EOF]
    assert [w.offset for w in works] == [0, 1, 2, 3]
    assert list(ledger.tracker.state(("t", 0)).pending) == [0, 1, 2, 3]


def test_a_failure_or_a_dropped_work_of_an_assignment_being_given_up_is_abandoned_not_failed() -> None:
    ledger = _ledger([("t", 0)])
    works = _singles(ledger.admit(_msgs(("t", 0, 0), ("t", 0, 1), ("t", 0, 2))))
    state = ledger.tracker.state(("t", 0))
    state.closing = True  # a revoke in progress (Dispatcher.retire)
    works[0].failed = True  # its last attempt failed while the revoke waited
    works[1].failed = works[1].dropped = True  # the rest of a chunk cut short, never run
    ledger.settle(deque(works))
    assert ledger.failed == 0 and ledger.failure.skipped == 0  # not this consumer's failure
    assert state.abandoned == {0, 1} and state.position is None  # the watermark stays below them
    assert ledger.tracker.outstanding(("t", 0)) == []  # a revoke does not wait for them
