"""``on_error`` (issue 28 item 3): a service hears of every failed attempt and of what became of each message
that did not succeed, on a thread of its own, whatever the hook does.

The matrix runs the real engine against the in-memory Kafka (tests/fake_kafka.py, through mtc75.testing): every
handler kind (sync, ``async def``, batch and async batch with BATCH_SIZE 4, a value that does not deserialize)
times every outcome (retried then done, dead-lettered, skipped, stopped), checking the exact calls the hook saw
and the failure's log line at Python's default level (WARNING). Then the hook's own failures (it raises, raises
a BaseException, blocks, calls back into the consumer), messages given up (revoke, shutdown, a dead letter never
confirmed or refused), and one run against the real broker.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError

import mtc75
from mtc75 import testing
from mtc75.core.failures import ABANDONED, DEAD_LETTERED, OUTCOMES, RETRY, SKIPPED, STOPPED
from mtc75.core.offsets import OffsetTracker
from mtc75.core.work import Work
from mtc75.errors import BatchError, ConfigError, MessageFailed, MisuseError
from mtc75.kafka.deadletter import H_OFFSET
from mtc75.runtime import dispatcher as dispatcher_module
from mtc75.runtime import failurehook as failurehook_module
from mtc75.runtime.failurehook import THREAD_NAME, FailureHook
from mtc75.settings import Settings
from tests.fake_kafka import FakeKafka
from tests.kafka_helpers import produce_numbered, read_topic, wait_until

pytestmark = pytest.mark.timeout(60)

TOPIC, GROUP = "orders", "billing"
COUNT, POISON = 6, 2  # messages on partition 0, and the offset that fails
WAIT = 10.0
FAST = {"commit_interval": 0.02, "pause_interval": 0.05, "shutdown_timeout": 5.0, "revoke_timeout": 5.0,
        "max_attempts": 2, "retry_backoff": 0.0, "retry_backoff_max": 0.0, "max_thread_count": 4}
BATCH = {"batch_size": 4, "batch_wait": 0.05}
KINDS = ["sync", "async def", "batch", "async batch", "deserializer"]
# outcome -> (ON_FAILURE, the poison message fails only its first attempt)
SCENARIOS = {"retry, then done": ("skip", True), DEAD_LETTERED: ("dlq", False), SKIPPED: ("skip", False),
             STOPPED: ("stop", False)}


class Hook:
    """An on_error that records what it is told and on which thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[mtc75.Failure] = []
        self.threads: set[str] = set()

    def __call__(self, failure: mtc75.Failure) -> None:
        with self.lock:
            self.seen.append(failure)
            self.threads.add(threading.current_thread().name)

    def calls(self) -> list[tuple[int, int, str, str]]:
        with self.lock:
            return [(f.message.offset(), f.attempt, f.outcome, type(f.exception).__name__) for f in self.seen]


class Poison:
    """The poison message's failure rule and the calls per offset (thread-safe)."""

    def __init__(self, once: bool) -> None:
        self.once = once
        self.lock = threading.Lock()
        self.count: Counter[int] = Counter()

    def fails(self, offset: int) -> bool:
        with self.lock:
            self.count[offset] += 1
            n = self.count[offset]
        return offset == POISON and (not self.once or n == 1)


