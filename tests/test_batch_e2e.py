"""Batch handlers (BATCH_SIZE > 1, issue 25) against the real broker: each outcome, the ordering modes, an
``async def`` batch handler, and a poison message inside a batch under ``kill -9`` loops.

In-process runs use ``mtc75.Consumer`` with a handler that records every call; the crash loop runs
``mtc75_consumer.py --handler tests.batch_handler:handle`` and kills it, recording outside the process what
each run handled (tests/batch_handler.py). Figures go to report_figures (RELIABILITY.md quotes them).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

import mtc75
from mtc75.kafka.deadletter import H_ATTEMPTS, H_OFFSET, H_PARTITION
from tests.kafka_helpers import (
    ROOT,
    all_offsets,
    committed_offsets,
    end_offsets,
    kill_9_at,
    peak_rate,
    produce_numbered,
    read_tagged_records,
    read_topic,
    report_figures,
    script_env,
    start_consumer,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)

FAST = {"commit_interval": 0.2, "retry_backoff": 0.05, "retry_backoff_max": 0.05, "pause_interval": 0.2}


class Calls:
    """A batch handler's calls: (partition, offsets, start, end); ``fail(offsets)`` may raise."""

    def __init__(self, fail: Callable[[list[Any]], None] | None = None, sleep: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[int, tuple[int, ...], tuple[bytes, ...], float, float]] = []
        self.fail = fail
        self.sleep = sleep

    def __call__(self, batch: list[Any]) -> None:
        started = time.monotonic()
        time.sleep(self.sleep)
        self._record(batch, started)

    def _record(self, batch: list[Any], started: float) -> None:
        partitions = {m.partition() for m in batch}
        assert len(partitions) == 1, "a batch holds one partition"
        with self.lock:
            self.calls.append((partitions.pop(), tuple(m.offset() for m in batch),
                               tuple(m.key() for m in batch), started, time.monotonic()))
        if self.fail is not None:
            self.fail(batch)

    def succeeded(self) -> Counter[tuple[int, int]]:
        """Messages of calls that returned (a call that raised recorded its messages, then raised)."""
        with self.lock:
            return Counter((p, o) for p, offsets, _k, _s, _e in self.calls for o in offsets)


