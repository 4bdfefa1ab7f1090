"""Live re-tuning without a broker: what changed, what is applied, and a bad edit keeps the old values."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mtc75.app.reload import LIVE_SETTINGS, ConfigWatcher, diff, read_isolated
from mtc75.errors import ConfigError
from mtc75.settings import Settings, load_settings

BASE = "MAX_THREAD_COUNT = 4\nPAUSE_INTERVAL = 0.5\nPROCESSING_SLEEP = 0.2\n"


def _write(path: Path, text: str) -> None:
    """Write and move the mtime forward, so the change is seen even on a coarse-clock file system."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10_000_000, before + 10_000_000))


def _watcher(
    tmp_path: Path, flags: dict[str, Any] | None = None, interval: float = 0.5,
    read: Callable[[Path], tuple[dict[str, Any], set[str]]] | None = read_isolated,
) -> tuple[ConfigWatcher, list[dict[str, Any]]]:
    path = tmp_path / "config.py"
    _write(path, BASE)
    applied: list[dict[str, Any]] = []

    def load(values: Any) -> Settings:
        return load_settings(path, env={}, flags=flags or {}, file_values=values)

    return ConfigWatcher(path, load_settings(path, env={}, flags=flags or {}), load, applied.append,
                         interval=interval, read=read), applied


def test_diff_separates_live_settings_from_restart_ones() -> None:
    old = Settings()
    new = old.replace(MAX_THREAD_COUNT=8, PROCESSING_SLEEP=0.1, TOPIC="other")
    live, restart = diff(old, new)
    assert live == {"MAX_THREAD_COUNT": 8, "PROCESSING_SLEEP": 0.1}
    assert restart == ["TOPIC"]
    assert diff(old, old) == ({}, [])
    assert set(LIVE_SETTINGS) == {"MAX_THREAD_COUNT", "PAUSE_INTERVAL", "PROCESSING_SLEEP", "MAX_RATE", "KEY_RATE",
                                  "RATE_BURST", "BATCH_SIZE", "BATCH_WAIT"}


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
def test_bad_edit_is_one_warning_line_and_keeps_the_running_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, fragment: str
) -> None:
    watcher, applied = _watcher(tmp_path)
    _write(watcher.path, text)
    with caplog.at_level(logging.INFO, logger="mtc75.app.reload"):
        assert watcher.check() is False
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
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

    def load(values: Any) -> Settings:
        return load_settings(path, env={}, file_values=values)

    def refuse(_changes: dict[str, Any]) -> None:
        raise ConfigError("not now")

    watcher = ConfigWatcher(path, load_settings(path, env={}), load, refuse)
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


# -- what the user's file can do (issue 22, item 6) ------------------------------------------------------------


def _settled_check(watcher: ConfigWatcher) -> bool:
    """check() until the change was read: a file written just now is read at the next check."""
    return watcher.check() or watcher.check()