def _handler(kind: str, poison: Poison) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The handler of ``kind`` failing as ``poison`` says, and the consumer keywords it needs."""

    def one(message: Any) -> None:
        if poison.fails(message.offset()):
            raise ValueError(f"poison {message.offset()}")

    async def one_async(message: Any) -> None:
        await asyncio.sleep(0)
        one(message)

    def named(batch: list[Any]) -> None:
        failed = [(m, ValueError(f"poison {m.offset()}")) for m in batch if poison.fails(m.offset())]
        if failed:
            raise BatchError(failed)

    async def named_async(batch: list[Any]) -> None:
        await asyncio.sleep(0)
        named(batch)

    def decode(data: bytes) -> int:
        offset = int(data)
        if poison.fails(offset):  # a registry out of reach is retried; bytes that do not decode are not
            raise ConnectionRefusedError("registry down") if poison.once else ValueError(f"not a number {offset}")
        return offset

    return {
        "sync": (one, {}),
        "async def": (one_async, {}),
        "batch": (named, BATCH),
        "async batch": (named_async, BATCH),
        "deserializer": (lambda m: None, {"value_deserializer": decode}),
    }[kind]


def _cluster() -> FakeKafka:
    cluster = FakeKafka()
    cluster.create_topic(TOPIC, 1)
    for i in range(COUNT):
        cluster.produce(TOPIC, 0, str(i).encode(), key=b"k")
    return cluster


def _consumer(cluster: FakeKafka, handler: Callable[..., Any], on_error: Any, **kw: Any) -> mtc75.Consumer:
    return testing.consumer(cluster.factories(), handler, topic=TOPIC, group_id=GROUP, on_error=on_error,
                            **{**FAST, **kw})


@pytest.mark.parametrize("outcome", list(SCENARIOS))
@pytest.mark.parametrize("kind", KINDS)
def test_the_hook_hears_every_failed_attempt_then_the_outcome_for_every_handler_kind(
    kind: str, outcome: str, caplog: pytest.LogCaptureFixture
) -> None:
    on_failure, once = SCENARIOS[outcome]
    poison = Poison(once)
    handler, kw = _handler(kind, poison)
    hook = Hook()
    cluster = _cluster()
    consumer = _consumer(cluster, handler, hook, on_failure=on_failure, **kw)
    with caplog.at_level(logging.WARNING):  # Python's default level: what a service shows without configuring
        if on_failure == "stop":
            with pytest.raises(MessageFailed, match=rf"{TOPIC}\[0\]@{POISON} failed"):
                consumer.run(max_messages=COUNT)
        else:
            stats = consumer.run(max_messages=COUNT)
            assert stats.processed == COUNT and cluster.committed(GROUP, TOPIC, 0) == COUNT
    undecodable = kind == "deserializer" and not once
    error = "DeserializationError" if kind == "deserializer" else "ValueError"
    if once:
        expected = [(POISON, 1, RETRY, error)]
    elif undecodable:  # not retried: the same bytes fail the same way
        expected = [(POISON, 1, outcome, error)]
    else:
        expected = [(POISON, 1, RETRY, error), (POISON, 2, outcome, error)]
    assert hook.calls() == expected  # returned after the run: every report was delivered by then
    assert hook.threads == {THREAD_NAME}
    assert [f.final for f in hook.seen] == [f.outcome != RETRY for f in hook.seen]
    assert all(f.message.value() == str(POISON).encode() for f in hook.seen)  # the fetched message, as fetched
    if kind == "deserializer":
        assert all(isinstance(f.exception, mtc75.DeserializationError) for f in hook.seen)
    # ... and the failure's log line at the default level: where, which attempt of how many, type and text
    text = r"DeserializationError: could not deserialize the value" if kind == "deserializer" else "ValueError: poison"
    lines = [r.getMessage() for r in caplog.records if r.name == dispatcher_module.__name__]
    pattern = (rf"handler failed for {TOPIC}\[0\]@{POISON}: {text}.* \(not retried: " if undecodable
               else rf"handler failed for {TOPIC}\[0\]@{POISON} \(attempt 1 of 2\): {text}")
    assert any(re.match(pattern, line) for line in lines), lines


def test_a_batch_that_fails_whole_reports_each_of_its_messages_then_the_poison_alone() -> None:
    """A batch handler that raises (no BatchError): every message of the batch failed that attempt."""
    calls: list[tuple[int, ...]] = []
    lock = threading.Lock()

    def handle(batch: list[Any]) -> None:
        offsets = tuple(m.offset() for m in batch)
        with lock:
            calls.append(offsets)
        if POISON in offsets:
            raise ValueError("the batch failed")

    hook = Hook()
    cluster = _cluster()
    stats = _consumer(cluster, handle, hook, on_failure="skip", **BATCH).run(max_messages=COUNT)
    assert stats.processed == COUNT and stats.skipped == 1
    first = next(c for c in calls if POISON in c)
    assert len(first) > 1  # a batch, not a message alone
    per_offset: dict[int, list[tuple[int, str]]] = {}
    for offset, attempt, outcome, _ in hook.calls():
        per_offset.setdefault(offset, []).append((attempt, outcome))
    batch_attempts = [(1, RETRY), (2, RETRY)]  # the whole batch twice; then each message alone
    assert per_offset == {o: batch_attempts + ([(1, RETRY), (2, SKIPPED)] if o == POISON else []) for o in first}


# -- what the hook does cannot reach the consumer --------------------------------------------------------


@pytest.mark.parametrize("raised", [ValueError("hook bug"), SystemExit(3), KeyboardInterrupt()],
                         ids=["ValueError", "SystemExit", "KeyboardInterrupt"])
def test_a_hook_that_raises_is_logged_once_and_every_report_still_reaches_it(
    raised: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    told: list[str] = []

    def hook(failure: mtc75.Failure) -> None:
        told.append(failure.outcome)
        raise raised

    cluster = _cluster()
    with caplog.at_level(logging.WARNING):
        stats = _consumer(cluster, lambda m: _raise() if m.offset() in (1, 4) else None, hook,
                          on_failure="dlq").run(max_messages=COUNT)
    assert (stats.processed, stats.dead_lettered) == (COUNT, 2)
    assert cluster.committed(GROUP, TOPIC, 0) == COUNT
    assert Counter(told) == Counter({RETRY: 2, DEAD_LETTERED: 2})  # the thread survived every raise
    said = [r for r in caplog.records if r.name == failurehook_module.__name__]
    assert len(said) == 1 and said[0].getMessage().startswith(f"on_error raised {type(raised).__name__}")
    assert said[0].exc_info is not None  # the hook's traceback, to fix it


def _raise() -> None:
    raise ValueError("declined")


def test_a_blocked_hook_holds_neither_the_workers_nor_the_poll_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every message handled and committed while the hook is stuck in its first call; released as the run
    ends, it still hears every report before close() returns."""
    entered, release = threading.Event(), threading.Event()
    close = FailureHook.close

    def release_then_close(self: FailureHook, timeout: float) -> None:
        release.set()  # the 39 other reports are still queued now: the shutdown delivers them
        close(self, timeout)

    monkeypatch.setattr(FailureHook, "close", release_then_close)
    told: list[tuple[int, str]] = []

    def hook(failure: mtc75.Failure) -> None:
        entered.set()
        release.wait(WAIT * 3)
        told.append((failure.message.offset(), failure.outcome))

    cluster = FakeKafka()
    cluster.create_topic(TOPIC, 1)
    cluster.fill(TOPIC, {0: 200})
    consumer = _consumer(cluster, lambda m: _raise() if m.offset() % 10 == 0 else None, hook, on_failure="skip")
    consumer.start()
    try:
        assert entered.wait(WAIT)
        wait_until(lambda: cluster.committed(GROUP, TOPIC, 0) == 200, WAIT, what="every offset committed")
        wait_until(lambda: consumer.stats().processed == 200, WAIT, what="a snapshot saying so")  # 0.25 s old at most
        assert consumer.stats().skipped == 20
        assert not told  # still in its first call
        consumer.close(timeout=WAIT)
    finally:
        release.set()
    assert Counter(outcome for _, outcome in told) == Counter({RETRY: 20, SKIPPED: 20})


