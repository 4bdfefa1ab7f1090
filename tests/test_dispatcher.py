"""Dispatcher without a broker: the permit bound holds, failures are contained, purge keeps order."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from mtc75.core.offsets import OffsetTracker
from mtc75.core.work import Work
from mtc75.runtime import pacing
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.invoker import Invoker
from mtc75.runtime.pacing import MIN_ACTIVE
from mtc75.runtime.permits import Permits
from mtc75.runtime.runner import WorkerSteps
from tests.fake_kafka import FakeMessage
from tests.kafka_helpers import wait_until


def _work(tracker: OffsetTracker, partition: int, offsets: range) -> list[Work]:
    items = []
    for o in offsets:
        state = tracker.state(("t", partition))
        assert tracker.admit(state, o)
        items.append(Work(FakeMessage("t", partition, o), state, o))
    return items


def _concurrency_probe(sleep: float) -> tuple[Callable[[object], None], list[int]]:
    lock = threading.Lock()
    current = [0]
    peak = [0]

    def handler(_msg: object) -> None:
        with lock:
            current[0] += 1
            peak[0] = max(peak[0], current[0])
        time.sleep(sleep)
        with lock:
            current[0] -= 1

    return handler, peak


def test_never_more_handlers_than_permits_and_every_message_runs_once() -> None:
    handler, peak = _concurrency_probe(0.002)
    tracker = OffsetTracker()
    tracker.assign([("t", 0), ("t", 1)])
    d = Dispatcher(Invoker(handler), max_thread_count=5)
    try:
        for start in range(0, 200, 20):  # batches arrive while workers are busy
            d.put(_work(tracker, 0, range(start, start + 10)) + _work(tracker, 1, range(start, start + 10)))
        seen: list[tuple[int, int]] = []

        def drained() -> bool:
            while d.completions:
                w = d.completions.popleft()
                seen.append((w.message.partition(), w.offset))
            return len(seen) >= 200

        wait_until(drained, timeout=30, what="200 completions")
        assert sorted(seen) == sorted({(p, o) for p in (0, 1) for s in range(0, 200, 20) for o in range(s, s + 10)})
        assert peak[0] <= 5
        assert d.max_active_threads <= 5
        assert d.wait_idle(5) and d.active_thread_count == 0
    finally:
        d.shutdown(wait=True)


def test_handler_exception_marks_failed_and_the_worker_goes_on() -> None:
    def handler(msg: FakeMessage) -> None:
        if msg.offset() % 2:
            raise RuntimeError("boom")

    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(handler), max_thread_count=2)
    try:
        d.put(_work(tracker, 0, range(10)))
        assert d.wait_idle(10)
        done = list(d.completions)
        assert len(done) == 10
        assert sorted(w.offset for w in done if w.failed) == [1, 3, 5, 7, 9]
    finally:
        d.shutdown(wait=True)


def test_purge_drops_only_unstarted_messages_of_the_given_assignment() -> None:
    gate = threading.Event()
    tracker = OffsetTracker()
    tracker.assign([("t", 0), ("t", 1)])
    d = Dispatcher(Invoker(lambda _m: gate.wait(10)), max_thread_count=1)
    try:
        d.put(_work(tracker, 0, range(3)) + _work(tracker, 1, range(3)))
        wait_until(lambda: d.backlog == 5, timeout=5, what="one message started")
        dropped = d.retire([tracker.state(("t", 1))])
        assert [(w.message.partition(), w.offset) for w in dropped] == [(1, 0), (1, 1), (1, 2)]
        assert d.backlog == 2
        gate.set()
        assert d.wait_idle(10)
        assert sorted(w.offset for w in d.completions) == [0, 1, 2]
    finally:
        gate.set()
        d.shutdown(wait=True)


def test_permits_bound_and_errors() -> None:
    p = Permits(3)
    assert p.acquire(5) == 3 and p.free == 0
    p.release()
    assert p.acquire(1) == 1 and p.max_in_use == 3
    with pytest.raises(ValueError, match="max_thread_count must be >= 1, got 0"):
        Permits(0)
    empty = Permits(1)
    with pytest.raises(RuntimeError):
        empty.release()


class _Gated:
    """A handler whose first ``held`` calls block until released; it records concurrency at each start."""

    def __init__(self, held: int) -> None:
        self._lock = threading.Lock()
        self._held = held
        self.release = threading.Event()
        self.current = 0
        self.starts: list[int] = []  # concurrency seen by each call as it started

    def __call__(self, _msg: object) -> None:
        with self._lock:
            self.current += 1
            self.starts.append(self.current)
            blocked = len(self.starts) <= self._held
        if blocked:
            self.release.wait(30)
        else:
            time.sleep(0.002)
        with self._lock:
            self.current -= 1


def test_resize_grow_starts_new_workers_at_once() -> None:
    handler = _Gated(held=10)
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(handler), max_thread_count=2)
    try:
        d.put(_work(tracker, 0, range(30)))
        wait_until(lambda: handler.current == 2, timeout=5, what="two handlers blocked")
        d.resize(6)  # no new message arrives: the backlog alone must fill the new permits
        wait_until(lambda: handler.current == 6, timeout=5, what="six handlers blocked")
        assert d.max_thread_count == 6 and d.active_thread_count == 6
        handler.release.set()
        assert d.wait_idle(20)
        assert len(d.completions) == 30
        assert max(handler.starts) == 6
    finally:
        handler.release.set()
        d.shutdown(wait=True)


def test_resize_shrink_lets_running_handlers_finish_and_bounds_new_work() -> None:
    handler = _Gated(held=6)
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(handler), max_thread_count=6)
    try:
        d.put(_work(tracker, 0, range(40)))
        wait_until(lambda: handler.current == 6, timeout=5, what="six handlers blocked")
        d.resize(2)
        d.put(_work(tracker, 0, range(40, 45)))  # new work while shrunk starts no thread
        # put() takes permits and submits workers synchronously, and the six running workers are held in
        # the handler: so right after put() returns, nothing new can be starting (no sleep needed).
        assert d.active_thread_count == 6 and d.backlog == 40 + 5 - 6  # no permit taken for the new work
        assert handler.current == 6 and len(handler.starts) == 6  # nothing cancelled, nothing new started
        handler.release.set()
        assert d.wait_idle(20)
        assert len(d.completions) == 45 and not any(w.failed for w in d.completions)
        assert max(handler.starts[6:]) <= 2  # every message started after the shrink saw at most 2 running
        assert d.max_thread_count == 2
    finally:
        handler.release.set()
        d.shutdown(wait=True)


def test_resize_rejects_a_bound_below_one() -> None:
    d = Dispatcher(Invoker(lambda _m: None), max_thread_count=2)
    try:
        with pytest.raises(ValueError, match="max_thread_count must be >= 1, got 0"):
            d.resize(0)
        assert d.max_thread_count == 2
    finally:
        d.shutdown(wait=True)


def test_failed_message_is_retried_without_holding_a_thread_then_reported_failed() -> None:
    from mtc75.core.retry import RetryPolicy

    attempts: dict[int, int] = {}
    lock = threading.Lock()

    def handler(msg: FakeMessage) -> None:
        with lock:
            attempts[msg.offset()] = attempts.get(msg.offset(), 0) + 1
        if msg.offset() == 0:
            raise RuntimeError("poison")
        time.sleep(0.01)

    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    # One thread, and a backoff long enough that the other messages run while offset 0 waits.
    retry = RetryPolicy(max_attempts=3, base=0.2, cap=0.2, jitter=0.0)
    d = Dispatcher(Invoker(handler), max_thread_count=1, retry=retry)
    try:
        d.put(_work(tracker, 0, range(5)))
        wait_until(lambda: len(d.completions) >= 4, timeout=5, what="the healthy messages")
        assert [w.offset for w in d.completions] == [1, 2, 3, 4]  # not stuck behind the retry
        assert d.delayed == 1 and d.backlog == 1  # waiting, counted, holding no thread
        wait_until(lambda: d.active_thread_count == 0, timeout=5, what="the worker to go idle")
        deadline = time.monotonic() + 5
        while len(d.completions) < 5 and time.monotonic() < deadline:
            d.release_due()  # the poll thread's job when no worker is looking for work
            time.sleep(0.01)
        failed = [w for w in d.completions if w.failed]
        assert len(failed) == 1 and failed[0].offset == 0
        assert failed[0].attempts == 3 and failed[0].error == "RuntimeError: poison"
        assert attempts == {0: 3, 1: 1, 2: 1, 3: 1, 4: 1}
        assert d.retried == 2 and d.delayed == 0
    finally:
        d.shutdown(wait=True)


def test_purge_also_drops_messages_waiting_for_a_retry() -> None:
    from mtc75.core.retry import RetryPolicy

    def handler(_msg: FakeMessage) -> None:
        raise RuntimeError("down")

    tracker = OffsetTracker()
    tracker.assign([("t", 0), ("t", 1)])
    d = Dispatcher(Invoker(handler), max_thread_count=2, retry=RetryPolicy(max_attempts=5, base=60.0, cap=60.0))
    try:
        d.put(_work(tracker, 0, range(2)) + _work(tracker, 1, range(2)))
        wait_until(lambda: d.delayed == 4, timeout=5, what="all four waiting for a retry")
        dropped = d.retire([tracker.state(("t", 1))])
        assert sorted((w.message.partition(), w.offset) for w in dropped) == [(1, 0), (1, 1)]
        assert d.delayed == 2
        assert len(d.purge()) == 2 and d.backlog == 0
        assert not d.completions  # none of them was reported done
    finally:
        d.shutdown(wait=True)


def test_a_handler_raising_a_base_exception_is_a_failed_completion_and_the_permit_comes_back() -> None:
    def handler(msg: FakeMessage) -> None:
        if msg.offset() == 0:
            raise SystemExit("handler called exit")

    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(handler), max_thread_count=1)
    try:
        d.put(_work(tracker, 0, range(2)))
        assert d.wait_idle(5)
        assert d.active_thread_count == 0
        # Reported, not lost with its worker: a permit that only came back when the abandoned worker was
        # garbage-collected would pass the two lines above, and leave offset 0 never completed.
        assert [(w.offset, w.failed, w.error) for w in d.completions] == [
            (0, True, "SystemExit: handler called exit"), (1, False, "")]
    finally:
        d.shutdown(wait=True)


def test_a_runner_that_drops_a_shift_half_way_still_gets_the_permit_back() -> None:
    """A runner closes a shift it gives up on (the asyncio one does, on an unexpected error): the
    dispatcher's guard, not the runner, gives the permit back, and the dropped message is not reported."""
    shifts: list[Any] = []

    class Dropping:
        workers = "threads"
        takes_chunks = False

        def __init__(self, steps: WorkerSteps, invoker: Invoker, limit: int) -> None:
            self._steps = steps

        def spawn(self, count: int) -> None:
            for _ in range(count):
                shift = self._steps.shift()
                shifts.append(next(shift))  # takes a message ...
                shift.close()  # ... and drops the shift before running it

        def grow(self, limit: int) -> None:
            pass

        def cancel(self, states: object) -> None:
            pass

        def shutdown(self, wait: bool) -> None:
            pass

    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(lambda _m: None), max_thread_count=2, runner=Dropping)
    d.put(_work(tracker, 0, range(3)))
    assert [w.offset for w in shifts] == [0, 1]  # two workers spawned, one message each
    assert d.active_thread_count == 0 and d.wait_idle(0)
    assert not d.completions
    d.shutdown(wait=True)


