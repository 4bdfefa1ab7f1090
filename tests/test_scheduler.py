"""Schedulers without a broker: the FIFO against the contract in mtc75/core/scheduler.py, and the
dispatcher's side of it (release exactly once per taken message, every call under the lock).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from mtc75.core.offsets import OffsetTracker
from mtc75.core.retry import RetryPolicy
from mtc75.core.scheduler import FifoScheduler
from mtc75.core.work import Work
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.invoker import Invoker
from mtc75.runtime.runner import Runner, WorkerSteps
from tests.kafka_helpers import wait_until
from tests.test_dispatcher import FakeMessage, _work


def _items(tracker: OffsetTracker, partition: int, offsets: range) -> list[Work]:
    return _work(tracker, partition, offsets)


def _tracker(*partitions: int) -> OffsetTracker:
    tracker = OffsetTracker()
    tracker.assign([("t", p) for p in partitions])
    return tracker


def _offsets(items: Iterable[Work]) -> list[tuple[int, int]]:
    return [(w.message.partition(), w.offset) for w in items]


# -- FifoScheduler against the contract ------------------------------------------------------------


def test_fifo_takes_in_put_order_and_says_when_empty() -> None:
    s = FifoScheduler()
    assert len(s) == 0 and s.ready == 0 and s.blocked == 0
    with pytest.raises(IndexError):
        s.take()
    s.put(_items(_tracker(0), 0, range(4)))
    assert len(s) == 4 and s.ready == 4 and s.blocked == 0
    assert [s.take().offset for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(IndexError):
        s.take()
    assert len(s) == 0


def test_fifo_requeued_retries_go_before_anything_fetched_since_in_their_own_order() -> None:
    tracker = _tracker(0, 1)
    s = FifoScheduler()
    retries = _items(tracker, 1, range(2))
    s.put(_items(tracker, 0, range(10, 13)))
    s.requeue(retries)
    assert _offsets([s.take(), s.take(), s.take()]) == [(1, 0), (1, 1), (0, 10)]


def test_fifo_release_changes_nothing_and_it_declares_itself_lock_free() -> None:
    s = FifoScheduler()
    s.put(_items(_tracker(0), 0, range(3)))
    taken = s.take()
    assert taken is not None
    s.release(taken)
    assert len(s) == 2 and s.ready == 2 and s.blocked == 0
    assert FifoScheduler.LOCK_FREE_TAKE and FifoScheduler.LOCK_FREE_RELEASE


def test_fifo_purge_returns_the_selected_in_order_and_keeps_the_rest_in_order() -> None:
    tracker = _tracker(0, 1)
    s = FifoScheduler()
    s.put(_items(tracker, 0, range(3)) + _items(tracker, 1, range(3)) + _items(tracker, 0, range(3, 5)))
    dropped = s.purge(lambda w: w.message.partition() == 1)
    assert _offsets(dropped) == [(1, 0), (1, 1), (1, 2)]
    assert len(s) == 5
    assert _offsets(s.purge()) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4)]
    assert len(s) == 0 and s.purge() == []


def test_fifo_lock_free_takes_racing_purges_never_lose_or_duplicate_a_message() -> None:
    """The contract's promise for LOCK_FREE_TAKE: each message goes to a take or to a purge, once."""
    tracker = _tracker(0)
    s = FifoScheduler()
    items = _items(tracker, 0, range(3_000))
    taken: list[list[Work]] = [[], []]
    stop = threading.Event()

    def taker(out: list[Work]) -> None:
        while not stop.is_set():
            try:
                out.append(s.take())
            except IndexError:
                pass

    threads = [threading.Thread(target=taker, args=(out,)) for out in taken]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a non-atomic purge then loses work
    for t in threads:
        t.start()
    dropped: list[Work] = []
    try:
        for start in range(0, len(items), 50):  # many short races rather than one long one
            s.put(items[start:start + 50])
            deadline = time.monotonic() + 5
            while len(s) and time.monotonic() < deadline:
                dropped.extend(s.purge(lambda w: w.offset % 7 == 0))  # keeps most: puts them back mid-race
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sys.setswitchinterval(interval)
    rest = s.purge()
    seen = [id(w) for w in dropped] + [id(w) for out in taken for w in out] + [id(w) for w in rest]
    assert len(seen) == len(items) and set(seen) == {id(w) for w in items}


# -- the dispatcher's side: a scheduler that records every call ------------------------------------