def test_batches_fill_under_a_backlog_and_trickle_out_after_batch_wait(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    n, size = 6_000, 200
    topic = make_topic(partitions=3)
    produce_numbered(bootstrap, topic, n)
    ends = end_offsets(bootstrap, topic)
    calls = Calls()
    consumer = mtc75.Consumer(calls, topic=topic, group_id=unique("g"), bootstrap_servers=bootstrap,
                              batch_size=size, batch_wait=1.0, max_thread_count=4, **FAST)
    stats = consumer.run(max_messages=n, idle_exit=60)
    handled = calls.succeeded()
    assert set(handled) == all_offsets(ends) and set(handled.values()) == {1}
    sizes = [len(offsets) for _p, offsets, _k, _s, _e in calls.calls]
    for p, offsets, _k, _s, _e in calls.calls:
        assert list(offsets) == sorted(offsets) and offsets[-1] - offsets[0] == len(offsets) - 1, (p, offsets)
    mean = sum(sizes) / len(sizes)
    assert max(sizes) <= size and mean >= size / 2, f"batches did not fill: mean {mean:.0f}"
    assert (stats.batches, stats.batch_size, stats.summary()["calls"]) == (len(sizes), size, len(sizes))
    wait_until(lambda: committed_offsets(bootstrap, unique("g"), topic) == ends, timeout=30,
               what="commits at the end")

    # A trickle: three messages, far fewer than a batch, go out after BATCH_WAIT, not after a full batch.
    trickle = Calls()
    topic2 = make_topic(partitions=1, prefix="trickle")
    consumer = mtc75.Consumer(trickle, topic=topic2, group_id=unique("g2"), bootstrap_servers=bootstrap,
                              batch_size=size, batch_wait=0.3, **FAST)
    consumer.start()
    try:
        wait_until(lambda: consumer.stats().assigned == 1, timeout=60, what="the assignment")
        sent = time.monotonic()
        produce_numbered(bootstrap, topic2, 3)
        wait_until(lambda: len(trickle.succeeded()) == 3, timeout=30, what="the trickle handled")
        waited = trickle.calls[0][3] - sent
    finally:
        consumer.close(timeout=60)
    assert [offsets for _p, offsets, _k, _s, _e in trickle.calls] == [(0, 1, 2)]
    report_figures("batch_fill", messages=n, batch_size=size, calls=len(sizes), mean_batch=round(mean, 1),
                   lost=len(all_offsets(ends) - set(handled)), duplicates=sum(handled.values()) - len(handled),
                   trickle_waited_s=round(waited, 2))
    assert waited < 5.0, f"a trickle of 3 waited {waited:.1f}s for a batch of {size}"


@pytest.mark.parametrize("on_failure", ["dlq", "skip", "stop"])
def test_a_poison_message_fails_its_batch_then_reaches_on_failure_alone(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], on_failure: str
) -> None:
    """The batch holding the poison is retried whole (MAX_ATTEMPTS 2), then each of its messages alone: the
    poison reaches ON_FAILURE alone; the others complete (``stop``: those below it are committed)."""
    topic, group, poison = make_topic(partitions=1), unique("g"), 23
    produce_numbered(bootstrap, topic, 60)

    def fail(batch: list[Any]) -> None:
        if any(m.offset() == poison for m in batch):
            raise ValueError("poison")

    calls = Calls(fail)
    consumer = mtc75.Consumer(calls, topic=topic, group_id=group, bootstrap_servers=bootstrap, batch_size=10,
                              batch_wait=0.5, max_attempts=2, on_failure=on_failure, **FAST)
    if on_failure == "stop":
        with pytest.raises(mtc75.MessageFailed):
            consumer.run(max_messages=60, idle_exit=30)
    else:
        stats = consumer.run(max_messages=60, idle_exit=30)
        assert (stats.processed, stats.failed) == (60, 1)
    holding = [offsets for _p, offsets, _k, _s, _e in calls.calls if poison in offsets]
    assert len(holding[0]) > 1 and holding[0] == holding[1]  # the batch, twice
    assert holding[2:] == [(poison,), (poison,)]  # then alone, twice
    neighbours = [o for o in holding[0] if o != poison]
    singles = Counter(offsets[0] for _p, offsets, _k, _s, _e in calls.calls if len(offsets) == 1)
    assert all(singles[o] == 1 for o in neighbours)  # each of the others alone once: it succeeded
    committed = committed_offsets(bootstrap, group, topic)
    if on_failure == "stop":
        assert committed.get(0, 0) == poison  # everything below the poison, nothing past it
        return
    assert committed == {0: 60}
    if on_failure == "dlq":
        [dead] = read_topic(bootstrap, topic + ".dlq", 1)
        headers = dict(dead.headers() or [])
        assert (headers[H_PARTITION], headers[H_OFFSET], headers[H_ATTEMPTS]) == (b"0", b"23", b"2")


def test_a_batch_error_completes_the_rest_at_once_and_retries_the_named_ones_alone(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group = make_topic(partitions=1), unique("g")
    produce_numbered(bootstrap, topic, 40)
    named = {5: 1, 17: 3}  # offset -> failed attempts (17 fails its last attempt too: dead-lettered)

    def fail(batch: list[Any]) -> None:
        if len(batch) > 1:
            failures = {i: ValueError(f"no {m.offset()}") for i, m in enumerate(batch) if m.offset() in named}
            if failures:
                raise mtc75.BatchError(failures)
        elif (o := batch[0].offset()) in named:
            seen = sum(1 for _p, offsets, _k, _s, _e in calls.calls if offsets == (o,))
            if seen <= named[o] - 1:
                raise ValueError(f"still no {o}")

    calls = Calls(fail)
    consumer = mtc75.Consumer(calls, topic=topic, group_id=group, bootstrap_servers=bootstrap, batch_size=40,
                              batch_wait=1.0, max_attempts=3, on_failure="dlq", **FAST)
    stats = consumer.run(max_messages=40, idle_exit=30)
    batches = [offsets for _p, offsets, _k, _s, _e in calls.calls if len(offsets) > 1]
    singles = Counter(offsets[0] for _p, offsets, _k, _s, _e in calls.calls if len(offsets) == 1)
    assert sum(len(b) for b in batches) == 40  # every message in exactly one batch call
    assert singles == Counter({5: 1, 17: 2})  # 5 succeeds alone at once; 17 fails its 2 attempts alone
    assert (stats.processed, stats.failed, stats.dead_lettered, stats.retried) == (40, 1, 1, 3)
    [dead] = read_topic(bootstrap, topic + ".dlq", 1)
    assert dict(dead.headers() or [])[H_OFFSET] == b"17"
    assert committed_offsets(bootstrap, group, topic) == {0: 40}


@pytest.mark.parametrize("ordering", ["partition", "key"])
def test_ordered_batches_keep_partition_or_key_order_and_never_overlap(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], ordering: str
) -> None:
    n = 3_000
    topic, group = make_topic(partitions=3), unique("g")
    produce_numbered(bootstrap, topic, n, key_prefix="")  # keys "0".."2999": few per key and partition ...
    keyed = make_topic(partitions=3, prefix="keys")
    produce_keys(bootstrap, keyed, n, keys=12)  # ... and 12 hot keys on another topic
    for source in (topic, keyed):
        calls = Calls(sleep=0.003)
        consumer = mtc75.Consumer(calls, topic=source, group_id=group + source, bootstrap_servers=bootstrap,
                                  batch_size=25, batch_wait=0.05, max_thread_count=16, ordering=ordering, **FAST)
        stats = consumer.run(max_messages=n, idle_exit=60)
        assert stats.processed == n and set(calls.succeeded().values()) == {1}
        overlaps, disorder = ordered_violations(calls, ordering)
        handled = calls.succeeded()
        report_figures(f"batch_ordering_{ordering}_{'keys' if source == keyed else 'unique'}", messages=n,
                       overlaps=overlaps, disorder=disorder, calls=len(calls.calls),
                       peak=peak_concurrency(calls), lost=n - len(handled),
                       duplicates=sum(handled.values()) - len(handled))
        assert (overlaps, disorder) == (0, 0)
        if ordering == "key" and source == keyed:
            assert peak_concurrency(calls) > 1  # different keys of one partition still run at once


