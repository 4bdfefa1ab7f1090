"""The three scripts as a user runs them: output, exit codes, one-line errors, signals."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.kafka_helpers import (
    Lines,
    all_offsets,
    committed_offsets,
    create_topic_with_config,
    end_offsets,
    produce_numbered,
    read_records,
    report_figures,
    run_script,
    script_env,
    start_script,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


def _one_error_line(stderr: str, prog: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


@contextlib.contextmanager
def _closed_port() -> Iterator[int]:
    """A port that refuses connections for as long as the block runs: bound by us, never listening.

    (A port found free and released would be free for anyone else to take before the test uses it.)
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_create_topic_then_already_exists_is_success(bootstrap: str, unique: Callable[[str], str]) -> None:
    env, topic = script_env(bootstrap), unique("created")
    first = run_script("create_topic.py", "--topic", topic, "--num-partitions", "4", env=env)
    assert first.returncode == 0, first.stderr
    assert f"topic {topic} created" in first.stderr
    assert len(end_offsets(bootstrap, topic)) == 4
    again = run_script("create_topic.py", "--topic", topic, "--num-partitions", "4", env=env)
    assert again.returncode == 0, again.stderr
    assert "already exists" in again.stderr


def test_producer_sends_faker_json_keyed_over_partitions(bootstrap: str, make_topic: Callable[..., str]) -> None:
    from confluent_kafka import Consumer

    topic = make_topic(partitions=3)
    result = run_script("producer.py", "--topic", topic, "--count", "60", env=script_env(bootstrap))
    assert result.returncode == 0, result.stderr
    assert "sent 60 delivered 60 failed 0" in result.stdout
    ends = end_offsets(bootstrap, topic)
    assert sum(ends.values()) == 60
    assert sum(1 for v in ends.values() if v > 0) >= 2  # keys spread over the partitions
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"{topic}-reader", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    records = []
    deadline = time.monotonic() + 30
    try:
        while len(records) < 60 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                records.append((msg.key(), json.loads(msg.value())))
    finally:
        consumer.close()
    assert len(records) == 60
    ids = sorted(r["id"] for _, r in records)
    assert ids == list(range(1, 61))
    assert all(key == str(r["id"]).encode() for key, r in records)
    assert {"name", "email", "address", "company", "timestamp"} <= set(records[0][1])


def test_consumer_script_bounded_run_writes_summary_and_plain_status(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(partitions=2), unique("g")
    produce_numbered(bootstrap, topic, 120)
    summary = tmp_path / "summary.json"
    result = run_script(
        "mtc75_consumer.py", "--topic", topic, "--group-id", group, "--max-thread-count", "3",
        "--processing-sleep", "0.02", "--pause-interval", "0.2", "--max-messages", "120",
        "--summary-json", str(summary), env=script_env(bootstrap), timeout=90,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(summary.read_text())
    assert data["processed"] == 120 and data["failed"] == 0
    assert data["max_active_threads"] <= 3
    assert set(data) >= {"processed", "failed", "pauses", "paused_seconds", "elapsed_seconds", "max_active_threads"}
    assert "threads " in result.stdout and "summary: processed 120" in result.stdout
    assert "\x1b[" not in result.stdout  # plain lines when stdout is not a terminal
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)


def test_idle_exit_ends_a_run_with_nothing_to_read(bootstrap: str, make_topic: Callable[..., str],
                                                   unique: Callable[[str], str]) -> None:
    topic = make_topic(partitions=1)
    proc = start_script("mtc75_consumer.py", "--topic", topic, "--group-id", unique("g"), "--idle-exit", "2",
                        env=script_env(bootstrap))
    stamped: list[tuple[float, str]] = []  # stderr's log lines with the time each arrived here
    out: list[str] = []
    readers = [
        threading.Thread(target=lambda: stamped.extend(
            (time.monotonic(), line) for line in iter(proc.stderr.readline, "")), daemon=True),  # type: ignore[union-attr]
        threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True),  # type: ignore[union-attr]
    ]
    for reader in readers:
        reader.start()
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    for reader in readers:
        reader.join(10)
    assert code == 0, "".join(line for _, line in stamped)

    def arrived(fragment: str) -> float:
        return next(t for t, line in stamped if fragment in line)

    # Idle counts from the first assignment (joining the group is not idleness) and ends the run once
    # IDLE_EXIT passed. The clock starts as the assignment begins, before it reads the committed offsets
    # and logs "assigned": so at least IDLE_EXIT after "consuming" (logged before the group is joined),
    # and at most a loop turn over it after "assigned" (lines timed as they arrived, on one pipe).
    stopping = arrived("no new message for 2.0s (idle_exit); stopping")
    since_consuming, since_assigned = stopping - arrived("consuming "), stopping - arrived(f"assigned {topic}[0]")
    assert since_consuming >= 1.9 and since_assigned < 4.0, (since_consuming, since_assigned)
    assert "summary: processed 0" in "".join(out)


