"""Output records and exactly-once against the in-memory fake (tests/fake_kafka.py): no broker.

The fake's log holds only what a read_committed reader sees: a transactional producer's records land
there when its transaction commits, never when it aborts. Each scenario runs the real engine
(mtc75.testing) and checks every input's output count, the committed offsets and what run() returned.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError

import mtc75
from mtc75.core.output import Output, ignored_type, outputs_of
from mtc75.core.work import Work
from mtc75.errors import ConfigError, KafkaFatalError, MessageFailed
from mtc75.runtime.invoker import Invoker, Partial
from tests.fake_kafka import FakeKafka, FakeProducer
from tests.test_engine_unit import GROUP, TOPIC, WAIT, Run, fast_settings, runs_on, until

pytestmark = pytest.mark.timeout(60)

OUT = "orders-out"


@pytest.fixture
def cluster() -> Iterator[FakeKafka]:
    fake = FakeKafka()
    fake.create_topic(TOPIC, 3)
    fake.create_topic(OUT, 1)
    yield fake
    assert fake.violations == []


@pytest.fixture
def start(cluster: FakeKafka) -> Iterator[Callable[..., Run]]:
    with runs_on(cluster) as begin:
        yield begin


def transform(message: Any) -> Output:
    """One output per input, naming where the input came from."""
    return Output(OUT, json.dumps([message.partition(), message.offset()]).encode(), key=message.key())


def outputs(cluster: FakeKafka) -> Counter[tuple[int, int]]:
    return Counter(tuple(json.loads(m.value())) for m in cluster.messages(OUT))  # type: ignore[misc]


def every(counts: dict[int, int]) -> Counter[tuple[int, int]]:
    return Counter({(p, o): 1 for p, n in counts.items() for o in range(n)})


# -- reading a return value -----------------------------------------------------------------------------


def test_a_return_value_is_none_an_output_a_sequence_of_them_an_error_or_ignored() -> None:
    one = Output("t", b"v")
    assert outputs_of(one) == (one,)
    assert outputs_of([one, one]) == (one, one)
    assert outputs_of(x for x in [one]) == (one,)
    assert outputs_of([]) == ()
    assert isinstance(outputs_of([one, {"topic": "t"}]), TypeError)  # a list must hold only Outputs
    assert isinstance(outputs_of(Output("", b"v")), TypeError)
    assert isinstance(outputs_of(Output("t", 42)), TypeError)  # type: ignore[arg-type]
    assert isinstance(outputs_of(Output("t", b"v", partition=-1)), TypeError)

    def broken() -> Iterator[Output]:
        yield one
        raise KeyError("inside the generator")

    assert isinstance(outputs_of(broken()), KeyError)  # the generator's failure is the message's
    for ignored in (True, 3, "text", b"bytes", {"a": 1}, object()):
        assert outputs_of(ignored) is None and ignored_type(ignored) is not None


def test_the_invoker_puts_outputs_on_the_work_tagged_with_their_offsets_and_part_keeps_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mtc75.core.offsets import PartitionState
    from tests.fake_kafka import FakeMessage

    def handler(message: Any) -> object:
        offset = message.offset()
        if offset == 2:
            raise ValueError("two")
        if offset == 3:
            return True  # ignored, with one warning
        return [Output(OUT, b"%d" % offset)] * (offset % 2 + 1) if offset != 4 else None

    state = PartitionState((TOPIC, 0))
    work = Work.chunk([FakeMessage(TOPIC, 0, o) for o in range(10, 16)], state, 10)
    # a clock that stands still: the chunk is never cut short, however slow the machine
    invoker = Invoker(lambda m: handler(FakeMessage(TOPIC, 0, m.offset() - 10)), clock=lambda: 0.0)
    outcome = invoker.invoke(work)
    assert isinstance(outcome, Partial) and [i for i, _ in outcome.failures] == [2]
    assert work.outputs is not None
    assert [o for o, _ in work.outputs] == [10, 11, 11, 15, 15]
    assert [o for o, _ in work.part(0, 2).outputs or []] == [10, 11, 11]
    assert work.part(2, 5).outputs is None  # the failed one, the ignored one, the None one
    assert [o for o, _ in work.part(5, 6).outputs or []] == [15, 15]
    single = Work(FakeMessage(TOPIC, 0, 7), state, 7)
    assert Invoker(lambda m: Output(OUT, b"x")).invoke(single) is None and single.outputs == [(7, Output(OUT, b"x"))]
    assert sum("returned a bool: ignored" in r.getMessage() for r in caplog.records) == 1


# -- at least once ---------------------------------------------------------------------------------------


def test_at_least_once_writes_every_output_and_commits_a_message_only_once_they_are_confirmed(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    counts = {0: 30, 1: 30, 2: 30}
    cluster.fill(TOPIC, counts)
    cluster.fail_deliveries(KafkaError(KafkaError._MSG_TIMED_OUT), count=5)  # sent again, never dropped
    stats = start(transform, max_messages=90, RETRY_BACKOFF_MAX=0.01).join()
    assert stats.processed == 90
    assert outputs(cluster) == every(counts)
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [30, 30, 30]


def test_at_least_once_a_record_that_can_never_be_written_stops_the_run_below_it(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 5})

    def handler(message: Any) -> Output:
        return Output("no-such-topic" if message.offset() == 2 else OUT, b"x")

    run = start(handler)
    with pytest.raises(MessageFailed, match=r"orders\[0\]@2 cannot write its output to no-such-topic"):
        run.join()
    assert cluster.committed(GROUP, TOPIC, 0) == 2  # never past the message whose output was not written


# -- exactly once ----------------------------------------------------------------------------------------


def test_exactly_once_commits_outputs_and_offsets_in_transactions_and_never_commits_through_the_consumer(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    counts = {0: 40, 1: 40, 2: 40}
    cluster.fill(TOPIC, counts)
    stats = start(transform, max_messages=120, PROCESSING_GUARANTEE="exactly_once").join()
    assert stats.processed == 120
    assert outputs(cluster) == every(counts)
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [40, 40, 40]
    assert cluster.transactions["committed"] >= 1 and cluster.transactions["aborted"] == 0
    producers = [p for p in cluster.producers if p.txn_id is not None]
    assert len({p.txn_id for p in producers}) == 1  # one transactional.id: the run's
    assert producers[0].txn_id.startswith(f"mtc75-{GROUP}-")  # type: ignore[union-attr]
    assert all(not c.asynchronous for c in cluster.commits)  # every commit came from a transaction


def test_exactly_once_an_aborted_transaction_shows_nothing_and_its_messages_run_again(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    counts = {0: 30, 1: 30, 2: 30}
    cluster.fill(TOPIC, counts)
    cluster.fail_transactions(KafkaError(KafkaError._FENCED + 1, "refused", txn_requires_abort=True), count=2)
    calls: Counter[tuple[int, int]] = Counter()
    lock = threading.Lock()

    def handler(message: Any) -> Output:
        with lock:
            calls[(message.partition(), message.offset())] += 1
        return transform(message)

    run = start(handler, PROCESSING_GUARANTEE="exactly_once")
    until(lambda: [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [30, 30, 30], "everything committed")
    run.stop()
    assert cluster.transactions["aborted"] == 2
    assert outputs(cluster) == every(counts)  # exactly once, though some ran twice
    assert sum(calls.values()) > 90


def test_exactly_once_a_message_finished_above_a_stuck_one_is_not_written_twice_after_a_crash(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    """The offset map goes with the transaction: the next run skips what the first committed above the stuck
    message and runs the stuck one; every output once."""
    cluster.fill(TOPIC, {0: 10})
    stuck = threading.Event()

    def first(message: Any) -> Output:
        if message.offset() == 3:
            stuck.wait(WAIT * 3)
        return transform(message)

    run = start(first, PROCESSING_GUARANTEE="exactly_once", MAX_THREAD_COUNT=4)
    until(lambda: len(outputs(cluster)) == 9, "the nine others committed in a transaction")
    assert cluster.committed(GROUP, TOPIC, 0) == 3  # the commit stays below the stuck one
    cluster.client_error(KafkaError(KafkaError._FATAL, "crash", fatal=True))  # halt: nothing more commits
    with pytest.raises(KafkaFatalError):
        run.join()
    stuck.set()
    second = start(transform, PROCESSING_GUARANTEE="exactly_once")
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 10, "the second run committed all")
    second.stop()
    assert outputs(cluster) == every({0: 10})


def test_exactly_once_a_static_member_fenced_by_a_newer_instance_halts_the_run(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    """With group.instance.id the transactional.id is the member's across restarts: fenced means a zombie."""
    cluster.fill(TOPIC, {0: 5})
    run = start(transform, PROCESSING_GUARANTEE="exactly_once", CONSUMER_CONFIG={"group.instance.id": "m1"})
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 5, "the first five committed")
    txn_id = next(p.txn_id for p in cluster.producers if p.txn_id is not None)
    FakeProducer(cluster, {"transactional.id": txn_id}).init_transactions()  # the zombie's successor
    cluster.fill(TOPIC, {0: 5})
    with pytest.raises(KafkaFatalError, match="fenced"):
        run.join()
    assert cluster.committed(GROUP, TOPIC, 0) == 5  # the zombie committed nothing more
    assert outputs(cluster) == every({0: 5})


