"""The library API (``import mtc75``): settings checks, run / start / close / with / stop / stats.

Most tests run against the in-memory fake (tests/fake_kafka.py); the docs' examples run as a
program against the real broker.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError

import mtc75
from mtc75 import testing
from mtc75.settings import Settings
from tests.api_helpers import GROUP, TOPIC, WAIT, make, new_cluster
from tests.fake_kafka import FakeKafka
from tests.kafka_helpers import ROOT, committed_offsets, end_offsets, produce_numbered, wait_until

pytestmark = pytest.mark.timeout(120)

cluster = pytest.fixture(name="cluster")(new_cluster)


def test_the_package_exports_its_api() -> None:
    assert set(mtc75.__all__) >= {"Consumer", "Stats", "Mtc75Error", "ConfigError", "KafkaUnavailable",
                                  "BrokerUnreachable", "TopicNotFound", "TopicGone", "KafkaFatalError",
                                  "MessageFailed", "HandlerRefused", "OffsetOutOfRange"}
    assert all(hasattr(mtc75, name) for name in mtc75.__all__)
    assert issubclass(mtc75.TopicNotFound, mtc75.KafkaUnavailable) and issubclass(mtc75.ConfigError, mtc75.Mtc75Error)
    # the exit codes the scripts use (docs/exit-codes.md)
    codes = {name: getattr(mtc75, name).exit_code for name in (
        "ConfigError", "HandlerRefused", "KafkaUnavailable", "BrokerUnreachable", "TopicNotFound", "TopicGone",
        "MessageFailed", "KafkaFatalError", "OffsetOutOfRange")}
    assert codes == {"ConfigError": 2, "HandlerRefused": 2, "KafkaUnavailable": 3, "BrokerUnreachable": 3,
                     "TopicNotFound": 3, "TopicGone": 3, "MessageFailed": 5, "KafkaFatalError": 6,
                     "OffsetOutOfRange": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_thread_count": 0}, "invalid MAX_THREAD_COUNT=0 (from keyword max_thread_count): must be >= 1"),
        ({"on_failure": "ignore"}, "must be one of dlq, skip, stop"),
        ({"pause_interval": "soon"}, "invalid PAUSE_INTERVAL='soon' (from keyword pause_interval): must be a number"),
        ({"max_threads": 4}, "unknown setting 'max_threads'"),
        ({"MAX_BACKLOG": 4}, "unknown setting 'MAX_BACKLOG'"),
        ({"producer_rate": 5}, "'producer_rate' is not a consumer setting"),
        ({"librdkafka": {"enable.auto.commit": "true"}}, "enable.auto.commit=true is not supported"),
        ({"librdkafka": ["fetch.wait.max.ms=5"]}, "must be a dict of librdkafka properties"),
        ({"group_id": "  "}, "invalid GROUP_ID='  ' (from keyword group_id): must not be empty"),
    ],
)
def test_bad_settings_are_config_errors_before_anything_connects(
    cluster: FakeKafka, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(mtc75.ConfigError) as caught:
        make(cluster, **kwargs)
    assert message in str(caught.value)
    assert cluster.consumers == []


def test_a_handler_that_cannot_work_is_refused(cluster: FakeKafka) -> None:
    async def handle(message: Any) -> Any:
        yield message

    class AsyncGenCallable:
        async def __call__(self, message: Any) -> Any:
            yield message

    for bad, message in [(handle, "async generator"), (AsyncGenCallable(), "async generator"),
                         (42, "must be callable")]:
        with pytest.raises(mtc75.ConfigError, match=message):
            make(cluster, handler=bad)  # type: ignore[arg-type]


def test_an_async_handler_is_taken_the_same_way(cluster: FakeKafka) -> None:
    cluster.fill(TOPIC, {0: 3, 1: 3})
    seen: list[int] = []

    async def handle(message: Any) -> None:
        await asyncio.sleep(0.001)
        seen.append(message.offset())

    stats = make(cluster, handler=handle, max_thread_count=3).run(max_messages=6)
    assert sorted(seen) == [0, 0, 1, 1, 2, 2] and stats.processed == 6
    assert stats.workers == "coroutines" and stats.max_active_threads <= 3


def test_run_blocks_and_returns_the_final_stats_without_printing(
    cluster: FakeKafka, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.fill(TOPIC, {0: 6, 1: 4})
    seen: list[int] = []
    consumer = make(cluster, handler=lambda m: seen.append(m.offset()), max_thread_count=3, on_failure="skip")
    assert consumer.stats().processed == 0 and consumer.stats().max_thread_count == 3
    stats = consumer.run(max_messages=10)
    assert isinstance(stats, mtc75.Stats) and stats.processed == 10 and len(seen) == 10
    assert consumer.stats() == stats
    assert (cluster.committed(GROUP, TOPIC, 0), cluster.committed(GROUP, TOPIC, 1)) == (6, 4)
    assert capsys.readouterr() == ("", "")  # a library prints nothing
    with pytest.raises(RuntimeError, match="already run"):
        consumer.run()


@pytest.mark.parametrize(("kwargs", "message"), [({"max_messages": 0}, "max_messages"),
                                                 ({"idle_exit": -1}, "idle_exit"),
                                                 ({"max_messages": True}, "max_messages")])
def test_bad_run_arguments_are_config_errors(cluster: FakeKafka, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(mtc75.ConfigError, match=message):
        make(cluster).run(**kwargs)


def test_from_settings_runs_a_whole_settings_and_lingering_tells_of_an_abandoned_handler(cluster: FakeKafka) -> None:
    cluster.fill(TOPIC, {0: 3})
    release = threading.Event()
    statuses: list[mtc75.Stats] = []

    def handler(message: Any) -> None:
        if message.offset() == 1:
            release.wait(WAIT)  # still running when the run gives up on it

    settings = Settings().replace(TOPIC=TOPIC, GROUP_ID=GROUP, SHUTDOWN_TIMEOUT=0.2, COMMIT_INTERVAL=0.02,
                                  OFFSET_WINDOW=50)
    consumer = testing.from_settings(cluster.factories(), handler, settings,
                                     on_status=statuses.append, status_interval=0.05)
    assert not consumer.lingering  # nothing ran yet
    try:
        # idle counts from the last finish: 1 s lets a loaded machine run offset 2 before it ends the run
        stats = consumer.run(idle_exit=1.0)
        assert stats.processed == 2 and stats.abandoned == 1 and consumer.lingering
        assert statuses and cluster.committed(GROUP, TOPIC, 0) == 1
    finally:
        release.set()
    with pytest.raises(mtc75.ConfigError, match="offset_window"):
        mtc75.Consumer(handler, topic=TOPIC, group_id=GROUP, offset_window=-1)


def test_start_runs_in_the_background_stats_move_and_close_commits(cluster: FakeKafka) -> None:
    release = threading.Event()
    consumer = make(cluster, handler=lambda m: release.wait(WAIT))
    consumer.start()
    cluster.fill(TOPIC, {0: 3})
    wait_until(lambda: consumer.stats().active_threads == 3, WAIT, step=0.01, what="three handlers running")
    release.set()
    wait_until(lambda: consumer.stats().processed == 3, WAIT, step=0.01, what="stats() to show 3 processed")
    stats = consumer.close(timeout=WAIT)
    assert stats.processed == 3 and cluster.committed(GROUP, TOPIC, 0) == 3
    assert cluster.consumer().closed


def test_with_block_starts_and_closes(cluster: FakeKafka) -> None:
    cluster.fill(TOPIC, {1: 5})
    with make(cluster) as consumer:
        wait_until(lambda: cluster.committed(GROUP, TOPIC, 1) == 5, WAIT, step=0.01, what="5 committed")
    assert cluster.consumer().closed and consumer.stats().processed == 5


def test_close_raises_the_background_failure_as_its_typed_error(cluster: FakeKafka) -> None:
    cluster.fill(TOPIC, {0: 3})
    # offset 1 divides by zero
    consumer = make(cluster, handler=lambda m: 1 / (m.offset() - 1), on_failure="stop", max_attempts=1)
    consumer.start()
    wait_until(lambda: cluster.consumer().closed, WAIT, step=0.01, what="the run to end by itself")
    with pytest.raises(mtc75.MessageFailed, match=r"orders\[0\]@1 failed 1 attempts \(ZeroDivisionError"):
        consumer.close(timeout=WAIT)
    assert cluster.committed(GROUP, TOPIC, 0) == 1
    assert consumer.close(timeout=WAIT).processed == consumer.stats().processed  # raised once


def test_a_failure_in_the_with_block_is_kept_and_the_close_failure_noted(cluster: FakeKafka) -> None:
    cluster.unreachable = True
    with pytest.raises(KeyError) as caught, make(cluster):
        wait_until(lambda: bool(cluster.consumers) and cluster.consumers[0].closed, WAIT, step=0.01,
                   what="the run to fail")
        raise KeyError("the body's own error")
    assert any("closing the MTC75 consumer failed too: BrokerUnreachable: cannot reach Kafka" in note
               for note in caught.value.__notes__)
    with pytest.raises(mtc75.TopicNotFound, match=r"topic 'orders\.missing' does not exist"), \
            testing.consumer(FakeKafka().factories(), print, topic="orders.missing", group_id=GROUP):
        pass


def test_stop_from_another_thread_and_from_a_signal_handler(cluster: FakeKafka) -> None:
    cluster.fill(TOPIC, {0: 2})
    consumer = make(cluster)
    stopper = threading.Thread(target=lambda: (wait_until(lambda: consumer.stats().processed == 2, WAIT, 0.01),
                                               consumer.stop()))
    stopper.start()
    assert consumer.run().processed == 2  # returned because of stop(); no max_messages, no idle_exit
    stopper.join(WAIT)

    second = make(cluster)
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: second.stop())
    try:
        sender = threading.Thread(target=lambda: (wait_until(lambda: cluster.consumers[-1:] != [] and
                                                             len(cluster.consumers) == 2, WAIT, 0.01),
                                                  os.kill(os.getpid(), signal.SIGUSR1)))
        sender.start()
        started = time.monotonic()
        assert second.run().processed == 0  # the group's offsets are committed: nothing new to do
        assert time.monotonic() - started < WAIT
        sender.join(WAIT)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_stop_before_run_returns_at_once_without_connecting(cluster: FakeKafka) -> None:
    consumer = make(cluster)
    consumer.stop()
    assert consumer.run().processed == 0
    assert cluster.consumers == []


def test_on_status_and_retune(cluster: FakeKafka) -> None:
    seen: list[mtc75.Stats] = []
    release = threading.Event()
    consumer = make(cluster, handler=lambda m: release.wait(WAIT), max_thread_count=1, on_status=seen.append,
                    status_interval=0.05)
    consumer.retune(max_thread_count=2)  # before the run: becomes its setting
    consumer.start()
    cluster.fill(TOPIC, {0: 6})
    wait_until(lambda: consumer.stats().active_threads == 2, WAIT, step=0.01, what="two threads busy")
    consumer.retune(max_thread_count=4)
    wait_until(lambda: consumer.stats().active_threads == 4, WAIT, step=0.01, what="four threads busy")
    release.set()
    consumer.close(timeout=WAIT)
    assert seen and all(isinstance(s, mtc75.Stats) for s in seen)
    assert max(s.max_thread_count for s in seen) == 4
    with pytest.raises(mtc75.ConfigError, match="MAX_THREAD_COUNT"):
        consumer.retune(max_thread_count=0)


def test_a_fatal_kafka_error_ends_a_background_run_as_kafka_fatal_error(cluster: FakeKafka) -> None:
    consumer = make(cluster)
    consumer.start()
    cluster.consumer()
    cluster.client_error(KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    wait_until(lambda: cluster.consumer().closed, WAIT, step=0.01, what="the run to end")
    with pytest.raises(mtc75.KafkaFatalError, match="fatal Kafka error: fenced"):
        consumer.close(timeout=WAIT)


# -- the docs' examples (README's 20 lines, the library guide's), as programs, against the real broker ---------


def docs_example(document: str) -> str:
    text = (ROOT / document).read_text()
    marker = "<!-- tests/test_api.py runs the next block against a real broker: keep it complete. -->"
    assert marker in text
    block = re.search(r"```python\n(.*?)```", text[text.index(marker):], re.S)
    assert block is not None
    return block.group(1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("document", ["README.md", "docs/library.md"])
def test_the_docs_library_examples_run_against_the_broker(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], document: str
) -> None:
    topic, group = make_topic(3, "api"), unique("api-billing")
    produce_numbered(bootstrap, topic, 30)
    code = docs_example(document)
    for literal, value in (('"orders"', topic), ('"billing"', group), ('"127.0.0.1:9092"', bootstrap)):
        assert literal in code  # the example still shows the values this test replaces
        code = code.replace(literal, repr(value))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTC75_", "KAFKA_"))}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the example logs; the library prints nothing of its own
    lines = result.stderr.splitlines()
    handled = sorted(int(m.group(1)) for line in lines if (m := re.search(r" order (\d+) from partition \d$", line)))
    assert handled == list(range(30))  # each order once
    assert re.search(r" handled 30 orders \(0 failed\) in \d+\.\ds$", lines[-1])
    assert any("consuming " + topic in line for line in lines)  # the engine's own records reach the app's logging
    assert committed_offsets(bootstrap, group, topic) == end_offsets(bootstrap, topic)
