"""No partition left behind, nothing called idle that is not, lag that reaches 0 (issue 22, items 4, 5 and 8).

Each test runs ``mtc75_consumer.py`` as a user would, against a real broker, on its own topic and group,
every wait bounded; what was handled is recorded outside the process (tests/recording_handler.py,
tests/hardening_handler.py). Each prints a ``FIGURES {...}`` line that RELIABILITY.md quotes.
The test that stops every broker uses test_faults.py's own broker (``own_broker``), never the session's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from mtc75.kafka.topics import create_topic
from mtc75.tools.broker import LocalKafka
from tests.kafka_helpers import (
    _COORDINATOR_MOVING,
    ROOT,
    committed_offsets,
    end_offsets,
    produce_numbered,
    read_records,
    read_tagged_records,
    report_figures,
    script_env,
    start_consumer,
    stop_process,
    wait_until,
)
from tests.test_faults import own_broker

__all__ = ["own_broker"]  # a fixture, used by name

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

PROG = "mtc75_consumer.py"
RECORDER = ("--handler", "tests.recording_handler:handle")


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / PROG), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _commit(bootstrap: str, group: str, offsets: dict[tuple[str, int], int]) -> None:
    """Commit ``offsets`` for ``group`` as a stopped consumer of it would have left them (retried, bounded,
    while the coordinator is still loading: NOT_COORDINATOR on a broker's first group)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    deadline = time.monotonic() + 90  # a new broker on a loaded machine: its offsets topic took 30+ s
    try:
        while True:
            try:
                consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                asynchronous=False)
                return
            except KafkaException as err:
                if time.monotonic() >= deadline or not (
                        err.args[0].retriable() or err.args[0].code() in _COORDINATOR_MOVING):
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()


