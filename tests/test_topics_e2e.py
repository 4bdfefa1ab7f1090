"""Several topics against the real broker: a list and a pattern, through ``mtc75.Consumer``.

Two topics consumed and committed to their ends, each failure on its own topic's ``<topic>.dlq``; a pattern that
picks up a topic created after the start (and makes its dead-letter topic before the first dead letter) within
a bounded time; one of two named topics deleted while consuming: the other goes on through the grace, then the
run ends with TopicGone naming the deleted one (exit 3 in the CLI); one of two topics a pattern matched deleted:
not an error, the other goes on.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

import mtc75
from mtc75.core.stats import Stats
from mtc75.engine.topicguard import TOPIC_GONE_GRACE
from mtc75.errors import TopicGone
from mtc75.kafka.deadletter import H_OFFSET, H_TOPIC
from mtc75.kafka.topics import create_topic
from tests.kafka_helpers import committed_offsets, end_offsets, produce_numbered, read_topic, report_figures, wait_until

pytestmark = pytest.mark.timeout(180)

POISON_ID = 7  # the message {"id": 7} of each topic fails every attempt


class Handled:
    """Records (topic, id) of each message handled; {"id": POISON_ID} raises."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.done: set[tuple[str, int]] = set()
        self.at: dict[str, float] = {}  # topic -> when its last message was handled

    def __call__(self, message: Any) -> None:
        ident = json.loads(message.value())["id"]
        if ident == POISON_ID:
            raise ValueError(f"poison {ident}")
        with self._lock:
            self.done.add((message.topic(), ident))
            self.at[message.topic()] = time.monotonic()

    def of(self, topic: str) -> set[int]:
        with self._lock:
            return {i for t, i in self.done if t == topic}


class Background:
    """``consumer.run()`` on a thread: what it returned or raised, and when."""

    def __init__(self, consumer: mtc75.Consumer) -> None:
        self.consumer = consumer
        self.result: Stats | None = None
        self.error: BaseException | None = None
        self.ended_at = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self.consumer.run()
        except BaseException as err:
            self.error = err
        self.ended_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"run() did not return within {timeout}s"

    def stop(self) -> Stats:
        self.consumer.stop()
        self.join(60)
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _consumer(handler: Handled, topic: str | list[str], group: str, bootstrap: str,
              librdkafka: dict[str, Any] | None = None, **settings: Any) -> Background:
    return Background(mtc75.Consumer(handler, topic=topic, group_id=group, bootstrap_servers=bootstrap,
                                     max_thread_count=4, max_attempts=1, commit_interval=0.2, librdkafka=librdkafka,
                                     **settings))