@pytest.mark.slow
def test_a_hook_that_never_returns_does_not_hold_the_shutdown_past_its_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SHUTDOWN_TIMEOUT + 5 s, the shutdown's promise, holds with a hook stuck for good; what it did not hear
    is said."""
    stuck = threading.Event()
    poison = Poison(once=False)
    handler, _ = _handler("sync", poison)
    cluster = _cluster()
    consumer = _consumer(cluster, handler, lambda failure: stuck.wait(60), on_failure="skip", shutdown_timeout=0.2)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING):
            consumer.run(max_messages=COUNT)
        took = time.monotonic() - started
    finally:
        stuck.set()
    assert took < 0.2 + 5.0 + 1.0, took
    [said] = [r.getMessage() for r in caplog.records if r.name == failurehook_module.__name__]
    assert said.startswith("on_error did not return within") and "1 failure reports not delivered" in said, said


def test_the_hook_may_stop_the_consumer_but_not_wait_for_it() -> None:
    results: list[str] = []

    def hook(failure: mtc75.Failure) -> None:
        if failure.final:
            return
        for call in (consumer.close, consumer.run):
            try:
                call()
            except MisuseError as err:
                results.append(str(err))
        consumer.stop()

    cluster = FakeKafka()
    cluster.create_topic(TOPIC, 1)
    cluster.fill(TOPIC, {0: 5})
    consumer = _consumer(cluster, lambda m: _raise() if m.offset() == 0 else None, hook, on_failure="skip")
    stats = consumer.run()  # no bound: the hook's stop() ends it
    assert stats.skipped == 1
    assert len(results) == 2 and "called from its on_error" in results[0] and "already running" in results[1]


def test_what_cannot_be_a_hook_is_refused_before_anything_connects() -> None:
    async def coroutine(failure: mtc75.Failure) -> None: ...

    class AsyncCall:
        async def __call__(self, failure: mtc75.Failure) -> None: ...

    cluster = _cluster()
    with pytest.raises(ConfigError, match="on_error=42"):
        _consumer(cluster, lambda m: None, 42)
    for bad in (coroutine, AsyncCall()):
        with pytest.raises(ConfigError, match="on_error must be a plain function"):
            _consumer(cluster, lambda m: None, bad)
    with pytest.raises(ConfigError, match="on_error must be a plain function"):
        mtc75.Consumer.from_settings(lambda m: None, Settings(), on_error=coroutine)


# -- messages given up: abandoned, or refused by Kafka ------------------------------------------------------


def test_a_message_waiting_for_its_retry_at_shutdown_is_reported_abandoned() -> None:
    hook = Hook()
    cluster = _cluster()
    consumer = _consumer(cluster, lambda m: _raise() if m.offset() == POISON else None, hook, on_failure="skip",
                         retry_backoff=60.0, retry_backoff_max=60.0)
    consumer.start()
    wait_until(lambda: hook.calls() == [(POISON, 1, RETRY, "ValueError")], WAIT, what="the retry report")
    stats = consumer.close(timeout=WAIT)
    assert hook.calls() == [(POISON, 1, RETRY, "ValueError"), (POISON, 1, ABANDONED, "ValueError")]
    assert stats.skipped == 0 and cluster.committed(GROUP, TOPIC, 0) == POISON  # uncommitted: delivered again


def test_a_message_waiting_for_its_retry_when_its_partition_is_revoked_is_reported_abandoned() -> None:
    hook = Hook()
    cluster = _cluster()
    consumer = _consumer(cluster, lambda m: _raise() if m.offset() == POISON else None, hook, on_failure="skip",
                         retry_backoff=60.0, retry_backoff_max=60.0)
    consumer.start()
    try:
        wait_until(lambda: hook.calls() == [(POISON, 1, RETRY, "ValueError")], WAIT, what="the retry report")
        assert cluster.consumer().rebalance(revoke=[(TOPIC, 0)]).wait(WAIT)
        wait_until(lambda: len(hook.calls()) == 2, WAIT, what="the final report")
        assert hook.calls()[1] == (POISON, 1, ABANDONED, "ValueError")
    finally:
        consumer.close(timeout=WAIT)


def test_a_dead_letter_kafka_refuses_is_reported_stopped() -> None:
    hook = Hook()
    cluster = _cluster()
    cluster.fail_deliveries(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    consumer = _consumer(cluster, lambda m: _raise() if m.offset() == POISON else None, hook, on_failure="dlq",
                         max_attempts=1)
    with pytest.raises(MessageFailed, match="dead-letter topic"):
        consumer.run(max_messages=COUNT)
    assert hook.calls() == [(POISON, 1, STOPPED, "ValueError")]


@pytest.mark.slow
def test_a_dead_letter_still_unconfirmed_at_the_end_is_reported_abandoned() -> None:
    """Waits out the shutdown's one second for the last dead letters."""
    hook = Hook()
    cluster = _cluster()
    cluster.fail_deliveries(KafkaError(KafkaError._MSG_TIMED_OUT), count=1000)  # retried until the shutdown
    consumer = _consumer(cluster, lambda m: _raise() if m.offset() == POISON else None, hook, on_failure="dlq",
                         max_attempts=1, retry_backoff_max=0.05, shutdown_timeout=0.2)  # then 1 s for dead letters
    consumer.start()
    wait_until(lambda: consumer.stats().processed == COUNT - 1, WAIT, what="the others handled")
    stats = consumer.close(timeout=WAIT)
    assert stats.dead_lettered == 0 and cluster.committed(GROUP, TOPIC, 0) == POISON
    assert hook.calls() == [(POISON, 1, ABANDONED, "ValueError")]


