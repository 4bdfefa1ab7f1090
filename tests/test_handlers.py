"""The default handler without a broker: malformed payloads raise a clear error, good ones pass."""

from __future__ import annotations

import json
import logging

import pytest

from mtc75.runtime import handlers as handlers_module
from mtc75.runtime.handlers import MalformedMessage, SimulatedWork
from tests.fake_kafka import FakeMessage


def _message(value: bytes | None) -> FakeMessage:
    return FakeMessage("t", 0, 7, value)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (None, "empty payload"),
        (b"", "empty payload"),
        (b"not json {", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (json.dumps({"pad": "x" * 200}).encode(), "exceeds MAX_PAYLOAD_BYTES=100"),
    ],
)
def test_malformed_payloads_raise_a_clear_error(value: bytes | None, fragment: str) -> None:
    handler = SimulatedWork(0.0, max_payload_bytes=100)
    with pytest.raises(MalformedMessage, match=fragment):
        handler(_message(value))


def test_good_payloads_do_the_work_and_are_logged_within_the_line_rate(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(handlers_module.time, "sleep", slept.append)  # the "work": recorded, not waited
    caplog.set_level(logging.INFO, logger="mtc75.runtime.handlers")
    at_the_bound = json.dumps({"pad": "x" * (100 - 11)}).encode()
    assert len(at_the_bound) == 100
    good = [b'{"id": 1, "name": "x"}', b"[1, 2]", at_the_bound]  # 100 bytes: not over the bound

    def lines() -> list[str]:
        return [r.getMessage().split(" handled ", 1)[1] for r in caplog.records]

    every = SimulatedWork(0.25, lines_per_second=1e9, max_payload_bytes=100)
    for value in good:
        assert every(_message(value)) is None
    assert slept == [0.25, 0.25, 0.25]  # PROCESSING_SLEEP per message
    assert lines() == ["t[0]@7 id=1 name='x'", "t[0]@7 (list)", "t[0]@7 id=None name=None"]
    caplog.clear()
    first_only = SimulatedWork(0.0, lines_per_second=0, max_payload_bytes=100)  # 0: one line, then none
    for value in good:
        first_only(_message(value))
    assert lines() == ["t[0]@7 id=1 name='x'"]
    assert slept == [0.25, 0.25, 0.25]  # no sleep of 0
    with pytest.raises(ValueError, match="max_payload_bytes must be >= 1"):
        SimulatedWork(0.0, max_payload_bytes=0)