def test_exactly_once_a_fatal_error_that_is_not_fencing_makes_a_new_producer_and_reads_again(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    """INVALID_TXN_STATE (the coordinator died during a commit) is fatal for the producer, not for the run."""
    counts = {0: 30, 1: 30, 2: 30}
    cluster.fill(TOPIC, counts)
    cluster.fail_transactions(KafkaError(KafkaError.INVALID_TXN_STATE, "coordinator moved", fatal=True))
    run = start(transform, PROCESSING_GUARANTEE="exactly_once")
    until(lambda: [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [30, 30, 30], "everything committed")
    run.stop()
    initialised = [p for p in cluster.producers if p.txn_id is not None and p._epoch >= 0]
    assert len(initialised) == 2  # the first, and the one made after its fatal error
    assert outputs(cluster) == every(counts)


def test_exactly_once_fenced_without_a_shared_transactional_id_makes_a_new_producer(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    """No other instance can own a random transactional.id: a "fenced" there (librdkafka reports one after a
    coordinator failover) is not a zombie; the run goes on with a new producer, every output once."""
    cluster.fill(TOPIC, {0: 5})
    run = start(transform, PROCESSING_GUARANTEE="exactly_once")
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 5, "the first five committed")
    txn_id = next(p.txn_id for p in cluster.producers if p.txn_id is not None)
    FakeProducer(cluster, {"transactional.id": txn_id}).init_transactions()
    cluster.fill(TOPIC, {0: 5})
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 10, "the next five committed by a new producer")
    run.stop()
    assert outputs(cluster) == every({0: 10})


def test_exactly_once_a_retried_message_writes_its_output_once(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 6})
    tries: Counter[int] = Counter()

    def handler(message: Any) -> Output:
        tries[message.offset()] += 1
        if message.offset() % 2 and tries[message.offset()] == 1:
            raise ValueError("first attempt")
        return transform(message)

    stats = start(handler, max_messages=6, PROCESSING_GUARANTEE="exactly_once", MAX_ATTEMPTS=2).join()
    assert stats.retried == 3 and outputs(cluster) == every({0: 6})


