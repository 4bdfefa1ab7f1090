"""Small, bounded helpers the broker tests share: produce numbered messages, read offsets, wait."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent


def produce_numbered(
    bootstrap: str, topic: str, count: int, key_prefix: str = "k",
    headers: Callable[[int], list[tuple[str, bytes]]] | None = None,
) -> None:
    """``count`` small JSON messages keyed so they spread over the partitions; all delivered or raise.

    ``headers(i)``, when given, makes message ``i``'s headers.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    failures: list[str] = []

    def report(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    for i in range(count):
        while True:
            try:
                value = json.dumps({"id": i}).encode()
                producer.produce(topic, key=f"{key_prefix}{i}", value=value, on_delivery=report,
                                 headers=headers(i) if headers is not None else None)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(30)
    assert left == 0 and not failures, f"produce failed: {left} undelivered, {failures[:3]}"


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "mtc75-test-probe"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    finally:
        consumer.close()


_COORDINATOR_MOVING = (
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError._TIMED_OUT,
)


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets; retried (bounded) while the coordinator is still loading."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    deadline = time.monotonic() + 30
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        while True:
            try:
                result = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
                return {tp.partition: tp.offset for tp in result}
            except KafkaException as err:
                # e.g. NOT_COORDINATOR right after a broker restart, until the group is loaded again
                code = err.args[0].code()
                if (code not in _COORDINATOR_MOVING and not err.args[0].retriable()) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
    finally:
        consumer.close()


def all_offsets(ends: dict[int, int]) -> set[tuple[int, int]]:
    return {(p, o) for p, end in ends.items() for o in range(end)}


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.05, what: str = "condition") -> None:
    """Poll ``condition`` until true; fail the test (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def script_env(bootstrap: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTC75_")}
    env.update({"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}, **extra)
    return env


def run_script(name: str, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / name), *args], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )


def start_script(name: str, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / name), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def start_consumer(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """mtc75_consumer.py as a user runs it; output to a file, so a long run never blocks on a full pipe."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "mtc75_consumer.py"), *args], env=env, cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` if it still runs (the ``finally`` of every test that starts one)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def kill_9_at(
    proc: subprocess.Popen[bytes], handled: Callable[[], int], target: int, timeout: float, what: str = "run"
) -> list[tuple[float, int]]:
    """SIGKILL ``proc`` once ``handled()`` reaches ``target``; return the (time, handled) samples seen.

    Fails the test if the process exits by itself or makes no progress to ``target`` within ``timeout``.
    """
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    while (count := handled()) < target:
        now = time.monotonic()
        samples.append((now, count))
        assert proc.poll() is None, f"{what}: consumer died by itself (exit {proc.returncode})"
        assert now < deadline, f"{what}: no progress to {target} records ({count})"
        time.sleep(0.02)
    samples.append((time.monotonic(), count))  # the burst that reached the target counts too
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return samples


def peak_rate(samples: list[tuple[float, int]]) -> float:
    """Most records per second over any 0.1-1 s stretch of the samples.

    A run can reach its kill target within a few tenths of a second of its first record; a 0.5 s
    minimum stretch then fell back to an average that included the group join, and understated the
    rate (and with it a duplicate bound) several times over.
    """
    best, j = 0.0, 0
    for i in range(len(samples)):
        while samples[i][0] - samples[j][0] > 1.0:
            j += 1
        span = samples[i][0] - samples[j][0]
        if span >= 0.1:
            best = max(best, (samples[i][1] - samples[j][1]) / span)
    if best == 0.0 and len(samples) > 1:
        span = samples[-1][0] - samples[0][0]
        best = (samples[-1][1] - samples[0][1]) / span if span > 0 else 0.0
    return best


def read_colon_lines(path: Path, fields: int) -> list[list[str]]:
    """The lines of ``path`` (a handler's record, appended as it runs) with ``fields`` colon-separated
    fields; others (a line being written) are skipped. No file yet: no lines."""
    if not path.exists():
        return []
    return [parts for parts in (line.split(":") for line in path.read_text().splitlines()) if len(parts) == fields]