class RecordingScheduler:
    """A FIFO that wants the lock for every call and records releases (and calls made without it)."""

    LOCK_FREE_TAKE = False
    LOCK_FREE_RELEASE = False
    takes_chunks = False

    def __init__(self) -> None:
        self._fifo = FifoScheduler()
        self.lock: Any = None  # the dispatcher's lock, set once the dispatcher exists
        self.taken: list[Work] = []
        self.released: list[Work] = []
        self.unlocked: list[str] = []  # calls made without the dispatcher's lock held

    def _check(self, name: str) -> None:
        if self.lock is not None and not self.lock.locked():
            self.unlocked.append(name)

    def put(self, items: Iterable[Work]) -> None:
        self._check("put")
        self._fifo.put(items)

    def requeue(self, items: list[Work]) -> None:
        self._check("requeue")
        self._fifo.requeue(items)

    def take(self) -> Work:
        self._check("take")
        work = self._fifo.take()
        self.taken.append(work)
        return work

    def release(self, work: Work) -> None:
        self._check("release")
        self.released.append(work)

    def purge(self, drop: Callable[[Work], bool] | None = None) -> list[Work]:
        self._check("purge")
        return self._fifo.purge(drop)

    def __len__(self) -> int:
        return len(self._fifo)

    @property
    def ready(self) -> int:
        return self._fifo.ready

    @property
    def blocked(self) -> int:
        return 0

    def releases_of(self, work: Work) -> int:
        return sum(1 for w in self.released if w is work)


def _dispatcher(
    handler: Callable[[Any], object], threads: int, retry: RetryPolicy | None = None
) -> tuple[Dispatcher, RecordingScheduler]:
    rec = RecordingScheduler()
    d = Dispatcher(Invoker(handler), threads, retry, scheduler=rec)
    rec.lock = d._lock
    return d, rec


def test_release_once_per_message_that_succeeds() -> None:
    tracker = _tracker(0)
    d, rec = _dispatcher(lambda _m: None, 3)
    try:
        items = _items(tracker, 0, range(50))
        d.put(items)
        wait_until(lambda: len(d.completions) == 50, timeout=10, what="50 completions")
        assert d.wait_idle(5)
        assert all(rec.releases_of(w) == 1 for w in items) and len(rec.released) == 50
        assert not rec.unlocked
    finally:
        d.shutdown(wait=True)


def test_release_once_when_the_last_attempt_fails() -> None:
    def handler(_m: FakeMessage) -> None:
        raise RuntimeError("always")

    tracker = _tracker(0)
    d, rec = _dispatcher(handler, 2, RetryPolicy(max_attempts=2, base=0.0, cap=0.0))
    try:
        items = _items(tracker, 0, range(4))
        d.put(items)
        deadline = time.monotonic() + 10
        while len(d.completions) < 4 and time.monotonic() < deadline:
            d.release_due()
            time.sleep(0.005)
        assert len(d.completions) == 4 and all(w.failed and w.attempts == 2 for w in d.completions)
        assert d.wait_idle(5)
        assert [rec.releases_of(w) for w in items] == [1, 1, 1, 1] and len(rec.released) == 4
        assert not rec.unlocked
    finally:
        d.shutdown(wait=True)


def test_a_retry_holds_its_place_while_it_waits_and_is_released_once_after_it_succeeds() -> None:
    calls: dict[int, int] = {}

    def handler(msg: FakeMessage) -> None:
        calls[msg.offset()] = calls.get(msg.offset(), 0) + 1
        if msg.offset() == 0 and calls[0] == 1:
            raise RuntimeError("first attempt")

    tracker = _tracker(0)
    d, rec = _dispatcher(handler, 1, RetryPolicy(max_attempts=3, base=0.3, cap=0.3, jitter=0.0))
    try:
        items = _items(tracker, 0, range(3))
        d.put(items)
        wait_until(lambda: len(d.completions) == 2 and d.active_thread_count == 0, timeout=5, what="the others")
        assert d.delayed == 1 and rec.releases_of(items[0]) == 0  # waiting out its backoff: not released
        assert [rec.releases_of(w) for w in items[1:]] == [1, 1]

        def retried() -> bool:
            d.release_due()
            return len(d.completions) == 3

        wait_until(retried, timeout=5, what="the retry to succeed")
        assert d.wait_idle(5)
        assert [rec.releases_of(w) for w in items] == [1, 1, 1] and calls == {0: 2, 1: 1, 2: 1}
        assert rec.taken.count(items[0]) == 2  # taken twice (first try, retry), released once
        assert not rec.unlocked
    finally:
        d.shutdown(wait=True)


