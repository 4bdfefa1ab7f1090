"""Live re-tuning without a broker: what changed, what is applied, and a bad edit keeps the old values."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from mtc75.app.reload import LIVE_SETTINGS, ConfigWatcher, diff
from mtc75.errors import ConfigError
from mtc75.settings import Settings, load_settings

BASE = "MAX_THREAD_COUNT = 4\nPAUSE_INTERVAL = 0.5\nPROCESSING_SLEEP = 0.2\n"


def _write(path: Path, text: str) -> None:
    """Write and move the mtime forward, so the change is seen even on a coarse-clock file system."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10_000_000, before + 10_000_000))


def _watcher(
    tmp_path: Path, flags: dict[str, Any] | None = None, interval: float = 0.5
) -> tuple[ConfigWatcher, list[dict[str, Any]]]:
    path = tmp_path / "config.py"
    _write(path, BASE)
    applied: list[dict[str, Any]] = []

    def load() -> Settings:
        return load_settings(path, env={}, flags=flags or {})

    return ConfigWatcher(path, load(), load, applied.append, interval=interval), applied


def test_diff_separates_live_settings_from_restart_ones() -> None:
    old = Settings()
    new = old.replace(MAX_THREAD_COUNT=8, PROCESSING_SLEEP=0.1, TOPIC="other")
    live, restart = diff(old, new)
    assert live == {"MAX_THREAD_COUNT": 8, "PROCESSING_SLEEP": 0.1}
    assert restart == ["TOPIC"]
    assert diff(old, old) == ({}, [])
    assert set(LIVE_SETTINGS) == {"MAX_THREAD_COUNT", "PAUSE_INTERVAL", "PROCESSING_SLEEP", "MAX_RATE", "KEY_RATE",
                                  "RATE_BURST"}


def test_saved_change_is_applied_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher, applied = _watcher(tmp_path)
    assert watcher.check() is False and applied == []  # nothing changed yet
    _write(watcher.path, BASE.replace("MAX_THREAD_COUNT = 4", "MAX_THREAD_COUNT = 9").replace("0.5", "1.5"))
    with caplog.at_level(logging.INFO):
        assert watcher.check() is True
    assert applied == [{"MAX_THREAD_COUNT": 9, "PAUSE_INTERVAL": 1.5}]
    assert watcher.current.MAX_THREAD_COUNT == 9 and watcher.current.PAUSE_INTERVAL == 1.5
    assert "MAX_THREAD_COUNT 4 -> 9" in caplog.text
    assert watcher.check() is False and len(applied) == 1  # same file: not applied again


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (BASE + "MAX_THREAD_COUNT = = 3\n", "syntax error"),
        (BASE.replace("= 4", "= 0"), "invalid MAX_THREAD_COUNT=0"),
        (BASE.replace("= 0.2", "= 'slow'"), "invalid PROCESSING_SLEEP='slow'"),
        (BASE + "MAX_THREADS = 3\n", "unknown setting MAX_THREADS"),
    ],
)
def test_bad_edit_is_one_error_line_and_keeps_the_running_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, fragment: str
) -> None:
    watcher, applied = _watcher(tmp_path)
    _write(watcher.path, text)
    with caplog.at_level(logging.INFO, logger="mtc75.app.reload"):
        assert watcher.check() is False
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert fragment in errors[0].getMessage() and "keeping the running values" in errors[0].getMessage()
    assert applied == [] and watcher.current.MAX_THREAD_COUNT == 4
    _write(watcher.path, BASE.replace("= 4", "= 6"))  # fixed: applied from the good file
    assert watcher.check() is True and applied == [{"MAX_THREAD_COUNT": 6}]


def test_a_flag_still_wins_over_the_edited_file(tmp_path: Path) -> None:
    watcher, applied = _watcher(tmp_path, flags={"MAX_THREAD_COUNT": "4"})
    _write(watcher.path, BASE.replace("= 4", "= 12"))
    assert watcher.check() is False and applied == []


def test_other_settings_are_named_for_a_restart_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher, applied = _watcher(tmp_path)
    _write(watcher.path, BASE + "TOPIC = 'elsewhere'\n")
    with caplog.at_level(logging.WARNING, logger="mtc75.app.reload"):
        assert watcher.check() is False
        _write(watcher.path, BASE + "TOPIC = 'elsewhere'\n# touched\n")
        watcher.check()
    restarts = [r.getMessage() for r in caplog.records if "restart to apply" in r.getMessage()]
    assert len(restarts) == 1 and "TOPIC" in restarts[0]
    assert applied == []


def test_a_rejected_apply_keeps_the_running_values(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config.py"
    _write(path, BASE)

    def load() -> Settings:
        return load_settings(path, env={})

    def refuse(_changes: dict[str, Any]) -> None:
        raise ConfigError("not now")

    watcher = ConfigWatcher(path, load(), load, refuse)
    _write(path, BASE.replace("= 4", "= 5"))
    assert watcher.check() is False
    assert "not applied: not now" in caplog.text and watcher.current.MAX_THREAD_COUNT == 4


def test_thread_applies_a_change_and_stops(tmp_path: Path) -> None:
    from tests.kafka_helpers import wait_until

    watcher, applied = _watcher(tmp_path, interval=0.05)
    watcher.start()
    try:
        _write(watcher.path, BASE.replace("= 4", "= 7"))
        wait_until(lambda: applied == [{"MAX_THREAD_COUNT": 7}], timeout=10, what="change applied")
    finally:
        watcher.close()
    assert watcher._thread is None


def test_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval must be > 0, got 0"):
        ConfigWatcher(tmp_path / "c.py", Settings(), Settings, lambda _c: None, interval=0)
