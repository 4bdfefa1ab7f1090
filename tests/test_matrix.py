"""Every handler kind with every option that touches it, against the in-memory Kafka (tests/fake_kafka.py).

Kinds: a plain function, an ``async def``, and both as batch handlers (BATCH_SIZE > 1); a plain one and a
batch one in worker processes (RUNNER="processes": tests/matrix_handlers.py records to a file). Options: none,
Prometheus metrics on a registry, MAX_THREAD_COUNT="auto", ORDERING key and partition, retries then the DLQ,
MAX_RATE, JSON values. Each run: 3 partitions of 40 messages with keys k0..k5 and one poison message
(partition 1, offset 17); the run must handle every other message, dead-letter the poison alone (its
original bytes, one DLQ record), commit every partition to its end, and keep the option's own promise,
checked from what the handler saw.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import mtc75
from mtc75 import testing
from mtc75.core.stats import Stats
from mtc75.kafka.deadletter import H_ATTEMPTS, H_OFFSET, H_PARTITION
from tests import matrix_handlers
from tests.fake_kafka import FakeKafka

pytestmark = pytest.mark.timeout(60)

TOPIC, GROUP = "orders", "matrix"
PARTITIONS, PER_PARTITION, KEYS = 3, 40, 6
POISON = (1, 17)
RATE = 200.0  # MAX_RATE of the "max_rate" option: messages per second
BATCH = 8
KINDS = ("sync", "async", "batch", "async_batch",
         pytest.param("process", marks=pytest.mark.slow), pytest.param("process_batch", marks=pytest.mark.slow))
OPTIONS = ("plain", "metrics", "auto_threads", "ordering_key", "ordering_partition", "retries_dlq", "max_rate",
           "json", "outputs", "exactly_once")
OUT = "orders-out"  # where the handlers of the "outputs" and "exactly_once" options write one record a message


class Calls:
    """What a handler of any kind saw: per call its messages' (partition, offset, key, value), start, end."""

    def __init__(self, outputs: bool = False) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[list[tuple[int, int, bytes, Any]], float, float]] = []
        self.outputs = outputs  # return one mtc75.Output per message

    def record(self, messages: list[Any], started: float) -> list[mtc75.Output] | None:
        seen = [(m.partition(), m.offset(), m.key(), m.value()) for m in messages]
        with self.lock:
            self.calls.append((seen, started, time.monotonic()))
        if any((p, o) == POISON for p, o, _k, _v in seen):
            raise ValueError("poison message")
        return [mtc75.Output(OUT, f"{p}:{o}") for p, o, _k, _v in seen] if self.outputs else None

    def read(self, path: Path) -> None:
        """The calls a process handler wrote to ``path`` (tests/matrix_handlers.py)."""
        for line in path.read_text().splitlines():
            call = json.loads(line)
            seen = [(p, o, k.encode(), v) for p, o, k, v in call["seen"]]
            self.calls.append((seen, call["started"], call["ended"]))

    def handled(self) -> Counter[tuple[int, int]]:
        with self.lock:
            return Counter((p, o) for seen, _s, _e in self.calls for p, o, _k, _v in seen)


class KeptRegistry(CollectorRegistry):
    """A service's registry that keeps what a scrape showed just before MTC75's collectors were taken off
    (they are registered only while the consumer runs)."""

    last = ""

    def unregister(self, collector: Any) -> None:
        if not self.last:
            self.last = generate_latest(self).decode()
        super().unregister(collector)


def handler_of(kind: str, calls: Calls) -> Callable[[Any], Any]:
    """A handler of ``kind`` that records into ``calls`` and sleeps a little, so that calls overlap."""
    if kind == "sync":
        def one(message: Any) -> Any:
            started = time.monotonic()
            time.sleep(0.001)
            return calls.record([message], started)
        return one
    if kind == "batch":
        def batch(messages: list[Any]) -> Any:
            started = time.monotonic()
            time.sleep(0.001)
            return calls.record(messages, started)
        return batch
    if kind == "async":
        async def one_async(message: Any) -> Any:
            started = time.monotonic()
            await asyncio.sleep(0.001)
            return calls.record([message], started)
        return one_async

    async def batch_async(messages: list[Any]) -> Any:
        started = time.monotonic()
        await asyncio.sleep(0.001)
        return calls.record(messages, started)
    return batch_async


