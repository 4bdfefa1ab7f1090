"""Several topics -- a list, or a pattern -- through the real engine on the in-memory fake (no broker).

Each topic is its own: every ordering mode and a batch handler keep working across two topics; a failure goes
to the dead-letter topic of its own topic; a topic re-created among two is read again while the other is
committed as usual, in the same commit round; a named topic deleted among two ends the run after the grace
while the other goes on; a pattern picks up a topic created later, lets a deleted one go without an error,
and never consumes dead-letter topics (ON_FAILURE=dlq would feed them to themselves).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError

from mtc75 import testing
from mtc75.core.subscription import Subscription
from mtc75.engine import topicguard as topicguard_module
from mtc75.errors import ConfigError, MessageFailed, TopicGone, TopicNotFound
from mtc75.kafka.client import KafkaClient
from mtc75.kafka.deadletter import H_OFFSET, H_TOPIC
from tests.fake_kafka import FakeKafka
from tests.test_engine_unit import GROUP, WAIT, Run, runs_on, until

pytestmark = pytest.mark.timeout(60)

ORDERS, PAYMENTS = "orders", "payments"
PARTITIONS = {ORDERS: 3, PAYMENTS: 2}
PER_PARTITION = 12
POISON = {ORDERS: (1, 5), PAYMENTS: (0, 7)}  # (partition, offset) that fails every attempt, per topic

Where = tuple[str, int, int]  # (topic, partition, offset)


class Handled:
    """Records every call by (topic, partition, offset); POISON (or ``fail``) raises. One message or a list."""

    def __init__(self, fail: Callable[[Where], bool] | None = None, batches: bool = False) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[Where] = Counter()
        self.done: list[Where] = []
        self.keys: dict[tuple[str, int, bytes], list[int]] = defaultdict(list)  # first calls per key of a partition
        self.batch_topics: list[set[tuple[str, int]]] = []
        self.values: list[Any] = []
        self._fail = fail or (lambda w: POISON.get(w[0]) == (w[1], w[2]))
        self._batches = batches

    def __call__(self, message: Any) -> None:
        messages = message if self._batches else [message]
        with self._lock:
            self.batch_topics.append({(m.topic(), m.partition()) for m in messages})
            for m in messages:
                where = (m.topic(), m.partition(), m.offset())
                if not self.calls[where]:
                    self.keys[(m.topic(), m.partition(), m.key())].append(m.offset())
                self.calls[where] += 1
                self.values.append(m.value())
        failed = [m for m in messages if self._fail((m.topic(), m.partition(), m.offset()))]
        if failed:
            raise ValueError(f"poison {failed[0].topic()}[{failed[0].partition()}]@{failed[0].offset()}")
        with self._lock:
            self.done += [(m.topic(), m.partition(), m.offset()) for m in messages]

    def handled(self) -> set[Where]:
        with self._lock:
            return set(self.done)


def fill(cluster: FakeKafka, topic: str, per_partition: int, start: int = 0) -> None:
    """JSON values; keys shared by neighbouring offsets so that key ordering has something to hold."""
    for p in range(PARTITIONS.get(topic, 2)):
        for i in range(start, start + per_partition):
            cluster.produce(topic, p, json.dumps({"topic": topic, "n": i}).encode(), key=b"k%d" % (i % 3))


def ends(cluster: FakeKafka, topic: str) -> list[int | None]:
    return [cluster.committed(GROUP, topic, p) for p in range(PARTITIONS.get(topic, 2))]


@pytest.fixture
def cluster() -> Iterator[FakeKafka]:
    fake = FakeKafka()
    for topic, partitions in PARTITIONS.items():
        fake.create_topic(topic, partitions)
    yield fake
    assert fake.violations == []


@pytest.fixture
def start(cluster: FakeKafka) -> Iterator[Callable[..., Run]]:
    with runs_on(cluster, TOPIC=[ORDERS, PAYMENTS]) as begin:
        yield begin


# -- the matrix: two topics x ordering x message or batch handler, a failure in each topic ----------------------


@pytest.mark.parametrize("batch", [1, 4], ids=["message", "batch"])
@pytest.mark.parametrize("ordering", ["unordered", "partition", "key"])
def test_two_topics_each_failure_goes_to_its_own_topics_dlq_and_everything_is_committed(
    cluster: FakeKafka, start: Callable[..., Run], ordering: str, batch: int,
) -> None:
    fill(cluster, ORDERS, PER_PARTITION)
    fill(cluster, PAYMENTS, PER_PARTITION)
    handler = Handled(batches=batch > 1)
    run = start(handler, ORDERING=ordering, BATCH_SIZE=batch, BATCH_WAIT=0.01, ON_FAILURE="dlq", MAX_ATTEMPTS=2,
                RETRY_BACKOFF_MAX=0.01, VALUE_FORMAT="json", MAX_RATE=100_000, KEY_RATE=50_000)
    until(lambda: ends(cluster, ORDERS) == [PER_PARTITION] * 3 and ends(cluster, PAYMENTS) == [PER_PARTITION] * 2,
          "both topics committed to their ends")
    until(lambda: {t[0] for t in run.stats().lag} == {ORDERS, PAYMENTS}, "the lag of both topics")
    stats = run.stop()
    everything = {(t, p, o) for t, n in PARTITIONS.items() for p in range(n) for o in range(PER_PARTITION)}
    assert handler.handled() == everything - {(t, *where) for t, where in POISON.items()}
    for topic, (_, offset) in POISON.items():  # each on its own topic's dead-letter topic, once
        [record] = cluster.messages(f"{topic}.dlq")
        headers = dict(record.headers() or [])
        assert (headers[H_TOPIC], record.partition(), headers[H_OFFSET]) == (topic.encode(), 0, str(offset).encode())
        assert json.loads(record.value() or b"") == {"topic": topic, "n": offset}  # the original bytes
    assert sorted(cluster.created_topics) == ["orders.dlq", "payments.dlq"]
    assert (stats.dead_lettered, stats.failed) == (2, 2)
    assert all(v["topic"] in PARTITIONS for v in handler.values)  # decoded (VALUE_FORMAT json)
    assert all(len(group) == 1 for group in handler.batch_topics)  # a call holds one partition of one topic
    if batch > 1:
        assert max(len(c) for c in handler.batch_topics) == 1 and stats.batches < stats.processed
    if ordering == "key":  # per key (of a topic's partition), first calls in offset order
        assert all(offsets == sorted(offsets) for offsets in handler.keys.values())
    assert stats.lag and set(stats.lag.values()) == {0}
    assert all(not c.outside for c in cluster.commits)


# -- a topic re-created among two --------------------------------------------------------------------------------


def test_a_recreated_topic_among_two_is_read_again_and_the_other_is_committed_in_the_same_round(
    cluster: FakeKafka, start: Callable[..., Run], caplog: pytest.LogCaptureFixture,
) -> None:
    handler = Handled(fail=lambda w: False)
    run = start(handler)
    until(lambda: run.stats().assigned == 5, "both topics assigned")
    cluster.hold_describes()
    cluster.wait_held_describes(2, WAIT)  # a check of both topics in flight, its snapshot taken before any message
    fill(cluster, ORDERS, 4)
    fill(cluster, PAYMENTS, 4)
    until(lambda: len(handler.handled()) == 20, "the first messages handled")
    assert cluster.answer_describes() == 2  # SAME for a snapshot of nothing
    cluster.wait_held_describes(2, WAIT)  # the next check: its snapshot holds both topics' messages
    before = len(cluster.commits)
    cluster.recreate_topic(PAYMENTS, 2)
    assert cluster.answer_describes() == 2  # orders SAME, payments RECREATED: in one answer
    cluster.wait_held_describes(2, WAIT)
    sent = [c.offsets for c in cluster.commits[before:]]
    assert sent == [{(ORDERS, p): 4 for p in range(3)}], sent  # orders sent; nothing of the old payments
    cluster.answer_describes(hold=False)
    new = {(PAYMENTS, p, o) for p in range(2) for o in range(6)}
    fill(cluster, PAYMENTS, 6)
    fill(cluster, ORDERS, 2, start=4)
    until(lambda: new <= handler.handled(), "every message of the new payments handled")
    until(lambda: ends(cluster, PAYMENTS) == [6, 6] and ends(cluster, ORDERS) == [6, 6, 6], "both at their ends")
    run.stop()
    assert "payments was deleted and re-created" in caplog.text and "orders was deleted" not in caplog.text
    assert {n for (t, _, _), n in handler.calls.items() if t == ORDERS} == {1}  # orders was not read again
    # nothing of the old payments was committed on the new one: its commits only ever went up to the new end
    assert all(o <= 6 for c in cluster.commits[before:] for (t, _), o in c.offsets.items() if t == PAYMENTS)


# -- a named topic deleted among two ---------------------------------------------------------------------------


def test_a_deleted_named_topic_among_two_ends_the_run_after_the_grace_and_the_other_goes_on_meanwhile(
    cluster: FakeKafka, start: Callable[..., Run], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(topicguard_module, "TOPIC_GONE_GRACE", 1.0)
    cluster.revoke_deleted_names = True  # as librdkafka: its partitions are taken away
    fill(cluster, ORDERS, 2)
    fill(cluster, PAYMENTS, 2)
    release = threading.Event()
    handler = Handled(fail=lambda w: w == (ORDERS, 0, 4) and not release.wait(WAIT))  # blocks until released
    run = start(handler)
    until(lambda: ends(cluster, PAYMENTS) == [2, 2] and ends(cluster, ORDERS) == [2, 2, 2], "both committed")
    with caplog.at_level(logging.INFO):
        cluster.delete_topic(PAYMENTS)
        until(lambda: run.stats().assigned == 3, "payments revoked")
        fill(cluster, ORDERS, 3, start=2)  # during the grace: orders goes on, handled and committed
        # (p0's run of 2..4 is one chunk, completed as one: its commit waits for the blocked handler)
        until(lambda: ends(cluster, ORDERS)[1:] == [5, 5], "orders committed during the grace")
        until(lambda: "shutdown: waiting up to" in caplog.text, "the grace over, the blocked handler waited for")
    release.set()
    with pytest.raises(TopicGone, match=r"topic 'payments' was deleted while consuming and not re-created within"):
        run.join()
    assert ends(cluster, ORDERS) == [5, 5, 5]  # a stop, not a halt: the handler that was running is committed


# -- patterns ------------------------------------------------------------------------------------------------


def test_a_pattern_picks_up_a_new_topic_makes_its_dlq_then_and_a_deleted_match_is_not_an_error(
    cluster: FakeKafka, start: Callable[..., Run], caplog: pytest.LogCaptureFixture,
) -> None:
    cluster.create_topic("shop-a", 2)
    fill(cluster, "shop-a", 3)
    handler = Handled(fail=lambda w: w == ("shop-b", 1, 1))
    with caplog.at_level(logging.INFO):
        run = start(handler, TOPIC="^shop-.*", ON_FAILURE="dlq")
        until(lambda: ends(cluster, "shop-a") == [3, 3], "shop-a committed")
    assert "pattern ^shop-.* matches 1 topics now: shop-a" in caplog.text
    assert cluster.created_topics == ["shop-a.dlq"]  # at start: the topics matched then
    cluster.create_topic("shop-b", 2)
    fill(cluster, "shop-b", 3)
    until(lambda: ends(cluster, "shop-b") == [3, 3], "the new topic consumed and committed")
    [record] = cluster.messages("shop-b.dlq")  # its dead-letter topic made before its first dead letter
    assert dict(record.headers() or [])[H_TOPIC] == b"shop-b"
    cluster.delete_topic("shop-a")
    until(lambda: run.stats().assigned == 2, "shop-a revoked")
    fill(cluster, "shop-b", 2, start=3)
    until(lambda: ends(cluster, "shop-b") == [5, 5], "shop-b goes on")
    stats = run.stop()  # no error: a topic a pattern matched just stops matching
    assert stats.dead_lettered == 1
    assert {t for t, _, _ in handler.calls} == {"shop-a", "shop-b"}  # shop-b.dlq matches too: left out
    assert not [t for t in cluster.created_topics if t.endswith(".dlq.dlq")]


def test_a_dead_letter_topic_slow_to_be_made_does_not_hold_the_poll_thread_nor_other_commits(
    cluster: FakeKafka, start: Callable[..., Run],
) -> None:
    cluster.create_topic("shop-a", 2)
    handler = Handled(fail=lambda w: w == ("shop-b", 0, 1))
    run = start(handler, TOPIC="^shop-.*", ON_FAILURE="dlq", RETRY_BACKOFF_MAX=0.02)
    until(lambda: run.stats().assigned == 2, "shop-a assigned")
    asked = cluster.create_requests  # shop-a.dlq's, at start
    cluster.create_hold = hold = threading.Event()  # the controller answers CreateTopics only once set free
    cluster.create_topic("shop-b", 2)
    fill(cluster, "shop-b", 3)
    until(lambda: cluster.create_requests > asked, "shop-b.dlq asked for")
    try:
        fill(cluster, "shop-a", 5)  # meanwhile the poll thread goes on: fetches, runs and commits the rest
        until(lambda: ends(cluster, "shop-a") == [5, 5] and ends(cluster, "shop-b")[1] == 3,
              "shop-a and shop-b[1] committed while the dead-letter topic is being made")
        assert ends(cluster, "shop-b")[0] == 1  # below the message that waits for its dead-letter topic
        assert not cluster.messages("shop-b.dlq")
    finally:
        hold.set()
    until(lambda: len(cluster.messages("shop-b.dlq")) == 1 and ends(cluster, "shop-b") == [3, 3],
          "the dead letter once its topic exists")
    assert run.stop().dead_lettered == 1


@pytest.mark.parametrize("refusal", ["no answer", "not authorized"])
def test_a_dead_letter_topic_that_cannot_be_made_yet_is_tried_again_and_one_refused_stops_the_run(
    cluster: FakeKafka, start: Callable[..., Run], refusal: str,
) -> None:
    handler = Handled(fail=lambda w: w == ("shop-b", 0, 1))
    run = start(handler, TOPIC="^shop-.*", ON_FAILURE="dlq", RETRY_BACKOFF_MAX=0.02)
    until(lambda: run.stats().elapsed_seconds > 0, "the start")
    code = KafkaError.REQUEST_TIMED_OUT if refusal == "no answer" else KafkaError.TOPIC_AUTHORIZATION_FAILED
    cluster.create_errors.extend([KafkaError(code, "fake refusal")] * 3)
    cluster.create_topic("shop-b", 2)
    fill(cluster, "shop-b", 3)
    if refusal == "no answer":  # tried again with the message's next publish, until it lands
        until(lambda: len(cluster.messages("shop-b.dlq")) == 1 and ends(cluster, "shop-b") == [3, 3],
              "the dead letter once its topic could be made")
        assert not cluster.create_errors  # three refusals, then made
        assert run.stop().dead_lettered == 1
    else:
        with pytest.raises(MessageFailed, match=r"cannot dead-letter a message of shop-b: cannot create topic "
                                                r"'shop-b.dlq'"):
            run.join()
        assert ends(cluster, "shop-b")[0] == 1  # committed below the message that could not be dead-lettered


def test_the_dead_letter_topics_of_many_matches_are_made_in_one_request(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    """A pattern may match hundreds of topics at start: their dead-letter topics are one CreateTopics request, not
    one (with its own metadata waits) each."""
    names = [f"many-{i:02d}" for i in range(30)]
    for name in names:
        cluster.create_topic(name, 2)
    cluster.create_topic("many-05.dlq", 2)  # one an administrator made: left as it is
    run = start(Handled(fail=lambda w: False), TOPIC="^many-.*", ON_FAILURE="dlq")
    until(lambda: run.stats().assigned == 60, "every match assigned")
    run.stop()
    assert sorted(cluster.created_topics) == sorted(f"{n}.dlq" for n in names if n != "many-05")
    assert cluster.create_requests == 1


def test_a_pattern_that_matches_nothing_yet_is_no_error_and_consumes_what_comes(
    cluster: FakeKafka, start: Callable[..., Run], caplog: pytest.LogCaptureFixture,
) -> None:
    handler = Handled(fail=lambda w: False)
    with caplog.at_level(logging.INFO):
        run = start(handler, TOPIC="^later-.*")
        until(lambda: "matches no topic yet" in caplog.text, "the start-up line")
        # librdkafka reports a pattern that matches nothing as a missing topic named like the pattern
        cluster.fail_fetch(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "Subscribed topic not available"),
                           topic="^later-.*")
        cluster.create_topic("later-1", 2)
        fill(cluster, "later-1", 2)
        until(lambda: ends(cluster, "later-1") == [2, 2], "the topic created later consumed")
    run.stop()
    assert "consumer error" not in caplog.text  # nothing to warn about: start-up said it matches nothing yet


def test_a_pattern_never_consumes_dead_letter_topics_with_dlq(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    """^orders.* matches orders.dlq: with ON_FAILURE=dlq its records would fail again into orders.dlq.dlq, for
    ever. topic.blacklist leaves them out."""
    fill(cluster, ORDERS, 2)
    handler = Handled(fail=lambda w: w[0].startswith(ORDERS) and w[2] == 1)
    run = start(handler, TOPIC="^orders.*", ON_FAILURE="dlq")
    until(lambda: ends(cluster, ORDERS) == [2, 2, 2] and len(cluster.messages("orders.dlq")) == 3, "dead letters")
    fill(cluster, ORDERS, 1, start=2)
    until(lambda: ends(cluster, ORDERS) == [3, 3, 3], "more handled after the dead letters exist")
    run.stop()
    assert {t for t, _, _ in handler.calls} == {ORDERS}
    assert cluster.created_topics == ["orders.dlq"]


# -- start-up and errors -----------------------------------------------------------------------------------------


def test_every_missing_named_topic_is_in_the_one_error(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    run = start(Handled(), TOPIC="orders,nope-1,^any-.*,", ON_FAILURE="skip")
    with pytest.raises(TopicNotFound, match=r"topic 'nope-1' does not exist"):
        run.join()
    run = start(Handled(), TOPIC=[ORDERS, "nope-1", "nope-2"])
    with pytest.raises(TopicNotFound, match=r"topics 'nope-1', 'nope-2' do not exist"):
        run.join()


def test_a_subscription_librdkafka_refuses_is_a_config_error_naming_it() -> None:
    class Refusing:
        consume = poll = None

        def subscribe(self, *args: Any, **kwargs: Any) -> None:
            from confluent_kafka import KafkaError, KafkaException
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG, "Failed to set subscription"))

    client = KafkaClient(Refusing(), Subscription(("^a[b",)), cooperative=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"invalid TOPIC='\^a\[b': librdkafka refused the subscription"):
        client.subscribe(lambda *a: None, lambda *a: None, lambda *a: None)


def test_the_library_takes_a_list_and_a_pattern(cluster: FakeKafka) -> None:
    fill(cluster, ORDERS, 1)
    fill(cluster, PAYMENTS, 1)
    for topic in ([ORDERS, PAYMENTS], (ORDERS, PAYMENTS), "orders,payments", "^(orders|payments)$"):
        handler = Handled(fail=lambda w: False)
        consumer = testing.consumer(cluster.factories(), handler, topic=topic, group_id=f"g-{topic!s}",
                                    commit_interval=0.02)
        stats = consumer.run(max_messages=5)
        assert stats.processed == 5 and {t for t, _, _ in handler.handled()} == {ORDERS, PAYMENTS}, topic


def test_the_fetch_probe_samples_every_topic_consumed_at_start_together() -> None:
    """One client's fetch sizes serve every topic: the probe reads them all (a list, or a pattern's matches)."""
    from mtc75.core.fetchsize import SMALL, choose
    from mtc75.kafka.fetchprobe import probe
    from mtc75.settings import Settings

    cluster = FakeKafka()
    for topic, ratio in (("plain", 1.0), ("packed", 6.0), ("other", 1.0)):
        cluster.create_topic(topic, 2)
        cluster.compress(topic, ratio)
        for i in range(100):
            cluster.produce(topic, i % 2, b"x" * 200, key=b"k")
    conf = Settings().replace(GROUP_ID=GROUP).consumer_config()
    both = probe(cluster.factories(), conf, Subscription.of("plain,packed"))
    pattern = probe(cluster.factories(), conf, Subscription.of("^p.*"))
    assert both is not None and both.messages == 200 and both == pattern  # "other" is not read
    assert 1.5 < both.ratio < 6.0 and choose(both).sizes == SMALL  # the blend: one compressed topic decides
