"""Ordering modes and fairness against the real broker: what the handler saw, recorded per call."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest
from confluent_kafka import Producer

from mtc75.core.stats import Stats
from mtc75.settings import Settings
from tests.kafka_helpers import BoundConsumer, committed_offsets, end_offsets, report_figures, wait_until

pytestmark = pytest.mark.timeout(240)

Call = tuple[int, bytes | None, int, float, float, bool]  # partition, key, offset, start, end, raised


class Journal:
    """A handler that sleeps a random time (fixed per message) and records every call."""

    def __init__(self, most: float, fail_once: Callable[[int, int], bool] | None = None) -> None:
        self._most = most
        self._fail_once = fail_once
        self._lock = threading.Lock()
        self._failed: set[tuple[int, int]] = set()
        self._current = 0
        self.peak = 0
        self.calls: list[Call] = []
        self.first_start: dict[int, float] = {}

    def __call__(self, msg: Any) -> None:
        where = (msg.partition(), msg.offset())
        with self._lock:
            self._current += 1
            self.peak = max(self.peak, self._current)
            self.first_start.setdefault(msg.partition(), time.monotonic())
        started = time.monotonic()
        raised = False
        try:
            time.sleep(random.Random(hash(where)).uniform(0, self._most))
            if self._fail_once is not None and self._fail_once(*where):
                with self._lock:
                    fail = where not in self._failed
                    self._failed.add(where)
                if fail:
                    raised = True
                    raise RuntimeError(f"first attempt of {where} fails")
        finally:
            ended = time.monotonic()
            with self._lock:
                self._current -= 1
                self.calls.append((msg.partition(), msg.key(), msg.offset(), started, ended, raised))

    def done(self) -> set[tuple[int, int]]:
        with self._lock:
            return {(p, o) for p, _k, o, _s, _e, raised in self.calls if not raised}


def _settings(bootstrap: str, topic: str, group: str, **kw: Any) -> Settings:
    base = {"BOOTSTRAP_SERVERS": bootstrap, "TOPIC": topic, "GROUP_ID": group, "COMMIT_INTERVAL": 0.2}
    base.update(kw)
    return Settings().replace(**base)


def _produce(bootstrap: str, topic: str, count: int, keys: int | None) -> None:
    """``count`` messages, key ``k<i % keys>`` (None: no key, spread round-robin), all delivered or raise."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    failures: list[str] = []

    def report(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    for i in range(count):
        key = f"k{i % keys}" if keys else None
        partition = {} if keys else {"partition": i % 3}
        producer.produce(topic, key=key, value=b"%d" % i, on_delivery=report, **partition)
        producer.poll(0)
    assert producer.flush(30) == 0 and not failures, failures[:3]


def _lanes(calls: list[Call], by_key: bool) -> dict[tuple[int, bytes | None], list[Call]]:
    lanes: dict[tuple[int, bytes | None], list[Call]] = defaultdict(list)
    for call in calls:
        lanes[(call[0], call[1] if by_key else None)].append(call)
    for lane in lanes.values():
        lane.sort(key=lambda c: c[3])  # by start
    return lanes


def _violations(calls: list[Call], by_key: bool) -> tuple[int, int]:
    """(overlaps, out-of-order starts) within each key (or partition), over every call made."""
    overlaps = disorder = 0
    for lane in _lanes(calls, by_key).values():
        for before, after in pairwise(lane):
            if after[3] < before[4]:
                overlaps += 1
            # the next call is the same message again (a retry) or a later one, never an earlier one
            if after[2] < before[2] or (after[2] == before[2] and not before[5]):
                disorder += 1
    return overlaps, disorder


def _run(consumer: BoundConsumer, journal: Journal, n: int, timeout: float) -> Stats:
    result: list[Stats] = []
    thread = threading.Thread(target=lambda: result.append(consumer.run()), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(journal.done()) >= n, timeout, what=f"{n} messages handled")
    finally:
        consumer.stop()
        thread.join(60)
    assert result, "the consumer did not stop"
    return result[0]


@pytest.mark.parametrize("ordering", ["key", "unordered"])
def test_key_mode_never_overlaps_or_reorders_a_key_with_75_threads_and_20_keys(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], ordering: str
) -> None:
    topic, group, n = make_topic(partitions=3), unique("g"), 3000
    _produce(bootstrap, topic, n, keys=20)
    journal = Journal(most=0.02)
    consumer = BoundConsumer(_settings(bootstrap, topic, group, MAX_THREAD_COUNT=75, ORDERING=ordering), journal)
    stats = _run(consumer, journal, n, 120)
    overlaps, disorder = _violations(journal.calls, by_key=True)
    report_figures(f"ordering {ordering}: 75 threads, 20 keys", messages=n, overlaps=overlaps, disorder=disorder,
                   peak=journal.peak, elapsed_s=round(stats.elapsed_seconds, 2))
    if ordering == "unordered":  # the reference: without ordering the same run does break key order
        assert overlaps > 0
        return
    assert (overlaps, disorder) == (0, 0)
    assert len(journal.done()) == n and stats.ordering == "key"
    assert journal.peak > 10, "different keys must run in parallel"
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)