def fill(cluster: FakeKafka, json_values: bool) -> None:
    for p in range(PARTITIONS):
        for o in range(PER_PARTITION):
            value = json.dumps({"p": p, "o": o}).encode() if json_values else b"%d-%d" % (p, o)
            if json_values and (p, o) == POISON:
                value = b'{"p": 1, "o": 17'  # cut short: it does not decode
            cluster.produce(TOPIC, p, value, key=b"k%d" % ((p * PER_PARTITION + o) % KEYS))


def options_of(option: str) -> dict[str, Any]:
    return {
        "plain": {}, "metrics": {}, "json": {"value_format": "json"},
        "auto_threads": {"max_thread_count": "auto", "max_thread_limit": 8},
        "ordering_key": {"ordering": "key"}, "ordering_partition": {"ordering": "partition"},
        "retries_dlq": {"max_attempts": 3},
        "max_rate": {"max_rate": RATE, "rate_burst": 0.05},
        "outputs": {}, "exactly_once": {"processing_guarantee": "exactly_once"},
    }[option]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_with_every_option_handles_all_dead_letters_the_poison_alone_and_commits_to_the_end(
    kind: str, option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = FakeKafka()
    cluster.create_topic(TOPIC, PARTITIONS)
    cluster.create_topic(OUT, 2)
    fill(cluster, json_values=option == "json")
    outputs = option in ("outputs", "exactly_once")
    calls = Calls(outputs)
    registry = KeptRegistry() if option == "metrics" else None
    batches = kind in ("batch", "async_batch", "process_batch")
    processes = kind.startswith("process")
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("MTC75_TEST_MATRIX_RECORD", str(record))  # before the worker processes start
    monkeypatch.setenv("MTC75_TEST_MATRIX_OUTPUT", OUT if outputs else "")
    handler = (matrix_handlers.batch if batches else matrix_handlers.one) if processes else handler_of(kind, calls)
    told: list[mtc75.Failure] = []  # on_error, with every kind and option
    consumer = testing.consumer(
        cluster.factories(), handler, topic=TOPIC, group_id=GROUP, metrics_registry=registry, on_error=told.append,
        **{"max_thread_count": 4, "pause_interval": 0.05, "commit_interval": 0.02, "retry_backoff": 0.0,
           "retry_backoff_max": 0.0, "on_failure": "dlq", "max_attempts": 2,
           "batch_size": BATCH if batches else 1, "batch_wait": 0.01,
           "runner": "processes" if processes else "threads", "process_count": 2, **options_of(option)},
    )
    total = PARTITIONS * PER_PARTITION
    stats = consumer.run(max_messages=total, idle_exit=20)
    if processes:
        calls.read(record)
    assert cluster.violations == []  # every client call came from the poll thread

    handled = calls.handled()
    everything = {(p, o) for p in range(PARTITIONS) for o in range(PER_PARTITION)}
    if option == "json":  # the poison never reaches the handler: it does not decode
        assert set(handled) == everything - {POISON}
    else:
        assert set(handled) == everything
    assert (stats.processed, stats.failed, stats.dead_lettered) == (total, 1, 1)
    [dead] = cluster.messages(TOPIC + ".dlq")
    headers = dict(dead.headers() or [])
    assert (headers[H_PARTITION], headers[H_OFFSET]) == (b"1", b"17")
    expected_attempts = b"1" if option == "json" else b"3" if option == "retries_dlq" else b"2"
    assert headers[H_ATTEMPTS] == expected_attempts
    original = cluster.messages(TOPIC)[POISON[0] * PER_PARTITION + POISON[1]]
    assert dead.value() == original.value()  # the original bytes
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(PARTITIONS)] == [PER_PARTITION] * PARTITIONS
    finals = [(f.message.partition(), f.message.offset(), f.outcome) for f in told if f.final]
    assert finals == [(*POISON, "dead_lettered")]  # one final report: the poison's
    poison_retries = [f.attempt for f in told if (f.message.partition(), f.message.offset()) == POISON
                      and f.outcome == "retry"]
    attempts = int(expected_attempts)
    # a batch's attempts first (the last one splits it: the poison runs alone, from attempt 1 again)
    retries = [] if option == "json" else list(range(1, attempts))
    assert poison_retries == (list(range(1, attempts + 1)) + retries if batches and option != "json" else retries)
    if outputs:  # one record per message the handler finished, each once (no crash here: exactly once either way)
        written = sorted(v if isinstance(v := m.value(), bytes) else v.encode() for m in cluster.messages(OUT))
        assert written == sorted(f"{p}:{o}".encode() for p, o in everything - {POISON})
    if batches:
        assert stats.batch_size == BATCH and stats.batches > 0
        assert max(len(seen) for seen, _s, _e in calls.calls) <= BATCH
    promise = PROMISES.get(option)
    if promise is not None:
        promise(calls, stats, registry)


