"""The library API: MTC75 inside your own program, as ``mtc75.Consumer``.

A facade over :class:`mtc75.engine.engine.Engine`: settings as lower-case keywords, checked like the
command line's flags; ``run()`` on the calling thread, or ``start()`` / ``close()`` (and ``with``) on a
background thread; failures as the typed errors of :mod:`mtc75.errors`. It never prints, exits or
configures logging (records go to the ``mtc75`` loggers).

Threads: one owning thread constructs the consumer and calls ``run``, ``start``, ``close`` and the
``with`` block. ``stop()`` may be called from any thread or a signal handler (it only sets flags);
``stats()``, ``retune()`` and ``lingering`` from any thread. The handler runs on worker threads, at most
``max_thread_count`` at once; ``on_status`` runs on the poll thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any

from mtc75.core.stats import Stats
from mtc75.engine.engine import Engine
from mtc75.errors import ConfigError
from mtc75.kafka.clients import REAL_FACTORIES, ClientFactories
from mtc75.runtime.invoker import CallObserver, Invoker
from mtc75.settings import SPECS, Settings, coerce, live_changes

# The settings a consumer uses; the others belong to producer.py, create_topic.py or the CLI's default handler.
CONSUMER_SETTINGS = (
    "BOOTSTRAP_SERVERS", "TOPIC", "GROUP_ID", "MAX_THREAD_COUNT", "MIN_THREAD_COUNT", "MAX_THREAD_LIMIT",
    "PAUSE_INTERVAL", "AUTO_OFFSET_RESET", "MAX_BACKLOG", "OFFSET_WINDOW", "COMMIT_INTERVAL", "REVOKE_TIMEOUT",
    "SHUTDOWN_TIMEOUT", "MAX_ATTEMPTS", "RETRY_BACKOFF", "RETRY_BACKOFF_MAX", "ON_FAILURE", "BROKER_DOWN_TIMEOUT",
    "REPLICATION_FACTOR", "CONSUMER_CONFIG",
    "PRODUCER_CONFIG", "ORDERING", "FETCH_SIZES", "MAX_RATE", "KEY_RATE", "RATE_BURST",
)
SNAPSHOT_INTERVAL = 0.25  # how stale stats() may be while running: the poll thread refreshes it this often
_DEFAULTS = Settings()


class Consumer:
    """Consume ``topic`` as ``group_id``, calling ``handler(message)`` on at most ``max_thread_count`` threads.

    ``handler`` gets a ``confluent_kafka.Message``; an ``async def`` handler is awaited on one event-loop
    thread instead, ``max_thread_count`` then bounding the coroutines in flight (README "Async handlers").
    Returning means done (its offset may be committed),
    raising means failed (retried per ``max_attempts``, then ``on_failure``: ``dlq``, ``skip`` or ``stop``).
    Any other setting of the README's table is a lower-case keyword (``pause_interval=1.0``,
    ``on_failure="skip"``, ``ordering="key"``, ...); ``librdkafka`` adds consumer properties, applied
    last. Bad values raise :class:`~mtc75.errors.ConfigError` here, before anything connects. A
    consumer runs once.
    ``on_status(stats)`` is called on the poll thread about every ``status_interval`` seconds while it
    runs (a dashboard, a metrics exporter); each of ``observers`` (:class:`~mtc75.runtime.invoker.CallObserver`)
    is told every handler call's duration, on the thread that made it. :meth:`from_settings` takes a whole
    Settings instead of keywords.
    """

    def __init__(
        self,
        handler: Callable[[Any], object],
        *,
        topic: str,
        group_id: str,
        bootstrap_servers: str = _DEFAULTS.BOOTSTRAP_SERVERS,
        max_thread_count: int | str = _DEFAULTS.MAX_THREAD_COUNT,
        librdkafka: Mapping[str, Any] | None = None,
        on_status: Callable[[Stats], None] | None = None,
        status_interval: float = 1.0,
        observers: Sequence[CallObserver] = (),
        **settings: Any,
    ) -> None:
        keywords = {"topic": topic, "group_id": group_id, "bootstrap_servers": bootstrap_servers,
                    "max_thread_count": max_thread_count, **settings}
        self._setup(handler, settings_from_keywords(keywords), librdkafka, on_status, status_interval, observers,
                    REAL_FACTORIES)

    @classmethod
    def from_settings(
        cls,
        handler: Callable[[Any], object],
        settings: Settings,
        *,
        librdkafka: Mapping[str, Any] | None = None,
        on_status: Callable[[Stats], None] | None = None,
        status_interval: float = 1.0,
        observers: Sequence[CallObserver] = (),
    ) -> Consumer:
        """A consumer from a whole :class:`~mtc75.settings.Settings` (e.g. ``mtc75.settings.load_settings``:
        defaults, a config file, ``MTC75_*`` environment variables), instead of keywords.

        The other keywords are those of the constructor; settings a consumer does not use (the
        producer's, the default handler's) are ignored.
        """
        return cls._built(handler, settings, librdkafka, on_status, status_interval, observers, REAL_FACTORIES)

    @classmethod
    def _built(
        cls, handler: Callable[[Any], object], settings: Settings, librdkafka: Mapping[str, Any] | None,
        on_status: Callable[[Stats], None] | None, status_interval: float, observers: Sequence[CallObserver],
        factories: ClientFactories,
    ) -> Consumer:
        """The one way in for :mod:`mtc75.testing` (client factories of its own) and :meth:`from_settings`."""
        consumer = cls.__new__(cls)
        consumer._setup(handler, settings, librdkafka, on_status, status_interval, observers, factories)
        return consumer

    def _setup(
        self, handler: Callable[[Any], object], settings: Settings, librdkafka: Mapping[str, Any] | None,
        on_status: Callable[[Stats], None] | None, status_interval: float, observers: Sequence[CallObserver],
        factories: ClientFactories,
    ) -> None:
        invoker = Invoker(handler)  # refuses what no runner can run (an async generator)
        for observer in observers:
            invoker.attach(observer)
        if not status_interval > 0:
            raise ConfigError(f"invalid status_interval={status_interval!r}: must be > 0")
        self._settings = settings
        if librdkafka is not None and not isinstance(librdkafka, Mapping):
            raise ConfigError(f"invalid librdkafka={librdkafka!r}: must be a dict of librdkafka properties")
        self._librdkafka: Mapping[str, Any] = MappingProxyType(dict(librdkafka or {}))
        self._settings.consumer_config(self._librdkafka)  # refuses enable.auto.commit=true and the like now
        self._invoker = invoker
        self._on_status = on_status
        self._status_interval = status_interval
        self._next_status = 0.0
        self._factories = factories
        self._engine: Engine | None = None
        self._stop_requested = False  # a plain flag: stop() must be safe in a signal handler
        self._launched = False
        self._stats: Stats = Stats.idle(
            self._settings.initial_threads(), "auto" if self._settings.auto_threads else "fixed",
            self._settings.ORDERING,
        )
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # what ended the background run

    # -- the owning thread ----------------------------------------------------------------------------

    def run(self, max_messages: int | None = None, idle_exit: float | None = None) -> Stats:
        """Consume on this thread until :meth:`stop`, ``max_messages`` handled, or ``idle_exit`` seconds idle.

        Finishes in-flight handlers (bounded by ``shutdown_timeout``), commits and closes before it
        returns the final :class:`Stats`; raises a :class:`~mtc75.errors.Mtc75Error` on failure.
        """
        engine = self._launch(max_messages, idle_exit)
        if engine is None:
            return self._stats
        try:
            self._stats = engine.run()
        except BaseException:
            self._stats = engine.stats()
            raise
        return self._stats

    def start(self, max_messages: int | None = None, idle_exit: float | None = None) -> None:
        """Run on a background thread; :meth:`close` stops it, waits and re-raises its failure."""
        engine = self._launch(max_messages, idle_exit)
        # A daemon thread: a program that never calls close() can still exit (uncommitted work is redelivered).
        self._thread = threading.Thread(target=self._background, args=(engine,), name="mtc75-poll", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> Stats:
        """Stop, wait for the background run to finish (at most ``timeout`` seconds) and return its Stats.

        Re-raises, once, the error that ended the background run; ``TimeoutError`` if it is still
        shutting down after ``timeout``.
        """
        self.stop()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"MTC75 consumer still shutting down after {timeout}s")
        error, self._error = self._error, None
        if error is not None:
            raise error
        return self._stats

    def __enter__(self) -> Consumer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except Exception as err:
            if exc is None:
                raise
            exc.add_note(f"closing the MTC75 consumer failed too: {type(err).__name__}: {err}")

    # -- any thread -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the run to finish (drain in-flight work, commit, close). Any thread, or a signal handler."""
        self._stop_requested = True
        engine = self._engine
        if engine is not None:
            engine.stop()

    def stats(self) -> Stats:
        """The latest snapshot: at most SNAPSHOT_INTERVAL old while running, final once finished."""
        return self._stats

    @property
    def lingering(self) -> bool:
        """After a run: handlers it stopped waiting for are still running on worker threads, or the Kafka
        client did not finish closing (no broker answered). The interpreter waits for both at exit;
        their messages are uncommitted and will be delivered again."""
        engine = self._engine
        return engine is not None and engine.lingering

    def retune(
        self, *, max_thread_count: int | str | None = None, pause_interval: float | None = None,
        max_rate: float | None = None, key_rate: float | None = None, rate_burst: float | None = None,
    ) -> None:
        """Change the thread bound (a count or "auto"), the pause interval and the rate limits (0: off); a
        running consumer applies it within 0.1 s. None leaves a setting as it is."""
        changes = {"max_thread_count": max_thread_count, "pause_interval": pause_interval, "max_rate": max_rate,
                   "key_rate": key_rate, "rate_burst": rate_burst}
        engine = self._engine
        if engine is not None:
            engine.retune(**changes)
        else:
            self._settings = self._settings.replace(**live_changes(**changes))

    # -- internals ------------------------------------------------------------------------------------

    def _launch(self, max_messages: int | None, idle_exit: float | None) -> Engine | None:
        """Build the engine for one run (None when stop() came first); refuses a second run."""
        if self._launched:
            raise RuntimeError("this mtc75.Consumer has already run; make a new one")
        engine = Engine(  # checks max_messages and idle_exit (ConfigError)
            self._settings, self._invoker, overrides=self._librdkafka, max_messages=max_messages,
            idle_exit=idle_exit, on_status=self._snapshot,
            status_interval=min(SNAPSHOT_INTERVAL, self._status_interval), factories=self._factories,
        )
        self._launched = True
        if self._stop_requested:
            return None
        self._engine = engine
        if self._stop_requested:  # stop() ran while the engine was being built
            engine.stop()
        return engine

    def _background(self, engine: Engine | None) -> None:
        if engine is None:
            return
        try:
            self._stats = engine.run()
        except BaseException as err:  # handed to close(), on the owning thread
            self._stats = engine.stats()
            self._error = err

    def _snapshot(self, stats: Stats) -> None:
        """Poll thread: keep the snapshot stats() returns; pass it on at the user's status interval."""
        self._stats = stats
        if self._on_status is not None:
            now = time.monotonic()
            if now >= self._next_status:
                self._next_status = now + self._status_interval
                self._on_status(stats)


def settings_from_keywords(keywords: Mapping[str, Any]) -> Settings:
    """Validated Settings from lower-case keywords; unknown or non-consumer names are ConfigErrors."""
    values: dict[str, Any] = {}
    for keyword, raw in keywords.items():
        name = keyword.upper()
        if keyword != keyword.lower() or name not in SPECS:
            raise ConfigError(f"unknown setting {keyword!r} (settings are lower-case names from the README table)")
        if name not in CONSUMER_SETTINGS:
            raise ConfigError(f"{keyword!r} is not a consumer setting")
        values[name] = coerce(SPECS[name], raw, f"keyword {keyword}")
    return Settings(**values)

