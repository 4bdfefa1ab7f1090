"""kafka/client.py without a broker: offset resets noticed in librdkafka's log, AUTO_OFFSET_RESET=error classified.

The log lines are librdkafka 2.16's own wording, captured from a real broker (tests/test_left_behind.py
checks the whole path against one).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from confluent_kafka import KafkaError

from mtc75.core.subscription import Subscription
from mtc75.kafka.client import ErrorKind, KafkaClient, OffsetReset, ResetLog, classify

NAME = "rdkafka#consumer-1"
RESET_TO_START = ("[thrd:main]: orders [3]: offset reset (at offset 5 (leader epoch -1), broker 2) to offset BEGINNING "
                  "(leader epoch -1): fetch failed due to requested offset not available on the broker: Broker: "
                  "Offset out of range")
RESET_TO_CACHED = ("[thrd:main]: orders [0]: offset reset (at offset 7 (leader epoch 0), broker 1) to cached BEGINNING "
                   "offset offset 150 (leader epoch -1): fetch failed due to requested offset not available on the "
                   "broker: Broker: Offset out of range")


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def log(self, level: int, fmt: str, *args: Any) -> None:
        self.lines.append((level, fmt % args))


def test_the_reset_log_notes_resets_and_passes_every_line_on() -> None:
    inner = Recorder()
    log = ResetLog(inner)
    log.log(logging.WARNING, "%s [%s] %s", "OFFSET", NAME, RESET_TO_START)
    log.log(logging.WARNING, "%s [%s] %s", "OFFSET", NAME, RESET_TO_CACHED)
    log.log(logging.DEBUG, "%s [%s] %s", "OFFSET", NAME, RESET_TO_START)  # a new group's reset: debug only
    log.log(logging.WARNING, "%s [%s] %s", "FAIL", NAME, "127.0.0.1:9092/1: Connect failed")
    assert log.resets == [OffsetReset(("orders", 3), 5, "BEGINNING"), OffsetReset(("orders", 0), 7, "150")]
    assert len(inner.lines) == 4 and inner.lines[0] == (logging.WARNING, f"OFFSET [{NAME}] {RESET_TO_START}")


class Watermarks:
    """The consumer calls report_resets makes: watermarks of one partition."""

    def __init__(self, low: int, high: int) -> None:
        self.marks = (low, high)
        self.consume = self.poll = None  # KafkaClient binds them; never called here

    def get_watermark_offsets(self, tp: Any, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        return self.marks


@pytest.mark.parametrize(("to", "expected"), [
    ("BEGINNING", "to the log start, offset 10 (5 offsets skipped, never handled by this group)"),
    ("END", "to the log end, offset 68 (63 offsets skipped, never handled by this group)"),
    ("150", "to the log start, offset 150 (145 offsets skipped, never handled by this group)"),
])
def test_each_reset_is_one_warning_from_where_to_where(to: str, expected: str, caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    log = ResetLog(None)
    client = KafkaClient(Watermarks(10, 68), Subscription(("orders",)), cooperative=False, log=log)  # type: ignore[arg-type]
    log.resets.append(OffsetReset(("orders", 3), 5, to))
    with caplog.at_level(logging.WARNING, logger="mtc75.kafka.client"):
        client.report_resets()
        client.report_resets()  # said once
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"orders[3]: offset 5 was out of range (records deleted or expired, or the log truncated): "
                     f"AUTO_OFFSET_RESET moved the position {expected}"]


def test_auto_offset_reset_error_is_its_own_kind() -> None:
    assert classify(KafkaError(KafkaError._AUTO_OFFSET_RESET)) is ErrorKind.OUT_OF_RANGE
    assert classify(KafkaError(KafkaError.OFFSET_OUT_OF_RANGE)) is ErrorKind.TRANSIENT  # librdkafka resets those


def test_the_error_line_names_the_partition_the_offset_and_what_the_log_holds() -> None:
    client = KafkaClient(Watermarks(10, 68), Subscription(("orders",)), cooperative=False)  # type: ignore[arg-type]
    text = client.out_of_range("orders", 0, 5)
    assert text.startswith("orders[0]: offset 5 is out of range (the log holds offsets 10 to 67")
    assert "AUTO_OFFSET_RESET=error" in text
    assert client.out_of_range("orders", 1, -1001).startswith("orders[1]: the group has no committed offset and")
    assert client.out_of_range("orders", 1, None).startswith("orders[1]: the group has no committed offset and")
