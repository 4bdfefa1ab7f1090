"""Batch handlers without a broker: the batch scheduler (mtc75/core/batching.py) and the dispatcher's rules for
batches (mtc75/runtime/batches.py): batches of one partition in offset order, full or due after BATCH_WAIT;
ordering modes through lanes; a raise retries the whole batch, then each message alone; a BatchError completes
the rest and retries the named ones alone; the batch's lanes are let go once, when its last piece settled.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import pytest

from mtc75.core.batching import BatchScheduler
from mtc75.core.offsets import OffsetTracker
from mtc75.core.retry import RetryPolicy
from mtc75.core.work import Work
from mtc75.errors import BatchError
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.invoker import Invoker, Partial
from tests.fake_kafka import FakeMessage
from tests.kafka_helpers import wait_until

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0


def _tracker(*partitions: int) -> OffsetTracker:
    tracker = OffsetTracker()
    tracker.assign([("t", p) for p in partitions])
    return tracker


def _works(tracker: OffsetTracker, partition: int, offsets: range, keys: list[Any] | None = None,
           at: float = 0.0) -> list[Work]:
    """Single-message Works, admitted as the ledger does, put at ``at``."""
    state = tracker.state(("t", partition))
    works = []
    for i, o in enumerate(offsets):
        assert tracker.admit(state, o)
        key = None if keys is None else keys[i % len(keys)]
        work = Work(FakeMessage("t", partition, o, key=None if key is None else str(key).encode()), state, o)
        work.put_at = at
        works.append(work)
    return works


def _run(tracker: OffsetTracker, partition: int, first: int, count: int, at: float = 0.0) -> Work:
    """One fetched run of ``count`` consecutive messages, as one Work."""
    state = tracker.state(("t", partition))
    offsets = list(range(first, first + count))
    assert tracker.admit_range(state, offsets) is None
    work = Work.chunk([FakeMessage("t", partition, o) for o in offsets], state, first)
    work.put_at = at
    return work


# -- the scheduler ------------------------------------------------------------------------------------


def test_full_batches_are_ready_at_once_partial_ones_after_the_wait_and_partitions_take_turns() -> None:
    tracker = _tracker(0, 1)
    sched = BatchScheduler("unordered", limit=4, wait=0.5)
    sched.put([_run(tracker, 0, 0, 10), _run(tracker, 1, 0, 3)])
    assert len(sched) == 13 and sched.ready == 10  # partition 1's 3 wait to fill
    first, second = sched.take(), sched.take()
    assert [(w.state.tp, list(w.offsets)) for w in (first, second)] == [
        (("t", 0), [0, 1, 2, 3]), (("t", 0), [4, 5, 6, 7])]  # a fetched run of 10 is cut to the limit
    assert [m.offset() for m in first.messages] == [0, 1, 2, 3]
    with pytest.raises(IndexError):
        sched.take()  # 2 of partition 0 and 3 of partition 1 left: neither full, neither due
    assert sched.next_due() == 0.5
    assert sched.promote(0.49) == 0 and sched.promote(0.5) == 2
    third, fourth = sched.take(), sched.take()
    assert {(w.state.tp, tuple(w.offsets)) for w in (third, fourth)} == {
        (("t", 0), (8, 9)), (("t", 1), (0, 1, 2))}
    assert len(sched) == 0 and sched.ready == 0 and sched.next_due() is None


def test_batches_of_two_partitions_alternate_under_a_backlog() -> None:
    tracker = _tracker(0, 1)
    sched = BatchScheduler("unordered", limit=2, wait=1.0)
    sched.put(_works(tracker, 0, range(0, 6)) + _works(tracker, 1, range(0, 6)))
    order = [sched.take().state.tp[1] for _ in range(6)]
    assert order == [0, 1, 0, 1, 0, 1]


def test_no_wait_hands_out_what_there_is() -> None:
    tracker = _tracker(0)
    sched = BatchScheduler("unordered", limit=100, wait=0.0)
    sched.put(_works(tracker, 0, range(0, 3)))
    assert sched.ready == 3 and list(sched.take().offsets) == [0, 1, 2]


def test_partition_mode_runs_one_batch_per_partition_and_release_lets_the_next_one_go() -> None:
    tracker = _tracker(0)
    sched = BatchScheduler("partition", limit=3, wait=0.0)
    sched.put(_works(tracker, 0, range(0, 7)))
    batch = sched.take()
    assert list(batch.offsets) == [0, 1, 2]
    with pytest.raises(IndexError):
        sched.take()  # its partition is busy
    assert sched.blocked == 4
    sched.release(batch)
    assert list(sched.take().offsets) == [3, 4, 5]


def test_key_mode_never_puts_a_running_key_in_a_batch_and_keeps_each_key_in_order() -> None:
    tracker = _tracker(0)
    sched = BatchScheduler("key", limit=10, wait=0.0)
    sched.put(_works(tracker, 0, range(0, 6), keys=["a", "b", "a", "c", "b", "a"]))
    first = sched.take()
    assert list(first.offsets) == [0, 1, 2, 3, 4, 5]  # every key free: all of them, in offset order
    sched.put(_works(tracker, 0, range(6, 10), keys=["a", "d", "a", "d"]))
    second = sched.take()
    assert list(second.offsets) == [7, 9]  # "a" runs in the first batch: only "d" may go
    assert not second.consecutive
    sched.release(first)
    third = sched.take()
    assert list(third.offsets) == [6, 8]  # "a" free again, its messages in order
    assert [m.key() for m in third.messages] == [b"a", b"a"]


def test_key_mode_keyless_messages_never_wait() -> None:
    tracker = _tracker(0)
    sched = BatchScheduler("key", limit=2, wait=0.0)
    sched.put(_works(tracker, 0, range(0, 4)))  # no keys
    a, b = sched.take(), sched.take()
    assert (list(a.offsets), list(b.offsets)) == ([0, 1], [2, 3])  # both run at once


def test_purge_drops_the_waiting_messages_of_an_assignment_and_recounts() -> None:
    tracker = _tracker(0, 1)
    sched = BatchScheduler("partition", limit=2, wait=0.0)
    sched.put(_works(tracker, 0, range(0, 4)) + _works(tracker, 1, range(0, 4)))
    running = sched.take()  # partition 0's first batch
    dropped = sched.purge(lambda w: w.state.tp == ("t", 0))
    assert sorted(w.offset for w in dropped) == [2, 3]
    assert len(sched) == 4 and sched.ready == 4
    sched.release(running)
    one = sched.take()
    sched.release(one)  # partition mode: one batch of a partition at a time
    two = sched.take()
    assert (one.state.tp, two.state.tp) == (("t", 1), ("t", 1)) and len(sched) == 0


# -- the invoker ----------------------------------------------------------------------------------------


def test_a_batch_handler_gets_one_list_and_a_batch_error_becomes_a_partial() -> None:
    seen: list[list[int]] = []

    def handler(batch: list[Any]) -> None:
        seen.append([m.offset() for m in batch])
        if len(batch) == 4:
            raise BatchError({1: ValueError("bad 1"), batch[3]: KeyError("bad 3")})

    tracker = _tracker(0)
    invoker = Invoker(handler, batches=True)
    assert invoker.invoke(Work.merged(_works(tracker, 0, range(0, 3)))) is None
    outcome = invoker.invoke(Work.merged(_works(tracker, 0, range(3, 7))))
    assert isinstance(outcome, Partial) and outcome.handled == 4
    assert [(i, type(e)) for i, e in outcome.failures] == [(1, ValueError), (3, KeyError)]
    assert seen == [[0, 1, 2], [3, 4, 5, 6]]


@pytest.mark.parametrize("failures", [{}, {7: ValueError("x")}, {0: "not an exception"}])
def test_a_batch_error_naming_nothing_or_something_else_fails_the_whole_batch(failures: Any) -> None:
    def handler(batch: list[Any]) -> None:
        raise BatchError(failures)

    outcome = Invoker(handler, batches=True).invoke(Work.merged(_works(_tracker(0), 0, range(0, 3))))
    assert isinstance(outcome, ValueError)


def test_an_async_batch_handler_is_awaited_with_the_list() -> None:
    seen: list[list[int]] = []

    async def handler(batch: list[Any]) -> None:
        await asyncio.sleep(0)
        seen.append([m.offset() for m in batch])

    invoker = Invoker(handler, batches=True)
    assert invoker.is_async
    assert asyncio.run(invoker.invoke_async(Work.merged(_works(_tracker(0), 0, range(0, 3))))) is None
    assert seen == [[0, 1, 2]]


# -- through the dispatcher -------------------------------------------------------------------------------


class Calls:
    """A batch handler that records every call and fails as told: ``fail(offsets, call_number)``."""

    def __init__(self, fail: Any = None) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[int, ...]] = []
        self.fail = fail

    def __call__(self, batch: list[Any]) -> None:
        offsets = tuple(m.offset() for m in batch)
        with self.lock:
            self.calls.append(offsets)
            n = sum(1 for c in self.calls if c == offsets)
        if self.fail is not None:
            self.fail(offsets, n)


def _dispatch(handler: Any, ordering: str = "unordered", limit: int = 5, attempts: int = 2,
              threads: int = 2) -> tuple[Dispatcher, BatchScheduler]:
    sched = BatchScheduler(ordering, limit=limit, wait=0.0)
    d = Dispatcher(Invoker(handler, batches=True), threads,
                   RetryPolicy(max_attempts=attempts, base=0.0, cap=0.0), scheduler=sched)
    return d, sched


def _settle(d: Dispatcher, tracker: OffsetTracker, out: list[Work], total: int) -> bool:
    d.release_due()
    while d.completions:
        work = d.completions.popleft()
        out.append(work)
    return sum(w.size for w in out) == total


def test_batches_run_each_message_once_and_never_more_than_the_limit() -> None:
    calls = Calls()
    tracker = _tracker(0, 1)
    d, _ = _dispatch(calls, threads=3)
    out: list[Work] = []
    d.put([_run(tracker, 0, 0, 23), _run(tracker, 1, 0, 17)])
    wait_until(lambda: _settle(d, tracker, out, 40), WAIT)
    d.shutdown(wait=True)
    assert all(len(c) <= 5 for c in calls.calls)
    assert Counter(o for c in calls.calls for o in c) == Counter(
        {o: 2 for o in range(17)} | {o: 1 for o in range(17, 23)})  # offsets of both partitions, each once
    assert not any(w.failed for w in out) and d.backlog == 0


def test_a_raising_batch_is_retried_whole_then_each_message_alone_and_only_the_poison_one_fails() -> None:
    calls = Calls(fail=lambda offsets, n: 3 in offsets and (_ for _ in ()).throw(ValueError("poison 3")))
    tracker = _tracker(0)
    d, sched = _dispatch(calls, ordering="partition", attempts=2)
    out: list[Work] = []
    d.put([_run(tracker, 0, 0, 5), _run(tracker, 0, 5, 3)])
    wait_until(lambda: _settle(d, tracker, out, 8), WAIT)
    d.shutdown(wait=True)
    assert calls.calls[:2] == [(0, 1, 2, 3, 4), (0, 1, 2, 3, 4)]  # the batch, twice (MAX_ATTEMPTS 2)
    singles = [c for c in calls.calls if len(c) == 1]
    assert Counter(singles) == Counter({(0,): 1, (1,): 1, (2,): 1, (3,): 2, (4,): 1})  # alone; 3 its 2 attempts
    failed = [w for w in out if w.failed]
    assert [(w.offset, w.attempts) for w in failed] == [(3, 2)] and "poison 3" in failed[0].error
    assert (5, 6, 7) in calls.calls  # partition mode: the next batch ran only after the split one let go
    assert calls.calls.index((5, 6, 7)) > max(i for i, c in enumerate(calls.calls) if c == (3,))
    assert len(sched) == 0


def test_a_batch_error_completes_the_rest_at_once_and_retries_the_named_message_alone() -> None:
    def fail(offsets: tuple[int, ...], n: int) -> None:
        if len(offsets) > 1 and 2 in offsets:
            raise BatchError({offsets.index(2): ValueError("no 2")})

    calls = Calls(fail=fail)
    tracker = _tracker(0)
    d, _ = _dispatch(calls, attempts=3)
    out: list[Work] = []
    d.put([_run(tracker, 0, 0, 5)])
    wait_until(lambda: _settle(d, tracker, out, 5), WAIT)
    d.shutdown(wait=True)
    assert calls.calls == [(0, 1, 2, 3, 4), (2,)]  # the retry of 2, alone, succeeded
    # what succeeded settles as one piece (offsets 0, 1, 3, 4), the named one alone once its retry succeeded
    assert sorted((tuple(w.offsets), w.failed) for w in out) == [((0, 1, 3, 4), False), ((2,), False)]


def test_a_retry_of_a_batch_holds_its_keys_so_nothing_of_them_overtakes_it() -> None:
    order: list[tuple[int, ...]] = []

    def fail(offsets: tuple[int, ...], n: int) -> None:
        order.append(offsets)
        if offsets == (0, 1) and n == 1:
            raise RuntimeError("once")

    calls = Calls(fail=fail)
    tracker = _tracker(0)
    d, _ = _dispatch(calls, ordering="key", limit=2, attempts=2, threads=4)
    out: list[Work] = []
    d.put(_works(tracker, 0, range(0, 4), keys=["a", "b"]))  # a b a b
    wait_until(lambda: _settle(d, tracker, out, 4), WAIT)
    d.shutdown(wait=True)
    assert order == [(0, 1), (0, 1), (2, 3)]  # keys a and b waited for the retry of their batch


def test_key_mode_splits_a_fetched_run_of_several_keys_into_their_lanes() -> None:
    tracker = _tracker(0)
    state = tracker.state(("t", 0))
    assert tracker.admit_range(state, [0, 1, 2, 3]) is None
    run = Work.chunk([FakeMessage("t", 0, o, key=b"ab"[o % 2:o % 2 + 1]) for o in range(4)], state, 0)
    sched = BatchScheduler("key", limit=10, wait=0.0)
    sched.put([run])
    first = sched.take()  # a b a b: both keys, both busy now
    sched.put(_works(tracker, 0, range(4, 6), keys=["a", "b"]))
    with pytest.raises(IndexError):
        sched.take()  # neither key may run twice at once
    sched.release(first)
    assert list(sched.take().offsets) == [4, 5]
