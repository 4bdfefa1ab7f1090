"""Batch handlers end to end against the in-memory Kafka (tests/fake_kafka.py), through the public API.

The same harness as tests/test_engine_unit.py (its fixtures are imported): a consumer with ``BATCH_SIZE`` > 1
runs on a test thread; what each call got, what was committed and what was dead-lettered are checked exactly.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import mtc75
from mtc75.errors import BatchError
from mtc75.kafka.deadletter import H_OFFSET
from tests.fake_kafka import FakeKafka
from tests.test_engine_unit import GROUP, P0, TOPIC, WAIT, Run, cluster, start, until

__all__ = ["cluster", "start"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(60)


class Batches:
    """A batch handler recording each call's (partition, offsets); ``fail(partition, offsets, call)``
    raises as told; ``hold`` offsets make their call wait for ``release``."""

    def __init__(self, fail: Callable[[int, tuple[int, ...], int], None] | None = None,
                 hold: set[tuple[int, int]] = frozenset()) -> None:  # type: ignore[assignment]
        self.lock = threading.Lock()
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self.fail = fail
        self.hold = hold
        self.release = threading.Event()
        self.started: set[tuple[int, int]] = set()

    def __call__(self, batch: list[Any]) -> None:
        partitions = {m.partition() for m in batch}
        assert len(partitions) == 1, "a batch holds one partition"
        partition = partitions.pop()
        offsets = tuple(m.offset() for m in batch)
        assert list(offsets) == sorted(offsets), "a batch is in offset order"
        with self.lock:
            self.calls.append((partition, offsets))
            n = sum(1 for call in self.calls if call == (partition, offsets))
            self.started.update((partition, o) for o in offsets)
        if any((partition, o) in self.hold for o in offsets):
            self.release.wait(WAIT * 3)
        if self.fail is not None:
            self.fail(partition, offsets, n)

    def handled(self) -> Counter[tuple[int, int]]:
        with self.lock:
            return Counter((p, o) for p, offsets in self.calls for o in offsets)


def test_batches_fill_under_a_backlog_every_message_once_and_commits_reach_the_end(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 1000, 1: 1000, 2: 1000})
    handler = Batches()
    stats = start(handler, BATCH_SIZE=100, BATCH_WAIT=0.5, max_messages=3000).join()
    assert handler.handled() == Counter({(p, o): 1 for p in range(3) for o in range(1000)})
    sizes = [len(offsets) for _, offsets in handler.calls]
    assert max(sizes) <= 100 and sum(sizes) / len(sizes) >= 50  # under a backlog batches fill
    assert stats.batch_size == 100 and stats.batches == len(handler.calls) and stats.mean_batch >= 50
    assert stats.summary()["calls"] == len(handler.calls)
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [1000, 1000, 1000]


def test_a_trickle_is_handed_over_after_batch_wait_not_held_for_a_full_batch(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    handler = Batches()
    run = start(handler, BATCH_SIZE=1000, BATCH_WAIT=0.2)
    cluster.fill(TOPIC, {0: 3})
    until(lambda: handler.handled() == Counter({(0, 0): 1, (0, 1): 1, (0, 2): 1}), "the 3 messages in a batch")
    assert handler.calls == [(0, (0, 1, 2))]
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 3, "the commit")
    run.stop()


@pytest.mark.parametrize("on_failure", ["dlq", "skip"])
def test_a_poison_message_in_a_batch_reaches_on_failure_alone_and_the_others_complete(
    cluster: FakeKafka, start: Callable[..., Run], on_failure: str
) -> None:
    cluster.fill(TOPIC, {0: 20})

    def fail(partition: int, offsets: tuple[int, ...], n: int) -> None:
        if 7 in offsets:
            raise ValueError("poison 7")

    handler = Batches(fail=fail)
    stats = start(handler, BATCH_SIZE=10, BATCH_WAIT=0.5, MAX_ATTEMPTS=2, ON_FAILURE=on_failure,
                  RETRY_BACKOFF_MAX=0.01, max_messages=20).join()
    assert handler.calls.count((0, tuple(range(0, 10)))) == 2  # the batch, twice (MAX_ATTEMPTS 2)
    singles = Counter(offsets[0] for _, offsets in handler.calls if len(offsets) == 1)
    assert singles == Counter({o: (2 if o == 7 else 1) for o in range(10)})  # then each alone; 7 twice
    assert (stats.processed, stats.failed) == (20, 1)
    if on_failure == "dlq":
        [record] = cluster.messages("orders.dlq")
        assert dict(record.headers() or [])[H_OFFSET] == b"7" and stats.dead_lettered == 1
    assert cluster.committed(GROUP, TOPIC, 0) == 20


def test_a_batch_error_completes_the_others_at_once_and_retries_the_named_ones_alone(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 6})

    def fail(partition: int, offsets: tuple[int, ...], n: int) -> None:
        if len(offsets) > 1:
            raise BatchError({offsets.index(1): ValueError("no 1"), offsets.index(4): ValueError("no 4")})

    handler = Batches(fail=fail)
    stats = start(handler, BATCH_SIZE=6, BATCH_WAIT=0.5, MAX_ATTEMPTS=3, max_messages=6).join()
    assert handler.calls[0] == (0, (0, 1, 2, 3, 4, 5))
    assert sorted(handler.calls[1:]) == [(0, (1,)), (0, (4,))]  # only the named ones, alone, succeeded
    assert (stats.processed, stats.failed, stats.retried) == (6, 0, 2)
    assert cluster.committed(GROUP, TOPIC, 0) == 6


@pytest.mark.parametrize("ordering", ["partition", "key"])
def test_ordered_batches_never_run_a_partition_or_key_twice_at_once_and_keep_its_order(
    cluster: FakeKafka, start: Callable[..., Run], ordering: str
) -> None:
    keys = [b"a", b"b", b"c", b"d"]
    for i in range(400):
        cluster.produce(TOPIC, i % 2, b"{}", key=keys[i % 4])
    running: Counter[bytes] = Counter()
    seen: dict[bytes, list[int]] = {k: [] for k in keys}
    lock = threading.Lock()
    overlaps: list[bytes] = []

    def handler(batch: list[Any]) -> None:
        group = {m.key() for m in batch} if ordering == "key" else {str(batch[0].partition()).encode()}
        with lock:
            for k in group:
                running[k] += 1
                if running[k] > 1:
                    overlaps.append(k)
            for m in batch:
                seen[m.key()].append(m.offset())
        threading.Event().wait(0.002)
        with lock:
            for k in group:
                running[k] -= 1

    stats = start(handler, BATCH_SIZE=7, BATCH_WAIT=0.01, ORDERING=ordering, MAX_THREAD_COUNT=8,
                  max_messages=400).join()
    assert overlaps == []
    assert all(offsets == sorted(offsets) for offsets in seen.values())  # each key in offset order
    assert stats.processed == 400 and [cluster.committed(GROUP, TOPIC, p) for p in range(2)] == [200, 200]


def test_an_async_batch_handler_is_awaited_with_its_list(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 50, 1: 50})
    calls: list[tuple[int, ...]] = []

    async def handler(batch: list[Any]) -> None:
        await asyncio.sleep(0.001)
        calls.append(tuple(m.offset() for m in batch))

    stats = start(handler, BATCH_SIZE=20, BATCH_WAIT=0.2, max_messages=100).join()
    assert stats.workers == "coroutines" and stats.processed == 100
    assert sum(len(c) for c in calls) == 100 and max(len(c) for c in calls) <= 20
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(2)] == [50, 50]


def test_a_revoke_drops_the_unstarted_batches_of_the_revoked_partition_and_waits_for_the_running_one(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 30})
    handler = Batches(hold={(0, 0)})
    run = start(handler, BATCH_SIZE=10, BATCH_WAIT=0.5, ORDERING="partition", REVOKE_TIMEOUT=0.3)
    until(lambda: (0, 0) in handler.started, "the first batch to start")
    revoked = cluster.consumer().rebalance(revoke=[P0])
    assert revoked.wait(WAIT)  # waited REVOKE_TIMEOUT for the running batch, then gave up
    handler.release.set()
    stats = run.stop()
    assert handler.calls == [(0, tuple(range(10)))]  # the other two batches were never started here
    assert stats.abandoned == 10 and cluster.committed(GROUP, TOPIC, 0) is None  # nothing of it committed


def test_batch_size_and_wait_change_live_and_a_per_message_handler_keeps_its_kind(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    handler = Batches()
    run = start(handler, BATCH_SIZE=5, BATCH_WAIT=0.5)
    run.consumer.retune(batch_size=20, batch_wait=0.05)
    until(lambda: run.stats().batch_size == 20, "the new batch size")
    cluster.fill(TOPIC, {0: 40})
    until(lambda: sum(handler.handled().values()) == 40, "40 messages")
    assert max(len(offsets) for _, offsets in handler.calls) == 20
    run.stop()


def test_a_batch_with_a_message_that_does_not_decode_writes_the_others_outputs_and_dead_letters_it(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    """The batch's output records go with what succeeded (one piece, done once they are written); the
    message that did not decode fails alone, and the handler never saw it."""
    cluster.create_topic("enriched", 1)
    for i in range(10):
        cluster.produce(TOPIC, 0, b'{"id": %d}' % i if i != 4 else b"{broken", key=b"k")
    seen: list[list[int]] = []

    def handler(batch: list[Any]) -> list[mtc75.Output]:
        seen.append([m.value()["id"] for m in batch])
        return [mtc75.Output("enriched", str(m.value()["id"])) for m in batch]

    stats = start(handler, BATCH_SIZE=10, BATCH_WAIT=0.5, VALUE_FORMAT="json", ON_FAILURE="dlq",
                  max_messages=10).join()
    assert seen == [[0, 1, 2, 3, 5, 6, 7, 8, 9]]
    assert sorted(m.value() for m in cluster.messages("enriched")) == sorted(str(i) for i in range(10) if i != 4)
    [dead] = cluster.messages(TOPIC + ".dlq")
    assert dead.value() == b"{broken" and (stats.processed, stats.dead_lettered) == (10, 1)
    assert cluster.committed(GROUP, TOPIC, 0) == 10
