"""Chunks across the thread boundary, without a broker: a fast handler's messages travel as chunks.

What must hold (mtc75/core/work.py, mtc75/runtime/dispatcher.py, mtc75/runtime/invoker.py): every message
is handled exactly once and in offset order within its chunk; a chunk completes as one step of the
watermark; a chunk that fails in part settles each failed message alone (retry, ON_FAILURE) and completes
the rest; a chunk whose handler turned slow is cut short and its rest is free for every worker; schedulers
count messages, not chunks; slow handlers and the asyncio runner only ever see single messages. Ordered
schedulers form their runs when a lane is taken (a key's messages, or several keys' of one partition): each
key still runs in offset order, and a run stops at its first failure, whose retry goes before the rest of its key.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from mtc75.core.offsets import OffsetTracker, PartitionState
from mtc75.core.ordering import FairFifoScheduler, KeyScheduler
from mtc75.core.retry import RetryPolicy
from mtc75.core.scheduler import FifoScheduler
from mtc75.core.work import Work
from mtc75.runtime import invoker as invoker_module
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.invoker import Invoker, Partial
from mtc75.runtime.pacing import CHUNK_TARGET, FAST_HANDLER
from tests.fake_kafka import FakeMessage
from tests.kafka_helpers import wait_until

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
PER = CHUNK_TARGET / 50  # the time per message _fast() pretends was measured: chunks of 50


def _run(tracker: OffsetTracker, partition: int, first: int, count: int) -> Work:
    """A fetched partition run, admitted to the tracker as the poll thread does (one Work)."""
    state = tracker.get(("t", partition))
    assert state is not None
    offsets = list(range(first, first + count))
    assert tracker.admit_range(state, offsets) is None
    return Work.chunk([FakeMessage("t", partition, o) for o in offsets], state, first)


def _drain(dispatcher: Dispatcher, tracker: OffsetTracker, sink: list[Work]) -> None:
    """The poll thread's part: apply completions to the watermarks (chunks in one step)."""
    while dispatcher.completions:
        work = dispatcher.completions.popleft()
        sink.append(work)
        if not work.failed:
            tracker.complete_range(work.state, work.offset, work.size)


def _fast(dispatcher: Dispatcher) -> None:
    """As if the invoker had measured a fast handler (it reports every Work's time)."""
    dispatcher.pacing.work_ended(PER * 50, 50)


# -- Work and the tracker ----------------------------------------------------------------------------


def test_a_chunk_splits_and_parts_into_the_same_messages_and_offsets() -> None:
    state = PartitionState(("t", 0))
    work = Work.chunk([FakeMessage("t", 0, o) for o in range(10, 17)], state, 10)
    assert (work.size, list(work.offsets), work.message.offset()) == (7, list(range(10, 17)), 10)
    pieces = work.split(3)
    assert [(p.offset, p.size) for p in pieces] == [(10, 3), (13, 3), (16, 1)]
    assert [m.offset() for p in pieces for m in p.messages] == list(range(10, 17))
    singles = work.split(1)
    assert [(s.offset, s.size, s.message.offset()) for s in singles] == [(o, 1, o) for o in range(10, 17)]
    assert work.split(7) == [work]
    middle = work.part(2, 5)
    assert (middle.offset, middle.size, [m.offset() for m in middle.messages]) == (12, 3, [12, 13, 14])
    one = work.part(4, 5)
    assert (one.offset, one.size, one.message.offset(), one.attempts) == (14, 1, 14, 0)


def test_complete_range_moves_the_watermark_in_one_step_and_falls_back_offset_by_offset() -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    state = tracker.state(("t", 0))
    tracker.admit_range(state, list(range(0, 10)))
    assert tracker.complete(state, 5)  # out of order: above the watermark
    assert tracker.complete_range(state, 0, 5)  # the head: pops 0..4, then 5 (done) follows
    assert state.position == 6 and not state.done and list(state.pending) == [6, 7, 8, 9]
    assert tracker.complete_range(state, 8, 2)  # not at the head: offset by offset, above the watermark
    assert state.position == 6 and state.done == {8, 9}
    assert tracker.complete_range(state, 6, 2)
    assert state.position == 10 and not state.pending and not state.done
    tracker.revoke([("t", 0)])
    assert not tracker.complete_range(state, 10, 3)  # a late completion of a revoked assignment