def produce_keys(bootstrap: str, topic: str, count: int, keys: int) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(count):
        producer.produce(topic, key=f"key-{i % keys}", value=b"%d" % i)
        producer.poll(0)
    assert producer.flush(30) == 0


def ordered_violations(calls: Calls, ordering: str) -> tuple[int, int]:
    """(overlapping calls of one lane, messages of a lane that started out of offset order): a lane is a
    partition, or a key within a partition."""
    spans: dict[object, list[tuple[float, float, list[int]]]] = {}
    for p, offsets, keys, started, ended in calls.calls:
        lanes: dict[object, list[int]] = {}
        for o, k in zip(offsets, keys, strict=True):
            lanes.setdefault(p if ordering == "partition" else (p, k), []).append(o)
        for lane, its in lanes.items():
            spans.setdefault(lane, []).append((started, ended, its))
    overlaps = disorder = 0
    for runs in spans.values():
        runs.sort()
        overlaps += sum(1 for a, b in pairwise(runs) if b[0] < a[1])
        flat = [o for _s, _e, its in runs for o in its]
        disorder += sum(1 for a, b in pairwise(flat) if b < a)
    return overlaps, disorder


def peak_concurrency(calls: Calls) -> int:
    events = sorted([(s, 1) for _p, _o, _k, s, _e in calls.calls] + [(e, -1) for _p, _o, _k, _s, e in calls.calls])
    peak = running = 0
    for _t, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_an_async_batch_handler_is_awaited_with_each_list_bounded_by_max_thread_count(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    n, threads = 2_000, 8
    topic, group = make_topic(partitions=3), unique("g")
    produce_numbered(bootstrap, topic, n)
    seen: list[tuple[int, ...]] = []
    running = [0, 0]  # now, peak (one event loop thread: no lock needed)

    async def handle(batch: list[Any]) -> None:
        running[0] += 1
        running[1] = max(running[1], running[0])
        await asyncio.sleep(0.02)
        running[0] -= 1
        seen.append(tuple(m.offset() for m in batch))
        if any(m.partition() == 2 and m.offset() == 99 for m in batch):
            raise ValueError("poison")

    consumer = mtc75.Consumer(handle, topic=topic, group_id=group, bootstrap_servers=bootstrap, batch_size=50,
                              batch_wait=0.2, max_thread_count=threads, on_failure="skip", max_attempts=1, **FAST)
    stats = consumer.run(max_messages=n, idle_exit=60)
    assert stats.workers == "coroutines" and stats.processed == n and stats.failed == 1
    assert 1 < running[1] <= threads
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)


