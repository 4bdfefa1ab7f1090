"""Fault injection against a real broker: what happens to the messages when things break.

Every test records what was handled *outside* the consumer process (tests/recording_handler.py appends
``partition:offset`` after the work and flushes) and checks coverage against the topic's end offsets.
Each prints a ``FIGURES {...}`` line (and appends it to $MTC75_FAULT_FIGURES): RELIABILITY.md quotes them.

Run alone with ``pytest -m faults`` (or ``make faults``). The graceful-stop, slow-handler and bad-input
scenarios live in test_scripts.py / test_consumer_e2e.py and carry the ``faults`` marker too.
The broker-restart tests stop and start a broker of their own (in the module's own folder, on
MTC75_TEST_FAULT_KAFKA_PORT or the next free pair; default the session broker's port + 10), never the
session's, nor one another suite started there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from mtc75.core.stats import Stats
from mtc75.kafka.clients import ClientFactories
from mtc75.kafka.deadletter import H_ATTEMPTS, H_ERROR, H_OFFSET, H_PARTITION, H_TOPIC
from mtc75.kafka.topics import create_topic
from mtc75.settings import Settings
from mtc75.tools.broker import LocalKafka
from tests.conftest import TEST_PORT, WORKER
from tests.kafka_helpers import (
    ROOT,
    BoundConsumer,
    all_offsets,
    committed_offsets,
    end_offsets,
    kill_9_at,
    peak_rate,
    produce_numbered,
    read_records,
    read_topic,
    report_figures,
    run_script,
    script_env,
    start_consumer,
    stop_process,
    wait_until,
)
from tests.local_kafka import restartable_broker

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

FAULT_PORT = int(os.environ.get("MTC75_TEST_FAULT_KAFKA_PORT", str(TEST_PORT + 10))) + 2 * WORKER
RECORDER = ("--handler", "tests.recording_handler:handle")
PROG = "mtc75_consumer.py"


# -- helpers --------------------------------------------------------------------------------------------


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{PROG}: error: ")]


def _headers(msg: object) -> dict[str, str]:
    return {k: v.decode(errors="replace") for k, v in (msg.headers() or [])}  # type: ignore[attr-defined]


def _original_headers(i: int) -> list[tuple[str, bytes]]:
    return [("trace-id", f"trace-{i}".encode()), ("tag", b"a"), ("tag", b"\x00\xff binary")]


def _poison_offsets(bootstrap: str, topic: str, n: int, every: int) -> set[tuple[int, int]]:
    """Where the messages with id % every == every - 1 landed (ids are unique, so read them back)."""
    found = set()
    for msg in read_topic(bootstrap, topic, n):
        if json.loads(msg.value())["id"] % every == every - 1:
            found.add((msg.partition(), msg.offset()))
    return found


@pytest.fixture(scope="module")
def own_broker(local_kafka: LocalKafka | None) -> Iterator[LocalKafka]:
    """A broker these tests may stop and restart: started by this module, shared by it, stopped at its end."""
    with restartable_broker(local_kafka, "fault-kafka", FAULT_PORT) as broker:
        yield broker


# -- 1. crash loop --------------------------------------------------------------------------------------


def test_crash_loop_kill_9_loses_nothing_and_duplicates_stay_within_the_window(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n, threads, max_backlog, commit_interval, kills = 20_000, 8, 1_000, 0.5, 6
    topic, group = make_topic(partitions=6), unique("g")
    produce_numbered(bootstrap, topic, n)
    ends = end_offsets(bootstrap, topic)
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record))
    args = ["--topic", topic, "--group-id", group, "--max-thread-count", str(threads), "--max-backlog",
            str(max_backlog), "--commit-interval", str(commit_interval), "-q", *RECORDER,
            # Static membership: a restarted consumer takes its partitions back at once instead of waiting
            # for the killed one's session to expire (the default 45 s per crash).
            "-X", f"group.instance.id={group}-member", "-X", "session.timeout.ms=10000"]
    segments: list[int] = [0]  # record-file line index where each run starts
    peak_rates: list[float] = []
    recover: list[float] = []

    def lines() -> list[str]:
        return record.read_text().splitlines() if record.exists() else []

    for k in range(kills):
        proc = start_consumer(args, env, log)
        started = time.monotonic()
        try:
            base = len(lines())
            target = base + rng.randint(300, 2_000)  # a random moment: after a random amount of new work
            samples = kill_9_at(proc, lambda: len(lines()), target, timeout=90, what=f"run {k}")
        finally:
            stop_process(proc)
        handled = {(int(p), int(o)) for p, o in (ln.split(":") for ln in lines())}
        assert len(handled) < n, "the kill came after the run was over"
        first_at = next((t for t, c in samples if c > base), time.monotonic())
        recover.append(first_at - started)
        peak_rates.append(peak_rate(samples))
        segments.append(len(lines()))

    final = start_consumer(args, env, log)
    try:
        wanted = all_offsets(ends)
        wait_until(lambda: wanted <= set(read_records(record)), timeout=180, what="every offset handled")
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == ends, timeout=30, what="commits at end")
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=60) == 0
    finally:
        stop_process(final)
    records = read_records(record)
    counts = Counter(records)
    lost = all_offsets(ends) - set(counts)
    assert not lost, f"lost {len(lost)} offsets, e.g. {sorted(lost)[:5]}"
    assert committed_offsets(bootstrap, group, topic) == ends

    # Duplicates caused by crash k: offsets the killed run k handled that a later run handled again,
    # i.e. what run k had handled but not committed when it died. (They sum to all duplicates.)
    segments.append(len(records))
    runs = [records[segments[k] : segments[k + 1]] for k in range(len(segments) - 1)]
    per_crash = []
    for k in range(kills):
        later = set().union(*runs[k + 1 :])
        per_crash.append(sum(1 for r in set(runs[k]) if r in later))
    assert sum(per_crash) == len(records) - len(counts)
    window = threads + max_backlog
    bounds = [window + int(rate * (commit_interval + 0.25)) + 1 for rate in peak_rates]
    for k, (dups, bound) in enumerate(zip(per_crash, bounds, strict=True)):
        assert dups <= bound, f"crash {k + 1}: {dups} duplicates > in-flight window {window} + one commit interval"
    report_figures(
        "crash_loop", seed=seed, messages=n, kills=kills, lost=len(lost), duplicates=sum(per_crash),
        duplicates_per_crash=per_crash, duplicate_bounds=bounds, peak_rate_per_s=[round(r) for r in peak_rates],
        restart_to_first_handled_s=[round(r, 2) for r in recover],
    )


# -- 3. broker restart ------------------------------------------------------------------------------------


def test_broker_restart_mid_run_consumer_and_producer_recover_and_lose_nothing(
    own_broker: LocalKafka, unique: Callable[[str], str], tmp_path: Path
) -> None:
    own_broker.start()
    bootstrap, n = own_broker.bootstrap, 4_000
    topic, group = unique("restart"), unique("g")
    create_topic({"bootstrap.servers": bootstrap}, topic, 3, 1)
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.002")
    consumer = start_consumer(["--topic", topic, "--group-id", group, "--max-thread-count", "4",
                               "--max-backlog", "1000", *RECORDER], env, log)
    producer = subprocess.Popen(
        [sys.executable, str(ROOT / "producer.py"), "--topic", topic, "--count", str(n), "--producer-sleep", "0.003",
         "-q"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: len(read_records(record)) >= 300, timeout=90, what="300 handled before the restart")
        before = len(read_records(record))
        stopped_at = time.monotonic()
        own_broker.stop()
        down_for = time.monotonic() - stopped_at
        time.sleep(2.0)  # the outage itself: clients must notice and keep retrying
        own_broker.start()
        up_at = time.monotonic()
        during = len(read_records(record))
        wait_until(lambda: len(read_records(record)) > during, timeout=120, what="handling to resume")
        recovered_in = time.monotonic() - up_at
        _out, perr = producer.communicate(timeout=180)
        assert producer.returncode == 0, perr
        ends = end_offsets(bootstrap, topic)
        # Each of producer.py's ids 1..n exactly once: a count would hide a lost record behind a duplicate.
        ids = sorted(json.loads(m.value())["id"] for m in read_topic(bootstrap, topic, sum(ends.values())))
        missing = sorted(set(range(1, n + 1)) - set(ids))
        assert ids == list(range(1, n + 1)), f"{len(ids)} records for {n}; missing e.g. {missing[:5]}"
        wanted = all_offsets(ends)
        wait_until(lambda: wanted <= set(read_records(record)), timeout=180, what="every offset handled")
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == ends, timeout=30, what="commits at end")
        assert consumer.poll() is None, "the consumer gave up instead of recovering"
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(timeout=60) == 0
    finally:
        stop_process(consumer)
        if producer.poll() is None:
            producer.kill()
            producer.communicate()
    counts = Counter(read_records(record))
    lost = wanted - set(counts)
    assert not lost
    report_figures(
        "broker_restart", messages=sum(ends.values()), lost=len(lost),
        duplicates=sum(c - 1 for c in counts.values()), handled_before_stop=before,
        broker_stop_s=round(down_for, 1), outage_s=round(up_at - stopped_at, 1),
        broker_restart_to_first_handled_s=round(recovered_in, 2),
    )


# -- 6. broker gone for longer than the budget ---------------------------------------------------------------


def test_broker_gone_longer_than_the_budget_exits_3_and_committed_only_what_was_handled(
    own_broker: LocalKafka, unique: Callable[[str], str], tmp_path: Path
) -> None:
    own_broker.start()
    bootstrap, n, budget = own_broker.bootstrap, 400, 5.0
    topic, group = unique("gone"), unique("g")
    create_topic({"bootstrap.servers": bootstrap}, topic, 2, 1)
    produce_numbered(bootstrap, topic, n)
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.05")
    consumer = start_consumer(["--topic", topic, "--group-id", group, "--max-thread-count", "2",
                               "--broker-down-timeout", str(budget), *RECORDER], env, log)
    try:
        wait_until(lambda: len(read_records(record)) >= 30, timeout=90, what="30 handled")
        # Something must be committed before the broker goes, or the check below has nothing to check.
        wait_until(lambda: sum(max(c, 0) for c in committed_offsets(bootstrap, group, topic).values()) > 0,
                   timeout=30, what="a first commit")
        stopping_at = time.monotonic()
        own_broker.stop()
        stopped_at = time.monotonic()
        code = consumer.wait(timeout=budget + 60)
        exited_at = time.monotonic()
    finally:
        stop_process(consumer)
        own_broker.start()
    output = log.read_text()
    errors = _error_lines(output)
    assert code == 3, output[-2000:]
    assert len(errors) == 1 and "no broker reachable for 5s" in errors[0], output[-2000:]
    # The budget counts from when librdkafka saw every broker down: between the start of the stop (the
    # broker may close its listener early in its shutdown) and its end (measured 0.8 s apart), plus
    # the detection itself (under a second) and the shutdown (no handler to wait for: 0.05 s each).
    exited_after = exited_at - stopped_at
    assert budget - 1 <= exited_at - stopping_at and exited_after <= budget + 3, (exited_at - stopping_at,
                                                                                   exited_after)
    handled = set(read_records(record))
    assert len(handled) < n  # it really stopped early
    committed = committed_offsets(bootstrap, group, topic)
    total = sum(max(c, 0) for c in committed.values())
    assert total > 0, "nothing committed: the check below would check nothing"
    unhandled = [(p, o) for p, c in committed.items() for o in range(max(c, 0)) if (p, o) not in handled]
    assert not unhandled, f"committed past unhandled offsets, e.g. {unhandled[:5]}"
    report_figures(
        "broker_gone", messages=n, handled=len(handled), committed=total,
        committed_unhandled=len(unhandled), budget_s=budget, exit_code=code, exited_after_s=round(exited_after, 1),
        # librdkafka's close() waits for a commit that was in flight when the broker went, retrying it every
        # socket.timeout.ms (60 s) until a broker answers; the engine leaves it after CLOSE_TIMEOUT_DOWN.
        close_left_behind="did not close within" in output,
    )


# -- 4. poison messages, dead letters, skip, stop ---------------------------------------------------------------


def test_poison_messages_are_retried_then_dead_lettered_and_no_partition_stalls(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n, every, attempts = 2_000, 100, 3  # 1 % poison
    topic, group = make_topic(partitions=3), unique("g")
    produce_numbered(bootstrap, topic, n, headers=_original_headers)
    ends = end_offsets(bootstrap, topic)
    poison = _poison_offsets(bootstrap, topic, n, every)
    assert len(poison) == n // every
    record, summary = tmp_path / "handled.txt", tmp_path / "summary.json"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_POISON_EVERY=str(every))
    started = time.monotonic()
    result = run_script(
        PROG, "--topic", topic, "--group-id", group, "--max-thread-count", "8", "--max-attempts", str(attempts),
        "--retry-backoff", "0.05", "--retry-backoff-max", "0.2", "--max-messages", str(n), "--summary-json",
        str(summary), "-q", *RECORDER, env=env, timeout=180,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(summary.read_text())
    assert stats["processed"] == n and stats["failed"] == len(poison)
    assert stats["retried"] == len(poison) * (attempts - 1)
    assert stats["dead_lettered"] == len(poison) and stats["skipped"] == 0
    counts = Counter(read_records(record))
    assert set(counts) == all_offsets(ends) - poison  # every other message handled
    assert max(counts.values()) == 1
    assert committed_offsets(bootstrap, group, topic) == ends  # no partition stalled behind a poison message

    dead = read_topic(bootstrap, f"{topic}.dlq", len(poison))
    assert len(dead) == len(poison)
    seen = set()
    for msg in dead:
        h = _headers(msg)
        where = (int(h[H_PARTITION]), int(h[H_OFFSET]))
        seen.add(where)
        assert h[H_TOPIC] == topic and h[H_ATTEMPTS] == str(attempts)
        assert h[H_ERROR].startswith("ValueError: poison message")
        assert json.loads(msg.value())["id"] % every == every - 1  # the original value
        assert msg.key() == f"k{json.loads(msg.value())['id']}".encode()  # and key
        # and the original headers, first, in order, repeated names and binary values as they were
        assert msg.headers()[:3] == _original_headers(json.loads(msg.value())["id"])
        assert len(msg.headers()) == 3 + 5  # then the five mtc75.* headers, nothing else
    assert seen == poison
    # <topic>.dlq was made like its source: as many partitions, REPLICATION_FACTOR (1) replicas each
    dlq_meta = Producer({"bootstrap.servers": bootstrap}).list_topics(f"{topic}.dlq", timeout=10)
    dlq_partitions = dlq_meta.topics[f"{topic}.dlq"].partitions
    assert len(dlq_partitions) == 3 and all(len(p.replicas) == 1 for p in dlq_partitions.values())
    report_figures(
        "poison_dlq", messages=n, poison=len(poison), handled=len(counts), dead_lettered=len(dead),
        retried=stats["retried"], lost=len(all_offsets(ends) - set(counts) - seen),
        duplicates=sum(c - 1 for c in counts.values()),
        run_seconds=round(elapsed, 1),
    )


def test_on_failure_skip_moves_on_and_counts(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n, every = 200, 50
    topic, group = make_topic(partitions=2), unique("g")
    produce_numbered(bootstrap, topic, n)
    record, summary = tmp_path / "handled.txt", tmp_path / "summary.json"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_POISON_EVERY=str(every))
    result = run_script(
        PROG, "--topic", topic, "--group-id", group, "--on-failure", "skip", "--max-attempts", "2",
        "--retry-backoff", "0.01", "--max-messages", str(n), "--summary-json", str(summary), *RECORDER,
        env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads(summary.read_text())
    assert (stats["skipped"], stats["retried"], stats["dead_lettered"]) == (n // every, n // every, 0)
    assert len(set(read_records(record))) == n - n // every
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)
    assert f"{topic}.dlq" not in Producer({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics


def test_dlq_topic_gets_the_replication_factor_setting(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    """REPLICATION_FACTOR reaches the DLQ topic's creation: 2 on this one-broker cluster cannot be met."""
    topic = make_topic(partitions=2)
    result = run_script(PROG, "--topic", topic, "--group-id", unique("g"), "--replication-factor", "2",
                        "--max-messages", "1", env=script_env(bootstrap), timeout=60)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and f"cannot create topic '{topic}.dlq'" in errors[0], result.stderr[-2000:]
    assert "replication factor" in errors[0].lower()
    assert f"{topic}.dlq" not in Producer({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics


def test_on_failure_stop_commits_only_what_is_safe_and_exits_5(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n, every = 200, 50
    topic, group = make_topic(partitions=1), unique("g")
    produce_numbered(bootstrap, topic, n)  # one partition: offset == id, the first poison is offset 49
    record = tmp_path / "handled.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_POISON_EVERY=str(every))
    result = run_script(
        PROG, "--topic", topic, "--group-id", group, "--on-failure", "stop", "--max-attempts", "2",
        "--retry-backoff", "0.01", "--max-thread-count", "4", *RECORDER, env=env, timeout=120,
    )
    assert result.returncode == 5, result.stderr[-2000:]
    errors = _error_lines(result.stderr)
    # 49, 99, 149 and 199 are poison; with jittered backoffs any of them may use up its attempts first
    assert len(errors) == 1 and "ON_FAILURE=stop" in errors[0], errors
    assert re.search(r"\[0\]@(49|99|149|199) failed 2 attempts", errors[0]), errors[0]
    assert "committed up to its first unfinished message" in errors[0]
    handled = set(read_records(record))
    committed = committed_offsets(bootstrap, group, topic)[0]
    assert (0, 49) not in handled
    # Exactly the failed message's offset (docs/how-it-works.md, RELIABILITY.md): 0..48 started before 49 (one FIFO
    # partition) and shutdown waits for running handlers, so they all finished and are committed.
    assert committed == 49
    assert all((0, o) in handled for o in range(committed))  # and nothing unhandled below it
    report_figures("on_failure_stop", messages=n, exit_code=result.returncode, committed=committed,
                   committed_unhandled=0)


def test_malformed_payloads_take_the_retry_and_dlq_path_in_the_default_handler(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(partitions=1), unique("g")
    bad = [None, b"", b"not json {", b"\xff\xfe binary", json.dumps({"pad": "x" * 200_000}).encode()]
    good = [json.dumps({"id": i}).encode() for i in range(3)]
    producer = Producer({"bootstrap.servers": bootstrap})
    for value in [good[0], *bad[:3], good[1], *bad[3:], good[2]]:
        producer.produce(topic, value=value, key=b"k")
    assert producer.flush(30) == 0
    summary = tmp_path / "summary.json"
    result = run_script(
        PROG, "--topic", topic, "--group-id", group, "--processing-sleep", "0", "--max-attempts", "2",
        "--retry-backoff", "0.01", "--max-messages", "8", "--summary-json", str(summary), "-q",
        env=script_env(bootstrap), timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    stats = json.loads(summary.read_text())
    assert stats["processed"] == 8 and stats["failed"] == 5 and stats["dead_lettered"] == 5
    errors = sorted(_headers(m)[H_ERROR] for m in read_topic(bootstrap, f"{topic}.dlq", 5))
    assert len(errors) == 5
    assert sum("empty payload" in e for e in errors) == 2
    assert sum("not JSON" in e for e in errors) == 2
    assert sum("exceeds MAX_PAYLOAD_BYTES=100000" in e for e in errors) == 1
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)


def test_a_message_waiting_for_its_retry_holds_no_thread_and_holds_back_the_commit(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:


    topic, group, n = make_topic(partitions=1), unique("g"), 20
    produce_numbered(bootstrap, topic, n)
    calls: Counter[int] = Counter()
    handled: list[int] = []

    def handler(msg: object) -> None:
        offset = msg.offset()  # type: ignore[attr-defined]
        calls[offset] += 1
        if offset == 0 and calls[offset] < 3:
            raise RuntimeError("flaky downstream")
        handled.append(offset)

    settings = Settings().replace(
        BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=group, MAX_THREAD_COUNT=1, COMMIT_INTERVAL=0.1,
        RETRY_BACKOFF=4.0, RETRY_BACKOFF_MAX=4.0, MAX_ATTEMPTS=3,
    )
    consumer = BoundConsumer(settings, handler, max_messages=n)
    result: list[object] = []
    runner = threading.Thread(target=lambda: result.append(consumer.run()))
    runner.start()
    try:
        # One thread: the others can only run while offset 0 waits if its backoff does not occupy it.
        wait_until(lambda: calls[0] >= 1 and len(handled) >= 3, timeout=60, what="others handled meanwhile")
        committed = committed_offsets(bootstrap, group, topic)[0]
        assert 0 not in handled, "offset 0 finished too soon for the check"
        assert committed <= 0  # the watermark waits for offset 0
        runner.join(timeout=60)
        assert not runner.is_alive()
    finally:
        consumer.stop()
        runner.join(timeout=60)
    stats = result[0]
    assert calls[0] == 3 and sorted(handled) == list(range(n))
    assert (stats.retried, stats.failed, stats.dead_lettered) == (2, 0, 0)  # type: ignore[attr-defined]
    assert committed_offsets(bootstrap, group, topic) == {0: n}


class _ClosedThenForwarding:
    """A local port that refuses connections until :meth:`open`, then forwards each one to ``target``.

    Bound from the start (so nobody else takes it), listening only once opened.
    """
    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._listener]

    def open(self) -> None:
        self._listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target, timeout=10)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_a_failed_dead_letter_publish_is_retried_never_dropped(
    bootstrap: str, unique: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    """The dead-letter producer cannot reach Kafka at first (its bootstrap address refuses): its records
    time out and are published again until they land. Meanwhile the two failed messages are neither
    counted done nor committed past; the DLQ topic ends with both, none dropped."""
    topic, group, n = unique("dlqretry"), unique("g"), 20
    create_topic({"bootstrap.servers": bootstrap}, topic, 1, 1)
    produce_numbered(bootstrap, topic, n)  # one partition: offset == id; 9 and 19 always fail
    handled: list[int] = []

    def handler(msg: object) -> None:
        if msg.offset() % 10 == 9:  # type: ignore[attr-defined]
            raise RuntimeError("poison")
        handled.append(msg.offset())  # type: ignore[attr-defined]

    door = _ClosedThenForwarding(bootstrap)
    settings = Settings().replace(
        BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=group, MAX_THREAD_COUNT=2, COMMIT_INTERVAL=0.1,
        MAX_ATTEMPTS=1, RETRY_BACKOFF_MAX=0.2, BROKER_DOWN_TIMEOUT=120,
        # only the dead-letter producer goes through the door; 1 s is as long as a DLQ record waits
        PRODUCER_CONFIG={"bootstrap.servers": door.address, "message.timeout.ms": "1000"},
    )
    snapshots: list[Stats] = []  # from the poll thread: stats() belongs to it
    consumer = BoundConsumer(settings, handler, max_messages=n, on_status=snapshots.append, status_interval=0.05)
    result: list[Stats] = []
    runner = threading.Thread(target=lambda: result.append(consumer.run()))
    caplog.set_level(logging.WARNING, logger="mtc75.kafka.deadletter")

    def refused() -> int:
        return sum("dead-lettering" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)

    runner.start()
    try:
        wait_until(lambda: refused() >= 4, timeout=60, what="DLQ publishes failing and retried")
        wait_until(lambda: len(handled) == n - 2, timeout=30, what="the other messages handled")
        assert runner.is_alive() and snapshots[-1].dead_lettered == 0  # the two are not done
        assert committed_offsets(bootstrap, group, topic)[0] <= 9  # nor committed past
        door.open()
        runner.join(timeout=90)
        assert not runner.is_alive(), "the DLQ records never landed"
    finally:
        consumer.stop()
        runner.join(timeout=60)
        door.close()
    stats = result[0]
    assert (stats.processed, stats.failed, stats.dead_lettered) == (n, 2, 2)
    dead = read_topic(bootstrap, f"{topic}.dlq", 2)
    assert sorted(int(_headers(m)[H_OFFSET]) for m in dead) == [9, 19]
    assert committed_offsets(bootstrap, group, topic) == {0: n}
    report_figures("dlq_publish_refused", messages=n, poison=2, failed_publishes_retried=refused(),
                   dead_lettered=len(dead),
                   lost=len(set(range(n)) - set(handled) - {int(_headers(m)[H_OFFSET]) for m in dead}))


def test_nothing_is_committed_while_no_broker_is_reachable(
    own_broker: LocalKafka, unique: Callable[[str], str], caplog: pytest.LogCaptureFixture,
) -> None:
    """While every broker is down the handlers go on finishing work, and the consumer sends no commit
    (it would only pile up in the client); once the broker is back it commits everything."""
    commits: list[float] = []  # wall-clock time of every commit() the engine makes

    class RecordingConsumer(Consumer):  # type: ignore[misc]
        def commit(self, *args: object, **kwargs: object) -> object:
            commits.append(time.time())
            return super().commit(*args, **kwargs)

    own_broker.start()
    bootstrap, n = own_broker.bootstrap, 1_500
    topic, group = unique("nocommit"), unique("g")
    create_topic({"bootstrap.servers": bootstrap}, topic, 1, 1)
    produce_numbered(bootstrap, topic, n)
    finished: list[tuple[float, int]] = []  # (wall-clock time, offset) of every handled message

    def handler(msg: object) -> None:
        time.sleep(0.01)
        finished.append((time.time(), msg.offset()))  # type: ignore[attr-defined]

    settings = Settings().replace(
        BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=group, MAX_THREAD_COUNT=2, COMMIT_INTERVAL=0.1,
        BROKER_DOWN_TIMEOUT=120, ON_FAILURE="skip",
        PAUSE_INTERVAL=5.0,  # the backlog holds about one interval of work: 5 s to finish during the outage
    )
    # No --max-messages: the run could end during the outage; it is stopped once all is committed.
    snapshots: list[Stats] = []  # from the poll thread: stats() belongs to it
    consumer = BoundConsumer(settings, handler, factories=ClientFactories(consumer=RecordingConsumer),
                             on_status=snapshots.append, status_interval=0.05)
    caplog.set_level(logging.WARNING, logger="mtc75.engine")
    runner = threading.Thread(target=consumer.run)
    runner.start()
    try:
        wait_until(lambda: len(commits) >= 3 and bool(snapshots) and snapshots[-1].backlog >= 300, timeout=60,
                   what="commits, and a backlog to work on during the outage")
        own_broker.stop()

        def down_at() -> float | None:
            return next((r.created for r in caplog.records if "brokers are down" in r.getMessage()), None)

        wait_until(lambda: down_at() is not None, timeout=30, what="the consumer to see every broker down")
        time.sleep(3.0)  # the outage: handlers keep finishing the fetched backlog meanwhile
        restart_at = time.time()
        own_broker.start()
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == {0: n}, timeout=120,
                   what="everything committed after the outage")
    finally:
        consumer.stop()
        runner.join(timeout=60)
    down = down_at()
    assert down is not None
    done_while_down = sum(down < t < restart_at for t, _ in finished)
    assert done_while_down >= 50, "too little finished during the outage for the check to mean anything"
    sent_while_down = [t for t in commits if down < t < restart_at]
    assert not sent_while_down, f"{len(sent_while_down)} commits sent while no broker was reachable"
    assert not runner.is_alive()
    # (the group may rebalance after the restart and redeliver what was handled but not committed)
    assert commits[-1] > restart_at and {o for _, o in finished} == set(range(n))
    report_figures("no_commit_while_down", messages=n, finished_while_down=done_while_down,
                   commits_while_down=len(sent_while_down), outage_s=round(restart_at - down, 1))
