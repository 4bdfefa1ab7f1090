"""Ordering schedulers without a broker: order, blocking, fairness, counts, purge, requeue, hot keys."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import pairwise

import pytest

from mtc75.core.offsets import PartitionState
from mtc75.core.ordering import (
    FRONT,
    LONG_LANE,
    FairFifoScheduler,
    KeyScheduler,
    PartitionScheduler,
    new_scheduler,
)
from mtc75.core.scheduler import FifoScheduler
from mtc75.core.work import Work
from tests.fake_kafka import FakeMessage


def _states(n: int) -> list[PartitionState]:
    return [PartitionState(("t", p)) for p in range(n)]


def _works(state: PartitionState, keys: list[bytes | None], start: int = 0) -> list[Work]:
    return [Work(FakeMessage("t", state.tp[1], start + i, key=k), state, start + i) for i, k in enumerate(keys)]


def _take(sched: object) -> Work | None:
    """``take()``, None when nothing may start (the interface raises IndexError)."""
    try:
        return sched.take()  # type: ignore[attr-defined,no-any-return]
    except IndexError:
        return None


def _key(work: Work) -> tuple[int, bytes | None]:
    return work.state.tp[1], work.message.key()


def _drain_all(sched: KeyScheduler | PartitionScheduler) -> list[Work]:
    order = []
    while (w := _take(sched)) is not None:
        order.append(w)
        sched.release(w)
    return order


@pytest.mark.parametrize("seed", range(20))
def test_key_mode_never_runs_a_key_twice_at_once_and_keeps_offset_order(seed: int) -> None:
    rng = random.Random(seed)
    sched = KeyScheduler()
    states = _states(3)
    put = 0
    for state in states:
        keys = [rng.choice([b"a", b"b", b"c", b"d", None]) for _ in range(200)]
        sched.put(_works(state, keys))
        put += len(keys)
    running: list[Work] = []
    last: dict[tuple[int, bytes | None], int] = {}
    taken = 0
    while taken < put or running:
        if running and (rng.random() < 0.5 or sched.ready == 0):
            sched.release(running.pop(rng.randrange(len(running))))
            continue
        work = _take(sched)
        assert work is not None, "a ready message exists: nothing runs that could block it"
        taken += 1
        if work.message.key() is not None:
            k = _key(work)
            assert all(_key(r) != k for r in running), f"key {k} started twice at once"
            assert last.get(k, -1) < work.offset, f"key {k} out of offset order"
            last[k] = work.offset
        running.append(work)
    assert len(sched) == 0 and sched.lanes == 0 and sched.running == 0


@pytest.mark.parametrize("cap", [1, 4])
def test_partition_mode_takes_a_fetched_run_one_message_or_one_run_at_a_time(cap: int) -> None:
    sched = PartitionScheduler()
    sched.take_cap = cap
    a, b = _states(2)
    sched.put([Work.chunk([FakeMessage("t", 0, o) for o in range(10, 16)], a, 10),
               Work.chunk([FakeMessage("t", 1, o) for o in range(3)], b, 0)])
    assert len(sched) == 9 and sched.ready == 2  # one per partition may start
    order: dict[int, list[int]] = {0: [], 1: []}
    while sched.ready:
        running = []
        while (work := _take(sched)) is not None:
            assert work.size <= cap and all(r.state is not work.state for r in running)
            order[work.state.tp[1]] += list(work.offsets)
            running.append(work)
        for work in running:
            sched.release(work)
    assert order == {0: list(range(10, 16)), 1: [0, 1, 2]} and len(sched) == 0 and sched.running == 0


@pytest.mark.parametrize("seed", range(10))
def test_partition_mode_one_message_per_partition_in_offset_order(seed: int) -> None:
    rng = random.Random(seed)
    sched = PartitionScheduler()
    states = _states(4)
    for state in states:
        sched.put(_works(state, [b"x"] * 50))
    running: list[Work] = []
    last = {s.tp: -1 for s in states}
    done = 0
    while done < 200:
        work = _take(sched) if rng.random() < 0.6 else None
        if work is None:
            if running:
                sched.release(running.pop(rng.randrange(len(running))))
                done += 1
            continue
        assert all(r.state is not work.state for r in running)
        assert work.offset == last[work.state.tp] + 1
        last[work.state.tp] = work.offset
        running.append(work)
        assert len(running) <= 4


def test_a_busy_key_blocks_only_its_own_messages() -> None:
    sched = KeyScheduler()
    (state,) = _states(1)
    sched.put(_works(state, [b"a", b"a", b"b"]))
    assert (len(sched), sched.ready, sched.blocked) == (3, 2, 1)
    a0 = _take(sched)
    assert a0 is not None and a0.offset == 0
    b = _take(sched)
    assert b is not None and b.offset == 2
    assert _take(sched) is None, "a@1 must wait for a@0"
    assert (len(sched), sched.ready, sched.blocked) == (1, 0, 1)
    sched.release(b)
    assert _take(sched) is None
    sched.release(a0)
    assert (sched.ready, sched.blocked) == (1, 0)
    a1 = _take(sched)
    assert a1 is not None and a1.offset == 1


def test_messages_without_a_key_are_each_their_own_key() -> None:
    sched = KeyScheduler()
    (state,) = _states(1)
    sched.put(_works(state, [None, None, None]))
    taken = [_take(sched) for _ in range(3)]
    assert [w.offset for w in taken if w] == [0, 1, 2]
    assert sched.lanes == 3
    for w in taken:
        assert w is not None
        sched.release(w)
    assert sched.lanes == 0


@pytest.mark.parametrize("kind", [PartitionScheduler, KeyScheduler, FairFifoScheduler])
def test_partitions_take_turns_so_a_late_partition_starts_at_once(kind: type) -> None:
    sched = kind()
    p0, p1, p2 = _states(3)
    sched.put(_works(p0, [None] * 200))
    sched.put(_works(p1, [None] * 200))
    first = _take(sched)
    sched.put(_works(p2, [None] * 200))
    # the unordered front already dealt FRONT messages of partition 0 before the others arrived
    ahead = FRONT if kind is FairFifoScheduler else 0
    seen = [first] + [_take(sched) for _ in range(ahead + 5)]
    parts = [w.state.tp[1] for w in seen if w is not None]
    assert parts.index(2) <= ahead + 3 and parts.index(1) <= ahead + 1, f"a partition waited: {parts}"
    for w in seen:
        if w is not None:
            sched.release(w)
    rest = [w.state.tp[1] for w in iter(lambda: _take(sched), None)][:30]
    assert rest.count(0) <= 11 and rest.count(1) <= 11 and rest.count(2) <= 11, f"not round-robin: {rest}"


def test_the_plain_fifo_is_unfair_which_is_what_the_fair_one_fixes() -> None:
    p0, p1 = _states(2)
    sched = FifoScheduler()
    sched.put(_works(p0, [None] * 50))
    sched.put(_works(p1, [None] * 50))
    parts = [w.state.tp[1] for w in (_take(sched) for _ in range(50)) if w]
    assert parts == [0] * 50  # the reference: p1 waits for all of p0


def test_keys_take_turns_and_a_hot_key_does_not_delay_others() -> None:
    sched = KeyScheduler()
    (state,) = _states(1)
    sched.put(_works(state, [b"hot"] * 10_000 + [b"cold"]))
    order = [(w.message.key(), w.offset) for w in _drain_all_n(sched, 4)]
    assert order[:2] == [(b"hot", 0), (b"cold", 10_000)]
    assert (len(sched), sched.blocked, sched.ready) == (9_997, 9_996, 1)


def _drain_all_n(sched: KeyScheduler, n: int) -> list[Work]:
    out = []
    for _ in range(n):
        w = _take(sched)
        if w is None:
            break
        out.append(w)
        sched.release(w)
    return out


def test_ten_thousand_keys_leave_nothing_behind() -> None:
    sched = KeyScheduler()
    (state,) = _states(1)
    sched.put(_works(state, [str(i).encode() for i in range(10_000)]))
    assert sched.ready == 10_000 and sched.blocked == 0
    assert len(_drain_all(sched)) == 10_000
    assert sched.lanes == 0 and len(sched) == 0


def test_a_waiting_retry_blocks_its_key_and_requeue_runs_it_first() -> None:
    sched = KeyScheduler()
    (state,) = _states(1)
    sched.put(_works(state, [b"a", b"a", b"b"]))
    a0 = _take(sched)
    assert a0 is not None and a0.offset == 0
    # a0 failed: it waits for its backoff in the dispatcher's delay queue, neither released nor queued
    b = _take(sched)
    assert b is not None and b.message.key() == b"b"
    sched.release(b)
    assert _take(sched) is None, "a@1 must not pass a@0 while a@0 waits for its retry"
    sched.put(_works(state, [b"a"], start=3))
    sched.requeue([a0])
    assert (sched.ready, sched.blocked) == (1, 2)
    again = _take(sched)
    assert again is a0
    assert _take(sched) is None
    sched.release(a0)
    assert [w.offset for w in _drain_all(sched)] == [1, 3]


def test_partition_mode_retry_blocks_the_partition() -> None:
    sched = PartitionScheduler()
    p0, p1 = _states(2)
    sched.put(_works(p0, [None, None]))
    sched.put(_works(p1, [None]))
    w = _take(sched)
    assert w is not None and w.state is p0
    other = _take(sched)
    assert other is not None and other.state is p1
    assert _take(sched) is None
    sched.requeue([w])
    assert _take(sched) is w
    sched.release(w)
    nxt = _take(sched)
    assert nxt is not None and nxt.offset == 1


def test_purge_drops_one_partition_and_forgets_its_lanes() -> None:
    sched = KeyScheduler()
    p0, p1 = _states(2)
    sched.put(_works(p0, [b"a", b"a", b"b"]))
    sched.put(_works(p1, [b"a", b"c"]))
    running = _take(sched)  # p0 a@0
    assert running is not None and running.state is p0
    dropped = sched.purge(lambda w: w.state is p0)
    assert sorted(w.offset for w in dropped) == [1, 2]
    assert (len(sched), sched.ready, sched.blocked) == (2, 2, 0)
    rest = [_take(sched), _take(sched)]
    assert {w.state.tp[1] for w in rest if w} == {1}
    assert _take(sched) is None
    for w in [*rest, running]:
        assert w is not None
        sched.release(w)  # a revoked message finishing late releases a lane nobody waits on
    assert sched.lanes == 0 and sched.running == 0 and len(sched) == 0


def test_purge_of_a_blocked_key_then_a_new_assignment_is_not_blocked_by_the_old_one() -> None:
    sched = KeyScheduler()
    (old,) = _states(1)
    sched.put(_works(old, [b"a", b"a"]))
    running = _take(sched)
    assert running is not None
    assert [w.offset for w in sched.purge()] == [1]
    assert (len(sched), sched.ready, sched.blocked) == (0, 0, 0)
    new = PartitionState(("t", 0))  # the partition assigned again
    sched.put(_works(new, [b"a"], start=1))
    again = _take(sched)
    assert again is not None and again.state is new
    sched.release(running)
    assert _take(sched) is None
    sched.release(again)
    assert sched.lanes == 0


def test_fair_fifo_purge_keeps_the_rest_in_partition_order() -> None:
    sched = FairFifoScheduler(front=4)
    p0, p1 = _states(2)
    sched.put(_works(p0, [None] * 10))
    sched.put(_works(p1, [None] * 10))
    dropped = sched.purge(lambda w: w.state is p0)
    assert sorted(w.offset for w in dropped) == list(range(10))
    assert len(sched) == 10
    assert [w.offset for w in iter(lambda: _take(sched), None)] == list(range(10))
    assert sched.purge() == []


def test_fair_fifo_requeue_goes_first() -> None:
    sched = FairFifoScheduler(front=4)
    (p0,) = _states(1)
    sched.put(_works(p0, [None] * 10))
    first = _take(sched)
    assert first is not None
    sched.requeue([first])
    assert _take(sched) is first
    assert (sched.ready, sched.blocked) == (9, 0)


def test_fair_fifo_lock_free_takes_hand_out_every_message_once_in_partition_order() -> None:
    sched = FairFifoScheduler()
    states = _states(3)
    total = 3 * 3000
    got: list[list[Work]] = [[] for _ in range(4)]
    stop = threading.Event()

    def worker(out: list[Work]) -> None:
        while not stop.is_set() or len(sched):
            w = _take(sched)
            if w is not None:
                out.append(w)

    threads = [threading.Thread(target=worker, args=(g,)) for g in got]
    for t in threads:
        t.start()
    for start in range(0, 3000, 100):
        for state in states:
            sched.put(_works(state, [None] * 100, start=start))
    stop.set()
    for t in threads:
        t.join(10)
    everything = [w for g in got for w in g]
    assert len(everything) == total
    assert len({id(w) for w in everything}) == total
    for g in got:  # each worker sees each partition's messages in offset order (one FIFO per partition)
        for state in states:
            offsets = [w.offset for w in g if w.state is state]
            assert offsets == sorted(offsets)


def test_fair_fifo_front_bounds_the_wait_of_a_new_partition() -> None:
    sched = FairFifoScheduler()
    p0, p1 = _states(2)
    sched.put(_works(p0, [None] * 500))
    taken = [_take(sched) for _ in range(3)]
    sched.put(_works(p1, [None]))
    waited = 0
    while (w := _take(sched)) is not None and w.state is p0:
        waited += 1
    assert w is not None and w.state is p1
    assert waited <= FRONT, f"partition 1 waited {waited} messages"
    assert all(taken)


def test_new_scheduler_names() -> None:
    assert isinstance(new_scheduler("unordered"), FairFifoScheduler)
    assert isinstance(new_scheduler("partition"), PartitionScheduler)
    assert isinstance(new_scheduler("key"), KeyScheduler)
    with pytest.raises(ValueError, match="ORDERING"):
        new_scheduler("keys")


def test_ordering_setting_from_env_flag_keyword_and_its_errors() -> None:
    from mtc75.api import Consumer
    from mtc75.errors import ConfigError
    from mtc75.settings import load_settings

    assert load_settings(None, env={}).ORDERING == "unordered"
    assert load_settings(None, env={"MTC75_ORDERING": "key"}).ORDERING == "key"
    assert load_settings(None, env={"MTC75_ORDERING": "key"}, flags={"ORDERING": "partition"}).ORDERING == "partition"
    with pytest.raises(ConfigError, match=r"ORDERING.*must be one of unordered, partition, key"):
        load_settings(None, env={"MTC75_ORDERING": "keys"})
    consumer = Consumer(lambda _m: None, topic="t", group_id="g", ordering="key")
    assert consumer.stats().ordering == "key"
    with pytest.raises(ConfigError, match="ordering"):
        Consumer(lambda _m: None, topic="t", group_id="g", ordering="fifo")


def test_dashboard_and_summary_show_the_ordering() -> None:
    from rich.console import Console

    from mtc75.app.dashboard import render
    from tests.stats_factory import make_stats

    def text(**changes: object) -> str:
        console = Console(record=True, width=110, color_system=None, force_terminal=False)
        console.print(render(make_stats(**changes), [1.0]))
        return console.export_text()

    shown = text(ordering="key", blocked=5)
    assert "ordering   key" in shown and "5 behind their key" in shown
    assert "ordering   unordered" in text() and "behind" not in text()
    assert make_stats(ordering="partition").summary()["ordering"] == "partition"


def test_fair_share_is_a_part_of_the_backlog_but_never_below_threads_or_half_a_second() -> None:
    from mtc75.core.ordering import fair_share

    assert fair_share(high=44, limit=4, partitions=3, rate=40.0) == 20  # demo: half a second of work
    assert fair_share(high=44, limit=4, partitions=3, rate=0.0) == 14  # before a rate: its part of the backlog
    assert fair_share(high=8, limit=4, partitions=3, rate=0.0) == 4  # one per thread at least
    assert fair_share(high=5000, limit=75, partitions=6, rate=100_000.0) == 50_000  # fast: never cut


def test_fair_cuts_keep_each_partition_to_its_share_in_fetch_order() -> None:
    from mtc75.core.ordering import fair_cuts

    a, b, c = ("t", 0), ("t", 1), ("t", 2)
    runs = [(a, list(range(0, 30))), (b, list(range(100, 105))), (a, list(range(30, 40)))]
    assert fair_cuts({a: 0, b: 0}, runs, share=20) == {a: 20}
    assert fair_cuts({a: 25, b: 0}, runs, share=20) == {a: 0}  # already over: nothing more of it
    assert fair_cuts({a: 0, b: 18}, runs, share=40) == {}
    assert fair_cuts({a: 0, b: 18}, runs, share=35) == {a: 35}  # the second run of a passes it
    assert fair_cuts({b: 0}, runs, share=1) == {b: 101}  # a is not ours: left to the intake to drop
    assert fair_cuts({a: 0, c: 0}, [], share=1) == {}


class _Consumer:
    def __init__(self, end: int, refuse_seek: bool = False) -> None:
        self.end = end
        self.refuse_seek = refuse_seek
        self.seeks: list[tuple[int, int]] = []

    def seek(self, tp: object) -> None:
        from confluent_kafka import KafkaError, KafkaException

        if self.refuse_seek:
            raise KafkaException(KafkaError(KafkaError._STATE))
        self.seeks.append((tp.partition, tp.offset))  # type: ignore[attr-defined]

    def get_watermark_offsets(self, _tp: object, cached: bool = False) -> tuple[int, int]:
        return 0, self.end


def _intake(pending_b: range) -> tuple[object, object]:
    from mtc75.core.offsets import OffsetTracker
    from mtc75.kafka.fairness import FairIntake

    tracker = OffsetTracker()
    tracker.assign([("t", 0), ("t", 1)])
    for o in pending_b:
        tracker.admit(tracker.state(("t", 1)), o)
    for o in pending_b:
        tracker.complete(tracker.state(("t", 1)), o)
    return tracker, FairIntake(tracker)


def test_fair_intake_cuts_a_long_run_while_another_partition_waits_and_seeks_it_back() -> None:
    _tracker, intake = _intake(range(0, 5))  # partition 1: offsets 0-4 done, the broker has up to 200
    batch = [FakeMessage("t", 0, o) for o in range(50)]

    def cut(consumer: _Consumer, now: float, held: tuple[tuple[str, int], ...] = ()) -> list[FakeMessage]:
        return intake.cut(consumer, batch, high=44, limit=4, rate=40.0, now=now, held=held)  # type: ignore[attr-defined]

    consumer = _Consumer(end=200)
    kept = cut(consumer, now=10.0)
    assert [m.offset() for m in kept] == list(range(22)) and consumer.seeks == [(0, 22)]  # share 44 // 2
    # cut again only after the cooldown (a partition that only looks as if it waited costs little)
    consumer = _Consumer(end=200)
    assert cut(consumer, now=10.01) == batch and not consumer.seeks
    assert len(cut(consumer, now=10.2)) == 22 and consumer.seeks == [(0, 22)]
    # partition 1 has nothing more on the broker (a commit marker at most): nobody waits, nothing is cut
    for end in (5, 6):
        consumer = _Consumer(end=end)
        assert cut(consumer, now=20.0 + end) == batch and not consumer.seeks
    # partition 1 paused alone (the window's hold) cannot take a turn: it does not wait
    consumer = _Consumer(end=200)
    assert cut(consumer, now=30.0, held=(("t", 1),)) == batch and not consumer.seeks
    # a seek that fails keeps the messages (dropping them without it would skip them for good)
    consumer = _Consumer(end=200, refuse_seek=True)
    assert cut(consumer, now=40.0) == batch


# -- through the dispatcher (worker threads, retries, purges), no broker ------------------------------


def _dispatch(sched: object, handler: Callable[[FakeMessage], None], threads: int, attempts: int = 1) -> object:
    from mtc75.core.retry import RetryPolicy
    from mtc75.runtime.dispatcher import Dispatcher
    from mtc75.runtime.invoker import Invoker

    return Dispatcher(Invoker(handler), threads, RetryPolicy(attempts, 0.01, 0.02), scheduler=sched)  # type: ignore[arg-type]


def test_key_mode_through_the_dispatcher_with_retries_keeps_each_key_in_order() -> None:
    from tests.kafka_helpers import wait_until

    lock = threading.Lock()
    calls: list[tuple[bytes | None, int, float, float, bool]] = []
    failed_once: set[int] = set()

    def handler(msg: FakeMessage) -> None:
        started = time.monotonic()
        fail = False
        try:
            time.sleep(random.Random(msg.offset()).uniform(0, 0.002))
            with lock:
                fail = msg.offset() % 5 == 1 and msg.offset() not in failed_once
                failed_once.add(msg.offset())
            if fail:
                raise RuntimeError("first attempt fails")
        finally:
            with lock:
                calls.append((msg.key(), msg.offset(), started, time.monotonic(), fail))

    sched = KeyScheduler()
    d = _dispatch(sched, handler, threads=16, attempts=3)
    (state,) = _states(1)
    items = _works(state, [b"k%d" % (i % 8) for i in range(800)])
    try:
        for start in range(0, 800, 100):
            d.put(items[start:start + 100])  # type: ignore[attr-defined]

        def finished() -> bool:
            d.release_due()  # type: ignore[attr-defined]  # the poll thread's turn: due retries start
            return len(d.completions) == 800  # type: ignore[attr-defined]

        wait_until(finished, timeout=60, step=0.005, what="800 completions")
        assert d.wait_idle(5)  # type: ignore[attr-defined]
    finally:
        d.shutdown(wait=True)  # type: ignore[attr-defined]
    assert not any(w.failed for w in d.completions)  # type: ignore[attr-defined]
    by_key: dict[bytes | None, list[tuple[bytes | None, int, float, float, bool]]] = {}
    for call in sorted(calls, key=lambda c: c[2]):
        by_key.setdefault(call[0], []).append(call)
    for lane in by_key.values():
        for before, after in pairwise(lane):
            assert after[2] >= before[3], "two messages of one key ran at once"
            assert after[1] == before[1] if before[4] else after[1] > before[1], "out of order"
    assert sched.lanes == 0 and sched.running == 0 and len(sched) == 0


def test_a_purged_retry_frees_its_key_for_the_next_assignment() -> None:
    from tests.kafka_helpers import wait_until

    def handler(msg: FakeMessage) -> None:
        raise RuntimeError("fails")

    sched = KeyScheduler()
    d = _dispatch(sched, handler, threads=2, attempts=5)
    (old,) = _states(1)
    try:
        d.put(_works(old, [b"a", b"a"]))  # type: ignore[attr-defined]
        wait_until(lambda: d.retried >= 1, timeout=10, what="a retry")  # type: ignore[attr-defined]
        assert d.wait_idle(5)  # type: ignore[attr-defined]
        assert sched.blocked >= 1 or sched.running == 1
        dropped = d.retire([old])  # type: ignore[attr-defined]
        assert sorted(w.offset for w in dropped) == [0, 1]
        assert sched.lanes == 0 and sched.running == 0 and len(sched) == 0  # the retry was released
    finally:
        d.shutdown(wait=True)  # type: ignore[attr-defined]


def test_fair_fifo_lock_free_takes_racing_purges_never_lose_or_duplicate_a_message() -> None:
    import sys

    sched = FairFifoScheduler()
    states = _states(3)
    items = [w for start in range(0, 1500, 50) for s in states for w in _works(s, [None] * 50, start=start)]
    taken: list[list[Work]] = [[], []]
    stop = threading.Event()

    def taker(out: list[Work]) -> None:
        while not stop.is_set():
            w = _take(sched)
            if w is not None:
                out.append(w)

    threads = [threading.Thread(target=taker, args=(out,)) for out in taken]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    for t in threads:
        t.start()
    dropped: list[Work] = []
    try:
        for start in range(0, len(items), 90):
            sched.put(items[start:start + 90])
            deadline = time.monotonic() + 5
            while len(sched) and time.monotonic() < deadline:
                dropped.extend(sched.purge(lambda w: w.offset % 7 == 0))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sys.setswitchinterval(interval)
    rest = sched.purge()
    seen = [id(w) for w in dropped] + [id(w) for out in taken for w in out] + [id(w) for w in rest]
    assert len(seen) == len(items) and set(seen) == {id(w) for w in items}


@pytest.mark.parametrize("kind", [PartitionScheduler, KeyScheduler, FairFifoScheduler])
def test_take_raises_index_error_when_nothing_may_start(kind: type) -> None:
    """The interface (mtc75/core/scheduler.py): IndexError, never None, so a deque's popleft can be a take."""
    sched = kind()
    with pytest.raises(IndexError):
        sched.take()
    (state,) = _states(1)
    sched.put(_works(state, [b"a"]))
    work = sched.take()
    assert isinstance(work, Work)
    with pytest.raises(IndexError):
        sched.take()


