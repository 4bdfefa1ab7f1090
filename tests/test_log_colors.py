"""The CLI's log colours follow the records' structure (level, the engine's ``mtc75_event``), never their text."""

from __future__ import annotations

import logging

import pytest
from termcolor import colored

from mtc75.app.cli import _ColorFormatter
from mtc75.engine.backpressure import PAUSE_EVENT, RESUME_EVENT


@pytest.fixture(autouse=True)
def _colours_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """termcolor colours only a terminal unless told otherwise; pytest's output is not one."""
    for name in ("NO_COLOR", "ANSI_COLORS_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")


def _prefix(color: str, bold: bool = False) -> str:
    """The escape codes termcolor puts before a text in ``color``."""
    prefix = colored("X", color, attrs=["bold"] if bold else None).split("X")[0]
    assert prefix.startswith("\x1b[")  # colours really are on: the checks below can fail
    return prefix


def _record(level: int, text: str, extra: dict[str, str] | None = None) -> logging.LogRecord:
    record = logging.LogRecord("mtc75.engine.backpressure", level, __file__, 1, text, None, None)
    for key, value in (extra or {}).items():
        setattr(record, key, value)  # what logger.warning(..., extra=...) does
    return record


def test_pause_and_resume_events_are_bold_red_and_green_whatever_they_say() -> None:
    fmt = _ColorFormatter(color=True)
    assert fmt.format(_record(logging.WARNING, "any wording", PAUSE_EVENT)).startswith(_prefix("red", bold=True))
    assert fmt.format(_record(logging.WARNING, "any wording", RESUME_EVENT)).startswith(_prefix("green", bold=True))


def test_a_line_that_only_reads_like_a_pause_is_coloured_by_its_level() -> None:
    fmt = _ColorFormatter(color=True)
    assert "\x1b[" not in fmt.format(_record(logging.INFO, "PAUSED 3 partitions"))  # info: no colour
    assert fmt.format(_record(logging.WARNING, "RESUMED, says a handler")).startswith(_prefix("yellow"))


def test_no_colour_without_a_terminal() -> None:
    assert "\x1b[" not in _ColorFormatter(color=False).format(_record(logging.WARNING, "x", PAUSE_EVENT))