# -- schedulers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [FifoScheduler, FairFifoScheduler])
def test_schedulers_count_messages_of_chunks_and_purge_whole_chunks(kind: type) -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", 0), ("t", 1)])
    sched = kind()
    sched.put([_run(tracker, 0, 0, 50), _run(tracker, 1, 0, 30), _run(tracker, 0, 50, 20)])
    assert len(sched) == sched.ready == 100
    first = sched.take()
    assert len(sched) == 100 - first.size
    sched.requeue([Work(FakeMessage("t", 0, 999), tracker.state(("t", 0)), 999)])
    assert len(sched) == 101 - first.size
    dropped = sched.purge(lambda w: w.state.tp == ("t", 1))
    assert sum(w.size for w in dropped) == (30 if first.state.tp == ("t", 0) else 0)
    rest = sched.purge()
    assert len(sched) == 0 and sched.ready == 0
    assert first.size + sum(w.size for w in dropped + rest) == 101


@pytest.mark.parametrize("kind", [FifoScheduler, FairFifoScheduler])
def test_concurrent_takes_get_every_chunk_once_and_the_count_ends_at_zero(kind: type) -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", p) for p in range(4)])
    sched = kind()
    taken: list[Work] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set() or len(sched):
            try:
                taken.append(sched.take())
            except IndexError:
                time.sleep(0)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for first in range(0, 4000, 40):
        sched.put([_run(tracker, p, first, 40) for p in range(4)])
    stop.set()
    for t in threads:
        t.join(WAIT)
    assert len(sched) == 0
    got = Counter((w.state.tp, o) for w in taken for o in w.offsets)
    assert len(got) == 16000 and set(got.values()) == {1}


# -- the dispatcher ---------------------------------------------------------------------------------


def test_a_fast_handler_gets_chunks_and_every_message_once_in_offset_order() -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", 0), ("t", 1)])
    seen: list[tuple[int, int]] = []
    d = Dispatcher(Invoker(lambda m: seen.append((m.partition(), m.offset()))), 4, scheduler=FairFifoScheduler())
    _fast(d)
    done: list[Work] = []
    d.put([_run(tracker, 0, 0, 400), _run(tracker, 1, 0, 400)])
    wait_until(lambda: (_drain(d, tracker, done), sum(w.size for w in done) == 800)[1], WAIT)
    d.shutdown(wait=True)
    assert max(w.size for w in done) == int(CHUNK_TARGET / PER) == 50  # cut to the chunk length, not singles
    assert sorted(seen) == [(p, o) for p in (0, 1) for o in range(400)]
    for p in (0, 1):  # within a partition, each chunk's messages ran in order
        offsets = [o for q, o in seen if q == p]
        for work in (w for w in done if w.state.tp == ("t", p)):
            at = offsets.index(work.offset)
            assert offsets[at:at + work.size] == list(work.offsets)
    assert tracker.state(("t", 0)).position == tracker.state(("t", 1)).position == 400


async def _async_noop(_msg: Any) -> None:
    return None


@pytest.mark.parametrize("case", ["unmeasured", "slow", "slow-ordered", "async", "async-ordered"])
def test_slow_or_unmeasured_handlers_and_coroutines_get_single_messages(case: str) -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    scheduler = KeyScheduler() if case.endswith("ordered") else FairFifoScheduler()
    d = Dispatcher(Invoker(_async_noop if case.startswith("async") else lambda _m: None), 4, scheduler=scheduler)
    if case != "unmeasured":
        d.pacing.work_ended(FAST_HANDLER if case.startswith("slow") else PER, 1)
    done: list[Work] = []
    d.put([_run(tracker, 0, 0, 100)])
    wait_until(lambda: (_drain(d, tracker, done), sum(w.size for w in done) == 100)[1], WAIT)
    d.shutdown(wait=True)
    assert {w.size for w in done} == {1} and len(done) == 100


