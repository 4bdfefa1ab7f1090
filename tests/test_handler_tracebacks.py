"""A failing handler's traceback reaches the log (issue 22, item 7): at DEBUG (``-v``) every attempt's
traceback, reaching into the handler's own code, for every handler kind -- a plain function, one whose
messages travel as runs, an ``async def`` one -- on a retry and on the last attempt; at the default
level its exception type and message, without a traceback. It was ``NoneType: None``: the log call ran
outside the ``except`` that caught the error."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mtc75 import testing
from mtc75.app.cli import setup_logging
from mtc75.runtime import dispatcher as dispatcher_module
from mtc75.runtime import pacing
from mtc75.settings import LIBRDKAFKA_LOGGER
from tests import failing_handlers
from tests.fake_kafka import FakeKafka
from tests.kafka_helpers import produce_numbered, report_figures, run_script, script_env

pytestmark = pytest.mark.timeout(120)

TOPIC, GROUP = "orders", "billing"
# kind -> (handler, messages per partition, failing offsets): the chunk kind fails late, once chunks formed
KINDS: dict[str, tuple[Callable[[Any], object], int, set[int]]] = {
    "sync": (failing_handlers.handle, 10, {3, 7}),
    "sync, inside a chunk": (failing_handlers.handle, 3000, {1500, 2000, 2500, 2900}),
    "async def": (failing_handlers.handle_async, 10, {3, 7}),
}


def _failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == dispatcher_module.__name__ and "handler failed" in r.getMessage()]


def _traceback(record: logging.LogRecord) -> str:
    return logging.Formatter().formatException(record.exc_info) if record.exc_info else ""


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO], ids=["debug", "info"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_handler_kind_logs_its_traceback_at_debug_and_its_error_at_info(
    kind: str, level: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library user's view (no broker): mtc75.Consumer against the in-memory Kafka, logging at ``level``."""
    handler, per_partition, fail = KINDS[kind]
    monkeypatch.setattr(failing_handlers, "FAIL", fail)
    monkeypatch.setattr(pacing, "FAST_HANDLER", 0.01)  # chunks form even on a loaded machine
    cluster = FakeKafka()
    cluster.create_topic(TOPIC, 2)
    cluster.fill(TOPIC, {0: per_partition, 1: per_partition})
    consumer = testing.consumer(cluster.factories(), handler, topic=TOPIC, group_id=GROUP, max_attempts=2,
                                retry_backoff=0.0, on_failure="skip", commit_interval=0.02)
    with caplog.at_level(level):
        stats = consumer.run(max_messages=2 * per_partition)
    assert stats.failed == 2 * len(fail)
    records = _failures(caplog)
    assert len(records) == 2 * stats.failed  # a retry and the last attempt each
    assert {r.levelno for r in records} == {logging.WARNING, logging.ERROR}
    for record in records:
        assert re.search(r"ValueError: card declined for offset \d+", record.getMessage()), record.getMessage()
    if level == logging.INFO:
        assert not any(r.exc_info for r in records)
        assert "Traceback" not in caplog.text
        return
    tracebacks = [_traceback(r) for r in records]
    for text in tracebacks:
        assert text.startswith("Traceback (most recent call last)"), text
        assert "in _charge" in text and "raise ValueError(f\"card declined" in text, text
    assert "NoneType: None" not in caplog.text
    # the traceback starts where the one handler path caught it, and goes down to the handler's raise
    assert all("mtc75/runtime/invoker.py" in text for text in tracebacks), tracebacks