def test_exactly_once_dead_letters_go_into_the_transaction(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 6})

    def handler(message: Any) -> Output:
        if message.offset() % 3 == 2:
            raise ValueError("poison")
        return transform(message)

    stats = start(handler, max_messages=6, PROCESSING_GUARANTEE="exactly_once", ON_FAILURE="dlq").join()
    assert stats.dead_lettered == 2
    assert sorted(m.offset() for m in cluster.messages(f"{TOPIC}.dlq")) == [0, 1]
    assert outputs(cluster) == Counter({(0, 0): 1, (0, 1): 1, (0, 3): 1, (0, 4): 1})
    assert cluster.committed(GROUP, TOPIC, 0) == 6


def test_exactly_once_a_revoke_commits_before_the_partitions_go(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 10, 1: 10, 2: 10})
    run = start(transform, PROCESSING_GUARANTEE="exactly_once", COMMIT_INTERVAL=3600.0)  # only the revoke commits
    until(lambda: run.stats().processed == 30, "all handled")
    assert cluster.committed(GROUP, TOPIC, 0) is None and outputs(cluster) == Counter()
    cluster.consumer().rebalance(revoke=[(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)]).wait(WAIT)
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [10, 10, 10]
    assert outputs(cluster) == every({0: 10, 1: 10, 2: 10})
    run.stop()