@pytest.mark.parametrize("error", [ValueError("bad"), SystemExit(3), KeyboardInterrupt()])
def test_a_chunk_that_fails_in_part_retries_the_failed_message_alone_and_completes_the_rest(
    error: BaseException,
) -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    calls: Counter[int] = Counter()

    def handler(msg: FakeMessage) -> None:
        calls[msg.offset()] += 1
        if msg.offset() in (7, 30) and calls[msg.offset()] == 1:
            raise error  # once: the retry succeeds

    d = Dispatcher(Invoker(handler), 2, RetryPolicy(max_attempts=2, base=0.0, cap=0.0), scheduler=FairFifoScheduler())
    _fast(d)
    done: list[Work] = []
    d.put([_run(tracker, 0, 0, 100)])

    def finished() -> bool:
        d.release_due()  # the poll thread's turn: due retries
        _drain(d, tracker, done)
        return tracker.state(("t", 0)).position == 100

    wait_until(finished, WAIT)
    d.shutdown(wait=True)
    assert all(calls[o] == (2 if o in (7, 30) else 1) for o in range(100)), calls
    assert not any(w.failed for w in done) and d.retried == 2
    retried = [w for w in done if w.offset in (7, 30)]
    assert [(w.size, w.attempts) for w in retried] == [(1, 1), (1, 1)]
    assert sorted(o for w in done for o in w.offsets) == list(range(100))


def test_a_chunk_whose_last_attempt_fails_completes_that_message_failed_and_the_rest_done() -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])

    def handler(msg: FakeMessage) -> None:
        if msg.offset() == 3:
            raise RuntimeError("poison")

    d = Dispatcher(Invoker(handler), 2, scheduler=FairFifoScheduler())
    _fast(d)
    done: list[Work] = []
    d.put([_run(tracker, 0, 0, 10)])
    wait_until(lambda: (_drain(d, tracker, done), sum(w.size for w in done) == 10)[1], WAIT)
    d.shutdown(wait=True)
    failed = [w for w in done if w.failed]
    assert [(w.offset, w.size, w.attempts, w.error) for w in failed] == [(3, 1, 1, "RuntimeError: poison")]
    assert sorted((w.offset, w.size) for w in done if not w.failed) == [(0, 3), (4, 6)]
    assert tracker.state(("t", 0)).position == 3  # the failed one is the poll thread's (ON_FAILURE) to finish


def test_the_invoker_reports_a_chunks_failures_by_index_and_stops_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def handler(msg: FakeMessage) -> Any:
        if msg.offset() == 2:
            raise ValueError(msg.offset())
        return None

    invoker = Invoker(handler)
    state = PartitionState(("t", 0))

    def chunk(*offsets: int) -> Work:
        return Work.chunk([FakeMessage("t", 0, o) for o in offsets], state, offsets[0])

    assert invoker.invoke(chunk(3, 4, 5)) is None
    partial = invoker.invoke(chunk(0, 1, 2, 3))
    assert isinstance(partial, Partial) and partial.handled == 4
    assert [(i, type(e)) for i, e in partial.failures] == [(2, ValueError)]
    monkeypatch.setattr(invoker_module, "CHUNK_SECONDS", -1.0)  # past the deadline: one message, then back
    assert invoker.invoke(chunk(0, 1, 2, 3)) == Partial(1, [])


def test_a_chunk_whose_handler_turns_slow_is_cut_and_its_rest_runs_on_other_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(invoker_module, "CHUNK_SECONDS", 0.01)
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    threads: dict[int, str] = {}

    def handler(msg: FakeMessage) -> None:
        threads[msg.offset()] = threading.current_thread().name
        if msg.offset() >= 5:
            time.sleep(0.03)  # the handler turned slow: 30 ms against a measured 20 us

    d = Dispatcher(Invoker(handler), 8, scheduler=FairFifoScheduler())
    _fast(d)
    done: list[Work] = []
    d.put([_run(tracker, 0, 0, 40)])
    wait_until(lambda: bool(d.completions), WAIT)  # the cut chunk's done part
    assert d.chunk_size == 1  # the measure was forgotten: single messages until measured again

    def finished() -> bool:
        d.release_due()  # the poll thread's turn: starts free workers for the handed-back rest
        _drain(d, tracker, done)
        return tracker.state(("t", 0)).position == 40

    wait_until(finished, WAIT)
    d.shutdown(wait=True)
    assert done[0].offset == 0 and done[0].size < 40  # the chunk came back cut short
    assert all(w.size == 1 for w in done[1:])  # its rest: single messages
    assert sorted(o for w in done for o in w.offsets) == list(range(40))
    assert len(set(threads.values())) >= 4  # the rest was spread over the free workers