def _delete_below(bootstrap: str, topic: str, partition: int, offset: int) -> None:
    """delete_records: the log of ``topic[partition]`` starts at ``offset`` from now on."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.delete_records([TopicPartition(topic, partition, offset)], request_timeout=30)
    for future in futures.values():
        assert future.result(timeout=30).low_watermark == offset


# -- item 4: a position out of range ---------------------------------------------------------------------


def _deleted_below_the_commit(bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
                              ) -> tuple[str, str, dict[int, int]]:
    """Two partitions of 20 messages each, the group committed at 5 on both; partition 0's records below 10
    deleted while no consumer ran; then 100 more messages. Returns (topic, group, end offsets)."""
    topic, group = make_topic(partitions=2), unique("g")
    produce_numbered(bootstrap, topic, 40)
    ends = end_offsets(bootstrap, topic)
    assert min(ends.values()) >= 10, ends
    _commit(bootstrap, group, {(topic, 0): 5, (topic, 1): 5})
    _delete_below(bootstrap, topic, 0, 10)
    produce_numbered(bootstrap, topic, 100, key_prefix="later")
    return topic, group, end_offsets(bootstrap, topic)


def test_auto_offset_reset_error_stops_with_a_clear_line_and_exit_1_instead_of_leaving_the_partition(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group, ends = _deleted_below_the_commit(bootstrap, make_topic, unique)
    record = tmp_path / "handled.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record))
    started = time.monotonic()
    done = _run(["--topic", topic, "--group-id", group, "--auto-offset-reset", "error", "--idle-exit", "3",
                 *RECORDER], env)
    took = time.monotonic() - started
    errors = [line for line in done.stderr.splitlines() if line.startswith(f"{PROG}: error: ")]
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(errors) == 1, done.stderr[-3000:]
    assert f"{topic}[0]: offset 5 is out of range (the log holds offsets 10 to {ends[0] - 1}" in errors[0], errors
    assert "AUTO_OFFSET_RESET=error" in errors[0]
    assert "Traceback" not in done.stderr
    handled = read_records(record)
    assert not [o for p, o in handled if p == 0], "partition 0 has no position: nothing of it can be handled"
    committed = committed_offsets(bootstrap, group, topic)
    assert committed[0] == 5, committed  # the out-of-range position is left as it was, for the user to decide
    # A group with no committed offset at all: the same, one line and exit 1.
    fresh = _run(["--topic", topic, "--group-id", unique("new"), "--auto-offset-reset", "error", "--idle-exit", "3",
                  *RECORDER], env)
    fresh_errors = [line for line in fresh.stderr.splitlines() if line.startswith(f"{PROG}: error: ")]
    assert fresh.returncode == 1 and len(fresh_errors) == 1, fresh.stderr[-3000:]
    assert "the group has no committed offset and AUTO_OFFSET_RESET=error" in fresh_errors[0]
    report_figures("offset_out_of_range_error", exit_code=done.returncode, line=errors[0],
                   exit_after_s=round(took, 1), partition1_handled=sum(1 for p, _ in handled if p == 1),
                   committed=committed, new_group_exit_code=fresh.returncode)


@pytest.mark.parametrize("reset", ["earliest", "latest"])
def test_an_offset_reset_says_in_one_line_from_where_to_where(
    reset: str, bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group, ends = _deleted_below_the_commit(bootstrap, make_topic, unique)
    record = tmp_path / "handled.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record))
    done = _run(["--topic", topic, "--group-id", group, "--auto-offset-reset", reset, "--idle-exit", "3",
                 *RECORDER], env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "was out of range" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    to = 10 if reset == "earliest" else ends[0]
    side = "start" if reset == "earliest" else "end"
    assert f"{topic}[0]: offset 5 was out of range" in lines[0], lines
    assert f"to the log {side}, offset {to} ({to - 5} offsets skipped, never handled by this group)" in lines[0]
    handled = {o for p, o in read_records(record) if p == 0}
    assert handled == set(range(to, ends[0])), sorted(handled)[:5]
    if reset == "earliest":  # (latest: nothing handled, nothing to commit)
        assert committed_offsets(bootstrap, group, topic)[0] == ends[0]
    report_figures(f"offset_reset_{reset}", line=lines[0].split("WARNING", 1)[-1].strip(), handled_p0=len(handled))


# -- item 5: idle means nothing to fetch and nothing held or waiting ------------------------------------------


def test_idle_exit_waits_for_a_partition_held_by_the_offset_window(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """OFFSET_WINDOW 100 and offset 0 takes 10 s: the partition is held (paused alone) behind it, so nothing
    is fetched and nothing finishes for longer than --idle-exit 3. That is not idle: the run goes on until
    the head finished and the rest was read, handled and committed."""
    n, window, head_s, idle = 1_000, 100, 10.0, 3.0
    topic, group = make_topic(partitions=1), unique("g")
    produce_numbered(bootstrap, topic, n)
    record = tmp_path / "handled.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLOW="0:0",
                     MTC75_TEST_SLOW_SECONDS=str(head_s))
    started = time.monotonic()
    done = _run(["--topic", topic, "--group-id", group, "--max-thread-count", "4", "--max-backlog", "20",
                 "--offset-window", str(window), "--idle-exit", str(idle),
                 "--handler", "tests.slow_head_handler:handle"], env, timeout=head_s + 120)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"HELD {topic}[0]" in done.stderr, "the window never held the partition: the test proves nothing"
    handled = {o for _, o, _ in read_tagged_records(record)}
    assert handled == set(range(n)), f"{n - len(handled)} of {n} left unhandled at the idle exit"
    assert committed_offsets(bootstrap, group, topic) == {0: n}
    report_figures("idle_exit_window_held", messages=n, handled=len(handled), window=window, head_s=head_s,
                   idle_exit_s=idle, run_s=round(took, 1))


def test_idle_exit_does_not_count_the_time_every_broker_is_down(
    own_broker: LocalKafka, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """--idle-exit 3 and the only broker stopped for longer: the consumer cannot see whether messages wait,
    so it is not idle. It waits, reads what was produced once the broker is back, then exits 0 when idle."""
    idle, n = 3.0, 100
    own_broker.start()
    bootstrap = own_broker.bootstrap
    topic, group = unique("down"), unique("g")
    create_topic({"bootstrap.servers": bootstrap}, topic, 1, 1)
    produce_numbered(bootstrap, topic, n)
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record))
    proc = start_consumer(["--topic", topic, "--group-id", group, "--idle-exit", str(idle),
                           "--broker-down-timeout", "120", *RECORDER], env, log)
    try:
        wait_until(lambda: len(read_records(record)) >= n, 60, what="the first messages handled")
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == {0: n}, 30, what="them committed")
        # Killed, not stopped: the consumer must lose the broker before IDLE_EXIT runs out, and a graceful stop
        # closes the connections late in a shutdown that takes longer than that on a loaded machine (seen: the
        # run ended idle with the broker still stopping).
        pid = own_broker.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        stopped_at = time.monotonic()
        wait_until(lambda: "brokers are down" in log.read_text(), 30, what="the consumer to see every broker down")
        time.sleep(3 * idle)
        running_while_down = proc.poll() is None
        down_s = time.monotonic() - stopped_at
        own_broker.start()
        produce_numbered(bootstrap, topic, n, key_prefix="after")
        code = proc.wait(timeout=120)
    finally:
        stop_process(proc)
    text = log.read_text()
    assert running_while_down, f"exited {proc.returncode} while every broker was down: {text[-2000:]}"
    assert code == 0, text[-3000:]
    handled = {o for _, o in read_records(record)}
    assert handled == set(range(2 * n)), f"{2 * n - len(handled)} left unhandled"
    assert committed_offsets(bootstrap, group, topic) == {0: 2 * n}
    report_figures("idle_exit_brokers_down", idle_exit_s=idle, brokers_down_s=round(down_s, 1),
                   handled=len(handled), messages=2 * n, exit_code=code)


# -- item 8: lag reaches 0 on transactional topics -----------------------------------------------------------


def _transactions(bootstrap: str, topic: str, partitions: int, batches: list[tuple[int, bool]]) -> set[tuple[int, int]]:
    """Write ``batches`` of (messages per partition, committed?) as transactions; returns the (partition,
    offset) of every record of a committed one (the records a read_committed consumer sees)."""
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"{topic}-tx", "linger.ms": 5})
    producer.init_transactions(60)
    visible: set[tuple[int, int]] = set()
    for count, commit in batches:
        producer.begin_transaction()
        sent: list[tuple[int, int]] = []
        for i in range(count * partitions):
            producer.produce(topic, json.dumps({"id": i}).encode(), partition=i % partitions,
                             on_delivery=lambda err, msg, out=sent: err is None and out.append((msg.partition(),
                                                                                                 msg.offset())))
        producer.flush(60)
        assert len(sent) == count * partitions
        if commit:
            producer.commit_transaction(60)
            visible.update(sent)
        else:
            producer.abort_transaction(60)
    return visible


def test_commits_cover_the_transaction_markers_so_lag_reaches_zero(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Committed transactions with an aborted one between them: every committed record is handled once, no
    aborted one is, and once all is handled the group's committed offset is each partition's end offset
    (the last transaction's marker covered), so lag reaches 0. A plain topic alongside: the same."""
    partitions, idle = 3, 3.0
    topic, plain, group = make_topic(partitions=partitions), make_topic(partitions=partitions), unique("g")
    visible = _transactions(bootstrap, topic, partitions, [(20, True), (5, False), (30, True)])
    ends = end_offsets(bootstrap, topic)
    record = tmp_path / "handled.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record))
    done = _run(["--topic", topic, "--group-id", group, "--idle-exit", str(idle), *RECORDER], env)
    assert done.returncode == 0, done.stderr[-3000:]
    handled = read_records(record)
    assert sorted(handled) == sorted(visible), "committed records handled once each, aborted ones never"
    committed = committed_offsets(bootstrap, group, topic)
    lag = {p: ends[p] - committed[p] for p in ends}
    # the plain topic, for comparison (its end is its last record + 1)
    produce_numbered(bootstrap, plain, 90)
    plain_record = tmp_path / "plain.txt"
    plain_done = _run(["--topic", plain, "--group-id", group, "--idle-exit", str(idle), *RECORDER],
                      script_env(bootstrap, MTC75_TEST_RECORD=str(plain_record)))
    assert plain_done.returncode == 0, plain_done.stderr[-3000:]
    plain_lag = {p: e - committed_offsets(bootstrap, group, plain)[p] for p, e in end_offsets(bootstrap, plain).items()}
    report_figures("transactional_lag", records=len(visible), handled=len(handled), end_offsets=ends,
                   committed=committed, lag=lag, plain_lag=plain_lag)
    assert lag == {p: 0 for p in ends}, f"committed {committed}, end offsets {ends}"
    assert plain_lag == {p: 0 for p in plain_lag}