def read_records(path: Path) -> list[tuple[int, int]]:
    """``partition:offset`` lines written by tests.recording_handler."""
    return [(int(p), int(o)) for p, o in read_colon_lines(path, 2)]


def read_tagged_records(path: Path) -> list[tuple[int, int, str]]:
    """``partition:offset:tag`` lines (tests/slow_head_handler.py, the async e2e handlers): which run handled what."""
    return [(int(p), int(o), tag) for p, o, tag in read_colon_lines(path, 3)]


def write_touched(path: Path, text: str) -> float:
    """Write ``path`` and move its mtime forward (a coarse-clock file system still sees the change).

    Returns when (``time.monotonic()``): a config reload is timed from there.
    """
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10_000_000, before + 10_000_000))
    return time.monotonic()


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 30) -> list[Message]:
    """The first ``count`` messages of ``topic`` (all partitions, from the start); bounded by ``timeout``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"mtc75-test-reader-{time.monotonic_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(msg)
    finally:
        consumer.close()
    return out


def report_figures(scenario: str, **figures: object) -> None:
    """Print a fault test's measured figures and append them to $MTC75_FAULT_FIGURES (JSON lines), if set.

    The appended line also names the test that wrote it (pytest's ``PYTEST_CURRENT_TEST``), so the
    recorder (``python -m bench.record``, run by ``make faults``) can store each record with its test's
    outcome in tests/figures/<name>.json, which RELIABILITY.md's figure cells are generated from
    (``python -m bench.docs``): ``scenario`` is the key a row's cells name.
    """
    record = {"scenario": scenario, **figures}
    print(f"FIGURES {json.dumps(record)}")
    path = os.environ.get("MTC75_FAULT_FIGURES")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        with open(path, "a") as out:
            out.write(json.dumps({**record, "test": test}) + "\n")


class Lines:
    """Collects a running script's stdout and stderr lines on two reader threads."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=lambda: self.out.extend(iter(proc.stdout.readline, "")), daemon=True),  # type: ignore[union-attr]
            threading.Thread(target=lambda: self.err.extend(iter(proc.stderr.readline, "")), daemon=True),  # type: ignore[union-attr]
        ]
        for t in self._threads:
            t.start()

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=30)


def create_topic_with_config(bootstrap: str, topic: str, config: dict[str, str], partitions: int = 1) -> None:
    """A topic with topic-level configs (e.g. ``max.message.bytes``), visible in metadata on return."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = NewTopic(topic, num_partitions=partitions, replication_factor=1, config=config)
    admin.create_topics([new], operation_timeout=30)[topic].result(timeout=30)

    def visible() -> bool:
        info = admin.list_topics(topic, timeout=10).topics.get(topic)
        return info is not None and info.error is None and bool(info.partitions)

    wait_until(visible, timeout=30, what=f"{topic} in metadata")


class BoundConsumer:
    """``mtc75.Consumer.from_settings`` with the run's bounds given up front, as the tests' scenarios read:
    ``run()`` takes no arguments. ``factories``: client factories of the test's own (through mtc75.testing)."""

    def __init__(self, settings: Any, handler: Callable[[Any], object], *, overrides: Any = None,
                 max_messages: int | None = None, idle_exit: float | None = None,
                 on_status: Callable[[Any], None] | None = None, status_interval: float = 1.0,
                 factories: Any = None) -> None:
        import mtc75
        from mtc75 import testing

        kw = {"librdkafka": overrides, "on_status": on_status, "status_interval": status_interval}
        self.consumer = (mtc75.Consumer.from_settings(handler, settings, **kw) if factories is None
                         else testing.from_settings(factories, handler, settings, **kw))
        self._bounds = {"max_messages": max_messages, "idle_exit": idle_exit}

    def run(self) -> Any:
        return self.consumer.run(**self._bounds)

    def stop(self) -> None:
        self.consumer.stop()

    def stats(self) -> Any:
        return self.consumer.stats()

    def retune(self, **changes: Any) -> None:
        self.consumer.retune(**changes)
