"""The plain checkpoint's commit points without a broker (mtc75/engine/checkpoint.py): what is due, when.

A point is due when an assignment's watermark moved, or its finished set (the offset map) grew, since its
last successful commit; a commit the broker refused is due again; an assignment that ended is forgotten.
The whole commit path with the topic-id gate runs against the fake cluster in tests/test_engine_unit.py.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from mtc75.core.offsets import OffsetTracker, PartitionState
from mtc75.engine.checkpoint import OffsetCheckpoint

TP = ("t", 0)


class Client:
    """What the checkpoint needs of KafkaClient: commits are recorded, never refused unless told."""

    down_since = None

    def __init__(self) -> None:
        self.sent: list[list[tuple[str, int, int, str]]] = []
        self.refuse: KafkaError | None = None

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> KafkaError | None:
        if self.refuse is not None:
            return self.refuse
        self.sent.append([(tp.topic, tp.partition, tp.offset, tp.metadata or "") for tp in offsets])
        return None

    def warn_rarely(self, err: KafkaError, text: str) -> None:
        pass


def _setup(offsets: list[int]) -> tuple[OffsetCheckpoint, Client, OffsetTracker, PartitionState]:
    tracker = OffsetTracker()
    tracker.assign([TP])
    state = tracker.state(TP)
    for o in offsets:
        assert tracker.admit(state, o)
    client = Client()
    checkpoint = OffsetCheckpoint(client, tracker, 0.0, lambda err: False, lambda topic, change, now: None)  # type: ignore[arg-type]
    return checkpoint, client, tracker, state


def _due(checkpoint: OffsetCheckpoint) -> list[tuple[Any, int]]:
    return [(point[0].tp, point[1]) for point in checkpoint.points()]


def test_each_moved_watermark_is_due_once() -> None:
    checkpoint, client, tracker, state = _setup([10, 11])
    assert _due(checkpoint) == []
    tracker.complete(state, 10)
    assert _due(checkpoint) == [(TP, 11)]
    checkpoint.tick(1.0)  # no topic watch: the periodic commit sends at once
    assert client.sent == [[("t", 0, 11, "")]] and _due(checkpoint) == []
    tracker.complete(state, 11)
    assert _due(checkpoint) == [(TP, 12)]
    assert checkpoint.committed(state) == 11


def test_before_the_first_contiguous_completion_the_point_is_the_oldest_in_flight_with_a_map() -> None:
    checkpoint, client, tracker, state = _setup([0, 1, 2])
    tracker.complete(state, 2)
    assert _due(checkpoint) == [(TP, 0)]  # 0 and 1 run; 2 goes in the map at offset 0
    checkpoint.commit_now(None, 0.0)
    assert client.sent[0][0][2] == 0 and client.sent[0][0][3].startswith("m1")
    assert _due(checkpoint) == []


def test_a_grown_done_set_is_due_though_the_position_did_not_move() -> None:
    checkpoint, client, tracker, state = _setup([0, 1, 2, 3])
    tracker.complete(state, 0)
    checkpoint.commit_now(None, 0.0)
    assert _due(checkpoint) == []
    tracker.complete(state, 3)  # position still 1, but the map changed
    assert _due(checkpoint) == [(TP, 1)]
    checkpoint.commit_now(None, 0.0)
    assert _due(checkpoint) == [] and len(client.sent) == 2


def test_a_refused_commit_is_due_again_and_an_ended_assignment_is_forgotten() -> None:
    checkpoint, client, tracker, state = _setup([0, 1])
    tracker.complete(state, 0)
    client.refuse = KafkaError(KafkaError.REQUEST_TIMED_OUT)
    checkpoint.commit_now(None, 0.0)
    assert _due(checkpoint) == [(TP, 1)] and checkpoint.committed(state) is None
    client.refuse = None
    checkpoint.commit_now(None, 0.0)
    assert checkpoint.committed(state) == 1
    checkpoint.on_commit(KafkaError(KafkaError.REQUEST_TIMED_OUT), [TopicPartition("t", 0, 1)])
    assert _due(checkpoint) == [(TP, 1)]  # an asynchronous commit failed: sent again next time
    tracker.revoke([TP])
    checkpoint.forget([state])
    assert _due(checkpoint) == [] and checkpoint.committed(state) is None


def test_after_a_halt_nothing_is_sent() -> None:
    checkpoint, client, tracker, state = _setup([0])
    tracker.complete(state, 0)
    checkpoint.halt()
    checkpoint.tick(1.0)
    checkpoint.commit_now(None, 0.0)
    assert client.sent == []