def test_a_failure_inside_a_chunk_logs_its_traceback_on_the_retry_and_the_last_attempt(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk path for certain (the dispatcher told the handler is fast, so it hands out chunks)."""
    from mtc75.core.offsets import OffsetTracker
    from mtc75.core.ordering import FairFifoScheduler
    from mtc75.core.retry import RetryPolicy
    from mtc75.runtime.invoker import Invoker
    from tests.kafka_helpers import wait_until
    from tests.test_chunks import _drain, _fast, _run

    monkeypatch.setattr(failing_handlers, "FAIL", {30})
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    d = dispatcher_module.Dispatcher(Invoker(failing_handlers.handle), 1,
                                     RetryPolicy(max_attempts=2, base=0.0, cap=0.0), scheduler=FairFifoScheduler())
    _fast(d)
    done: list[Any] = []
    with caplog.at_level(logging.DEBUG):
        d.put([_run(tracker, 0, 0, 40)])

        def finished() -> bool:
            d.release_due()
            _drain(d, tracker, done)
            return sum(w.size for w in done) == 40

        wait_until(finished, 10)
        d.shutdown(wait=True)
    records = _failures(caplog)
    assert [r.levelno for r in records] == [logging.WARNING, logging.ERROR]
    first, last = (_traceback(r) for r in records)
    assert "invoker.py" in first and "in _charge" in first  # attempt 1: inside its chunk
    assert "in _charge" in last  # attempt 2: alone, and still its own traceback


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level, LIBRDKAFKA_LOGGER.level
    yield
    root.handlers[:], level, rdkafka = saved
    root.setLevel(level)
    LIBRDKAFKA_LOGGER.setLevel(rdkafka)


@pytest.mark.usefixtures("restore_logging")
def test_v_is_debug_and_vv_adds_librdkafkas_own_log() -> None:
    root = logging.getLogger()
    seen = {}
    for verbose, quiet in ((0, False), (1, False), (2, False), (1, True)):
        setup_logging(verbose, quiet)
        seen[(verbose, quiet)] = (root.level, LIBRDKAFKA_LOGGER.level)
    assert seen == {
        (0, False): (logging.INFO, logging.CRITICAL),
        (1, False): (logging.DEBUG, logging.CRITICAL),  # -v: debug, handler tracebacks included
        (2, False): (logging.DEBUG, logging.DEBUG),  # -vv: librdkafka's own log too
        (1, True): (logging.WARNING, logging.CRITICAL),  # -q wins
    }


# -- the script against a real broker -----------------------------------------------------------------------


@pytest.mark.parametrize("handler", ["handle", "handle_async"])
def test_the_script_shows_a_failing_handlers_traceback_at_v_and_its_error_line_by_default(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], handler: str
) -> None:
    topic = make_topic(partitions=1)
    produce_numbered(bootstrap, topic, 20)
    env = script_env(bootstrap, MTC75_TEST_FAIL="3,7")
    figures: dict[str, dict[str, int]] = {}
    for flags in ([], ["-v"], ["-vv"]):
        result = run_script(
            "mtc75_consumer.py", "--topic", topic, "--group-id", unique("g" + "".join(flags)), "--handler",
            f"tests.failing_handlers:{handler}", "--max-attempts", "2", "--retry-backoff", "0.01",
            "--on-failure", "skip", "--max-messages", "20", "--no-reload", *flags, env=env, timeout=90,
        )
        err = result.stderr
        assert result.returncode == 0, err[-3000:]
        failed = [line for line in err.splitlines() if "handler failed for" in line]
        shown = {"failure lines": len(failed), "tracebacks": err.count("Traceback (most recent call last)"),
                 "handler frames": err.count(", in _charge"), "NoneType: None": err.count("NoneType: None")}
        figures[" ".join(flags) or "default"] = shown
        assert len(failed) == 4, err[-3000:]  # offsets 3 and 7, two attempts each
        assert all("ValueError: card declined for offset" in line for line in failed), failed
        if flags:
            assert shown["tracebacks"] == shown["handler frames"] == 4 and shown["NoneType: None"] == 0, err[-3000:]
        else:
            assert shown["tracebacks"] == 0 and shown["NoneType: None"] == 0, err[-3000:]
    report_figures("handler_tracebacks", handler=handler,
                   failure_lines=[figures[level]["failure lines"] for level in ("default", "-v", "-vv")],
                   tracebacks=[figures[level]["tracebacks"] for level in ("default", "-v", "-vv")],
                   handler_frames=[figures[level]["handler frames"] for level in ("default", "-v", "-vv")],
                   nonetype_lines=sum(figures[level]["NoneType: None"] for level in figures))