def _delete(bootstrap: str, *topics: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(list(topics), operation_timeout=30).values():
        future.result(timeout=30)


def _dead_letters(bootstrap: str, topic: str) -> list[tuple[bytes, bytes]]:
    """(original topic, original offset) header pairs of every record on ``topic``'s dead-letter topic."""
    count = sum(end_offsets(bootstrap, topic + ".dlq").values())
    records = read_topic(bootstrap, topic + ".dlq", count)
    assert len(records) == count
    return [(dict(r.headers() or [])[H_TOPIC], dict(r.headers() or [])[H_OFFSET]) for r in records]


def test_two_topics_are_committed_to_their_ends_and_each_dead_letter_goes_to_its_own_topic(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    first, second, group = make_topic(2, "ta"), make_topic(3, "tb"), unique("g")
    produce_numbered(bootstrap, first, 30)
    produce_numbered(bootstrap, second, 40)
    handler = Handled()
    run = _consumer(handler, [first, second], group, bootstrap, on_failure="dlq")
    try:
        wait_until(lambda: committed_offsets(bootstrap, group, first) == end_offsets(bootstrap, first)
                   and committed_offsets(bootstrap, group, second) == end_offsets(bootstrap, second), 60,
                   step=0.5, what="both topics committed to their ends")
    finally:
        stats = run.stop()
    assert handler.of(first) == set(range(30)) - {POISON_ID}
    assert handler.of(second) == set(range(40)) - {POISON_ID}
    assert stats.dead_lettered == 2
    for topic in (first, second):
        [(original, _offset)] = _dead_letters(bootstrap, topic)  # one record, on this topic's own DLQ
        assert original == topic.encode()
    assert {t for t, _ in stats.lag} == {first, second}
    report_figures("topics_two_topics", messages=70, topics=2, lost=70 - len(handler.done) - stats.dead_lettered,
                   dead_lettered=stats.dead_lettered)


def test_a_pattern_picks_up_a_topic_created_after_the_start_within_a_bounded_time(
    bootstrap: str, unique: Callable[[str], str]
) -> None:
    prefix, group = unique("rx"), unique("g")
    existing, later = f"{prefix}-a", f"{prefix}-b"
    conf = {"bootstrap.servers": bootstrap}
    create_topic(conf, existing, 2, 1)
    produce_numbered(bootstrap, existing, 10)
    handler = Handled()
    run = _consumer(handler, f"^{prefix}-.*", group, bootstrap, on_failure="dlq")
    try:
        wait_until(lambda: len(handler.of(existing)) == 9, 60, what="the existing topic handled")
        create_topic(conf, later, 2, 1)
        created_at = time.monotonic()
        produce_numbered(bootstrap, later, 20)
        # topic.metadata.refresh.interval.ms is 10 s (settings.py): seen at the next refresh, then a rebalance
        wait_until(lambda: len(handler.of(later)) == 19, 45, step=0.1, what="the topic created later handled")
        picked_up_s = handler.at[later] - created_at
        wait_until(lambda: committed_offsets(bootstrap, group, later) == end_offsets(bootstrap, later), 30,
                   step=0.5, what="the new topic committed to its end")
        assert run.alive
    finally:
        stats = run.stop()
    assert _dead_letters(bootstrap, later) == [(later.encode(), b"%d" % _offset_of(bootstrap, later))]
    assert stats.dead_lettered == 2  # one per topic, each on its own DLQ (the later one made before its first)
    report_figures("topics_pattern_new_topic", created_to_all_handled_s=round(picked_up_s, 1), messages=20,
                   lost=20 - len(handler.of(later)) - len(_dead_letters(bootstrap, later)))


def _offset_of(bootstrap: str, topic: str) -> int:
    """The offset of {"id": POISON_ID} in ``topic``."""
    for message in read_topic(bootstrap, topic, sum(end_offsets(bootstrap, topic).values())):
        if json.loads(message.value())["id"] == POISON_ID:
            return message.offset()
    raise AssertionError(f"no poison message in {topic}")


def test_a_named_topic_deleted_among_two_ends_the_run_after_the_grace_and_the_other_goes_on_meanwhile(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    kept, deleted, group = make_topic(2, "kept"), make_topic(2, "deleted"), unique("g")
    produce_numbered(bootstrap, kept, 10)
    produce_numbered(bootstrap, deleted, 10)
    handler = Handled()
    # cooperative: the deleted topic's partitions are revoked alone, so the other's commits come from the
    # periodic commit round (an eager revoke would commit everything on the way)
    run = _consumer(handler, [kept, deleted], group, bootstrap, on_failure="skip",
                    librdkafka={"partition.assignment.strategy": "cooperative-sticky"})
    wait_until(lambda: len(handler.of(kept)) == 9 and len(handler.of(deleted)) == 9, 60, what="both handled")
    _delete(bootstrap, deleted)
    deleted_at = time.monotonic()
    producer_ids = range(100, 140)  # produced during the grace: the other topic is handled and committed
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in producer_ids:
        producer.produce(kept, value=json.dumps({"id": i}).encode())
    producer.flush(10)
    wait_until(lambda: set(producer_ids) <= handler.of(kept), TOPIC_GONE_GRACE, step=0.1,
               what="the other topic handled during the grace")
    handled_during_grace_s = time.monotonic() - deleted_at
    wait_until(lambda: committed_offsets(bootstrap, group, kept) == end_offsets(bootstrap, kept),
               max(1.0, TOPIC_GONE_GRACE - handled_during_grace_s), step=0.2, what="the other topic committed")
    run.join(45)
    assert isinstance(run.error, TopicGone), run.error
    assert f"topic {deleted!r} was deleted while consuming and not re-created" in str(run.error)
    assert TopicGone.exit_code == 3
    report_figures("topics_named_deleted", exited_after_s=round(run.ended_at - deleted_at, 1),
                   other_handled_after_s=round(handled_during_grace_s, 1), other_messages=len(producer_ids))


def test_a_topic_a_pattern_matched_deleted_is_not_an_error_and_the_other_goes_on(
    bootstrap: str, unique: Callable[[str], str]
) -> None:
    prefix, group = unique("rd"), unique("g")
    gone, kept = f"{prefix}-gone", f"{prefix}-kept"
    conf = {"bootstrap.servers": bootstrap}
    for topic in (gone, kept):
        create_topic(conf, topic, 2, 1)
        produce_numbered(bootstrap, topic, 10)
    handler = Handled()
    run = _consumer(handler, f"^{prefix}-.*", group, bootstrap, on_failure="skip")
    try:
        wait_until(lambda: len(handler.of(kept)) == 9 and len(handler.of(gone)) == 9, 60, what="both handled")
        _delete(bootstrap, gone)
        deleted_at = time.monotonic()
        wait_until(lambda: run.consumer.stats().assigned == 2, 40, step=0.2, what="the deleted topic let go")
        let_go_s = time.monotonic() - deleted_at
        producer = Producer({"bootstrap.servers": bootstrap})
        for i in range(200, 220):
            producer.produce(kept, value=json.dumps({"id": i}).encode())
        producer.flush(10)
        wait_until(lambda: set(range(200, 220)) <= handler.of(kept), 30, what="the other topic goes on")
        # past the grace a named topic gets: still running
        time.sleep(max(0.0, deleted_at + TOPIC_GONE_GRACE + 2 - time.monotonic()))
        assert run.alive, run.error
    finally:
        stats = run.stop()  # returns: no error
    assert stats.processed >= 38
    report_figures("topics_pattern_deleted", let_go_s=round(let_go_s, 1), other_messages=20,
                   error=run.error is not None)