def test_no_retry_is_scheduled_for_a_revoked_assignment() -> None:
    from mtc75.core.retry import RetryPolicy

    started = threading.Event()
    go = threading.Event()

    def handler(_msg: FakeMessage) -> None:
        started.set()
        go.wait(10)
        raise RuntimeError("fails after its partition was revoked")

    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(handler), max_thread_count=1, retry=RetryPolicy(max_attempts=5, base=0.01, cap=0.01))
    try:
        d.put(_work(tracker, 0, range(1)))
        assert started.wait(5)
        tracker.revoke([("t", 0)])
        go.set()
        assert d.wait_idle(5)
        assert d.delayed == 0 and d.retried == 0
        (work,) = list(d.completions)
        assert work.failed and work.attempts == 1
    finally:
        go.set()
        d.shutdown(wait=True)


def test_fast_handlers_start_few_workers_and_a_stalled_backlog_gets_every_free_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whether a no-op counts as fast, and how many workers drain a backlog in time, follow the measured time
    # per message, which a loaded machine inflates: bounds so wide that any machine's no-op is fast and needs
    # no more than MIN_ACTIVE workers. What is tested is what put() and the poll thread's turn do with that.
    monkeypatch.setattr(pacing, "FAST_HANDLER", 1.0)
    monkeypatch.setattr(pacing, "DRAIN_TARGET", 1000.0)
    release = threading.Event()
    slow = [False]

    def handler(_msg: object) -> None:
        if slow[0]:
            release.wait(10)

    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(handler), max_thread_count=20)
    try:
        # until a first measure every free worker starts, as before
        d.put(_work(tracker, 0, range(0, 40)))
        assert d.max_active_threads == 20
        assert d.wait_idle(10)
        d.completions.clear()
        # the handler turns slow: a burst of 10 starts only MIN_ACTIVE workers ...
        slow[0] = True
        d.put(_work(tracker, 0, range(40, 50)))
        assert d.active_thread_count == MIN_ACTIVE
        wait_until(lambda: d.backlog == 10 - MIN_ACTIVE, timeout=5, what="the two workers to take a message each")
        # ... and once nothing was taken for STALL_SECONDS, the poll thread's turn starts the rest
        def unstalled() -> bool:
            d.release_due()
            return d.active_thread_count == 10

        wait_until(unstalled, timeout=5, what="every waiting message to get a worker")
        wait_until(lambda: d.backlog == 0, timeout=5, what="the backlog to be taken")
        release.set()
        assert d.wait_idle(10)
        assert sorted(w.offset for w in d.completions) == list(range(40, 50))
    finally:
        release.set()
        d.shutdown(wait=True)