def test_partition_mode_never_overlaps_within_a_partition(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group, n = make_topic(partitions=3), unique("g"), 600
    _produce(bootstrap, topic, n, keys=None)
    journal = Journal(most=0.03)  # 15 ms on average: the partitions overlap
    consumer = BoundConsumer(_settings(bootstrap, topic, group, MAX_THREAD_COUNT=75, ORDERING="partition"), journal)
    stats = _run(consumer, journal, n, 120)
    overlaps, disorder = _violations(journal.calls, by_key=False)
    report_figures("ordering partition: 75 threads, 3 partitions", messages=n, overlaps=overlaps, disorder=disorder,
                   peak=journal.peak)
    assert (overlaps, disorder) == (0, 0)
    assert journal.peak >= 2, "different partitions must run in parallel"
    assert journal.peak <= 3
    assert len(journal.done()) == n and stats.processed == n
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)


def test_key_mode_retries_keep_the_order_of_their_key(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group, n = make_topic(partitions=3), unique("g"), 600
    _produce(bootstrap, topic, n, keys=20)
    journal = Journal(most=0.005, fail_once=lambda _p, o: o % 7 == 3)
    consumer = BoundConsumer(
        _settings(bootstrap, topic, group, MAX_THREAD_COUNT=75, ORDERING="key", MAX_ATTEMPTS=3,
                  RETRY_BACKOFF=0.05, RETRY_BACKOFF_MAX=0.1, ON_FAILURE="skip"),
        journal,
    )
    stats = _run(consumer, journal, n, 120)
    failures = sum(1 for c in journal.calls if c[5])
    assert failures > 20 and stats.retried == failures
    overlaps, disorder = _violations(journal.calls, by_key=True)
    report_figures("ordering key: retries", messages=n, retried=failures, overlaps=overlaps, disorder=disorder)
    assert (overlaps, disorder) == (0, 0)
    # after a failure, the next call of that key is the same message again
    for lane in _lanes(journal.calls, by_key=True).values():
        for before, after in pairwise(lane):
            if before[5]:
                assert after[2] == before[2], f"offset {after[2]} ran while {before[2]} waited for its retry"
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)


@pytest.mark.alone  # a 2 s bound on when each partition starts
@pytest.mark.parametrize("ordering", ["unordered", "key"])
def test_every_partition_starts_within_2s_and_never_waits_while_others_drain_in_the_demo_shape(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], ordering: str
) -> None:
    topic, group, n = make_topic(partitions=3), unique("g"), 600
    journal = Journal(most=0.0)

    def handler(msg: Any) -> None:
        time.sleep(0.1)
        journal(msg)

    consumer = BoundConsumer(
        _settings(bootstrap, topic, group, MAX_THREAD_COUNT=4, PAUSE_INTERVAL=1.0, ORDERING=ordering), handler,
        max_messages=n,
    )
    # As in the demo: the producer's burst lands while the group forms, so fetches return every
    # partition's messages, one partition's run after the other's.
    result: list[Stats] = []
    thread = threading.Thread(target=lambda: result.append(consumer.run()), daemon=True)
    thread.start()
    try:
        _produce(bootstrap, topic, n, keys=None)
        thread.join(60)
    finally:
        consumer.stop()
        thread.join(30)
    assert result and result[0].processed == n
    starts: dict[int, list[float]] = defaultdict(list)
    for partition, _key, _offset, started, _ended, _raised in journal.calls:
        starts[partition].append(started - 0.1)  # the handler records after its 0.1 s of work
    first = min(min(times) for times in starts.values())
    waits = {p: round(min(times) - first, 2) for p, times in sorted(starts.items())}
    # the longest stretch in which a partition with messages still to run got no thread
    gaps = {p: round(max(b - a for a, b in pairwise(sorted(times))), 2) for p, times in sorted(starts.items())}
    report_figures(f"fairness {ordering}: 4 threads, 3 partitions, 600 burst, 0.1 s", first_start_s=waits,
                   longest_wait_s=gaps, elapsed_s=round(result[0].elapsed_seconds, 1))
    assert len(waits) == 3 and max(waits.values()) <= 2.0, f"a partition's first message waited: {waits}"
    assert max(gaps.values()) <= 2.0, f"a partition waited while the others drained: {gaps}"