# -- the delivery itself (FailureHook) ---------------------------------------------------------------------


@pytest.fixture
def blocked() -> Iterator[tuple[FailureHook, threading.Event, threading.Event]]:
    """A FailureHook of capacity 3 whose hook blocks until released; released and closed at teardown."""
    entered, release = threading.Event(), threading.Event()

    def hook(failure: mtc75.Failure) -> None:
        entered.set()
        release.wait(WAIT)

    delivery = FailureHook(hook, capacity=3, log_every=2)
    delivery.start()
    yield delivery, entered, release
    release.set()
    delivery.close(WAIT)


def _failed_work(offset: int) -> Work:
    tracker = OffsetTracker()
    tracker.assign([(TOPIC, 0)])
    state = tracker.get((TOPIC, 0))
    assert state is not None
    work = Work(f"message {offset}", state, offset)
    work.attempts, work.exception = 1, ValueError("x")
    return work


def test_reports_beyond_the_queue_are_dropped_counted_and_said_never_waited_for(
    blocked: tuple[FailureHook, threading.Event, threading.Event], caplog: pytest.LogCaptureFixture
) -> None:
    delivery, entered, _ = blocked
    delivery.report(_failed_work(0), RETRY)
    assert entered.wait(WAIT)  # the thread took it and is stuck in the hook: the queue is empty again
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        for offset in range(1, 8):
            delivery.report(_failed_work(offset), RETRY)
    assert time.monotonic() - started < 1.0  # never waited for the hook
    assert delivery.dropped == 4  # 3 queued, 4 dropped
    said = [r.getMessage() for r in caplog.records if r.name == failurehook_module.__name__]
    assert len(said) == 3 and all("failure reports dropped so far" in line for line in said)  # 1st, 2nd, 4th


