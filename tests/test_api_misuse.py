"""Library misuse (issue 22, item 9): every call the consumer's state does not allow raises MisuseError at
once -- never a hang, never a silent success -- and the calls documented as safe are safe from anywhere.

Most cases run against the in-memory Kafka (tests/fake_kafka.py); the last two against the real broker.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import mtc75
from mtc75 import testing
from tests.api_helpers import FAST, GROUP, TOPIC, WAIT, make, new_cluster
from tests.fake_kafka import FakeKafka
from tests.kafka_helpers import committed_offsets, produce_numbered, report_figures, wait_until

pytestmark = pytest.mark.timeout(120)

cluster = pytest.fixture(name="cluster")(new_cluster)


def test_run_start_or_with_after_close_raise_at_once_without_connecting(cluster: FakeKafka) -> None:
    consumer = make(cluster)
    assert consumer.close().processed == 0  # never ran: its idle Stats, at once
    for call in (consumer.run, consumer.start, consumer.__enter__):
        with pytest.raises(mtc75.MisuseError, match="closed; make a new one"):
            call()
    with pytest.raises(mtc75.MisuseError, match="nothing to retune"):
        consumer.retune(max_thread_count=3)
    assert cluster.consumers == []
    assert consumer.close().processed == 0  # a second close() is fine


def test_a_second_run_or_start_raises_and_close_twice_returns_the_same_stats(cluster: FakeKafka) -> None:
    cluster.fill(TOPIC, {0: 3})
    consumer = make(cluster)
    stats = consumer.run(max_messages=3)
    for call in (consumer.run, consumer.start):
        with pytest.raises(mtc75.MisuseError, match="already run; make a new one"):
            call()
    with pytest.raises(mtc75.MisuseError, match="nothing to retune"):
        consumer.retune(pause_interval=1.0)
    assert consumer.close() == stats and consumer.close() == stats
    assert len(cluster.consumers) == 1


class SlowStateRead(mtc75.Consumer):
    """Reading the run state takes 5 ms: a thread switch between "not running yet" and "running" for
    certain, where the scheduler would give one only now and then."""

    @property  # type: ignore[override]
    def _state(self) -> str:
        value = str(self.__dict__["_slow_state"])
        time.sleep(0.005)  # read, then switched away from: what it read may be stale on return
        return value

    @_state.setter
    def _state(self, value: str) -> None:
        self.__dict__["_slow_state"] = value


def test_two_threads_calling_run_and_start_at_once_run_it_once(cluster: FakeKafka) -> None:
    """The "already running" check and its claim are one step under a lock: of two threads released
    together, exactly one runs and the other gets MisuseError."""
    outcomes: list[tuple[str, ...]] = []
    for _ in range(20):
        consumer = testing.consumer(cluster.factories(), lambda m: None, cls=SlowStateRead, topic=TOPIC,
                                    group_id=GROUP, **FAST)
        consumer.stop()  # stop() first: a run returns at once, without connecting
        gate = threading.Barrier(2)
        got: list[str] = []

        def call(method: Callable[[], object], gate: threading.Barrier = gate, got: list[str] = got) -> None:
            gate.wait()
            try:
                method()
                got.append("ran")
            except mtc75.MisuseError:
                got.append("refused")

        threads = [threading.Thread(target=call, args=(m,)) for m in (consumer.run, consumer.start)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        consumer.close(timeout=WAIT)
        outcomes.append(tuple(sorted(got)))
    assert set(outcomes) == {("ran", "refused")}, {o: outcomes.count(o) for o in set(outcomes)}


def close_from_handler(consumer: mtc75.Consumer, seen: dict[str, Any]) -> None:
    """close() from a handler: ``seen["close"]`` = (seconds until it raised MisuseError, its message)."""
    started = time.monotonic()
    try:
        consumer.close(timeout=3)  # bounded, should it wait after all
    except mtc75.MisuseError as err:
        seen["close"] = (time.monotonic() - started, str(err))


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("how", ["start", "run"])
def test_close_from_a_handler_raises_at_once_and_stop_there_ends_the_run_with_that_message_committed(
    cluster: FakeKafka, kind: str, how: str
) -> None:
    cluster.fill(TOPIC, {0: 10})
    seen: dict[str, Any] = {}

    def misuse(message: Any) -> None:
        if message.offset() == 5 and "close" not in seen:
            close_from_handler(consumer, seen)
            try:
                consumer.run()
            except mtc75.MisuseError as err:
                seen["run"] = str(err)
            consumer.retune(pause_interval=0.2)  # safe from a handler
            consumer.stop()  # the call for "stop after this message"
            consumer.stop()  # twice is fine

    def sync_handler(message: Any) -> None:
        misuse(message)

    async def async_handler(message: Any) -> None:
        await asyncio.sleep(0)
        misuse(message)

    consumer = make(cluster, sync_handler if kind == "sync" else async_handler, max_thread_count=1)
    if how == "start":
        consumer.start()
        wait_until(lambda: "close" in seen or cluster.committed(GROUP, TOPIC, 0) == 10, WAIT, step=0.01,
                   what="the handler's close()")
        stats = consumer.close(timeout=WAIT)
    else:
        stats = consumer.run()
    waited, text = seen["close"]
    assert waited < 1.0 and "called from one of its handlers" in text and "call stop()" in text, seen
    assert "already running (called from one of its handlers)" in seen["run"]
    # the caller's own message (5) committed, with whatever the worker took before the intake closed
    assert 6 <= stats.processed < 10 and cluster.committed(GROUP, TOPIC, 0) == stats.processed


@pytest.mark.parametrize("how", ["start", "run"])
def test_close_from_on_status_raises_at_once_and_stop_there_ends_the_run(cluster: FakeKafka, how: str) -> None:
    seen: list[str] = []

    def on_status(_stats: mtc75.Stats) -> None:
        if not seen:
            try:
                consumer.close(timeout=3)  # bounded, should it wait after all
            except mtc75.MisuseError as err:
                seen.append(str(err))
            consumer.stop()

    consumer = make(cluster, on_status=on_status, status_interval=0.05)
    started = time.monotonic()
    if how == "start":
        consumer.start()
        wait_until(lambda: bool(seen), WAIT, step=0.01, what="on_status called")
        consumer.close(timeout=WAIT)
    else:
        consumer.run()  # ended by the stop() in on_status
    assert time.monotonic() - started < WAIT
    assert seen and "called from its on_status" in seen[0]


def test_close_from_another_thread_waits_for_a_run_on_the_owner_and_close_with_a_timeout_raises(
    cluster: FakeKafka,
) -> None:
    cluster.fill(TOPIC, {0: 2})
    release = threading.Event()
    consumer = make(cluster, handler=lambda m: release.wait(WAIT))
    closed: list[Any] = []
    with pytest.raises(mtc75.ConfigError, match="timeout"):
        consumer.close(timeout=-1)

    def closer() -> None:
        wait_until(lambda: consumer.stats().active_threads == 2, WAIT, step=0.01, what="two handlers running")
        started = time.monotonic()
        try:
            consumer.close(timeout=0.2)
        except TimeoutError:
            closed.append(time.monotonic() - started)
        release.set()
        closed.append(consumer.close(timeout=WAIT))

    thread = threading.Thread(target=closer)
    thread.start()
    stats = consumer.run()  # ended by the other thread's close() (stop, then wait)
    thread.join(WAIT)
    # the timeout, not a hang (a hang never returns: release comes only after); the bound leaves room for load
    assert 0.2 <= closed[0] < WAIT / 2
    assert closed[1] == stats and stats.processed == 2  # the final Stats, the same as run() returned


def test_a_handler_may_close_another_consumer(cluster: FakeKafka) -> None:
    """Only the consumer's own threads are refused: closing another consumer from a handler just waits for it."""
    other_cluster = FakeKafka()
    other_cluster.create_topic(TOPIC, 1)
    other = make(other_cluster)
    other.start()
    closed: list[mtc75.Stats] = []
    cluster.fill(TOPIC, {0: 1})
    consumer = make(cluster, handler=lambda m: closed.append(other.close(timeout=WAIT)))
    consumer.run(max_messages=1)
    assert len(closed) == 1 and other_cluster.consumer().closed


