"""The in-memory Kafka fake keeps the librdkafka behaviours the engine tests rely on."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    KafkaError,
    KafkaException,
    TopicCollection,
    TopicPartition,
)

from tests.fake_kafka import FakeKafka


@pytest.fixture
def cluster() -> FakeKafka:
    fake = FakeKafka()
    fake.create_topic("t", 2)
    fake.fill("t", {0: 3, 1: 2})
    return fake


def consumer(cluster: FakeKafka, **conf: Any) -> Any:
    return cluster.factories().consumer({"group.id": "g", "auto.offset.reset": "earliest", **conf})


def test_subscribe_assigns_on_the_polling_thread_and_messages_come_in_offset_order(cluster: FakeKafka) -> None:
    c = consumer(cluster)
    seen: list[tuple[str, int]] = []
    c.subscribe(["t"], on_assign=lambda cons, tps: seen.append(("assign", threading.get_ident())))
    assert seen == []  # nothing happens until the application polls
    got = c.consume(10, 0)
    assert seen == [("assign", threading.get_ident())]
    assert sorted((m.partition(), m.offset()) for m in got) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert [m.offset() for m in got if m.partition() == 0] == [0, 1, 2]
    assert c.position([TopicPartition("t", 0)])[0].offset == 3


def test_eager_and_cooperative_assignment_calls_are_not_interchangeable(cluster: FakeKafka) -> None:
    eager = consumer(cluster)
    with pytest.raises(KafkaException):
        eager.incremental_assign([TopicPartition("t", 0)])
    coop = consumer(cluster, **{"partition.assignment.strategy": "cooperative-sticky"})
    with pytest.raises(KafkaException):
        coop.assign([TopicPartition("t", 0)])


def test_eager_rebalance_revokes_everything_cooperative_only_the_difference(cluster: FakeKafka) -> None:
    for strategy, revoked in (("range", [[("t", 0), ("t", 1)]]), ("cooperative-sticky", [[("t", 0)]])):
        c = consumer(cluster, **{"partition.assignment.strategy": strategy})
        calls: list[list[tuple[str, int]]] = []
        c.subscribe(["t"], on_revoke=lambda cons, tps, calls=calls: calls.append([(t.topic, t.partition) for t in tps]))
        c.consume(10, 0)
        done = c.rebalance(revoke=[("t", 0)])
        assert not done.is_set()
        c.consume(1, 0)
        assert done.is_set() and calls == revoked and c.assignment_now() == {("t", 1)}


def test_pause_stops_fetching_a_partition_and_does_nothing_to_an_unassigned_one(cluster: FakeKafka) -> None:
    c = consumer(cluster)
    c.assign([TopicPartition("t", 0)])
    c.pause([TopicPartition("t", 0), TopicPartition("t", 1)])
    assert c.paused == {("t", 0)} and c.consume(10, 0) == []
    c.resume([TopicPartition("t", 0)])
    assert [m.offset() for m in c.consume(10, 0)] == [0, 1, 2]


def test_commit_errors_sync_raise_async_report_on_the_next_poll(cluster: FakeKafka) -> None:
    reports: list[KafkaError | None] = []
    c = consumer(cluster, on_commit=lambda err, tps: reports.append(err))
    c.assign([TopicPartition("t", 0)])
    cluster.fail_commits(KafkaError(KafkaError._TIMED_OUT), count=2)
    with pytest.raises(KafkaException):
        c.commit(offsets=[TopicPartition("t", 0, 2)], asynchronous=False)
    c.commit(offsets=[TopicPartition("t", 0, 2)], asynchronous=True)
    assert reports == [] and cluster.committed("g", "t", 0) is None
    c.consume(1, 0)
    assert [r.code() if r else None for r in reports] == [KafkaError._TIMED_OUT]
    c.commit(offsets=[TopicPartition("t", 0, 2)], asynchronous=False)
    assert cluster.committed("g", "t", 0) == 2
    assert c.committed([TopicPartition("t", 0), TopicPartition("t", 1)])[1].offset == OFFSET_INVALID


def test_a_fatal_error_reaches_error_cb_and_poisons_the_client(cluster: FakeKafka) -> None:
    errors: list[KafkaError] = []
    c = consumer(cluster, error_cb=errors.append)
    c.assign([TopicPartition("t", 0)])
    cluster.client_error(KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    assert c.consume(10, 0) == []
    assert [e.fatal() for e in errors] == [True]
    with pytest.raises(KafkaException):
        c.commit(offsets=[TopicPartition("t", 0, 1)], asynchronous=False)


def test_a_call_from_a_second_thread_is_recorded(cluster: FakeKafka) -> None:
    c = consumer(cluster)
    c.assign([TopicPartition("t", 0)])
    other = threading.Thread(target=lambda: c.consume(1, 0))
    other.start()
    other.join(5)
    assert cluster.violations == ["consume() from a second thread"]


def test_close_may_be_handed_to_another_thread_but_nothing_after_it(cluster: FakeKafka) -> None:
    c = consumer(cluster)
    c.assign([TopicPartition("t", 0)])
    other = threading.Thread(target=c.close)  # the engine's bounded close runs on a helper thread
    other.start()
    other.join(5)
    assert cluster.violations == [] and c.closed
    with pytest.raises(RuntimeError, match="closed"):
        c.consume(1, 0)


def test_topic_ids_change_on_recreation_and_a_consumer_goes_on_at_its_old_position(cluster: FakeKafka) -> None:
    admin = cluster.factories().admin({})

    def described() -> Any:
        future = admin.describe_topics(TopicCollection(["t"]))["t"]
        return future.exception() or future.result().topic_id

    first = described()
    c = consumer(cluster)
    c.assign([TopicPartition("t", 0)])
    assert [m.offset() for m in c.consume(10, 0)] == [0, 1, 2]
    cluster.delete_topic("t")
    gone = described()
    assert isinstance(gone, KafkaException) and gone.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    assert c.consume(10, 0) == []  # a deleted topic delivers nothing
    cluster.recreate_topic("t", 2)
    cluster.fill("t", {0: 5})
    second = described()
    assert isinstance(first, str) and isinstance(second, str) and first != second
    # Like librdkafka: the old position (3) is kept, so offsets 0-2 of the new topic would be skipped.
    assert [m.offset() for m in c.consume(10, 0)] == [3, 4]
    c.seek(TopicPartition("t", 0, OFFSET_BEGINNING))
    assert [m.offset() for m in c.consume(10, 0)] == [0, 1, 2, 3, 4]


def test_held_topic_id_checks_are_answered_with_the_cluster_as_it_is_when_answered(cluster: FakeKafka) -> None:
    admin = cluster.factories().admin({})
    old = cluster.topic_id("t")
    cluster.hold_describes()
    asked = admin.describe_topics(TopicCollection(["t"]))["t"]
    cluster.wait_held_describes(1, 1.0)
    assert not asked.done() and cluster.held_describes == 1
    cluster.recreate_topic("t", 1)  # between the request and the answer, as a broker would see it
    assert cluster.answer_describes() == 1 and cluster.held_describes == 0
    assert asked.result().topic_id == cluster.topic_id("t") != old
    later = admin.describe_topics(TopicCollection(["t"]))["t"]
    assert not later.done()  # still holding
    assert cluster.answer_describes(hold=False) == 1 and later.done()
    assert admin.describe_topics(TopicCollection(["t"]))["t"].done()  # answered at once again
    assert cluster.describes == 3


def test_poll_wait_caps_how_long_an_empty_poll_blocks(cluster: FakeKafka) -> None:
    c = consumer(cluster)
    cluster.poll_wait = 0.0
    started = time.monotonic()
    assert c.poll(30.0) is None  # returns at once instead of after its 30 s timeout
    assert time.monotonic() - started < 10.0