def key_order(calls: Calls, stats: Stats, _registry: Any, group: Callable[[int, bytes], object] | None = None) -> None:
    """No two calls holding messages of one key (of one partition: a key's order is its partition's) overlap,
    and each key's messages first start in offset order."""
    group = group or (lambda p, key: (p, key))
    spans: dict[object, list[tuple[float, float, list[int]]]] = {}
    for seen, started, ended in calls.calls:
        for name in {group(p, k) for p, _o, k, _v in seen}:
            offsets = [p * PER_PARTITION + o for p, o, k, _v in seen if group(p, k) == name]
            spans.setdefault(name, []).append((started, ended, offsets))
    for name, runs in spans.items():
        runs.sort()
        for (_s1, e1, _o1), (s2, _e2, _o2) in pairwise(runs):
            assert s2 >= e1, f"two calls of {name!r} overlapped"
        firsts = [offsets for _s, _e, offsets in runs]
        flat = [o for offsets in firsts for o in offsets]
        # a retry repeats offsets already seen: the order that counts is each offset's first run
        first_seen = list(dict.fromkeys(flat))
        assert first_seen == sorted(first_seen), f"{name!r} out of offset order"
    assert stats.ordering in ("key", "partition")


def partition_order(calls: Calls, stats: Stats, registry: Any) -> None:
    key_order(calls, stats, registry, group=lambda p, _k: p)


def metrics_count_every_call(calls: Calls, _stats: Stats, registry: Any) -> None:
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(registry.last)
              for s in family.samples}
    assert values[("mtc75_handler_duration_seconds_count", ())] == len(calls.calls), registry.last  # failures too
    assert values[("mtc75_processed_total", ())] == PARTITIONS * PER_PARTITION


def auto_threads(_calls: Calls, stats: Stats, _registry: Any) -> None:
    assert stats.thread_mode == "auto" and 1 <= stats.max_thread_count <= 8


def retries(calls: Calls, stats: Stats, _registry: Any) -> None:
    poison_calls = sum(1 for seen, _s, _e in calls.calls if any((p, o) == POISON for p, o, _k, _v in seen))
    assert stats.retried >= 2 and poison_calls >= 3  # the poison's own three attempts at least


def max_rate(calls: Calls, stats: Stats, _registry: Any) -> None:
    """No call starts before its tokens: messages started by any moment stay within the bucket's burst plus
    RATE per second since the first start (retries pay again; a batch pays for each of its messages, and
    may start once the bucket holds what the batch before it left owing)."""
    starts = sorted((started, len(seen)) for seen, started, _e in calls.calls)
    first = starts[0][0]
    burst = max(1.0, RATE * 0.05)
    owed = stats.batch_size if stats.batch_size > 1 else 0
    if stats.workers == "messages":  # worker processes: admitted calls may wait for a process, then start at once
        owed += stats.max_thread_count * max(1, stats.batch_size)
    # Stamps are taken inside the handler, after the tokens were paid: a first stamp a thread switch late
    # shifts the line by that delay, so two tokens (10 ms) of slack; a missing limit is hundreds ahead.
    slack = 2.0
    paid = 0
    for started, size in starts:
        paid += size
        assert paid <= burst + RATE * (started - first) + owed + slack, "a call started ahead of its tokens"
    assert starts[-1][0] - first >= (paid - burst - owed) / RATE * 0.999


def decoded(calls: Calls, _stats: Stats, _registry: Any) -> None:
    values = [v for seen, _s, _e in calls.calls for _p, _o, _k, v in seen]
    assert all(isinstance(v, dict) and set(v) == {"p", "o"} for v in values)


PROMISES: dict[str, Callable[[Calls, Stats, Any], None]] = {
    "ordering_key": key_order, "ordering_partition": partition_order, "metrics": metrics_count_every_call,
    "auto_threads": auto_threads, "retries_dlq": retries, "max_rate": max_rate, "json": decoded,
}