def test_safe_calls_are_safe_before_during_and_after(cluster: FakeKafka) -> None:
    consumer = make(cluster, max_thread_count=1)
    consumer.retune(max_thread_count=2)  # before the run: its setting
    assert consumer.stats().max_thread_count == 2 and not consumer.lingering
    consumer.start()
    stopper = threading.Thread(target=consumer.stop)
    stopper.start()
    stopper.join(WAIT)
    stats = consumer.close(timeout=WAIT)
    consumer.stop()  # after the end: nothing to do, no error
    assert consumer.stats() == stats and not consumer.lingering


# -- against the real broker -----------------------------------------------------------------------------


def test_close_in_a_handler_raises_at_once_and_the_message_is_committed_on_a_real_broker(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    """The case of the issue: close() inside a handler blocked SHUTDOWN_TIMEOUT and left that message
    uncommitted. Now: MisuseError at once; stop() there ends the run with that message committed."""
    topic, group = make_topic(partitions=1), unique("g")
    produce_numbered(bootstrap, topic, 10)
    seen: dict[str, Any] = {}
    handled: list[int] = []

    def handler(message: Any) -> None:
        handled.append(message.offset())
        if message.offset() == 5 and "close" not in seen:
            close_from_handler(consumer, seen)
            seen["stop_at"] = time.monotonic()
            consumer.stop()

    consumer = mtc75.Consumer(handler, topic=topic, group_id=group, bootstrap_servers=bootstrap, max_thread_count=1,
                              shutdown_timeout=5.0, commit_interval=0.2)
    consumer.start()
    wait_until(lambda: "stop_at" in seen, 60, what="offset 5 handled")
    stats = consumer.close(timeout=30)
    ended = time.monotonic() - seen["stop_at"]
    waited, text = seen.get("close", (None, "close() did not raise"))
    assert waited is not None and waited < 1.0, text
    assert ended < 5.0  # not SHUTDOWN_TIMEOUT: nothing waited for the calling handler
    # the caller's own message (5) committed, with whatever the worker took before the intake closed
    assert handled == list(range(len(handled))) and 6 <= len(handled) < 10 and stats.abandoned == 0
    assert committed_offsets(bootstrap, group, topic) == {0: len(handled)} and stats.processed == len(handled)
    report_figures("close_in_handler", close_raised_after_ms=round(waited * 1000, 3),
                   run_ended_after_stop_s=round(ended, 2), handled=len(handled),
                   committed=committed_offsets(bootstrap, group, topic)[0])


def test_run_after_close_and_two_threads_running_one_consumer_on_a_real_broker(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group = make_topic(partitions=2), unique("g")
    produce_numbered(bootstrap, topic, 40)
    handled: list[tuple[int, int]] = []
    lock = threading.Lock()

    def handler(message: Any) -> None:
        with lock:
            handled.append((message.partition(), message.offset()))

    consumer = mtc75.Consumer(handler, topic=topic, group_id=group, bootstrap_servers=bootstrap, commit_interval=0.2)
    gate = threading.Barrier(2)
    results: list[Any] = []

    def call(method: Callable[..., Any]) -> None:
        gate.wait()
        started = time.monotonic()
        try:
            results.append(("ran", method(idle_exit=3.0)))
        except mtc75.MisuseError as err:
            results.append(("refused", time.monotonic() - started, str(err)))

    threads = [threading.Thread(target=call, args=(m,)) for m in (consumer.run, consumer.start)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wait_until(lambda: len(handled) >= 40, 60, what="40 handled")  # start() may have won: it returned at once
    stats = consumer.close(timeout=60)
    refused = [r for r in results if r[0] == "refused"]
    assert len(results) == 2 and len(refused) == 1, results
    assert refused[0][1] < 1.0 and "already run" in refused[0][2]
    assert stats.processed == 40 and len(handled) == 40 and len(set(handled)) == 40, (results, stats, len(handled))
    started = time.monotonic()
    with pytest.raises(mtc75.MisuseError, match="closed"):
        consumer.run()
    refused_after_close = time.monotonic() - started
    assert refused_after_close < 1.0
    report_figures("api_misuse", runs=len(results) - len(refused), handled=len(handled),
                   second_caller_refused_in_ms=round(refused[0][1] * 1000, 3),
                   run_after_close_refused_in_ms=round(refused_after_close * 1000, 3))
