"""RUNNER="processes" against the real broker: the same consumer, with the handler in worker processes.

The handlers are tests/process_handlers.py's: each message's value says what to do, and each call writes a
journal line (the handlers share no memory with the test). What must hold is what holds for threads:
ordering modes, retries, dead letters, commits to the end -- and a worker process killed with -9 mid-run
loses nothing.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest
from confluent_kafka import Consumer as RawConsumer
from confluent_kafka import Producer

from mtc75.kafka.deadletter import H_ERROR, H_OFFSET
from mtc75.settings import Settings
from tests import process_handlers as ph
from tests.kafka_helpers import BoundConsumer, committed_offsets, end_offsets, report_figures, wait_until
from tests.test_process_runner import Journal, children, journal

__all__ = ["journal"]  # a fixture, used by name

pytestmark = pytest.mark.timeout(300)

WAIT = 120.0


def _settings(bootstrap: str, topic: str, group: str, **kw: Any) -> Settings:
    base = {"BOOTSTRAP_SERVERS": bootstrap, "TOPIC": topic, "GROUP_ID": group, "COMMIT_INTERVAL": 0.2,
            "RUNNER": "processes", "PROCESS_COUNT": 2, "MAX_THREAD_COUNT": 8, "RETRY_BACKOFF": 0.05,
            "RETRY_BACKOFF_MAX": 0.1}
    base.update(kw)
    return Settings().replace(**base)


def _produce(bootstrap: str, topic: str, orders: list[tuple[int, bytes, dict[str, Any]]]) -> None:
    """(partition, key, order) each, all delivered or raise."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    failures: list[str] = []

    def report(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    for partition, key, order in orders:
        producer.produce(topic, json.dumps(order).encode(), key=key, partition=partition, on_delivery=report)
        producer.poll(0)
    assert producer.flush(30) == 0 and not failures, failures


def _run(settings: Settings, handler: Any, count: int) -> Any:
    return BoundConsumer(settings, handler, max_messages=count).run()


@pytest.mark.parametrize("ordering", ["partition", "key"])
def test_ordering_modes_hold_with_the_handler_in_worker_processes(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], journal: Journal, ordering: str
) -> None:
    topic, group = make_topic(3), unique("g")
    orders = [(p, b"k%d" % (i % 4), {"ms": 1}) for p in range(3) for i in range(100)]
    _produce(bootstrap, topic, orders)
    stats = _run(_settings(bootstrap, topic, group, ORDERING=ordering), ph.handle, 300)
    keys = {(p, o): k for p in range(3) for o, (_p, k, _x) in enumerate(x for x in orders if x[0] == p)}
    begun = {(int(r[2]), int(r[3])): float(r[4]) for r in journal.lines("start")}
    lanes: dict[tuple[Any, ...], list[tuple[int, float, float]]] = defaultdict(list)
    for r in journal.lines("done"):
        where = (int(r[2]), int(r[3]))
        lane = (where[0],) if ordering == "partition" else (where[0], keys[where])
        lanes[lane].append((where[1], begun[where], float(r[4])))
    assert sorted(o for lane in lanes.values() for o, _s, _e in lane) == sorted(list(range(100)) * 3)
    for lane in lanes.values():
        lane.sort(key=lambda span: span[1])
        assert [o for o, _s, _e in lane] == sorted(o for o, _s, _e in lane)  # offset order
        assert all(b[1] >= a[2] for a, b in pairwise(lane))  # one at a time, across the processes too
    assert len(journal.pids()) == 2 and stats.processed == 300 and stats.workers == "messages"
    assert committed_offsets(bootstrap, group, topic) == {0: 100, 1: 100, 2: 100}


def test_retries_and_dead_letters_with_the_handler_in_worker_processes(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], journal: Journal
) -> None:
    topic, group = make_topic(1), unique("g")
    plan = {3: {"do": "fail"}, 7: {"do": "odd-error"}, 11: {"do": "fail-once"}}
    _produce(bootstrap, topic, [(0, b"k", plan.get(i, {})) for i in range(20)])
    stats = _run(_settings(bootstrap, topic, group, MAX_ATTEMPTS=2, ON_FAILURE="dlq"), ph.handle, 20)
    starts = journal.count("start")
    assert (starts[(0, 3)], starts[(0, 7)], starts[(0, 11)]) == (2, 2, 2)
    assert (stats.processed, stats.failed, stats.dead_lettered, stats.retried) == (20, 2, 2, 3)
    letters = _read_all(bootstrap, f"{topic}.dlq", 2)
    by_offset = {int(h[H_OFFSET]): h[H_ERROR] for h in letters}
    assert by_offset == {3: b"ValueError: fails at 0@3", 7: b"OddError: odd 7: cannot be rebuilt"}
    assert committed_offsets(bootstrap, group, topic) == {0: 20}


def test_a_worker_process_killed_mid_run_loses_nothing(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], journal: Journal
) -> None:
    topic, group = make_topic(3), unique("g")
    total = 1500
    before = children(os.getpid())  # the test session's own (its broker)
    _produce(bootstrap, topic, [(i % 3, b"k%d" % i, {"ms": 2}) for i in range(total)])
    consumer = BoundConsumer(_settings(bootstrap, topic, group, MAX_ATTEMPTS=3), ph.handle, max_messages=total)
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.setdefault("stats", consumer.run()), daemon=True)
    runner.start()
    try:
        wait_until(lambda: sum(journal.count("done").values()) >= 200, WAIT, what="200 messages done")
        victim = int(journal.lines("start")[-1][1])
        first = journal.pids()
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        runner.join(WAIT)
        assert not runner.is_alive(), "the run did not end"
    finally:
        consumer.stop()
        runner.join(WAIT)
    stats = result["stats"]
    done = journal.count("done")
    assert {(p, o) for p in range(3) for o in range(total // 3)} <= set(done)  # every message, at least once
    assert stats.failed == 0 and stats.processed == total and 0 <= stats.retried <= 1
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)
    [replacement] = journal.pids() - first  # the one that replaced the killed process, and did work
    assert len(first) == 2 and victim in first
    assert children(os.getpid()) <= before  # every worker process reaped
    report_figures("process runner: a worker killed with -9 mid-run", messages=total,
                   lost=len({(p, o) for p in range(3) for o in range(total // 3)} - set(done)),
                   handled_twice=sum(1 for n in done.values() if n > 1), retried=stats.retried,
                   replacement_first_call_s=round(min(float(r[4]) for r in journal.lines("start")
                                                      if int(r[1]) == replacement) - killed_at, 2))


def _read_all(bootstrap: str, topic: str, count: int) -> list[dict[str, bytes]]:
    consumer = RawConsumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{time.monotonic_ns()}",
                            "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    headers: list[dict[str, bytes]] = []
    deadline = time.monotonic() + 60
    try:
        while len(headers) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                headers.append(dict(msg.headers() or []))
    finally:
        consumer.close()
    assert len(headers) == count, headers
    return headers