def test_close_gives_up_on_a_stuck_hook_after_its_timeout_and_delivers_nothing_more(
    blocked: tuple[FailureHook, threading.Event, threading.Event], caplog: pytest.LogCaptureFixture
) -> None:
    delivery, entered, _ = blocked
    delivery.report(_failed_work(0), RETRY)
    assert entered.wait(WAIT)
    delivery.report(_failed_work(1), SKIPPED)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        delivery.close(0.05)
    assert time.monotonic() - started < 1.0
    assert delivery.dropped == 1
    delivery.report(_failed_work(2), SKIPPED)  # after close: ignored
    assert delivery.dropped == 1
    assert any("1 failure reports not delivered" in r.getMessage() for r in caplog.records)


def test_a_work_that_never_failed_is_not_reported_and_the_outcomes_are_the_documented_ones() -> None:
    told: list[mtc75.Failure] = []
    delivery = FailureHook(told.append)
    delivery.start()
    work = _failed_work(0)
    work.exception = None  # dropped before it ever ran
    delivery.report(work, ABANDONED)
    delivery.close(WAIT)
    assert told == []
    assert OUTCOMES == ("retry", "dead_lettered", "skipped", "stopped", "abandoned")


# -- the real broker -------------------------------------------------------------------------------------


def test_on_error_against_the_real_broker(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic = make_topic(partitions=1)
    produce_numbered(bootstrap, topic, 10)
    calls: Counter[int] = Counter()
    lock = threading.Lock()

    def handle(message: Any) -> None:
        with lock:
            calls[message.offset()] += 1
            n = calls[message.offset()]
        if message.offset() == 3 or (message.offset() == 5 and n == 1):
            raise ValueError(f"declined {message.offset()}")

    hook = Hook()
    consumer = mtc75.Consumer(handle, topic=topic, group_id=unique("g"), bootstrap_servers=bootstrap,
                              max_attempts=2, retry_backoff=0.05, commit_interval=0.1, on_error=hook)
    stats = consumer.run(max_messages=10)
    assert (stats.processed, stats.dead_lettered, stats.retried) == (10, 1, 2)
    assert sorted(hook.calls()) == [(3, 1, RETRY, "ValueError"), (3, 2, DEAD_LETTERED, "ValueError"),
                                    (5, 1, RETRY, "ValueError")]
    assert hook.threads == {THREAD_NAME}
    [letter] = read_topic(bootstrap, topic + ".dlq", 1)
    assert dict(letter.headers() or [])[H_OFFSET] == b"3"


@pytest.mark.parametrize("with_hook", [False, True], ids=["no hook", "a hook"])
def test_a_failed_message_keeps_its_exception_only_for_a_hook(with_hook: bool) -> None:
    """Without on_error a failed message keeps only its error's text: an exception holds its traceback's frames,
    and a poison storm keeps thousands of failed messages in flight."""
    from mtc75.core.retry import RetryPolicy
    from mtc75.runtime.dispatcher import Dispatcher
    from mtc75.runtime.invoker import Invoker
    from tests.test_chunks import _drain, _run

    told: list[mtc75.Failure] = []
    hook = FailureHook(told.append) if with_hook else None
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(lambda m: _raise()), 1, RetryPolicy(max_attempts=1, base=0.0, cap=0.0),
                   failure_hook=hook)
    done: list[Work] = []
    d.put([_run(tracker, 0, 0, 1)])
    wait_until(lambda: (_drain(d, tracker, done), bool(done))[1], WAIT, what="the failed message")
    d.shutdown(wait=True)
    [work] = done
    assert work.failed and work.error == "ValueError: declined"
    assert isinstance(work.exception, ValueError) if with_hook else work.exception is None