def test_exactly_once_refuses_read_uncommitted_input(cluster: FakeKafka) -> None:
    from mtc75 import testing

    consumer = testing.from_settings(cluster.factories(), transform, fast_settings(PROCESSING_GUARANTEE="exactly_once"),
                                     librdkafka={"isolation.level": "read_uncommitted"})
    with pytest.raises(ConfigError, match="read_committed"):
        consumer.run(max_messages=1)


def test_output_is_exported() -> None:
    assert mtc75.Output is Output


def test_exactly_once_a_start_up_failure_before_transactions_is_its_own_error(cluster: FakeKafka) -> None:
    from mtc75 import testing
    from mtc75.errors import TopicNotFound

    settings = fast_settings(PROCESSING_GUARANTEE="exactly_once", TOPIC="missing")
    with pytest.raises(TopicNotFound):
        testing.from_settings(cluster.factories(), transform, settings).run(max_messages=1)


def test_exactly_once_a_lost_assignment_aborts_the_transaction_holding_its_outputs(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 10, 1: 10, 2: 10})
    run = start(transform, PROCESSING_GUARANTEE="exactly_once", COMMIT_INTERVAL=3600.0)  # no commit by the clock
    until(lambda: run.stats().processed == 30, "all handled")
    consumer = cluster.consumer()
    consumer.lose().wait(WAIT)
    assert cluster.transactions == {"committed": 0, "aborted": 1}
    assert outputs(cluster) == Counter() and cluster.committed(GROUP, TOPIC, 0) is None
    consumer.rebalance(assign=[(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)]).wait(WAIT)
    until(lambda: run.stats().processed == 60, "all handled again")
    run.stop()  # shutdown commits
    assert outputs(cluster) == every({0: 10, 1: 10, 2: 10})
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [10, 10, 10]


def test_an_async_handler_returns_outputs_too(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 5, 1: 5})

    async def handler(message: Any) -> list[Output]:
        return [transform(message)]

    stats = start(handler, max_messages=10).join()
    assert stats.processed == 10 and outputs(cluster) == every({0: 5, 1: 5})


def test_exactly_once_a_topic_id_check_without_answer_commits_nothing_and_aborts_before_the_timeout(
    cluster: FakeKafka, start: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtc75.engine import transactions

    monkeypatch.setattr(transactions, "TRANSACTION_TIMEOUT_MS", 200)  # half of it: 0.1 s
    cluster.fill(TOPIC, {0: 10})
    run = start(transform, PROCESSING_GUARANTEE="exactly_once")
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 10, "the first ten committed")
    cluster.describe_error = KafkaError(KafkaError._TIMED_OUT, "no answer")  # a node that does not answer
    cluster.fill(TOPIC, {0: 10})
    until(lambda: cluster.transactions["aborted"] >= 1, "the transaction aborted before its timeout")
    assert cluster.committed(GROUP, TOPIC, 0) == 10 and outputs(cluster) == every({0: 10})
    cluster.describe_error = None
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 20, "committed once the topic is confirmed again")
    run.stop()
    assert outputs(cluster) == every({0: 20})


def test_exactly_once_over_two_topics_commits_both_and_dead_letters_each_on_its_own(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    """One transaction holds both topics' outputs, dead letters and offsets; each dead letter goes to its own
    topic's DLQ (the second one's made when its first dead letter needs it)."""
    cluster.create_topic("payments", 2)
    cluster.fill(TOPIC, {0: 10, 1: 10, 2: 10})
    cluster.fill("payments", {0: 10, 1: 10})

    def handler(message: Any) -> Output:
        if message.offset() == 7 and message.partition() == 1:
            raise ValueError("poison")
        return Output(OUT, json.dumps([message.topic(), message.partition(), message.offset()]).encode())

    stats = start(handler, max_messages=50, TOPIC=(TOPIC, "payments"), PROCESSING_GUARANTEE="exactly_once",
                  ON_FAILURE="dlq").join()
    assert stats.dead_lettered == 2
    assert [(m.topic(), m.offset()) for m in cluster.messages(f"{TOPIC}.dlq")] == [(f"{TOPIC}.dlq", 0)]
    assert len(cluster.messages("payments.dlq")) == 1
    written = Counter(tuple(json.loads(m.value())) for m in cluster.messages(OUT))
    assert len(written) == 48 and set(written.values()) == {1}
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [10, 10, 10]
    assert [cluster.committed(GROUP, "payments", p) for p in range(2)] == [10, 10]