@pytest.mark.faults
def test_sigterm_while_saturated_finishes_in_flight_commits_and_restart_redelivers_nothing(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group, n = make_topic(partitions=2), unique("g"), 80
    produce_numbered(bootstrap, topic, n)
    record, started = tmp_path / "handled.txt", tmp_path / "started.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.3",
                     MTC75_TEST_STARTED=str(started))
    args = ("--topic", topic, "--group-id", group, "--max-thread-count", "4", "--handler",
            "tests.recording_handler:handle")
    proc = start_script("mtc75_consumer.py", *args, env=env)

    def running() -> int:
        return len(read_records(started)) - len(read_records(record))

    try:
        wait_until(lambda: len(read_records(record)) >= 8, timeout=60, what="8 handled messages")
        # Every thread busy: 4 handlers started and not finished (each runs 0.3 s; a finishing thread
        # takes the next message at once, so the count stays at 4 until SIGTERM).
        wait_until(lambda: running() == 4, timeout=30, what="4 handlers running")
        busy_at_sigterm = running()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    first_run = read_records(record)
    assert len(first_run) < n  # it really stopped early
    starts = read_records(started)
    assert busy_at_sigterm == 4 and len(starts) >= 12
    # A graceful stop drops no running handler: everything started in the first run finished in it.
    assert Counter(starts) == Counter(first_run), f"started, never finished: {set(starts) - set(first_run)}"
    committed = committed_offsets(bootstrap, group, topic)
    for p, o in first_run:
        assert committed[p] > o  # everything handled was committed

    rest = run_script("mtc75_consumer.py", *args, "--idle-exit", "3", env=env, timeout=120)
    assert rest.returncode == 0, rest.stderr
    counts = Counter(read_records(record))
    assert set(counts) == all_offsets(end_offsets(bootstrap, topic))  # nothing lost
    assert max(counts.values()) == 1  # and the restart redelivered nothing
    report_figures("graceful_stop", messages=n, handled_before_sigterm=len(first_run),
                   lost=len(all_offsets(end_offsets(bootstrap, topic)) - set(counts)),
                   duplicates=sum(c - 1 for c in counts.values()))


def test_second_signal_exits_at_once(bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str],
                                     tmp_path: Path) -> None:
    topic, group = make_topic(partitions=1), unique("g")
    produce_numbered(bootstrap, topic, 10)
    record = tmp_path / "handled.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="30")
    proc = start_script("mtc75_consumer.py", "--topic", topic, "--group-id", group, "--max-thread-count", "2",
                        "--handler", "tests.recording_handler:handle", env=env)
    lines = Lines(proc)
    try:
        wait_until(lambda: any("threads   2/2" in line for line in lines.out), timeout=60, what="both threads busy")
        proc.send_signal(signal.SIGINT)
        # The second signal only counts as second once the first one was handled: wait for its log line.
        wait_until(lambda: any("stopping: finishing in-flight" in line for line in lines.err), timeout=30,
                   what="the first signal's log line")
        assert proc.poll() is None  # the first signal waits for the 30 s handlers
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    lines.join()
    assert proc.returncode == 128 + signal.SIGINT
    assert any("exiting at once" in line for line in lines.err)
    assert read_records(record) == []  # the 30 s handlers never finished
    assert all(o <= 0 for o in committed_offsets(bootstrap, group, topic).values())  # so nothing was committed