def test_a_poison_message_in_a_batch_under_kill_9_loops_loses_nothing_and_only_it_is_dead_lettered(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """kill -9 x 4 while batches of 50 run (4 threads, 0.1 s a call, a poison message at 1:7777); then a last
    run to the end. Every other offset is handled; the DLQ holds the poison only; a crash repeats at most the
    batches running plus one commit interval of progress (each run lasts seconds: the first commit of a run
    comes a commit interval after its first snapshot, and a run killed before it repeats all it did)."""
    n, threads, size, kills, commit_interval = 30_000, 4, 50, 4, 0.5
    seed = int(time.time()) % 1_000_000
    rng = random.Random(seed)
    topic, group = make_topic(partitions=3), unique("g")
    produce_numbered(bootstrap, topic, n)
    ends = end_offsets(bootstrap, topic)
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.1", MTC75_TEST_POISON="1:7777")
    args = ["--topic", topic, "--group-id", group, "--max-thread-count", str(threads), "--batch-size", str(size),
            "--batch-wait", "0.05", "--commit-interval", str(commit_interval), "--max-attempts", "2",
            "--retry-backoff", "0.05", "--on-failure", "dlq", "-q", "--handler", "tests.batch_handler:handle",
            "-X", f"group.instance.id={group}-member", "-X", "session.timeout.ms=10000"]

    def by_tag(tag: str) -> set[tuple[int, int]]:
        return {(p, o) for p, o, t in read_tagged_records(record) if t == tag}

    rates: list[float] = []
    for k in range(kills):
        proc = start_consumer(args, {**env, "MTC75_TEST_TAG": f"r{k}"}, log)
        try:
            target = rng.randint(4_000, 6_000)
            samples = kill_9_at(proc, lambda k=k: len(by_tag(f"r{k}")), target, timeout=120, what=f"run {k}")
        finally:
            stop_process(proc)
        rates.append(peak_rate(samples))
    final = start_consumer(args, {**env, "MTC75_TEST_TAG": "final"}, log)
    wanted = all_offsets(ends) - {(1, 7777)}
    try:
        wait_until(lambda: wanted <= {(p, o) for p, o, _ in read_tagged_records(record)}, timeout=180,
                   what="every offset but the poison handled")
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == ends, timeout=60, what="commits at the end")
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=60) == 0
    finally:
        stop_process(final)
    tags = [f"r{k}" for k in range(kills)] + ["final"]
    runs = {t: by_tag(t) for t in tags}
    handled = set().union(*runs.values())
    lost = wanted - handled
    per_crash = [len(runs[t] & set().union(*(runs[u] for u in tags[i + 1:]))) for i, t in enumerate(tags[:-1])]
    bounds = [threads * size + int(rate * (commit_interval + 0.5)) + 1 for rate in rates]
    dead = read_topic(bootstrap, topic + ".dlq", 1, timeout=30)
    dead += read_topic(bootstrap, topic + ".dlq", 100, timeout=5)[1:]  # any more (a crash between DLQ and commit)
    dead_offsets = {(int(dict(m.headers() or [])[H_PARTITION]), int(dict(m.headers() or [])[H_OFFSET])) for m in dead}
    report_figures("batch_poison_kill_9_loop", seed=seed, messages=n, batch_size=size, kills=kills, lost=len(lost),
                   dead_lettered=sorted(f"{p}:{o}" for p, o in dead_offsets), dlq_records=len(dead),
                   duplicates=sum(per_crash), duplicates_per_crash=per_crash, duplicate_bounds=bounds,
                   poison_handled=(1, 7777) in handled)
    assert not lost, f"lost {len(lost)} offsets, e.g. {sorted(lost)[:5]}"
    assert (1, 7777) not in handled and dead_offsets == {(1, 7777)}
    for k, (dups, bound) in enumerate(zip(per_crash, bounds, strict=True)):
        assert dups <= bound, f"crash {k + 1}: {dups} repeated > running batches + one commit interval ({bound})"


def batch_page_example() -> str:
    text = (ROOT / "docs" / "batch.md").read_text()
    marker = "<!-- tests/test_batch_e2e.py runs the next block"
    assert marker in text, "the batch page's example is gone"
    return text.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_batch_page_example_bulk_inserts_and_dead_letters_what_is_not_json(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(3, "warehouse"), unique("warehouse")
    produce_numbered(bootstrap, topic, 1_500)
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(3):
        producer.produce(topic, key=f"bad{i}", value=b"not json %d" % i)
    assert producer.flush(30) == 0
    code = batch_page_example()
    database = tmp_path / "orders.db"
    for literal, value in (('"orders"', topic), ('"warehouse"', group), ('"127.0.0.1:9092"', bootstrap),
                           ('"orders.db"', str(database))):
        assert literal in code  # the page still shows the values this test replaces
        code = code.replace(literal, repr(value))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTC75_", "KAFKA_"))}
    env.update(PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    calls = re.fullmatch(r"1503 messages in (\d+) calls of (\d+) on average\n", result.stdout)
    assert calls is not None, result.stdout
    rows = sqlite3.connect(database).execute("SELECT body FROM orders").fetchall()
    assert sorted(json.loads(body)["id"] for (body,) in rows) == list(range(1_500))
    dead = read_topic(bootstrap, topic + ".dlq", 3)
    assert sorted(m.value() for m in dead) == [b"not json 0", b"not json 1", b"not json 2"]
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)
