"""The poll thread's intake without a broker: fetched messages become work per partition run."""

from __future__ import annotations

from typing import Any

from confluent_kafka import KafkaError, Message

from mtc75.core.work import Work
from mtc75.engine.consumer import Mtc75Consumer
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.settings import Settings


def _engine(partitions: list[tuple[str, int]]) -> tuple[Mtc75Consumer, list[Any]]:
    """An engine whose pool only records what it is given, one entry per message (runs split)."""
    engine = Mtc75Consumer(Settings().replace(TOPIC="t"), lambda _m: None)
    dispatcher = Dispatcher(lambda _m: None, 1)
    queued: list[Any] = []

    def capture(items: list[Work]) -> None:
        for work in items:
            queued.extend(work.split(1))

    dispatcher.put = capture  # type: ignore[method-assign]  # capture what the pool would get
    engine._dispatcher = dispatcher
    engine._tracker.assign(partitions)
    return engine, queued


def _msgs(*spec: tuple[str, int, int]) -> list[Any]:
    return [Message(topic=t, partition=p, offset=o, value=b"v") for t, p, o in spec]


def test_runs_of_partitions_and_topics_keep_fetch_order_and_their_own_state() -> None:
    engine, queued = _engine([("t", 0), ("t", 1), ("u", 0)])
    engine._accept(_msgs(("t", 0, 0), ("t", 0, 1), ("t", 1, 7), ("u", 0, 3), ("t", 0, 2), ("t", 1, 8)))
    assert [(w.state.tp, w.offset) for w in queued] == [
        (("t", 0), 0), (("t", 0), 1), (("t", 1), 7), (("u", 0), 3), (("t", 0), 2), (("t", 1), 8),
    ]
    assert [w.message.offset() for w in queued] == [w.offset for w in queued]
    assert list(engine._tracker.state(("t", 0)).pending) == [0, 1, 2]
    assert list(engine._tracker.state(("u", 0)).pending) == [3]


def test_unowned_partitions_and_redeliveries_are_not_queued_twice() -> None:
    engine, queued = _engine([("t", 0)])
    engine._accept(_msgs(("t", 0, 0), ("t", 0, 1), ("t", 5, 0)))  # partition 5 is not ours
    engine._accept(_msgs(("t", 0, 1), ("t", 0, 2)))  # 1 is still in flight
    assert [w.offset for w in queued] == [0, 1, 2]
    assert list(engine._tracker.state(("t", 0)).pending) == [0, 1, 2]


def test_completions_move_the_watermark_and_count() -> None:
    engine, queued = _engine([("t", 0)])
    engine._accept(_msgs(("t", 0, 0), ("t", 0, 1), ("t", 0, 2)))
    assert engine._dispatcher is not None
    engine._dispatcher.completions.extend([queued[1], queued[0]])
    assert engine._drain_completions() == 2
    assert engine._processed == 2
    assert engine._tracker.position(("t", 0)) == 2
    engine._tracker.revoke([("t", 0)])
    engine._dispatcher.completions.append(queued[2])  # finished after its partition was revoked
    assert engine._drain_completions() == 0
    assert engine._processed == 2 and engine._dropped_late == 1


def test_each_partition_run_becomes_one_work_of_consecutive_offsets() -> None:
    engine = Mtc75Consumer(Settings().replace(TOPIC="t"), lambda _m: None)
    dispatcher = Dispatcher(lambda _m: None, 1)
    put: list[Work] = []
    dispatcher.put = put.extend  # type: ignore[method-assign]
    engine._dispatcher = dispatcher
    engine._tracker.assign([("t", 0), ("t", 1)])
    engine._accept(_msgs(*[("t", 0, o) for o in range(5)], *[("t", 1, o) for o in range(10, 13)], ("t", 0, 5)))
    assert [(w.state.tp, w.offset, w.size) for w in put] == [(("t", 0), 0, 5), (("t", 1), 10, 3), (("t", 0), 5, 1)]
    assert [m.offset() for m in put[0].messages] == [0, 1, 2, 3, 4]


def test_an_error_event_among_the_messages_is_handled_in_place_and_the_runs_around_it_are_kept() -> None:
    engine, queued = _engine([("t", 0)])
    seen: list[int] = []
    engine._on_message_error = lambda msg: seen.append(msg.error().code())  # type: ignore[method-assign]
    eof = Message(topic="t", partition=0, offset=2, error=KafkaError(KafkaError._PARTITION_EOF))
    engine._accept([*_msgs(("t", 0, 0), ("t", 0, 1)), eof, *_msgs(("t", 0, 2), ("t", 0, 3))])
    assert seen == [KafkaError._PARTITION_EOF]
    assert [w.offset for w in queued] == [0, 1, 2, 3]
    assert list(engine._tracker.state(("t", 0)).pending) == [0, 1, 2, 3]