# Each body comes after a good file's lines (the names stay set): only what the body does is under test.
HOSTILE = {
    "sys.exit(1)": ("import sys\nsys.exit(1)\n", "called sys.exit(1)"),
    "sys.exit(0)": ("import sys\nsys.exit(0)\n", "called sys.exit(0)"),
    "KeyboardInterrupt": ("raise KeyboardInterrupt\n", "raised KeyboardInterrupt"),
    "GeneratorExit": ("raise GeneratorExit\n", "raised GeneratorExit"),
    "CancelledError": ("import asyncio\nraise asyncio.CancelledError\n", "raised CancelledError"),
    "unprintable": ("class E(Exception):\n    def __str__(self):\n        raise RuntimeError\nraise E\n", "raised E"),
    "os._exit": ("import os\nos._exit(0)\n", "ended the process reading it"),
    "SIGKILL itself": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "killed by signal 9"),
    "allocates 8 GiB": ("x = bytearray(8 << 30)\n", "raised MemoryError"),
    "endless loop": ("while True:\n    pass\n", "still running after 1s"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_whatever_the_file_does_is_one_warning_line_and_the_next_good_edit_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    body, fragment = HOSTILE[case]
    # 1 s for the endless loop (the case is the timeout); the others get room for a child's start on a loaded
    # machine (an import of asyncio alone once took over 1 s), or they would time out instead of raising
    limit = 1.0 if case == "endless loop" else 15.0
    watcher, applied = _watcher(tmp_path, read=lambda path: read_isolated(path, timeout=limit))
    _write(watcher.path, BASE.replace("= 4", "= 9") + body)
    with caplog.at_level(logging.INFO, logger="mtc75.app.reload"):
        assert watcher.check() is False
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and fragment in lines[0] and "keeping the running values" in lines[0], lines
    assert applied == [] and watcher.current.MAX_THREAD_COUNT == 4
    _write(watcher.path, BASE.replace("= 4", "= 6"))
    assert watcher.check() is True and applied == [{"MAX_THREAD_COUNT": 6}]


def test_the_file_runs_apart_from_the_consumer_process(tmp_path: Path) -> None:
    """A file that changes the working directory, a signal handler and the environment changes them in
    its own process: the consumer's stay as they were, and its values still apply."""
    import signal

    cwd, handler = os.getcwd(), signal.getsignal(signal.SIGTERM)
    watcher, applied = _watcher(tmp_path)
    _write(watcher.path, BASE.replace("= 4", "= 6") + "import os, signal\nos.chdir('/')\n"
           "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nos.environ['MTC75_RELOAD_PROBE'] = '1'\n")
    assert watcher.check() is True and applied == [{"MAX_THREAD_COUNT": 6}]
    assert os.getcwd() == cwd and signal.getsignal(signal.SIGTERM) is handler
    assert "MTC75_RELOAD_PROBE" not in os.environ


def test_a_huge_file_or_a_fifo_is_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reads: list[Path] = []

    def read(path: Path) -> tuple[dict[str, Any], set[str]]:
        reads.append(path)
        return read_isolated(path)

    watcher, applied = _watcher(tmp_path, read=read)
    _write(watcher.path, BASE + "#" * (1 << 20))
    with caplog.at_level(logging.INFO, logger="mtc75.app.reload"):
        assert watcher.check() is False
        watcher.path.unlink()
        os.mkfifo(watcher.path)  # open() of a FIFO nobody writes blocks for ever
        os.utime(watcher.path, ns=(10_000_000, 10_000_000))
        assert watcher.check() is False
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2 and "more than a settings file may have" in lines[0] and "not a regular file" in lines[1]
    assert reads == [] and applied == []


def test_a_thread_check_that_raises_anything_leaves_the_watcher_running(tmp_path: Path) -> None:
    """Whatever escapes check() (here the reader itself raising SystemExit and KeyboardInterrupt) is one
    line; the thread goes on and applies the next good edit."""
    from tests.kafka_helpers import wait_until

    escapes = [SystemExit(1), KeyboardInterrupt()]

    def read(path: Path) -> tuple[dict[str, Any], set[str]]:
        if escapes:
            raise escapes.pop(0)
        return read_isolated(path)

    watcher, applied = _watcher(tmp_path, interval=0.02, read=read)
    watcher.start()
    try:
        for text in (BASE + "# one\n", BASE + "# and two\n"):
            before = len(escapes)
            _write(watcher.path, text)
            wait_until(lambda b=before: len(escapes) < b, timeout=10, what="the reader called")  # type: ignore[misc]
        _write(watcher.path, BASE.replace("= 4", "= 7"))
        wait_until(lambda: applied == [{"MAX_THREAD_COUNT": 7}], timeout=10, what="the good edit applied")
        assert watcher._thread is not None and watcher._thread.is_alive()
    finally:
        watcher.close()


def test_a_file_being_written_is_read_once_it_settled(tmp_path: Path) -> None:
    reads: list[str] = []

    def read(path: Path) -> tuple[dict[str, Any], set[str]]:
        reads.append(path.read_text())
        return read_isolated(path)

    watcher, applied = _watcher(tmp_path, read=read)
    watcher.path.write_text("MAX_THREAD_COUNT = 8\n")  # a truncate-then-write editor, half-way
    future = time.time_ns() + 60 * 10**9  # written "now" as far as the watcher can tell
    os.utime(watcher.path, ns=(future, future))
    assert watcher.check() is False and reads == []  # not read in the check that saw it change
    watcher.path.write_text(BASE.replace("= 4", "= 8"))  # the editor finished
    os.utime(watcher.path, ns=(future + 1, future + 1))
    assert watcher.check() is False and reads == []  # changed again: wait again
    assert watcher.check() is True and reads == [BASE.replace("= 4", "= 8")]
    assert applied == [{"MAX_THREAD_COUNT": 8}]


def test_an_empty_or_cut_short_file_keeps_the_running_values_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watcher, applied = _watcher(tmp_path)
    with caplog.at_level(logging.INFO, logger="mtc75.app.reload"):
        _write(watcher.path, "")  # truncated: every setting gone, for a moment
        assert watcher.check() is False
        _write(watcher.path, "MAX_THREAD_COUNT = 4\n")  # cut short: the lines after the first not written yet
        assert watcher.check() is False
    assert applied == []
    assert (watcher.current.MAX_THREAD_COUNT, watcher.current.PROCESSING_SLEEP) == (4, 0.2)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # PAUSE_INTERVAL 0.5 is its default: removing it changes nothing, so it is not named
    assert lines == ["config.py: MAX_THREAD_COUNT, PROCESSING_SLEEP no longer set; the running values stay until "
                     "a restart (which takes the default)"], lines
    _write(watcher.path, BASE.replace("= 0.2", "= 0.3"))  # written whole
    assert watcher.check() is True and applied == [{"PROCESSING_SLEEP": 0.3}]


def test_an_atomic_rename_is_seen_and_a_missing_file_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watcher, applied = _watcher(tmp_path)
    stamp = watcher.path.stat().st_mtime_ns
    new = tmp_path / "config.py.tmp"
    new.write_text(BASE.replace("= 4", "= 8"))  # same size, same mtime: only the inode tells
    os.utime(new, ns=(stamp, stamp))
    os.replace(new, watcher.path)
    assert watcher.check() is True and applied == [{"MAX_THREAD_COUNT": 8}]
    watcher.path.unlink()
    with caplog.at_level(logging.INFO, logger="mtc75.app.reload"):
        for _ in range(3):
            assert watcher.check() is False
    gone = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
    assert gone == ["config.py is gone; keeping the running values"]
    _write(watcher.path, BASE.replace("= 4", "= 5"))
    assert watcher.check() is True and applied[-1] == {"MAX_THREAD_COUNT": 5}


def test_consumer_config_changes_are_named_for_a_restart_and_a_function_in_it_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watcher, applied = _watcher(tmp_path)
    with caplog.at_level(logging.INFO, logger="mtc75.app.reload"):
        _write(watcher.path, BASE + "CONSUMER_CONFIG = {'client.id': 'x'}\n")  # a dict value: was a TypeError
        assert watcher.check() is False
        _write(watcher.path, BASE.replace("= 4", "= 6") + "CONSUMER_CONFIG = {'client.id': 'x', 'error_cb': print}\n")
        assert watcher.check() is True
    assert applied == [{"MAX_THREAD_COUNT": 6}]
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines[0].startswith("config.py: CONSUMER_CONFIG changed; restart to apply"), lines
    assert len(lines) == 2 and "reloaded: MAX_THREAD_COUNT 4 -> 6" in lines[1], lines


def test_closing_the_watcher_ends_a_file_still_running(tmp_path: Path) -> None:
    """A file that loops for ever: close() does not wait the child's time bound, and the child is gone."""
    from tests.kafka_helpers import wait_until

    watcher, _applied = _watcher(tmp_path, interval=0.02, read=None)  # the default reader
    pid_file = tmp_path / "child.pid"
    _write(watcher.path, BASE + f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
           "while True:\n    pass\n")
    watcher.start()
    thread = watcher._thread
    assert thread is not None
    wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", timeout=10, what="the child running the file")
    started = time.monotonic()
    watcher.close()
    assert time.monotonic() - started < 3.0 and not thread.is_alive()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
