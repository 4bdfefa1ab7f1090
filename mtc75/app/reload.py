"""Live re-tuning: saving config.py changes MAX_THREAD_COUNT, PAUSE_INTERVAL, the rate limits (MAX_RATE,
KEY_RATE, RATE_BURST) or PROCESSING_SLEEP at once.

A small daemon thread checks the file's modification time twice a second. On a change it loads the
settings again exactly as at start-up (defaults, config file, environment, flags: a value given by
flag or environment variable still wins) and hands the live-tunable ones that changed to ``apply``.
A file that does not load -- a syntax error, a bad value -- is reported in one log line and the
running values stay; other changed settings are named once as needing a restart.

Threads: the script's main thread starts and closes the watcher; ``apply`` runs on the watcher's
thread, so :func:`retuner` only calls what any thread may: ``Consumer.retune`` (the API takes a lock)
and one float assignment the workers read (``SimulatedWork.processing_sleep``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtc75.api import Consumer
from mtc75.errors import ConfigError
from mtc75.runtime.handlers import SimulatedWork
from mtc75.settings import SPECS, Settings

logger = logging.getLogger(__name__)

LIVE_SETTINGS = ("MAX_THREAD_COUNT", "PAUSE_INTERVAL", "MAX_RATE", "KEY_RATE", "RATE_BURST", "PROCESSING_SLEEP")
CHECK_INTERVAL = 0.5  # seconds between modification-time checks


def diff(old: Settings, new: Settings) -> tuple[dict[str, Any], list[str]]:
    """(live changes as ``{name: new value}``, names of other changed settings that need a restart)."""
    live = {n: getattr(new, n) for n in LIVE_SETTINGS if getattr(old, n) != getattr(new, n)}
    restart = [n for n in SPECS if n not in LIVE_SETTINGS and getattr(old, n) != getattr(new, n)]
    return live, restart


def retuner(consumer: Consumer, work: object) -> Callable[[dict[str, Any]], None]:
    """The ``apply`` for a running consumer: threads, pause interval and rate limits to the engine, sleep to
    the handler."""

    def apply(changes: dict[str, Any]) -> None:
        consumer.retune(max_thread_count=changes.get("MAX_THREAD_COUNT"), pause_interval=changes.get("PAUSE_INTERVAL"),
                        max_rate=changes.get("MAX_RATE"), key_rate=changes.get("KEY_RATE"),
                        rate_burst=changes.get("RATE_BURST"))
        if "PROCESSING_SLEEP" in changes:
            if isinstance(work, SimulatedWork):
                work.processing_sleep = changes["PROCESSING_SLEEP"]
            else:
                logger.warning("PROCESSING_SLEEP applies only to the default handler, not to --handler")

    return apply


class ConfigWatcher:
    """Applies live-tunable changes of ``path`` while a consumer runs.

    ``load`` builds the settings as the script did at start-up; ``apply`` receives the changed live
    values (it runs on the watcher thread, so it must be thread-safe). :meth:`check` is the one
    step the thread repeats, public so tests can drive it without the thread.
    """

    def __init__(
        self,
        path: Path,
        current: Settings,
        load: Callable[[], Settings],
        apply: Callable[[dict[str, Any]], None],
        interval: float = CHECK_INTERVAL,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.path = path
        self.current = current
        self._load = load
        self._apply = apply
        self._interval = interval
        self._stamp = self._read_stamp()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_restart: set[tuple[str, Any]] = set()

    def _read_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def check(self) -> bool:
        """Reload if the file changed since the last check; True when live values were applied."""
        stamp = self._read_stamp()
        if stamp == self._stamp or stamp is None:
            return False
        self._stamp = stamp
        try:
            new = self._load()
        except ConfigError as err:
            logger.error("%s not reloaded: %s; keeping the running values", self.path.name, err)
            return False
        live, restart = diff(self.current, new)
        pending = [(n, getattr(new, n)) for n in restart]
        fresh = [n for n, v in pending if (n, v) not in self._warned_restart]
        if fresh:
            self._warned_restart.update(pending)
            logger.warning("%s: %s changed; restart to apply (live: %s)", self.path.name, ", ".join(fresh),
                           ", ".join(LIVE_SETTINGS))
        if not live:
            return False
        try:
            self._apply(live)
        except (ConfigError, ValueError) as err:
            logger.error("%s not applied: %s; keeping the running values", self.path.name, err)
            return False
        changes = ", ".join(f"{n} {getattr(self.current, n)!r} -> {v!r}" for n, v in live.items())
        self.current = self.current.replace(**live)
        logger.warning("%s reloaded: %s", self.path.name, changes)
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mtc75-reload", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception:  # the watcher must never take the consumer down
                logger.exception("config reload failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
