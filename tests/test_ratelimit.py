"""Rate limits without a broker or a clock: the token buckets (mtc75/core/ratelimit.py) and the dispatcher
that parks throttled Works in its delay queue (mtc75/runtime/throttle.py), driven by a fake clock."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mtc75
from mtc75 import testing
from mtc75.core.offsets import OffsetTracker
from mtc75.core.ordering import new_scheduler
from mtc75.core.ratelimit import (
    PAID_KEY,
    PAID_RATE,
    SWEEP_MIN,
    KeyBuckets,
    RateLimits,
    TokenBucket,
    WaitTime,
    capacity,
)
from mtc75.core.work import Work
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.invoker import Invoker
from tests.fake_kafka import FakeKafka, FakeMessage
from tests.kafka_helpers import wait_until


def _works(tracker: OffsetTracker, partition: int, keys: list[bytes | None], first: int = 0) -> list[Work]:
    state = tracker.state(("t", partition))
    out = []
    for i, key in enumerate(keys):
        assert tracker.admit(state, first + i)
        out.append(Work(FakeMessage("t", partition, first + i, key=key), state, first + i))
    return out


# -- the buckets -------------------------------------------------------------------------------------------


def test_a_bucket_spaces_reservations_one_over_rate_apart_after_its_burst() -> None:
    bucket = TokenBucket(rate=10, burst=0.3, now=100.0)  # holds 3
    starts = [bucket.reserve(100.0) for _ in range(6)]
    assert starts[:3] == [100.0, 100.0, 100.0]
    assert starts[3:] == pytest.approx([100.1, 100.2, 100.3])


def test_a_bucket_refills_at_its_rate_and_never_past_its_capacity() -> None:
    bucket = TokenBucket(rate=10, burst=0.2, now=0.0)  # holds 2
    assert [bucket.reserve(0.0), bucket.reserve(0.0)] == [0.0, 0.0]
    assert bucket.reserve(0.05) == pytest.approx(0.1)  # half a token there: waits for the rest
    assert bucket.reserve(60.0) == 60.0  # idle a minute: full again, but only 2
    assert bucket.reserve(60.0) == 60.0
    assert bucket.reserve(60.0) == pytest.approx(60.1)


def test_burst_zero_still_lets_one_message_through() -> None:
    assert capacity(5, 0) == 1 and capacity(200, 0.1) == 20
    bucket = TokenBucket(rate=4, burst=0, now=0.0)
    assert [bucket.reserve(0.0), bucket.reserve(0.0)] == [0.0, 0.25]


def test_a_work_larger_than_the_bucket_waits_for_a_full_bucket_and_leaves_a_debt() -> None:
    bucket = TokenBucket(rate=10, burst=0.5, now=0.0)  # holds 5
    assert bucket.reserve(0.0, 20) == 0.0  # full: starts, 15 tokens in debt
    assert bucket.reserve(0.0, 1) == pytest.approx(1.6)  # 1.5 s of debt, then its own token
    # the long-run rate holds whatever the sizes: Works of 7 start 0.7 s apart
    bucket = TokenBucket(rate=10, burst=0.5, now=0.0)
    starts = [bucket.reserve(0.0, 7) for _ in range(143)]
    assert starts[0] == 0.0 and starts[-1] == pytest.approx(0.7 * 142)


def test_refund_gives_a_reserved_slot_back_and_retune_keeps_the_debt() -> None:
    bucket = TokenBucket(rate=10, burst=0.1, now=0.0)
    for _ in range(5):
        bucket.reserve(0.0)
    assert bucket.tokens(0.0) == pytest.approx(-4)
    bucket.refund(3)
    assert bucket.reserve(0.0) == pytest.approx(0.2)
    faster = bucket.retuned(100, 0.1, 0.0)  # 2 tokens of debt at 100/s: 20 ms
    assert faster.reserve(0.0) == pytest.approx(0.03)


def test_key_buckets_are_independent_and_dropped_once_full_again() -> None:
    keys = KeyBuckets(rate=2, burst=0)
    assert keys.reserve(b"hot", 0.0) == 0.0
    assert keys.reserve(b"hot", 0.0) == 0.5
    assert keys.reserve(b"cold", 0.0) == 0.0  # another key: its own tokens
    for i in range(SWEEP_MIN + 1):
        keys.reserve(i, 10.0)
    # the sweep ran at SWEEP_MIN + 1 keys: every bucket full again by t=10 is gone; the 1025 just used stay
    assert b"hot" not in keys._zero_at and b"cold" not in keys._zero_at
    assert len(keys) == SWEEP_MIN + 1
    for i in range(3 * SWEEP_MIN):
        keys.reserve(("k", i), 100.0 + i)  # keys come and go: one new key each second
    assert len(keys) <= SWEEP_MIN + 1


def test_limits_pay_the_key_first_and_the_consumer_only_once_the_key_allows() -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    limits = RateLimits(max_rate=100, key_rate=1, burst=0, now=0.0)
    a1, a2, b1 = _works(tracker, 0, [b"a", b"a", b"b"])
    assert limits.admit(a1, 0.0) == 0.0 and a1.paid == 0
    assert limits.admit(a2, 0.0) == 1.0 and a2.paid == PAID_KEY  # waits for its key: no MAX_RATE token taken
    assert limits.admit(b1, 0.0) == pytest.approx(0.01)  # the consumer's 2nd token, not its 3rd
    assert b1.paid == PAID_KEY | PAID_RATE
    assert limits.admit(a2, 1.0) == 1.0 and a2.paid == 0  # its key's time: only the consumer's token left
    assert limits.admit(b1, 0.01) == 0.01 and b1.paid == 0  # paid both: starts without paying again


def test_a_chunk_pays_one_token_per_message_and_each_key_its_count() -> None:
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    state = tracker.state(("t", 0))
    msgs = [FakeMessage("t", 0, i, key=k) for i, k in enumerate([b"a", b"a", None, b"b"])]
    chunk = Work.chunk(msgs, state, 0)
    limits = RateLimits(max_rate=10, key_rate=1, burst=0, now=0.0)
    assert limits.admit(chunk, 0.0) == 0.0 and chunk.paid == 0  # full buckets start it, leaving debts
    assert limits.all is not None and limits.keys is not None
    assert limits.all.reserve(0.0) == pytest.approx(0.4)  # 4 tokens taken: 0.3 s of debt, then its own
    assert limits.keys.reserve(b"a", 0.0) == pytest.approx(2.0)  # a took 2
    assert limits.keys.reserve(b"b", 0.0) == pytest.approx(1.0)  # b took 1; the keyless message none
    assert len(limits.keys) == 2


def test_chunks_are_capped_at_the_bucket_and_single_under_key_rate() -> None:
    assert RateLimits(200, 0, 0.1, 0.0).chunk_cap == 20
    assert RateLimits(200, 5, 0.1, 0.0).chunk_cap == 1
    assert RateLimits(0, 5, 0.1, 0.0).chunk_cap == 1


def test_wait_time_counts_the_spells_with_someone_waiting() -> None:
    wait = WaitTime()
    wait.add(1.0)
    wait.add(2.0)
    wait.remove(3.0)
    assert wait.seconds(4.0) == 3.0 and wait.waiting == 1
    wait.remove(5.0)
    wait.add(10.0)
    wait.remove(11.0)
    assert wait.seconds(20.0) == 5.0


# -- the dispatcher, on a fake clock -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _recording(gate: threading.Event | None = None) -> tuple[Callable[[object], None], list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def handler(msg: FakeMessage) -> None:  # type: ignore[override]
        if gate is not None:
            gate.wait(10)
        with lock:
            seen.append((msg.partition(), msg.offset()))

    return handler, seen  # type: ignore[return-value]


def _drain(d: Dispatcher) -> list[Work]:
    out = []
    while d.completions:
        out.append(d.completions.popleft())
    return out


def _settled(d: Dispatcher, done: list[Work], count: int) -> None:
    def enough() -> bool:
        done.extend(_drain(d))
        return len(done) >= count

    wait_until(enough, timeout=10, what=f"{count} completions")
    assert d.wait_idle(5)


@pytest.mark.parametrize("ordering", ["unordered", "partition", "key", "fifo"])
def test_throttled_messages_wait_in_the_delay_queue_holding_no_thread_and_start_when_due(ordering: str) -> None:
    clock = Clock()
    handler, seen = _recording()
    tracker = OffsetTracker()
    tracker.assign([("t", 0), ("t", 1)])
    d = Dispatcher(Invoker(handler), 4, scheduler=new_scheduler(ordering), clock=clock)
    d.limit_rates(max_rate=2, key_rate=0, burst=0)  # one message each 0.5 s
    try:
        d.put(_works(tracker, 0, [b"a", b"b", b"c"]) + _works(tracker, 1, [b"a", b"b", b"c"]))
        done: list[Work] = []
        _settled(d, done, 1)
        assert len(seen) == 1 and d.active_thread_count == 0  # nobody holds a thread while waiting
        if ordering in ("unordered", "fifo", "key"):
            assert d.throttle.throttled == d.delayed == 5 and d.backlog == 5
        else:  # partition: each partition's head throttled, the rest blocked behind it
            assert d.throttle.throttled == d.delayed == 2 and d.backlog == 5 and d.blocked == 3
        for step in range(1, 6):
            clock.now += 0.5
            d.release_due()
            _settled(d, done, step + 1)
            assert len(seen) == step + 1, f"step {step}: one more message per 0.5 s"
        assert d.backlog == 0 and d.throttle.throttled == 0
        assert sorted(seen) == [(p, o) for p in (0, 1) for o in range(3)]
        if ordering != "unordered" and ordering != "fifo":
            for p in (0, 1):  # order kept within each partition
                assert [o for q, o in seen if q == p] == [0, 1, 2]
        # 5 messages waited 2.5 s in all, one after another: throttled the whole 2.5 s
        assert d.throttle.seconds() == (pytest.approx(2.5), 0.0)
    finally:
        d.shutdown(wait=True)


def test_a_hot_key_waits_for_its_tokens_while_other_keys_flow() -> None:
    clock = Clock()
    handler, seen = _recording()
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(handler), 4, scheduler=new_scheduler("key"), clock=clock)
    d.limit_rates(max_rate=0, key_rate=1, burst=0)
    try:
        keys = [b"hot", b"x1", b"hot", b"x2", b"hot", b"x3", None, None]
        d.put(_works(tracker, 0, keys))
        done: list[Work] = []
        _settled(d, done, 6)
        assert sorted(o for _, o in seen) == [0, 1, 3, 5, 6, 7]  # every key's first, and the keyless ones
        assert d.throttle.throttled == 1 and d.blocked == 1  # hot @2 waits for its token, hot @4 behind it
        assert d.throttle.key_waiting() == {("t", 0): 2}  # what the poll thread's key holds count
        clock.now += 1.0
        d.release_due()
        _settled(d, done, 7)
        clock.now += 1.0
        d.release_due()
        _settled(d, done, 8)
        assert [o for _, o in seen if o in (0, 2, 4)] == [0, 2, 4]
        assert d.throttle.seconds() == (0.0, pytest.approx(2.0))
        assert d.throttle.key_waiting() == {}  # nothing left to hold a partition for
    finally:
        d.shutdown(wait=True)


def test_changing_the_rate_replans_the_waiting_messages_at_once() -> None:
    clock = Clock()
    handler, seen = _recording()
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(handler), 2, scheduler=new_scheduler("unordered"), clock=clock)
    d.limit_rates(max_rate=1, key_rate=0, burst=0)
    try:
        d.put(_works(tracker, 0, [None] * 10))
        done: list[Work] = []
        _settled(d, done, 1)
        assert d.throttle.throttled == 9  # reserved 1 s apart: the last 9 s ahead
        d.limit_rates(max_rate=10, key_rate=0, burst=0)  # their tokens back; they pay again, 0.1 s apart
        _settled(d, done, 1)
        assert d.throttle.throttled == 9 and d.due_in() == pytest.approx(0.1)
        clock.now += 0.55  # 0.1 .. 0.5 due (not 0.5 itself: sums of 0.1 land a hair either side)
        d.release_due()
        _settled(d, done, 6)
        assert len(seen) == 6
        d.limit_rates(max_rate=0, key_rate=0, burst=0)  # off: whatever waits starts now
        _settled(d, done, 10)
        assert d.throttle.throttled == 0 and d.delayed == 0 and d.throttle.limits == (0.0, 0.0, 0.0)
        assert sorted(o for _, o in seen) == list(range(10))
    finally:
        d.shutdown(wait=True)


def test_a_retry_pays_again_and_a_throttled_message_of_a_retired_assignment_is_dropped() -> None:
    clock = Clock()
    calls: list[int] = []

    def handler(msg: FakeMessage) -> None:
        calls.append(msg.offset())
        if msg.offset() == 0 and calls.count(0) == 1:
            raise ValueError("once")

    from mtc75.core.retry import RetryPolicy

    tracker = OffsetTracker()
    tracker.assign([("t", 0), ("t", 1)])
    d = Dispatcher(Invoker(handler), 2, RetryPolicy(2, 0.0, 0.0), scheduler=new_scheduler("key"), clock=clock)
    d.limit_rates(max_rate=1, key_rate=0, burst=0)
    try:
        d.put(_works(tracker, 0, [b"a"]))
        wait_until(lambda: d.delayed == 1 and d.active_thread_count == 0, timeout=10, what="the retry scheduled")
        d.release_due()  # the retry is due at once (no backoff) but its new token only at +1 s
        wait_until(lambda: d.throttle.throttled == 1 and d.active_thread_count == 0, timeout=10,
                   what="the retry throttled")
        assert calls == [0] and d.due_in() == pytest.approx(1.0)
        d.put(_works(tracker, 1, [b"b"]))  # queues behind the retry's token
        wait_until(lambda: d.throttle.throttled == 2 and d.active_thread_count == 0, timeout=10, what="both throttled")
        state1 = tracker.state(("t", 1))
        dropped = d.retire([state1])
        assert [w.offset for w in dropped] == [0] and d.throttle.throttled == 1
        # a worker that took a Work of the retired assignment just before the purge: it never runs
        late = _works(tracker, 1, [b"c"], first=1)
        d.put(late)
        done: list[Work] = []
        _settled(d, done, 1)
        assert [(w.state, w.offset, w.failed, w.dropped) for w in done] == [(late[0].state, 1, True, True)]
        assert d.throttle.throttled == 1
        clock.now += 1.0
        d.release_due()
        _settled(d, done, 2)
        assert calls == [0, 0] and not done[1].failed
    finally:
        d.shutdown(wait=True)


def test_a_message_that_paid_and_ran_after_the_limits_went_off_pays_again_on_retry() -> None:
    """A throttled message promoted (due, paid) that a worker takes after the limits were turned off runs
    with its mark; when it fails, its retry waits out a backoff, not a token, and is counted as such."""
    from mtc75.core.retry import RetryPolicy

    clock = Clock()
    calls: list[int] = []

    def handler(msg: FakeMessage) -> None:
        calls.append(msg.offset())
        if len(calls) == 1:
            raise ValueError("once")

    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(handler), 1, RetryPolicy(2, 1.0, 1.0, jitter=0), clock=clock)
    try:
        work = _works(tracker, 0, [b"a"])
        work[0].paid = PAID_KEY  # as a throttled message is when its start has come
        d.put(work)
        wait_until(lambda: d.delayed == 1 and d.active_thread_count == 0, timeout=10, what="the retry scheduled")
        d.limit_rates(max_rate=0, key_rate=5, burst=0)  # re-plans what waits for tokens: not this retry
        assert d.delayed == 1 and d.due_in() == pytest.approx(1.0) and calls == [0]
        assert d.throttle.throttled == 0 and d.throttle.seconds() == (0.0, 0.0)
        clock.now += 1.0
        d.release_due()
        done: list[Work] = []
        _settled(d, done, 1)
        assert calls == [0, 0] and d.throttle.throttled == 0 and d.delayed == 0
    finally:
        d.shutdown(wait=True)


def test_a_fast_handler_gets_chunks_no_larger_than_the_bucket() -> None:
    clock = Clock()
    handler, _seen = _recording()
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = Dispatcher(Invoker(handler), 2, clock=clock)
    d.pacing.work_ended(1e-6, 1)  # a measured no-op handler: chunks of 1000 without a limit
    assert d.chunk_size == 1000
    d.limit_rates(max_rate=200, key_rate=0, burst=0.1)
    assert d.chunk_size == 20
    d.limit_rates(max_rate=200, key_rate=5, burst=0.1)
    assert d.chunk_size == 1
    d.limit_rates(max_rate=0, key_rate=0, burst=0.1)
    assert d.chunk_size == 1000
    d.shutdown(wait=True)


# -- the consumer on the in-memory fake (real time, checked from above: a load delays, never speeds up) -----

TOPIC, GROUP = "orders", "billing"
FAST = {"commit_interval": 0.02, "pause_interval": 0.05, "shutdown_timeout": 5.0, "revoke_timeout": 5.0}


def _fake(partitions: int = 2) -> FakeKafka:
    fake = FakeKafka()
    fake.create_topic(TOPIC, partitions)
    return fake


def test_max_rate_spaces_the_starts_of_a_consumer() -> None:
    cluster = _fake()
    cluster.fill(TOPIC, {0: 15, 1: 15})
    stamps: list[float] = []
    lock = threading.Lock()

    def handler(_m: object) -> None:
        with lock:
            stamps.append(time.monotonic())

    consumer = testing.consumer(cluster.factories(), handler, topic=TOPIC, group_id=GROUP, max_thread_count=4,
                                max_rate=100, rate_burst=0, **FAST)
    before = time.monotonic()
    stats = consumer.run(max_messages=30)
    assert stats.processed == 30 and stats.max_rate == 100
    # the k-th start's token came k / 100 s after the first reservation, which was after `before`
    late = [k for k, at in enumerate(sorted(stamps)) if at < before + k / 100]
    assert late == [], "messages started ahead of their tokens"
    assert 0 < stats.throttled_seconds <= stats.elapsed_seconds and stats.key_throttled_seconds == 0
    summary = stats.summary()
    assert summary["max_rate"] == 100 and summary["key_rate"] == 0 and summary["throttled_seconds"] > 0


def test_throttled_messages_fill_the_backlog_pause_fetching_and_a_retune_lets_them_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mtc75.engine")
    cluster = _fake()
    cluster.fill(TOPIC, {0: 300, 1: 300})
    seen: list[mtc75.Stats] = []
    consumer = testing.consumer(cluster.factories(), lambda m: None, topic=TOPIC, group_id=GROUP,
                                max_thread_count=4, max_backlog=40, max_rate=20, on_status=seen.append,
                                status_interval=0.02, **FAST)
    before = time.monotonic()
    consumer.start()
    try:
        wait_until(lambda: consumer.stats().paused and consumer.stats().throttled > 0, 10, step=0.01,
                   what="a pause with throttled messages")
        stats = consumer.stats()
        assert stats.backlog <= 40 + 4 and stats.throttled <= stats.backlog
        assert stats.processed <= 2 + 20 * (time.monotonic() - before)  # the burst (2), then 20/s
        consumer.retune(max_rate=0)
        wait_until(lambda: consumer.stats().processed >= 600, 10, step=0.01, what="all 600 once the limit is off")
    finally:
        final = consumer.close(timeout=10)
    assert final.max_rate == 0 and final.throttled == 0 and final.throttled_seconds > 0
    throttled = [s for s in seen if s.throttled]
    assert throttled and max(s.backlog for s in throttled) <= 40 + 4  # bounded while they wait for tokens
    # the pauses the limit causes are what it is for: INFO lines that say so, not warnings
    paused = [r for r in caplog.records if r.getMessage().startswith("PAUSED")]
    assert any("for rate tokens" in r.getMessage() and r.levelno == logging.INFO for r in paused)


@pytest.mark.parametrize("keywords", [{"max_rate": -1}, {"key_rate": "fast"}, {"rate_burst": -0.5},
                                      {"max_rate": float("inf")}])
def test_bad_rate_settings_are_config_errors_before_and_while_running(keywords: dict[str, Any]) -> None:
    cluster = _fake()
    with pytest.raises(mtc75.ConfigError, match=next(iter(keywords)).upper()):
        testing.consumer(cluster.factories(), lambda m: None, topic=TOPIC, group_id=GROUP, **keywords)
    consumer = testing.consumer(cluster.factories(), lambda m: None, topic=TOPIC, group_id=GROUP)
    with pytest.raises(mtc75.ConfigError, match=next(iter(keywords)).upper()):
        consumer.retune(**keywords)


# -- what the views show, and live reload --------------------------------------------------------------------


def test_the_dashboard_status_line_summary_and_metrics_show_the_limits_and_the_time_throttled() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from rich.console import Console

    from mtc75.app.dashboard import render
    from mtc75.app.status import format_status
    from mtc75.commands.consumer import _summary_line
    from mtc75.observe.metrics import Metrics
    from tests.stats_factory import make_stats

    def text(stats: mtc75.Stats) -> str:
        console = Console(record=True, width=200, color_system=None, force_terminal=False)
        console.print(render(stats, []))
        return console.export_text()

    plain = make_stats()
    assert "rate limit" not in text(plain) and "throttled" not in format_status(plain, color=False)
    assert "max rate" not in _summary_line(plain) and "key rate" not in _summary_line(plain)
    limited = make_stats(max_rate=200.0, key_rate=10.0, throttled=37, throttled_seconds=9.0,
                         key_throttled_seconds=3.0, elapsed_seconds=12.0)
    frame = text(limited)
    assert "MAX_RATE 200/s (throttled 9.0s, 75%)" in frame
    assert "KEY_RATE 10/s per key (a key throttled 3.0s, 25%)" in frame and "37 waiting for a token" in frame
    assert "throttled 37" in format_status(limited, color=False)
    line = _summary_line(limited)
    assert "max rate 200/s (throttled 9.0s)" in line and "key rate 10/s (keys throttled 3.0s)" in line
    summary = limited.summary()
    assert (summary["max_rate"], summary["key_rate"], summary["throttled_seconds"],
            summary["key_throttled_seconds"]) == (200.0, 10.0, 9.0, 3.0)

    metrics = Metrics()
    metrics.update(limited)
    values = {s.name: s.value for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
              for s in f.samples}
    assert values["mtc75_max_rate"] == 200 and values["mtc75_key_rate"] == 10 and values["mtc75_throttled"] == 37
    assert values["mtc75_throttled_seconds_total"] == 9 and values["mtc75_key_throttled_seconds_total"] == 3


def test_a_saved_config_changes_the_rates_of_a_running_consumer(tmp_path: Path) -> None:
    from mtc75.app.reload import ConfigWatcher, retuner
    from mtc75.settings import Settings, load_settings

    path = tmp_path / "config.py"
    path.write_text("MAX_RATE = 5\n")
    def load(values: Any = None) -> Settings:
        return load_settings(path, env={}, file_values=values)

    retuned: list[dict[str, Any]] = []

    class Recorder:
        def retune(self, **changes: Any) -> None:
            retuned.append({k: v for k, v in changes.items() if v is not None})

    watcher = ConfigWatcher(path, load(), load, retuner(Recorder(), object()))  # type: ignore[arg-type]
    stamp = path.stat().st_mtime_ns
    path.write_text("MAX_RATE = 50\nKEY_RATE = 2\nRATE_BURST = 0.5\n")
    os.utime(path, ns=(stamp + 10_000_000, stamp + 10_000_000))
    assert watcher.check() or watcher.check()  # a file written just now is read at the next check
    assert retuned == [{"max_rate": 50.0, "key_rate": 2.0, "rate_burst": 0.5}]


def test_key_holds_hold_a_partition_at_the_bound_and_release_it_at_half() -> None:
    from mtc75.core.ratelimit import KeyHolds, key_hold_bound

    assert key_hold_bound(10, 1000) == 5 and key_hold_bound(0.1, 1000) == 2 and key_hold_bound(1e6, 300) == 300
    holds = KeyHolds()
    a, b = ("t", 0), ("t", 1)
    assert holds.update({a: 9, b: 10}, 10) == ([b], [])
    assert b in holds and a not in holds
    assert holds.update({a: 3, b: 6}, 10) == ([], [])  # above half: still held
    assert holds.update({a: 3, b: 5}, 10) == ([], [b])
    assert holds.update({}, 10) == ([], []) and len(holds) == 0
    assert holds.update({a: 12}, 10) == ([a], []) and holds.forget([a, b]) == [a] and holds.holds == 2


@pytest.mark.parametrize("ordering", ["unordered", "key"])
def test_a_throttled_hot_key_holds_its_partition_alone_while_the_other_partition_flows(
    ordering: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = _fake()
    for _ in range(300):
        cluster.produce(TOPIC, 0, b"{}", key=b"hot")
    for i in range(600):
        cluster.produce(TOPIC, 1, b"{}", key=b"k%d" % i)  # each key once: none of them is throttled
    handled: dict[int, list[float]] = {0: [], 1: []}
    lock = threading.Lock()

    def handler(m: Any) -> None:
        with lock:
            handled[m.partition()].append(time.monotonic())

    consumer = testing.consumer(cluster.factories(), handler, topic=TOPIC, group_id=GROUP, max_thread_count=4,
                                key_rate=20, rate_burst=0, ordering=ordering, **FAST)
    caplog.set_level(logging.INFO, logger="mtc75.engine")
    before = time.monotonic()
    consumer.start()
    try:
        wait_until(lambda: len(handled[1]) == 600, 20, step=0.01, what="the other partition's 600 messages")
        took = time.monotonic() - before
        with lock:
            hot = sorted(handled[0])
        assert len(hot) <= 1 + 20 * took  # the hot key at 20/s meanwhile
        assert all(at >= before + k / 20 for k, at in enumerate(hot))  # and never ahead of its tokens
        wait_until(lambda: any(r.getMessage().startswith("HELD") for r in caplog.records), 10, step=0.01,
                   what="the hot key's partition held")
    finally:
        stats = consumer.close(timeout=10)
    assert stats.key_throttled_seconds > 0 and stats.throttled_seconds == 0
    held = [r.getMessage() for r in caplog.records if r.getMessage().startswith("HELD")]
    assert held and all(f"{TOPIC}[0]" in line for line in held)


def test_throttled_chunks_count_their_messages_in_the_backlog_and_as_throttled() -> None:
    clock = Clock()
    handler, seen = _recording()
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    state = tracker.state(("t", 0))
    for offset in range(100):
        assert tracker.admit(state, offset)
    d = Dispatcher(Invoker(handler), 2, clock=clock)
    d.pacing.work_ended(1e-6, 1)  # a measured no-op handler: chunks
    d.limit_rates(max_rate=200, key_rate=0, burst=0.1)  # chunks of 20, one each 0.1 s
    try:
        d.put([Work.chunk([FakeMessage("t", 0, o) for o in range(100)], state, 0)])
        done: list[Work] = []
        _settled(d, done, 1)
        assert len(seen) == 20
        assert d.delayed == d.throttle.throttled == d.backlog == 80  # 4 chunks of 20 waiting: messages, not Works
        clock.now += 0.25
        d.release_due()
        _settled(d, done, 3)
        assert len(seen) == 60 and d.delayed == d.throttle.throttled == d.backlog == 40
    finally:
        d.shutdown(wait=True)


def test_the_rate_limits_page_s_budget_share_follows_the_assignment() -> None:
    """docs/rate-limits.md: each member's MAX_RATE from its status callback, its share of the partitions."""
    cluster = _fake(partitions=4)
    cluster.fill(TOPIC, {p: 5 for p in range(4)})
    budget, partitions = 600.0, 4
    consumer: mtc75.Consumer | None = None

    def share(stats: mtc75.Stats) -> None:
        assert consumer is not None
        consumer.retune(max_rate=budget * max(1, stats.assigned) / partitions)

    consumer = testing.consumer(cluster.factories(), lambda m: None, topic=TOPIC, group_id=GROUP,
                                max_rate=budget / partitions, on_status=share, status_interval=0.02, **FAST)
    consumer.start()
    try:
        wait_until(lambda: consumer.stats().max_rate == budget, 10, step=0.01, what="the whole budget")
    finally:
        consumer.close(timeout=10)


def test_an_async_handler_is_limited_alike() -> None:
    """Coroutines take their tokens in the same shift as threads: the loop thread pays, and a throttled
    message holds no coroutine."""
    cluster = _fake()
    cluster.fill(TOPIC, {0: 10, 1: 10})
    stamps: list[float] = []

    async def handler(_m: object) -> None:
        stamps.append(time.monotonic())  # the loop thread only

    consumer = testing.consumer(cluster.factories(), handler, topic=TOPIC, group_id=GROUP, max_thread_count=50,
                                max_rate=100, rate_burst=0, **FAST)
    before = time.monotonic()
    stats = consumer.run(max_messages=20)
    assert stats.processed == 20 and stats.workers == "coroutines"
    assert [k for k, at in enumerate(sorted(stamps)) if at < before + k / 100] == []
    assert stats.throttled_seconds > 0
