"""``async def`` handlers against the real broker (issue 12), one test per point of the issue.

Library runs use :class:`mtc75.Consumer` (the public API takes an async handler like any other);
script runs use ``mtc75_consumer.py --handler tests.async_handler:...`` as a user would. Each test has
its own topic and group; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mtc75
from tests.kafka_helpers import (
    ROOT,
    all_offsets,
    committed_offsets,
    end_offsets,
    produce_numbered,
    read_tagged_records,
    read_topic,
    report_figures,
    run_script,
    script_env,
    start_script,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

FAST = {"commit_interval": 0.2, "pause_interval": 0.2}


def _os_threads() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError("no Threads: line")


class AsyncRecorder:
    """An async handler that awaits like real I/O and records what ran, where, and how many at once.

    Runs on the consumer's event-loop thread only, so its counters need no lock; the test thread reads
    them as hints and, once the consumer has stopped, as facts.
    """

    def __init__(self, wait: float, hang: Callable[[Any], bool] = lambda m: False) -> None:
        self._wait = wait
        self._hang = hang
        self.current = 0
        self.peak = 0
        self.threads: set[str] = set()
        self.started: list[tuple[int, int]] = []
        self.handled: list[tuple[int, int]] = []
        self.cancelled: list[tuple[int, int, float]] = []
        self.release = threading.Event()  # ends the hangs

    async def __call__(self, msg: Any) -> None:
        where = (msg.partition(), msg.offset())
        self.threads.add(threading.current_thread().name)
        self.started.append(where)
        self.current += 1
        self.peak = max(self.peak, self.current)
        try:
            if self._hang(msg):
                while not self.release.is_set():
                    await asyncio.sleep(0.02)
            await asyncio.sleep(self._wait)
            self.handled.append(where)
        except asyncio.CancelledError:
            self.cancelled.append((*where, time.monotonic()))
            raise
        finally:
            self.current -= 1


# -- 1. the event loop, the bound, the library API ---------------------------------------------------------


def test_async_handler_runs_on_one_loop_thread_bounded_and_commits_everything(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group, n, bound = make_topic(partitions=3), unique("g"), 3000, 300
    produce_numbered(bootstrap, topic, n)
    handler = AsyncRecorder(0.05)
    baseline = _os_threads()
    peak_threads = [0]

    def on_status(stats: mtc75.Stats) -> None:
        peak_threads[0] = max(peak_threads[0], _os_threads())

    consumer = mtc75.Consumer(handler, topic=topic, group_id=group, bootstrap_servers=bootstrap,
                              max_thread_count=bound, on_status=on_status, status_interval=0.05, **FAST)
    started = time.monotonic()
    stats = consumer.run(max_messages=n)
    took = time.monotonic() - started
    ends = end_offsets(bootstrap, topic)
    assert sorted(handler.handled) == sorted(all_offsets(ends))  # each message once
    assert handler.threads == {"mtc75-loop"}  # every coroutine on the one loop thread
    assert handler.peak <= bound and stats.max_active_threads <= bound  # the permits bound the coroutines
    assert handler.peak >= 0.8 * bound, handler.peak  # and they are used: thousands of waits overlap
    assert stats.processed == n and stats.failed == 0
    assert committed_offsets(bootstrap, group, topic) == ends
    extra = peak_threads[0] - baseline
    # 300 threads would be 300 more; the loop, its watchdog, the poll thread and librdkafka's few are all
    assert extra <= 20, f"{extra} more OS threads while {bound} coroutines ran"
    assert took < 40, f"{n} x 0.05 s took {took:.1f}s"  # one at a time: 150 s
    report_figures("async_bound", messages=n, bound=bound, peak_in_flight=handler.peak,
                   extra_os_threads=extra, run_s=round(took, 1), load_avg=os.getloadavg()[0])


# -- 2. retries with backoff, ON_FAILURE ----------------------------------------------------------------------


def test_a_retry_waiting_its_backoff_holds_no_slot_and_the_last_failure_is_dead_lettered(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group, n = make_topic(partitions=1), unique("g"), 20
    produce_numbered(bootstrap, topic, n)
    calls: list[tuple[int, float]] = []

    async def handle(msg: Any) -> None:
        calls.append((msg.offset(), time.monotonic()))
        await asyncio.sleep(0.01)
        if msg.offset() == 3 or (msg.offset() == 5 and sum(1 for o, _ in calls if o == 5) == 1):
            raise ValueError(f"service refused {msg.offset()}")

    consumer = mtc75.Consumer(handle, topic=topic, group_id=group, bootstrap_servers=bootstrap,
                              max_thread_count=1, max_attempts=3, retry_backoff=3.0, retry_backoff_max=3.0,
                              on_failure="dlq", **FAST)
    stats = consumer.run(max_messages=n)
    attempts = Counter(o for o, _ in calls)
    assert attempts[3] == 3 and attempts[5] == 2 and all(attempts[o] == 1 for o in range(n) if o not in (3, 5))
    first_try_of_3 = next(t for o, t in calls if o == 3)
    second_try_of_3 = [t for o, t in calls if o == 3][1]
    assert second_try_of_3 - first_try_of_3 >= 3.0 * 0.5  # the backoff was waited (less its jitter, at most half)
    # One slot, and other messages ran while offset 3 waited its backoff: the wait held no slot (had it
    # held the only one, nothing could have started in between).
    during = {o for o, t in calls if first_try_of_3 < t < second_try_of_3}
    assert {4, 5, 6} <= during, sorted(during)
    assert (stats.processed, stats.retried, stats.dead_lettered) == (n, 3, 1)
    dead = read_topic(bootstrap, f"{topic}.dlq", 1)
    assert len(dead) == 1 and json.loads(dead[0].value())["id"] is not None
    assert committed_offsets(bootstrap, group, topic) == {0: n}


def test_on_failure_stop_commits_below_the_failed_message(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group, n = make_topic(partitions=1), unique("g"), 10

    async def handle(msg: Any) -> None:
        await asyncio.sleep(0.01)
        if msg.offset() == 6:
            raise ValueError("service down")

    produce_numbered(bootstrap, topic, n)
    consumer = mtc75.Consumer(handle, topic=topic, group_id=group, bootstrap_servers=bootstrap,
                              max_thread_count=50, max_attempts=2, retry_backoff=0.05, on_failure="stop", **FAST)
    with pytest.raises(mtc75.MessageFailed, match=r"\[0\]@6 failed 2 attempts \(ValueError: service down\)"):
        consumer.run(idle_exit=10)
    assert committed_offsets(bootstrap, group, topic) == {0: 6}


# -- 2. rebalance: wait, then cancel; the cancelled offsets stay uncommitted -----------------------------------


def test_revoke_waits_for_the_partitions_coroutines_then_cancels_only_them_uncommitted(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group = make_topic(partitions=2), unique("g")
    produce_numbered(bootstrap, topic, 40)
    revoke_timeout = 2.0
    # The first consumer's handler hangs on offset 2 of each partition (until released); everything
    # after it finishes, so each partition's commit is held at 2.
    first = AsyncRecorder(0.01, hang=lambda m: m.offset() == 2)
    second = AsyncRecorder(0.01)
    common = {"topic": topic, "group_id": group, "bootstrap_servers": bootstrap, "max_thread_count": 50,
              "revoke_timeout": revoke_timeout, "librdkafka": {"partition.assignment.strategy": "cooperative-sticky"},
              **FAST}
    a = mtc75.Consumer(first, **common)
    b = mtc75.Consumer(second, **common)
    a.start()
    try:
        ends = end_offsets(bootstrap, topic)
        wait_until(lambda: len(first.handled) == sum(ends.values()) - 2, timeout=60, what="all but the hangs handled")
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == {0: 2, 1: 2}, timeout=30,
                   what="commits held below the hangs")
        joined = time.monotonic()
        b.start()  # the group rebalances: one partition moves to b
        wait_until(lambda: len(first.cancelled) == 1, timeout=60, what="a revoked coroutine cancelled")
        moved, _, cancelled_at = first.cancelled[0][0], first.cancelled[0][1], first.cancelled[0][2]
        assert first.cancelled[0][1] == 2
        assert cancelled_at - joined >= revoke_timeout * 0.9  # it was waited for first
        wait_until(lambda: (moved, 2) in second.handled, timeout=60, what="the cancelled offset redelivered to b")
        time.sleep(0.5)
        kept = 1 - moved
        assert (kept, 2) not in {(p, o) for p, o, _ in first.cancelled}  # the kept partition's coroutine runs on
        first.release.set()
        wait_until(lambda: (kept, 2) in first.handled, timeout=30, what="the kept partition's hang finished")
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == ends, timeout=30, what="commits at the end")
    finally:
        first.release.set()
        stats_a = a.close(60)
        b.close(60)
    assert (moved, 2) not in first.handled  # cancelled, so never counted done by a
    assert stats_a.abandoned >= 1  # the revoke gave up waiting for it
    # every offset handled by someone, the moved partition's offset 2 by b (a's commit stayed below it)
    assert set(first.handled) | set(second.handled) == all_offsets(ends)
    # b ran only what a had not finished: the offset map of a's commit skips the rest (issue 9)
    assert {o for p, o in second.handled if p == moved} == {2}
    report_figures("async_revoke_cancel", revoke_timeout=revoke_timeout,
                   cancelled_after_s=round(cancelled_at - joined, 2), load_avg=os.getloadavg()[0])


# -- 2. SIGTERM drain (the script), and a hung coroutine cancelled at shutdown ---------------------------------


def test_sigterm_drains_running_coroutines_commits_them_and_cancels_a_hung_one_uncommitted(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group, record = make_topic(partitions=1), unique("g"), tmp_path / "record.txt"
    produce_numbered(bootstrap, topic, 30)
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="1.5", MTC75_TEST_HANG="8")
    proc = start_script(
        "mtc75_consumer.py", "--topic", topic, "--group-id", group, "--handler", "tests.async_handler:handle",
        "--max-thread-count", "10", "--shutdown-timeout", "4", "--no-reload", env=env,
    )
    try:
        wait_until(lambda: sum(1 for r in read_tagged_records(record) if r[2] == "start") >= 10, timeout=60,
                   what="ten coroutines running")
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    exited = time.monotonic() - signalled
    assert proc.returncode == 0, err[-3000:]
    rows = read_tagged_records(record)
    started = {o for _, o, e in rows if e == "start"}
    done = {o for _, o, e in rows if e == "done"}
    assert started == set(range(10))  # nothing new started after the signal
    assert done == set(range(10)) - {8}  # the running ones finished...
    assert (0, 8, "cancelled") in rows  # ...but the hung one, cancelled when SHUTDOWN_TIMEOUT ran out
    assert committed_offsets(bootstrap, group, topic) == {0: 8}  # committed up to it, never past it
    assert exited < 4 + 8, f"exit {exited:.1f}s after SIGTERM"
    assert "Traceback" not in err
    report_figures("async_sigterm", running=10, finished=len(done), cancelled=1, committed=8,
                   exit_after_s=round(exited, 1), load_avg=os.getloadavg()[0])


# -- 2. live re-tuning --------------------------------------------------------------------------------------------


def test_retune_raises_and_lowers_the_coroutine_bound_while_running(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group = make_topic(partitions=3), unique("g")
    produce_numbered(bootstrap, topic, 3000)
    handler = AsyncRecorder(0.2)
    consumer = mtc75.Consumer(handler, topic=topic, group_id=group, bootstrap_servers=bootstrap,
                              max_thread_count=5, **FAST)
    consumer.start()
    try:
        wait_until(lambda: handler.current == 5, timeout=60, what="5 coroutines running")
        time.sleep(0.5)
        assert handler.peak == 5
        consumer.retune(max_thread_count=60)
        wait_until(lambda: handler.current >= 50, timeout=10, what="the raised bound used")
        wait_until(lambda: consumer.stats().max_thread_count == 60, timeout=5, what="the stats to show 60")
        consumer.retune(max_thread_count=2)
        # every running coroutine ends within 0.2 s of work; after that none starts over the new bound
        wait_until(lambda: handler.current <= 2, timeout=10, what="the lowered bound reached")
        samples = []
        for _ in range(20):
            samples.append(handler.current)
            time.sleep(0.02)
        assert max(samples) <= 2, samples
    finally:
        stats = consumer.close(60)
    assert 50 <= stats.max_active_threads <= 60


# -- 3. a handler that blocks the loop is named, once ---------------------------------------------------------


def test_a_handler_blocking_the_loop_is_warned_about_once_by_name(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group, record = make_topic(partitions=1), unique("g"), tmp_path / "record.txt"
    produce_numbered(bootstrap, topic, 6)
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.4")
    result = run_script(
        "mtc75_consumer.py", "--topic", topic, "--group-id", group, "--no-reload", "--idle-exit", "3",
        "--handler", "tests.async_handler:handle_blocking", env=env, timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "blocked the event loop" in line]
    assert len(warnings) == 1, warnings  # six blocking calls, one line
    assert "tests.async_handler.handle_blocking" in warnings[0]
    assert "async_handler.py" in warnings[0] and "in handle_blocking" in warnings[0]  # where it blocked
    assert sum(1 for r in read_tagged_records(record) if r[2] == "done") == 6  # still handled: a warning, not a failure
    assert committed_offsets(bootstrap, group, topic) == {0: 6}


def test_a_well_behaved_async_handler_gets_no_warning(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group, record = make_topic(partitions=2), unique("g"), tmp_path / "record.txt"
    produce_numbered(bootstrap, topic, 500)
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.3")
    result = run_script(
        "mtc75_consumer.py", "--topic", topic, "--group-id", group, "--no-reload", "--idle-exit", "3",
        "--max-thread-count", "500", "--handler", "tests.async_handler:handle", env=env, timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "blocked the event loop" not in result.stderr
    assert "coroutines" in result.stderr  # the start-up line says what the bound counts
    assert sum(1 for r in read_tagged_records(record) if r[2] == "done") == 500


# -- 4. the async example of docs/async.md, against the broker, with a fake service ------------------------------------


FAKE_HTTPX = '''
"""A stand-in for httpx in the async example's test: an in-memory charge service, no network.