@pytest.mark.parametrize("seed", range(10))
def test_key_mode_runs_hold_every_key_they_carry_and_keep_each_key_in_offset_order(seed: int) -> None:
    rng = random.Random(seed)
    sched = KeyScheduler()
    sched.take_cap = rng.randint(2, 12)
    # each partition's 200 messages arrive in slices of 25 while runs are taken and released: lanes empty
    # and fill again (a lane a run left busy would hold its key's next slice for good)
    slices: dict[PartitionState, deque[list[Work]]] = {}
    for state in _states(3):
        works = _works(state, [rng.choice([b"a", b"b", b"c", b"d", None]) for _ in range(200)])
        slices[state] = deque(works[i:i + 25] for i in range(0, len(works), 25))
    put = 0
    running: list[Work] = []
    last: dict[tuple[int, bytes | None], int] = {}
    taken = sizes = 0
    while slices or taken < put or running:
        if slices and (rng.random() < 0.2 or (sched.ready == 0 and not running)):
            state = rng.choice(list(slices))
            sched.put(slices[state].popleft())
            put += 25
            if not slices[state]:
                del slices[state]
            continue
        if running and (rng.random() < 0.5 or sched.ready == 0):
            sched.release(running.pop(rng.randrange(len(running))))
            continue
        run = _take(sched)
        assert run is not None, "a ready message exists: nothing runs that could block it"
        assert 1 <= run.size <= sched.take_cap and list(run.offsets) == sorted(run.offsets)
        assert {m.partition() for m in run.messages} == {run.state.tp[1]}, "a run is one partition's"
        held = {_key(r_work) for r in running for r_work in _singles(r) if r_work.message.key() is not None}
        for single in _singles(run):
            if single.message.key() is None:
                continue
            k = _key(single)
            assert k not in held, f"key {k} started while a run holding it runs"
            assert last.get(k, -1) < single.offset, f"key {k} out of offset order"
            last[k] = single.offset
        taken += run.size
        sizes = max(sizes, run.size)
        running.append(run)
    assert sizes > 1 and len(sched) == 0 and sched.lanes == 0 and sched.running == 0


