"""The default handler without a broker: malformed payloads raise a clear error, good ones pass."""

from __future__ import annotations

import json

import pytest

from mtc75.runtime.handlers import MalformedMessage, SimulatedWork


class Msg:
    def __init__(self, value: bytes | None) -> None:
        self._value = value

    def value(self) -> bytes | None:
        return self._value

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 7


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
        handler(Msg(value))


def test_good_payloads_pass() -> None:
    handler = SimulatedWork(0.0, max_payload_bytes=100)
    handler(Msg(b'{"id": 1, "name": "x"}'))
    handler(Msg(b"[1, 2]"))
    with pytest.raises(ValueError, match="max_payload_bytes must be >= 1"):
        SimulatedWork(0.0, max_payload_bytes=0)