def test_the_rest_of_a_chunk_cut_short_after_its_partition_was_revoked_is_dropped_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(invoker_module, "CHUNK_SECONDS", 0.01)
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    ran: list[int] = []
    started = threading.Event()

    def handler(msg: FakeMessage) -> None:
        ran.append(msg.offset())
        started.set()
        if msg.offset() == 0:
            tracker.revoke([("t", 0)])  # revoked while the chunk is running (the poll thread does this)
            time.sleep(0.02)

    d = Dispatcher(Invoker(handler), 4, scheduler=FairFifoScheduler())
    _fast(d)
    d.put([_run(tracker, 0, 0, 20)])
    assert started.wait(WAIT)
    wait_until(lambda: bool(d.completions), WAIT)
    d.shutdown(wait=True)
    assert ran == [0] and d.backlog == 0  # the rest was neither run nor left waiting
    back = sorted((w.offset, w.size, w.dropped) for w in d.completions)
    assert back == [(0, 1, False)] + [(o, 1, True) for o in range(1, 20)]  # the rest handed back as dropped


def _drain_each(dispatcher: Dispatcher, tracker: OffsetTracker, sink: list[Work]) -> None:
    """:func:`_drain` for Works whose offsets may have gaps (an ordered run of several keys)."""
    while dispatcher.completions:
        work = dispatcher.completions.popleft()
        sink.append(work)
        if not work.failed:
            for offset in work.offsets:
                tracker.complete(work.state, offset)


def test_an_ordered_fast_handler_takes_runs_each_key_in_order_and_a_failure_retries_before_its_key_goes_on(
) -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    state = tracker.get(("t", 0))
    assert state is not None
    lock = threading.Lock()
    seen: list[tuple[bytes | None, int]] = []
    calls: Counter[int] = Counter()

    def handler(msg: FakeMessage) -> None:
        with lock:
            seen.append((msg.key(), msg.offset()))
            calls[msg.offset()] += 1
            first = calls[msg.offset()] == 1
        if msg.offset() in (13, 202) and first:
            raise RuntimeError("once")

    d = Dispatcher(Invoker(handler), 4, RetryPolicy(max_attempts=2, base=0.0, cap=0.0), scheduler=KeyScheduler())
    _fast(d)
    keys = [b"k%d" % (o % 4) for o in range(400)]
    assert tracker.admit_range(state, list(range(400))) is None
    d.put([Work(FakeMessage("t", 0, o, key=k), state, o) for o, k in enumerate(keys)])
    done: list[Work] = []

    def finished() -> bool:
        d.release_due()
        _drain_each(d, tracker, done)
        return tracker.state(("t", 0)).position == 400

    wait_until(finished, WAIT)
    d.shutdown(wait=True)
    assert max(w.size for w in done) > 1, "a fast ordered handler takes runs, not single messages"
    assert all(list(w.offsets) == sorted(w.offsets) for w in done)
    assert all(calls[o] == (2 if o in (13, 202) else 1) for o in range(400)), calls
    for key in set(keys):  # per key: offset order, the failed message's retry right after it
        offsets = [o for k, o in seen if k == key]
        expected = sorted(o for o in range(400) if keys[o] == key)
        for retried in (13, 202):
            if keys[retried] == key:
                expected.insert(expected.index(retried), retried)
        assert offsets == expected, key
    assert d.retried == 2 and not any(w.failed for w in done)