def _singles(work: Work) -> list[Work]:
    return work.split(1) if work.size > 1 else [work]


def test_a_run_that_failed_holds_only_the_failed_messages_key_until_its_retry() -> None:
    sched = KeyScheduler()
    sched.take_cap = 10
    (state,) = _states(1)
    sched.put(_works(state, [b"a", b"a", b"b", b"b", b"a"]))
    run = _take(sched)
    assert run is not None and list(run.offsets) == [0, 1, 2, 3, 4] and _take(sched) is None
    # The dispatcher's part when the run stopped at a@1 (the invoker stops at the first failure): the
    # messages after it go back to their lanes, the lane of a is handed over to a@1, the others are free.
    failed = run.part(1, 2)
    sched.requeue(run.part(2, 5).split(1))
    sched.handover(run, failed)
    b = _take(sched)
    assert b is not None and b.offset == 2 and b.size == 1, "b's lane is free (put back: one at a time)"
    assert _take(sched) is None, "a@4 must wait for a@1's retry, b@3 for b@2"
    failed.attempts = 1
    sched.requeue([failed])
    again = _take(sched)
    assert again is failed, "a retry runs alone, before the rest of its key"
    assert _take(sched) is None
    sched.release(failed)
    sched.release(b)
    assert sorted(w.offset for w in _drain_all(sched)) == [3, 4]
    assert sched.lanes == 0 and sched.running == 0 and len(sched) == 0


