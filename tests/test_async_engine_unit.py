"""The real engine with an ``async def`` handler against the in-memory Kafka fake: no broker.

Same harness as tests/test_engine_unit.py (its fixtures are imported): the engine runs on a test
thread, rebalances are driven from the test thread, every wait is bounded. The real-broker versions
of these scenarios are in tests/test_async_e2e.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.fake_kafka import FakeKafka
from tests.test_engine_unit import GROUP, P0, TOPIC, WAIT, Run, cluster, start, until

__all__ = ["cluster", "start"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(60)


class AsyncRecorder:
    """An async handler: records calls; ``hang`` offsets wait until released (or cancelled)."""

    def __init__(self, wait: float = 0.0, hang: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
                 fail: Callable[[int, int, int], bool] = lambda p, o, n: False) -> None:
        self.wait = wait
        self.hang = hang
        self.fail = fail
        self.calls: Counter[tuple[int, int]] = Counter()
        self.done: list[tuple[int, int]] = []
        self.cancelled: list[tuple[int, int]] = []
        self.threads: set[str] = set()
        self.current = 0
        self.peak = 0
        self.release = threading.Event()

    async def __call__(self, message: Any) -> None:
        where = (message.partition(), message.offset())
        self.calls[where] += 1
        call = self.calls[where]
        self.threads.add(threading.current_thread().name)
        self.current += 1
        self.peak = max(self.peak, self.current)
        try:
            if where in self.hang:
                while not self.release.is_set():
                    await asyncio.sleep(0.005)
            await asyncio.sleep(self.wait)
            if self.fail(where[0], where[1], call):
                raise ValueError(f"fails at {where} (call {call})")
            self.done.append(where)
        except asyncio.CancelledError:
            self.cancelled.append(where)
            raise
        finally:
            self.current -= 1


def test_an_async_handler_runs_on_the_loop_thread_within_the_bound(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 100, 1: 100, 2: 100})
    handler = AsyncRecorder(wait=0.02)
    run = start(handler, MAX_THREAD_COUNT=50, max_messages=300)
    assert run.stats().workers == "coroutines"
    stats = run.join(WAIT * 2)
    assert handler.calls == Counter({(p, o): 1 for p in range(3) for o in range(100)})
    assert handler.threads == {"mtc75-loop"}
    assert 40 <= handler.peak <= 50 and stats.max_active_threads <= 50
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [100, 100, 100]
    assert stats.workers == "coroutines" and stats.processed == 300


def test_a_plain_handler_still_runs_on_threads(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 5})
    names: set[str] = set()
    stats = start(lambda m: names.add(threading.current_thread().name), max_messages=5).join()
    assert stats.workers == "threads" and all(n.startswith("mtc75-worker") for n in names)


def test_revoke_waits_then_cancels_the_partitions_coroutines_and_commits_below_them(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 4, 1: 3})
    handler = AsyncRecorder(hang={(0, 2), (1, 1)})
    run = start(handler, REVOKE_TIMEOUT=1.0, MAX_THREAD_COUNT=10,
                CONSUMER_CONFIG={"partition.assignment.strategy": "cooperative-sticky"})  # p0 alone is revoked
    until(lambda: {(0, 0), (0, 1), (0, 3), (1, 0), (1, 2)} <= set(handler.done) and handler.current == 2,
          "all but the hangs done")
    consumer = cluster.consumer()
    asked = time.monotonic()
    revoked = consumer.rebalance(revoke=[P0])
    assert not revoked.wait(0.5), "the revoke did not wait for the partition's running coroutine"
    assert revoked.wait(WAIT)
    waited = time.monotonic() - asked
    until(lambda: handler.cancelled == [(0, 2)], "the revoked partition's coroutine cancelled")
    assert waited >= 0.9  # REVOKE_TIMEOUT, then the cancel
    assert cluster.committed(GROUP, TOPIC, 0) == 2  # below the cancelled message, never past it
    assert handler.current == 1 and (1, 1) not in handler.cancelled  # the kept partition's one runs on
    # the partition comes back: the cancelled message is read and run again, to the end
    assert consumer.rebalance(assign=[P0]).wait(WAIT)
    handler.release.set()
    until(lambda: handler.calls[(0, 2)] == 2 and (0, 2) in handler.done, "the cancelled message run again")
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 4 and cluster.committed(GROUP, TOPIC, 1) == 3,
          "commits at the end")
    stats = run.stop()
    assert stats.abandoned >= 1
    assert stats.failed == 0 and stats.dropped_late >= 1  # the cancel was the revoke's, not a failure


def test_lost_partitions_cancel_their_coroutines_at_once_and_nothing_of_them_is_committed(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    """The membership expired: another member may own the partitions already. Nothing of them is
    committed -- not the finished work, not below the running coroutine -- and nothing is waited for."""
    cluster.fill(TOPIC, {0: 4, 1: 2})
    handler = AsyncRecorder(hang={(0, 1)})
    # Commit only at the start (nothing finished yet) and at the end: the loss finds finished work uncommitted.
    run = start(handler, REVOKE_TIMEOUT=30.0, COMMIT_INTERVAL=300.0, MAX_THREAD_COUNT=10,
                CONSUMER_CONFIG={"partition.assignment.strategy": "cooperative-sticky"})
    until(lambda: run.stats().processed == 5 and handler.current == 1, "all but the hang done and counted")
    consumer = cluster.consumer()
    began = time.monotonic()
    assert consumer.lose().wait(WAIT)
    assert time.monotonic() - began < 5.0  # not the 30 s REVOKE_TIMEOUT
    until(lambda: handler.cancelled == [(0, 1)], "the lost partition's coroutine cancelled")
    stats = run.stop()
    assert cluster.commits == []  # the whole history: no commit at the loss, none at shutdown
    assert consumer.assignment_now() == set() and stats.assigned == 0
    assert (stats.processed, stats.dropped_late, stats.failed) == (5, 1, 0)  # the cancelled one: dropped, late


def test_a_retry_waiting_out_its_backoff_holds_no_coroutine_slot(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 10})
    handler = AsyncRecorder(fail=lambda p, o, n: o == 1 and n == 1)
    run = start(handler, MAX_THREAD_COUNT=1, MAX_ATTEMPTS=2, RETRY_BACKOFF=1.0, RETRY_BACKOFF_MAX=1.0,
                max_messages=10)
    # one slot: every other message runs while offset 1 waits its second chance
    until(lambda: {(0, o) for o in range(10) if o != 1} <= set(handler.done), "the rest done during the backoff")
    assert (0, 1) not in handler.done
    stats = run.join()
    assert handler.calls[(0, 1)] == 2 and stats.retried == 1 and stats.failed == 0
    assert cluster.committed(GROUP, TOPIC, 0) == 10


def test_shutdown_cancels_a_coroutine_past_the_timeout_and_leaves_it_uncommitted(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 5})
    handler = AsyncRecorder(hang={(0, 3)})
    run = start(handler, SHUTDOWN_TIMEOUT=0.5)
    until(lambda: len(handler.done) == 4 and handler.current == 1, "all but the hang done")
    stopped = time.monotonic()
    stats = run.stop()
    assert time.monotonic() - stopped < 4.0
    assert handler.cancelled == [(0, 3)]
    assert stats.abandoned == 1
    assert cluster.committed(GROUP, TOPIC, 0) == 3


def test_retune_resizes_the_coroutine_bound(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 400, 1: 400, 2: 400})
    handler = AsyncRecorder(wait=0.05)
    run = start(handler, MAX_THREAD_COUNT=3)
    until(lambda: handler.current == 3, "3 running")
    run.consumer.retune(max_thread_count=30)
    until(lambda: handler.current >= 25, "the new bound used")
    run.consumer.retune(max_thread_count=2)
    until(lambda: handler.current <= 2, "the lowered bound reached")  # the running ones end within 0.05 s
    samples = []
    for _ in range(50):
        samples.append(handler.current)
        time.sleep(0.002)
    assert max(samples) <= 2, samples
    run.stop()
    assert handler.peak <= 30


def test_an_async_handler_under_the_auto_thread_count_still_runs_on_the_loop(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    """MAX_THREAD_COUNT="auto" times the handler with a wrapper: the wrapper must stay awaited on the loop."""
    cluster.fill(TOPIC, {0: 20, 1: 20, 2: 20})
    handler = AsyncRecorder(wait=0.01)
    stats = start(handler, MAX_THREAD_COUNT="auto", max_messages=60).join(WAIT * 2)
    assert handler.threads == {"mtc75-loop"} and stats.workers == "coroutines"
    assert stats.processed == 60 and stats.failed == 0
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [20, 20, 20]


@pytest.mark.parametrize("ordering", ["partition", "key"])
def test_ordering_modes_hold_for_coroutines(cluster: FakeKafka, start: Callable[..., Run], ordering: str) -> None:
    """The ordering schedulers hand coroutines the same work as threads: one at a time per partition/key."""
    for p in range(3):
        for o in range(30):
            cluster.produce(TOPIC, p, b'{"id": %d}' % o, key=b"k%d" % (o % 3))  # 3 keys per partition
    running: Counter[tuple[int, ...]] = Counter()
    peak_per_group = 0
    peak = 0
    order: dict[tuple[int, ...], list[int]] = {}

    async def handle(message: Any) -> None:
        nonlocal peak_per_group, peak
        group = (message.partition(),) if ordering == "partition" else (message.partition(), message.key())
        running[group] += 1
        peak_per_group = max(peak_per_group, running[group])
        peak = max(peak, sum(running.values()))
        order.setdefault(group, []).append(message.offset())
        await asyncio.sleep(0.003)
        running[group] -= 1

    stats = start(handle, MAX_THREAD_COUNT=20, ORDERING=ordering, max_messages=90).join(WAIT * 2)
    assert stats.processed == 90 and stats.workers == "coroutines"
    assert peak_per_group == 1  # never two coroutines of one partition (key) at once...
    assert all(offsets == sorted(offsets) for offsets in order.values())  # ...and in offset order
    assert peak > 1  # while different partitions (keys) ran side by side