@pytest.mark.faults
@pytest.mark.parametrize(
    ("script", "args", "fragment"),
    [
        ("mtc75_consumer.py", ["--max-thread-count", "0"], "invalid MAX_THREAD_COUNT='0' (from --max-thread-count)"),
        ("mtc75_consumer.py", ["--pause-interval", "soon"], "invalid PAUSE_INTERVAL='soon'"),
        ("mtc75_consumer.py", ["--handler", "no_such_module:fn"], "cannot import handler module 'no_such_module'"),
        ("mtc75_consumer.py", ["--handler", "json"], "expected package.module:function"),
        ("mtc75_consumer.py", ["-X", "nonsense"], "expected key=value"),
        ("mtc75_consumer.py", ["--max-messages", "0"], "must be >= 1"),
        ("mtc75_consumer.py", ["--metrics-port", "http"], "--metrics-port: must be a port number"),
        ("mtc75_consumer.py", ["--metrics-port", "70000"], "must be between 0 and 65535"),
        ("producer.py", ["--rate", "-5"], "invalid PRODUCER_RATE='-5'"),
        ("mtc75_consumer.py", ["--max-attempts", "0"], "invalid MAX_ATTEMPTS='0' (from --max-attempts): must be >= 1"),
        ("mtc75_consumer.py", ["--on-failure", "ignore"], "must be one of dlq, skip, stop"),
        ("mtc75_consumer.py", ["--broker-down-timeout", "0"], "invalid BROKER_DOWN_TIMEOUT='0'"),
        ("mtc75_consumer.py", ["--handler", "tests.no_such_file:handle"], "cannot import handler module"),
        ("producer.py", ["--count", "-1"], "invalid PRODUCER_MESSAGE_COUNT='-1'"),
        ("create_topic.py", ["--num-partitions", "0"], "invalid NUM_PARTITIONS='0'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(script: str, args: list[str], fragment: str) -> None:
    result = run_script(script, *args, env=script_env("127.0.0.1:1"), timeout=30)
    assert result.returncode == 2
    assert fragment in _one_error_line(result.stderr, script)


@pytest.mark.faults
def test_bad_config_file_and_env_value(tmp_path: Path) -> None:
    bad = tmp_path / "config.py"
    bad.write_text("MAX_THREAD_COUNT = 'lots'\n")
    result = run_script("mtc75_consumer.py", "--config", str(bad), env=script_env("127.0.0.1:1"), timeout=30)
    assert result.returncode == 2
    assert "invalid MAX_THREAD_COUNT='lots'" in _one_error_line(result.stderr, "mtc75_consumer.py")
    env = script_env("127.0.0.1:1", MTC75_AUTO_OFFSET_RESET="newest")
    result = run_script("mtc75_consumer.py", env=env, timeout=30)
    assert result.returncode == 2
    assert "from MTC75_AUTO_OFFSET_RESET" in _one_error_line(result.stderr, "mtc75_consumer.py")


@pytest.mark.faults
@pytest.mark.slow  # waits out the 10 s it promises: make test runs it, make unit does not
def test_unreachable_broker_is_a_clear_error_within_10_seconds() -> None:
    scripts = ("create_topic.py", "producer.py", "mtc75_consumer.py")
    # The three at once (each waits out the 10 s metadata timeout, so together they cost one wait), and
    # their start-up (interpreter, imports, flags) measured the same way: --help does all of it but Kafka.
    startup = _exit_times({s: start_script(s, "--help", env=script_env("127.0.0.1:1")) for s in scripts})
    with _closed_port() as port:
        env = script_env(f"127.0.0.1:{port}")
        gave_up = _exit_times({s: start_script(s, env=env) for s in scripts})
    for script in scripts:
        (code, _), elapsed = gave_up[script]
        assert startup[script][0][0] == 0
        assert code == 3
        line = _one_error_line(gave_up[script][0][1], script)
        assert "cannot reach Kafka" in line and "within 10s" in line and "make broker" in line
        # It tries for the 10 s the line names (the whole run lasts at least that), and gives up then: not at
        # 15 s (+1.5 s: start-up runs three at once). The start-up measured apart is no lower bound: on a
        # loaded machine it took 5.2 s there and 3.5 s here (one run: 13.68 - 5.20 = 8.48 s).
        assert elapsed >= 9.9, (script, elapsed)
        assert elapsed - startup[script][1] <= 11.5, (script, elapsed, startup[script][1])


def _exit_times(procs: dict[str, subprocess.Popen[str]]) -> dict[str, tuple[tuple[int, str], float]]:
    """Each process's (exit code, stderr) and seconds from now until it exited (bounded: 30 s)."""
    started = time.monotonic()
    deadline = started + 30
    ended: dict[str, float] = {}
    while len(ended) < len(procs):
        assert time.monotonic() < deadline, f"still running: {sorted(set(procs) - set(ended))}"
        for name, proc in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.monotonic() - started
        time.sleep(0.02)
    out = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=5)
        out[name] = ((proc.returncode, stderr), ended[name])
    return out


@pytest.mark.faults
def test_unknown_topic_is_a_clear_error(bootstrap: str, unique: Callable[[str], str]) -> None:
    for script in ("producer.py", "mtc75_consumer.py"):
        result = run_script(script, "--topic", unique("missing"), env=script_env(bootstrap), timeout=30)
        assert result.returncode == 3
        assert "does not exist" in _one_error_line(result.stderr, script)


def test_help_has_examples() -> None:
    for script in ("create_topic.py", "producer.py", "mtc75_consumer.py"):
        result = run_script(script, "--help", env=script_env("127.0.0.1:1"), timeout=30)
        assert result.returncode == 0
        assert "example" in result.stdout and "-X KEY=VALUE" in result.stdout
        if script == "mtc75_consumer.py":
            for flag in ("--no-dashboard", "--metrics-port", "--report", "--no-reload", "python mtc75_consumer.py "):
                assert flag in result.stdout
        if script == "producer.py":
            assert "--rate" in result.stdout and "--count 5000 --rate 200" in result.stdout


def test_busy_metrics_port_and_unusable_report_dir_are_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_script("mtc75_consumer.py", "--metrics-port", str(port), env=script_env("127.0.0.1:1"),
                            timeout=30)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in _one_error_line(result.stderr, "mtc75_consumer.py")
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_script("mtc75_consumer.py", "--report", str(blocker / "sub"), env=script_env("127.0.0.1:1"),
                        timeout=30)
    assert result.returncode == 2
    assert f"--report {blocker / 'sub'}" in _one_error_line(result.stderr, "mtc75_consumer.py")


def test_producer_exits_1_when_records_were_not_delivered(bootstrap: str, unique: Callable[[str], str]) -> None:
    topic = unique("refusing")
    # Faker records are about 300 bytes: the broker refuses each batch (MSG_SIZE_TOO_LARGE)
    create_topic_with_config(bootstrap, topic, {"max.message.bytes": "100"})
    result = run_script("producer.py", "--topic", topic, "--count", "5", env=script_env(bootstrap), timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "done: sent 5 delivered 0 failed 5" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("producer.py: error: ")]
    assert len(errors) == 1 and "5 messages failed, last: " in errors[0], result.stderr
    assert sum(end_offsets(bootstrap, topic).values()) == 0


def test_metrics_addr_is_the_address_bound() -> None:
    """--metrics-addr reaches the listener: an address this host does not have cannot be bound (no
    packet leaves the machine; 192.0.2.1 is TEST-NET-1, never assigned)."""
    result = run_script("mtc75_consumer.py", "--metrics-port", "0", "--metrics-addr", "192.0.2.1",
                        env=script_env("127.0.0.1:1"), timeout=30)
    assert result.returncode == 2
    assert "cannot listen on 192.0.2.1:0" in _one_error_line(result.stderr, "mtc75_consumer.py")