def test_a_purged_delayed_retry_is_released_once() -> None:
    def handler(_msg: FakeMessage) -> None:
        raise RuntimeError("down")

    tracker = _tracker(0, 1)
    d, rec = _dispatcher(handler, 2, RetryPolicy(max_attempts=5, base=60.0, cap=60.0))
    try:
        (w0,), (w1,) = _items(tracker, 0, range(1)), _items(tracker, 1, range(1))
        d.put([w0, w1])
        wait_until(lambda: d.delayed == 2 and d.active_thread_count == 0, timeout=5, what="both waiting")
        assert rec.released == []  # waiting out a backoff is not done
        assert d.retire([tracker.state(("t", 1))]) == [w1]  # revoke
        assert rec.releases_of(w1) == 1 and rec.releases_of(w0) == 0
        d.shutdown(wait=True)  # purges the rest
        assert rec.releases_of(w0) == 1 and rec.releases_of(w1) == 1 and len(rec.released) == 2
        assert not d.completions and not rec.unlocked
    finally:
        d.shutdown(wait=True)


def test_a_purged_requeued_retry_is_released_once_and_a_never_taken_message_is_not() -> None:
    gate = threading.Event()

    def handler(msg: FakeMessage) -> None:
        if msg.partition() == 1:
            raise RuntimeError("fails")
        gate.wait(10)

    tracker = _tracker(0, 1)
    d, rec = _dispatcher(handler, 1, RetryPolicy(max_attempts=5, base=0.05, cap=0.05, jitter=0.0))
    try:
        (failing,), (holding,) = _items(tracker, 1, range(1)), _items(tracker, 0, range(1))
        d.put([failing, holding])  # the only worker fails the first, then is held by the second
        wait_until(lambda: d.delayed == 1 and len(rec.taken) == 2, timeout=5, what="one retry, one running")
        # due while the only permit is held: requeued into the scheduler, not started
        wait_until(lambda: (d.release_due(), d.delayed == 0)[1], timeout=5, what="the retry requeued")
        (never,) = _items(tracker, 1, range(1, 2))
        d.put([never])
        assert len(rec) == 2 and d.active_thread_count == 1 and rec.taken == [failing, holding]
        assert d.retire([tracker.state(("t", 1))]) == [failing, never]  # revoke
        assert rec.releases_of(failing) == 1 and rec.releases_of(never) == 0
        gate.set()
        wait_until(lambda: len(d.completions) == 1, timeout=5, what="the held one to finish")
        assert d.wait_idle(5)
        assert rec.released == [failing, holding] and not rec.unlocked
    finally:
        gate.set()
        d.shutdown(wait=True)


def test_a_worker_whose_scheduler_breaks_gives_its_permit_back() -> None:
    class Broken(RecordingScheduler):
        def take(self) -> Work:
            raise RuntimeError("scheduler bug")

    tracker = _tracker(0)
    d = Dispatcher(Invoker(lambda _m: None), 2, scheduler=Broken())
    try:
        d.put(_items(tracker, 0, range(3)))
        assert d.max_active_threads == 2  # two workers started, each with a permit
        assert d.wait_idle(5) and d.active_thread_count == 0  # without the shift's guard this times out
    finally:
        d.shutdown(wait=True)


class InlineRunner:
    """A runner with no threads: each spawned shift runs at once on the caller's thread.

    Shows the worker steps compose for a runner that is not the thread pool.
    """

    workers = "inline"
    takes_chunks = False

    def __init__(self, steps: WorkerSteps, invoker: Invoker, limit: int) -> None:
        self._steps, self._invoker = steps, invoker
        self.shifts = 0

    def spawn(self, count: int) -> None:
        for _ in range(count):
            self.shifts += 1
            shift = self._steps.shift()
            try:
                work = next(shift)
                while True:
                    work = shift.send(self._invoker.invoke(work))
            except StopIteration:
                pass

    def grow(self, limit: int) -> None:
        pass

    def cancel(self, states: object) -> None:
        pass

    def shutdown(self, wait: bool) -> None:
        pass


def test_the_worker_steps_drive_a_runner_that_is_not_the_thread_pool() -> None:
    seen: list[int] = []

    def handler(msg: FakeMessage) -> None:
        seen.append(msg.offset())
        if msg.offset() == 3:
            raise ValueError("bad")

    runner: list[InlineRunner] = []

    def factory(steps: WorkerSteps, invoker: Invoker, limit: int) -> Runner:
        runner.append(InlineRunner(steps, invoker, limit))
        return runner[0]

    tracker = _tracker(0)
    d = Dispatcher(Invoker(handler), 4, runner=factory)
    d.put(_items(tracker, 0, range(6)))  # runs them all before put() returns
    assert seen == [0, 1, 2, 3, 4, 5] and runner[0].shifts == 4
    assert [(w.offset, w.failed) for w in d.completions] == [(0, False), (1, False), (2, False), (3, True),
                                                            (4, False), (5, False)]
    assert d.completions[3].error == "ValueError: bad"
    assert d.active_thread_count == 0 and d.backlog == 0
    d.shutdown(wait=True)

