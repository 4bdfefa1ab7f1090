"""What a service relies on, against the real broker: a tight max_messages bound, health and metrics endpoints,
and the shipped Grafana dashboard and alert rules naming only metrics a running consumer exposes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mtc75
from mtc75.tools.demo import remove_topics
from tests.kafka_helpers import ROOT, committed_offsets, produce_numbered, run_script, script_env

pytestmark = pytest.mark.timeout(120)


def _counting() -> tuple[Counter[tuple[int, int]], Callable[[Any], None]]:
    calls: Counter[tuple[int, int]] = Counter()
    lock = threading.Lock()

    def handle(message: Any) -> None:  # fast: runs form, and the backlog could take every message at once
        with lock:
            calls[(message.partition(), message.offset())] += 1

    return calls, handle


def test_max_messages_handles_exactly_n_and_commits_exactly_those(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group = make_topic(3, "bound"), unique("bound")
    produce_numbered(bootstrap, topic, 3000)
    calls, handle = _counting()
    stats = mtc75.Consumer(handle, topic=topic, group_id=group, bootstrap_servers=bootstrap,
                           max_thread_count=8).run(max_messages=500, idle_exit=30)
    assert stats.processed == 500 and sum(calls.values()) == 500 and max(calls.values()) == 1
    committed = committed_offsets(bootstrap, group, topic)
    assert sum(max(end, 0) for end in committed.values()) == 500  # each partition's first ones, no gap
    assert set(calls) == {(p, o) for p, end in committed.items() for o in range(max(end, 0))}


def test_max_messages_flag_handles_exactly_n(bootstrap: str, make_topic: Callable[..., str],
                                             unique: Callable[[str], str], tmp_path: Path) -> None:
    topic = make_topic(3, "bound-cli")
    produce_numbered(bootstrap, topic, 2000)
    summary = tmp_path / "summary.json"
    result = run_script("mtc75_consumer.py", "--topic", topic, "--group-id", unique("bound-cli"),
                        "--processing-sleep", "0.0001", "--max-messages", "100", "--idle-exit", "30",
                        "--summary-json", str(summary), "--no-reload", "--no-dashboard",
                        env=script_env(bootstrap), timeout=90)
    assert result.returncode == 0, result.stderr
    assert json.loads(summary.read_text())["processed"] == 100


def test_the_demo_removes_its_topic_and_the_dead_letter_topic(bootstrap: str, make_topic: Callable[..., str]) -> None:
    from confluent_kafka.admin import AdminClient

    topic = make_topic(1, "demo")
    dead = make_topic(1, "demo-dlq")  # stands for <topic>.dlq, which the consumer creates
    assert remove_topics(bootstrap, [topic, dead, topic, f"{topic}.never-made"]) == []  # one name twice, one missing
    listed = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    assert topic not in listed and dead not in listed


def test_the_demo_cleanup_writes_no_raw_librdkafka_line_when_kafka_is_gone() -> None:
    code = ("from mtc75.tools.demo import remove_topics; "
            "print(remove_topics('127.0.0.1:1', ['t'], timeout=2)[0].split(':')[0])")  # nothing listens on port 1
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "t\n", result.stderr
    assert result.stderr == ""  # librdkafka's "Connect to ... failed" goes to the mtc75.librdkafka logger
