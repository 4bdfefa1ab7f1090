"""The engine against the real broker: bounded concurrency, pauses, exactly-once in a clean run, commits."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from mtc75.core.stats import Stats
from mtc75.engine.assignments import Assignments
from mtc75.settings import Settings
from tests.kafka_helpers import (
    BoundConsumer,
    all_offsets,
    committed_offsets,
    end_offsets,
    produce_numbered,
    report_figures,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


class Recorder:
    """A handler that sleeps like real I/O and records what ran and how many ran at once."""

    def __init__(self, sleep: float, slow: Callable[[Any], float] | None = None) -> None:
        self._sleep = sleep
        self._slow = slow
        self._lock = threading.Lock()
        self._current = 0
        self.peak = 0
        self.handled: list[tuple[int, int]] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) of each call, monotonic seconds

    @property
    def durations(self) -> list[float]:
        with self._lock:
            return [end - start for start, end in self.spans]

    def __call__(self, msg: Any) -> None:
        with self._lock:
            self._current += 1
            self.peak = max(self.peak, self._current)
        started = time.monotonic()
        try:
            time.sleep(self._slow(msg) if self._slow else self._sleep)
        finally:
            ended = time.monotonic()
            with self._lock:
                self._current -= 1
                self.handled.append((msg.partition(), msg.offset()))
                self.spans.append((started, ended))

    def count(self) -> int:
        with self._lock:
            return len(self.handled)


def _settings(bootstrap: str, topic: str, group: str, **kw: Any) -> Settings:
    base = {"BOOTSTRAP_SERVERS": bootstrap, "TOPIC": topic, "GROUP_ID": group, "COMMIT_INTERVAL": 0.2}
    base.update(kw)
    return Settings().replace(**base)


def test_saturated_run_handles_each_message_once_within_the_bound_and_commits_to_the_end(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    topic, group, n, threads = make_topic(partitions=3), unique("g"), 400, 4
    produce_numbered(bootstrap, topic, n)
    recorder = Recorder(sleep=0.01)
    consumer = BoundConsumer(
        _settings(bootstrap, topic, group, MAX_THREAD_COUNT=threads, PAUSE_INTERVAL=0.2), recorder, max_messages=n,
    )
    caplog.set_level(logging.INFO, logger="mtc75.engine")
    stats = consumer.run()

    ends = end_offsets(bootstrap, topic)
    assert sum(ends.values()) == n
    counts = Counter(recorder.handled)
    assert set(counts) == all_offsets(ends)  # nothing lost
    assert max(counts.values()) == 1  # nothing handled twice in a clean run
    assert 1 < recorder.peak <= threads  # observed inside the handler
    assert stats.max_active_threads <= threads
    assert stats.processed == n and stats.failed == 0
    assert stats.pauses >= 1  # the backlog filled while every thread was busy
    # every pause is an event with its line (not a state a status sample may or may not catch)
    paused = [r for r in caplog.records if r.getMessage().startswith("PAUSED")]
    resumed = [r for r in caplog.records if r.getMessage().startswith("RESUMED")]
    assert len(paused) == stats.pauses and len(resumed) in (stats.pauses, stats.pauses - 1)
    assert committed_offsets(bootstrap, group, topic) == ends


def test_handler_failures_are_counted_and_do_not_stall_the_partition(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group, n = make_topic(partitions=1), unique("g"), 50
    produce_numbered(bootstrap, topic, n)

    def handler(msg: Any) -> None:
        if msg.offset() % 10 == 3:
            raise ValueError("bad record")

    stats = BoundConsumer(_settings(bootstrap, topic, group, MAX_THREAD_COUNT=3), handler, max_messages=n).run()
    assert stats.processed == n
    assert stats.failed == 5
    assert committed_offsets(bootstrap, group, topic) == {0: n}


@pytest.mark.faults
@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_handler_longer_than_max_poll_interval_does_not_evict_while_saturated(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], strategy: str,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic, group, n = make_topic(partitions=2), unique("g"), 12
    produce_numbered(bootstrap, topic, n)
    # Two threads, and the first two messages each take longer than max.poll.interval.ms.
    slow_offsets = {(0, 0), (1, 0)}
    recorder = Recorder(0.05, slow=lambda m: 8.0 if (m.partition(), m.offset()) in slow_offsets else 0.05)
    caplog.set_level(logging.INFO, logger="mtc75.engine")
    overrides = {
        "session.timeout.ms": "6000",
        "max.poll.interval.ms": "6000",
        "heartbeat.interval.ms": "1000",
        "partition.assignment.strategy": strategy,
    }
    consumer = BoundConsumer(
        _settings(bootstrap, topic, group, MAX_THREAD_COUNT=2, PAUSE_INTERVAL=0.5, MAX_BACKLOG=2),
        recorder, overrides=overrides, max_messages=n,
    )
    assignments: list[str] = []  # the rebalance callbacks librdkafka made, seen through the Assignments class
    original_assign, original_lost = Assignments.on_assign, Assignments.on_lost
    monkeypatch.setattr(Assignments, "on_assign",
                        lambda self, c, p: (assignments.append("assign"), original_assign(self, c, p))[1])
    monkeypatch.setattr(Assignments, "on_lost",
                        lambda self, c, p: (assignments.append("lost"), original_lost(self, c, p))[1])
    started = time.monotonic()
    stats = consumer.run()
    assert time.monotonic() - started > 8.0
    slowest = max(recorder.durations)
    assert slowest > 6.0  # a handler really ran past max.poll.interval.ms, measured inside it
    assert stats.pauses >= 1
    # Evictions, counted from the log: the engine logs "lost ..." when librdkafka takes the partitions
    # away (on_lost), and every eviction ends in a new "assigned ..." line with partitions.
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("mtc75.engine")]
    lost_lines = [m for m in messages if m.startswith("lost ")]
    assigned_lines = [m for m in messages if m.startswith("assigned ") and "no partitions" not in m]
    evictions = len(lost_lines) + max(0, len(assigned_lines) - 1)
    assert assignments.count("lost") == len(lost_lines) == 0
    assert assignments.count("assign") == 1  # never kicked out, so never re-assigned
    assert evictions == 0, messages
    counts = Counter(recorder.handled)
    wanted = all_offsets(end_offsets(bootstrap, topic))
    assert counts == Counter(wanted)  # no redelivery
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)
    report_figures(f"slow_handler_{strategy}", messages=n, lost=len(wanted - set(counts)),
                   duplicates=sum(c - 1 for c in counts.values()), evictions=evictions,
                   slowest_handler_s=round(slowest, 2), max_poll_interval_s=6.0, pauses=stats.pauses)


@pytest.mark.parametrize("strategy", ["range", "roundrobin", "cooperative-sticky"])
def test_two_consumers_one_leaves_mid_run_nothing_lost_and_nothing_redone(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], strategy: str
) -> None:
    topic, group, n = make_topic(partitions=4), unique("g"), 1500
    produce_numbered(bootstrap, topic, n)
    # Slow enough that neither consumer finishes the topic alone before the other has joined.
    leaving, staying = Recorder(0.02), Recorder(0.02)
    settings = _settings(bootstrap, topic, group, MAX_THREAD_COUNT=4, PAUSE_INTERVAL=0.2)
    overrides = {"partition.assignment.strategy": strategy}
    leaver = BoundConsumer(settings, leaving, overrides=overrides)
    stayer = BoundConsumer(settings, staying, overrides=overrides)
    results: dict[str, Stats] = {}
    threads = [
        threading.Thread(target=lambda: results.__setitem__("leaver", leaver.run())),
        threading.Thread(target=lambda: results.__setitem__("stayer", stayer.run())),
    ]
    for t in threads:
        t.start()

    def handled() -> set[tuple[int, int]]:
        return set(leaving.handled) | set(staying.handled)

    try:
        wait_until(lambda: leaving.count() > 0 and staying.count() > 0, timeout=60, what="both consumers working")
        leaver.stop()  # leaves the group mid-run, with work in flight
        threads[0].join(timeout=60)
        assert not threads[0].is_alive()
        ends = end_offsets(bootstrap, topic)
        wanted = all_offsets(ends)
        assert len(handled()) < len(wanted)  # the leaver really left mid-run
        wait_until(lambda: wanted <= handled(), timeout=120, what="every offset handled")
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == ends, timeout=30, what="commits at end")
    finally:
        leaver.stop()
        stayer.stop()
        for t in threads:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert results["leaver"].processed > 0 and results["stayer"].processed > 0
    assert handled() == wanted
    # Count handlings, not a set union: every rebalance (the join, then the leave) commits the finished
    # work of the partitions it takes away, and a graceful leave finishes and commits what runs. So no
    # offset is handled twice -- the survivor never redoes the leaver's work.
    counts = Counter(leaving.handled) + Counter(staying.handled)
    twice = sorted(o for o, c in counts.items() if c > 1)
    assert not twice, f"{len(twice)} offsets handled twice, e.g. {twice[:5]}"
    assert len(leaving.handled) == results["leaver"].processed  # and its count says so


def test_threads_stay_busy_through_pauses_over_a_saturated_run(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    """The core claim, measured inside the handler: busy-thread time >= 0.9 of N x elapsed.

    8 threads, 20 ms handlers (400 msg/s), far more messages than the backlog holds: the consumer
    pauses again and again, and must resume (and refetch) before the threads run dry. The window runs
    from the moment all 8 threads had started (the ramp-up is the group join, not the pause logic) to
    the last handler start (after it the topic is empty, so idle threads are expected).
    """
    topic, group, n, threads, sleep = make_topic(partitions=3), unique("g"), 2400, 8, 0.02
    produce_numbered(bootstrap, topic, n)
    recorder = Recorder(sleep=sleep)
    consumer = BoundConsumer(
        _settings(bootstrap, topic, group, MAX_THREAD_COUNT=threads, PAUSE_INTERVAL=0.5), recorder, max_messages=n,
    )
    stats = consumer.run()
    assert stats.processed == n and recorder.peak == threads
    assert stats.pauses >= 3, f"only {stats.pauses} pauses: the run did not exercise pause and resume"
    spans = sorted(recorder.spans)
    start, end = spans[threads - 1][0], spans[-1][0]
    busy = sum(max(0.0, min(e, end) - max(s, start)) for s, e in spans)
    ratio = busy / (threads * (end - start))
    report_figures("threads_busy_through_pauses", messages=n, threads=threads, handler_s=sleep,
                   pauses=stats.pauses, window_s=round(end - start, 2), busy_ratio=round(ratio, 3))
    assert ratio >= 0.9, f"threads busy {ratio:.1%} of {threads} x {end - start:.1f}s ({stats.pauses} pauses)"


def test_a_fast_handler_runs_in_chunks_and_a_failure_or_a_slow_spell_inside_a_chunk_loses_nothing(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunks across the thread boundary (mtc75/core/work.py) against the real broker: a fast handler's
    messages go as chunks; one failing once inside a chunk is retried alone; a slow message (50 ms against
    ~us) cuts its chunk short and the rest goes on; every message succeeds exactly once and the group commits
    to the end. The slow messages stand far apart: after one, the measured time per message sends the next
    few alone (no chunk to cut), and one that ends its chunk cuts nothing either."""
    from mtc75.core.offsets import OffsetTracker
    from mtc75.runtime import pacing
    from mtc75.runtime.pieces import Pieces

    # Chunks form for handlers measured under FAST_HANDLER (0.1 ms); a loaded machine can measure this
    # one slower, so the bound is raised: this test is about what chunks do, not when they start.
    monkeypatch.setattr(pacing, "FAST_HANDLER", 0.01)
    topic, group, n = make_topic(partitions=3), unique("g"), 6000
    produce_numbered(bootstrap, topic, n)
    ends = end_offsets(bootstrap, topic)
    fail_once = {(p, ends[p] // 2) for p in ends}
    slow = {(0, ends[0] // 4 + i * ends[0] // 20) for i in range(8)} - fail_once
    lock = threading.Lock()
    calls: Counter[tuple[int, int]] = Counter()
    succeeded: Counter[tuple[int, int]] = Counter()

    def handler(msg: Any) -> None:
        where = (msg.partition(), msg.offset())
        with lock:
            calls[where] += 1
            first = calls[where] == 1
        if where in slow:
            time.sleep(0.05)
        if where in fail_once and first:
            raise ValueError("fails once")
        with lock:
            succeeded[where] += 1

    cuts: list[int] = []
    sizes: list[int] = []
    settle = Pieces.settle

    def spy(self: Pieces, work: Any, outcome: Any) -> None:
        if outcome.handled < work.size:
            cuts.append(work.size - outcome.handled)
        settle(self, work, outcome)

    monkeypatch.setattr(Pieces, "settle", spy)
    complete_range = OffsetTracker.complete_range

    def completed(state: Any, first: int, count: int) -> bool:
        sizes.append(count)
        return complete_range(state, first, count)

    monkeypatch.setattr(OffsetTracker, "complete_range", staticmethod(completed))
    consumer = BoundConsumer(
        _settings(bootstrap, topic, group, MAX_THREAD_COUNT=8, MAX_ATTEMPTS=2, RETRY_BACKOFF=0.01,
                  RETRY_BACKOFF_MAX=0.01, ON_FAILURE="stop"),
        handler, max_messages=n, idle_exit=10.0,  # a lost message ends the run (bounded) short of n
    )
    stats = consumer.run()
    assert set(succeeded) == all_offsets(ends) and max(succeeded.values()) == 1  # none lost, none twice
    assert all(calls[w] == 2 for w in fail_once)  # retried alone, once
    assert stats.processed == n and stats.failed == 0 and stats.retried == len(fail_once)
    assert max(sizes) > 1  # workers took, ran and completed chunks
    assert cuts  # the slow spell cut a chunk short; its rest went back as single messages
    assert committed_offsets(bootstrap, group, topic) == ends
    report_figures("runs", messages=n, largest_chunk=max(sizes), cut=cuts, retried=stats.retried)