def test_a_hot_key_keeps_the_backlog_bounded_and_the_consumer_pauses(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group, n = make_topic(partitions=1), unique("g"), 3000
    _produce(bootstrap, topic, n, keys=1)  # one key: everything waits behind the running message
    backlogs: list[int] = []
    journal = Journal(most=0.01)

    def on_status(stats: Stats) -> None:
        backlogs.append(stats.backlog)
        if len(journal.calls) >= 300:
            consumer.stop()

    consumer = BoundConsumer(
        _settings(bootstrap, topic, group, MAX_THREAD_COUNT=75, ORDERING="key", PAUSE_INTERVAL=0.2), journal,
        on_status=on_status, status_interval=0.05,
    )
    stats = consumer.run()
    overlaps, disorder = _violations(journal.calls, by_key=True)
    report_figures("ordering key: one hot key, 75 threads", peak_backlog=max(backlogs), pauses=stats.pauses,
                   handled=len(journal.calls), peak_threads=journal.peak)
    assert (overlaps, disorder) == (0, 0) and journal.peak == 1
    assert stats.pauses >= 1, "every waiting message blocked and threads free: the consumer must pause"
    # the gate's high watermark with 75 threads is at least 150 (2 x threads) and grows with the rate;
    # unbounded intake would have taken the whole 3000-message backlog within a second
    assert max(backlogs) <= 1000, f"backlog grew to {max(backlogs)}"


def test_key_mode_through_a_rebalance_keeps_order_loses_nothing_and_redoes_nothing(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group, n = make_topic(partitions=4), unique("g"), 1200
    _produce(bootstrap, topic, n, keys=20)
    # Slow enough (4 threads, 20 ms on average: ~6 s in all) that the first one does not finish alone.
    leaving, staying = Journal(most=0.04), Journal(most=0.04)
    settings = _settings(bootstrap, topic, group, MAX_THREAD_COUNT=4, ORDERING="key", PAUSE_INTERVAL=0.2)
    leaver, stayer = BoundConsumer(settings, leaving), BoundConsumer(settings, staying)
    results: dict[str, Stats] = {}
    threads = [
        threading.Thread(target=lambda: results.__setitem__("leaver", leaver.run()), daemon=True),
        threading.Thread(target=lambda: results.__setitem__("stayer", stayer.run()), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(leaving.calls) > 0 and len(staying.calls) > 0, 60, what="both consumers working")
        leaver.stop()  # leaves mid-run, with keys running and messages waiting behind them
        threads[0].join(60)
        assert len(leaving.done() | staying.done()) < n, "the leaver left mid-run"
        wait_until(lambda: len(leaving.done() | staying.done()) >= n, 120, what="every message handled")
        ends = end_offsets(bootstrap, topic)
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == ends, 30, what="commits at the end")
    finally:
        leaver.stop()
        stayer.stop()
        for t in threads:
            t.join(60)
    calls = leaving.calls + staying.calls
    handled = [(p, o) for p, _k, o, _s, _e, raised in calls if not raised]
    report_figures("ordering key: one of two consumers leaves", messages=n, handled=len(handled),
                   distinct=len(set(handled)), leaver=results["leaver"].processed,
                   overlaps_disorder=_violations(calls, by_key=True))
    assert len(handled) == len(set(handled)) == n, "a message was lost or handled twice"
    assert _violations(calls, by_key=True) == (0, 0)
    assert results["leaver"].processed > 0 and results["stayer"].processed > 0