Order 7 gets one 503 before it is charged; every charge is appended to $FAKE_SERVICE_LOG.
"""
import asyncio
import os

_log = open(os.environ["FAKE_SERVICE_LOG"], "a", buffering=1)
_refused = set()


class HTTPStatusError(Exception):
    pass


class Response:
    def __init__(self, status_code):
        self.status_code = status_code

    def raise_for_status(self):
        if self.status_code >= 400:
            raise HTTPStatusError(f"Server error '{self.status_code}'")


class AsyncClient:
    def __init__(self, base_url="", timeout=None):
        self.base_url = base_url

    async def post(self, path, json=None):
        await asyncio.sleep(0.05)
        order = json["order"]
        if order == 7 and order not in _refused:
            _refused.add(order)
            return Response(503)
        _log.write(f"{path} {order}\\n")
        return Response(200)
'''


def docs_async_example() -> str:
    text = (ROOT / "docs" / "async.md").read_text()
    marker = "<!-- tests/test_async_e2e.py runs the next block"
    assert marker in text, "the async example of docs/async.md is gone"
    block = text.split(marker, 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_docs_async_example_runs_against_the_broker(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(3, "api"), unique("api-billing")
    produce_numbered(bootstrap, topic, 30)
    code = docs_async_example()
    for literal, value in (('"orders"', topic), ('"billing"', group), ('"127.0.0.1:9092"', bootstrap)):
        assert literal in code  # the example still shows the values this test replaces
        code = code.replace(literal, repr(value))
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "httpx.py").write_text(FAKE_HTTPX)
    log = tmp_path / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTC75_", "KAFKA_"))}
    env.update(PYTHONPATH=f"{fake}{os.pathsep}{ROOT}", FAKE_SERVICE_LOG=str(log))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    charged = sorted(int(line.split()[1]) for line in log.read_text().splitlines())
    assert charged == list(range(30))  # each order charged once; order 7 after its 503 and one retry
    lines = result.stderr.splitlines()
    on_loop = [line for line in lines if re.search(r" mtc75-loop charged order \d+$", line)]
    assert len(on_loop) == 30  # awaited on the event loop thread
    assert re.search(r" charged 30 orders \(0 failed, 1 retried\) in \d+\.\ds$", lines[-1]), lines[-1]
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)
