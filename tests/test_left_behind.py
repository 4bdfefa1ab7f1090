"""No partition left behind, nothing called idle that is not, lag that reaches 0 (issue 22, items 4, 5 and 8).

Each test runs ``mtc75_consumer.py`` as a user would, against a real broker, on its own topic and group,
every wait bounded; what was handled is recorded outside the process (tests/recording_handler.py,
tests/hardening_handler.py). Each prints a ``FIGURES {...}`` line that RELIABILITY.md quotes.
The test that stops every broker uses test_faults.py's own broker (``own_broker``), never the session's.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.kafka_helpers import (
    _COORDINATOR_MOVING,
    ROOT,
    committed_offsets,
    end_offsets,
    produce_numbered,
    read_records,
    report_figures,
    script_env,
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
    report_figures("offset_out_of_range_error", exit_code=done.returncode, line=errors[0],
                   exit_after_s=round(took, 1), partition1_handled=sum(1 for p, _ in handled if p == 1),
                   committed=committed)


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