def test_a_run_of_several_keys_put_back_whole_goes_home_as_single_messages() -> None:
    sched = KeyScheduler()
    sched.take_cap = 10
    (state,) = _states(1)
    sched.put(_works(state, [b"a", b"b", b"a"]))
    run = _take(sched)
    assert run is not None and run.size == 3
    run.paid = 1  # it waited for rate tokens it had paid in part
    sched.requeue([run])  # throttled: back in front, to start again
    assert (len(sched), sched.ready) == (3, 2)
    taken = [_take(sched), _take(sched), _take(sched)]
    assert taken[2] is None and sorted(w.offset for w in taken[:2] if w) == [0, 1], "paid: alone, a@2 after a@0"
    assert all(w is not None and w.paid == 1 for w in taken[:2])
    for work in taken[:2]:
        assert work is not None
        sched.release(work)
    assert [w.offset for w in _drain_all(sched)] == [2]


@pytest.mark.parametrize("cap", [1, 10])
def test_a_hot_keys_long_lane_keeps_offset_order_through_takes_a_retry_and_a_purge(cap: int) -> None:
    sched = KeyScheduler()
    sched.take_cap = cap
    [state] = _states(1)
    sched.put(_works(state, [b"hot"]))
    first = sched.take()  # the key runs: what follows waits in its lane
    sched.put(_works(state, [b"hot"] * (3 * LONG_LANE), start=1))
    assert len(sched) == 3 * LONG_LANE and sched.ready == 0
    sched.release(first)
    order = [first.offset]
    retried = False
    cut = 0  # the messages taken when the purge came
    while (work := _take(sched)) is not None:
        assert work.size <= cap
        if not retried and work.offset > LONG_LANE:  # its first attempt failed: back in front of its lane
            retried = True
            work.attempts = 1
            sched.requeue([work])
            continue
        order += list(work.offsets)
        sched.release(work)
        if not cut and len(order) >= 2 * LONG_LANE:
            cut = len(order)
            dropped = sched.purge(lambda w: w.offset % 2 == 0)  # a purge keeps the rest in order
            assert dropped and all(w.offset % 2 == 0 for w in dropped)
    kept = [o for o in range(3 * LONG_LANE + 1) if o < cut or o % 2 == 1]
    assert retried and cut and order == kept and len(sched) == 0 and sched.running == 0
