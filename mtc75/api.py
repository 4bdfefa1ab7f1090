"""The library API: MTC75 inside your own program, as ``mtc75.Consumer``.

A facade over :class:`mtc75.engine.engine.Engine`: settings as lower-case keywords, checked like the
command line's flags; ``run()`` on the calling thread, or ``start()`` / ``close()`` (and ``with``) on a
background thread; failures as the typed errors of :mod:`mtc75.errors`. It never prints, exits or
configures logging (records go to the ``mtc75`` loggers).

Threads: one owning thread constructs the consumer and calls ``run``, ``start``, ``close`` and the
``with`` block. ``stop()`` may be called from any thread or a signal handler (it only sets flags);
``stats()``, ``health()``, ``retune()`` and ``lingering`` from any thread. The handler runs on worker threads,
at most ``max_thread_count`` at once; ``on_status`` runs on the poll thread; ``on_error`` on a thread of its own
(``mtc75-on-error``), one call at a time; ``metrics_port``'s endpoints answer on their own threads from the latest
snapshot.

Misuse raises :class:`~mtc75.errors.MisuseError` at once, never hangs nor passes silently: a second
``run()``/``start()`` (also two threads at once: the run state is under ``_lock``), ``run()`` after
``close()``, ``close()`` from a handler, ``on_status`` or ``on_error`` (it would wait for itself: ``stop()`` is
the call there), ``retune()`` after the run ended. ``close()`` from another thread waits for the run, whichever
thread runs it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType, TracebackType
from typing import Any

from mtc75.core.failures import Failure
from mtc75.core.health import DEFAULT_MAX_POLL_INTERVAL, Health, HealthWatch
from mtc75.core.stats import Stats
from mtc75.engine.engine import Engine
from mtc75.engine.share import ShareEngine
from mtc75.errors import ConfigError, MisuseError
from mtc75.kafka.clients import REAL_FACTORIES, ClientFactories
from mtc75.kafka.deserializers import DeserializerSpec, decoder
from mtc75.runtime.failurehook import check_on_error
from mtc75.runtime.invoker import CallObserver, Invoker
from mtc75.settings import SPECS, Settings, check_bounds, coerce, live_changes

# The settings a consumer uses; the others belong to producer.py, create_topic.py or the CLI's default handler.
CONSUMER_SETTINGS = (
    "BOOTSTRAP_SERVERS", "TOPIC", "GROUP_ID", "GROUP_TYPE", "MAX_THREAD_COUNT", "MIN_THREAD_COUNT",
    "MAX_THREAD_LIMIT",
    "PAUSE_INTERVAL", "AUTO_OFFSET_RESET", "MAX_BACKLOG", "OFFSET_WINDOW", "COMMIT_INTERVAL", "REVOKE_TIMEOUT",
    "SHUTDOWN_TIMEOUT", "MAX_ATTEMPTS", "RETRY_BACKOFF", "RETRY_BACKOFF_MAX", "ON_FAILURE", "BROKER_DOWN_TIMEOUT",
    "REPLICATION_FACTOR", "CONSUMER_CONFIG", "PRODUCER_CONFIG", "ORDERING", "BATCH_SIZE", "BATCH_WAIT",
    "FETCH_SIZES", "KEY_FORMAT", "VALUE_FORMAT", "MAX_RATE", "KEY_RATE", "RATE_BURST", "RUNNER", "PROCESS_COUNT",
    "PROCESSING_GUARANTEE",
)
NEW, RUNNING, ENDED = "new", "running", "ended"  # a Consumer's run state, in this order, once
logger = logging.getLogger(__name__)
SNAPSHOT_INTERVAL = 0.25  # how stale stats() may be while running: the poll thread refreshes it this often
_DEFAULTS = Settings()
# The client factories of the consumers built in this context: :mod:`mtc75.testing` sets its own for one build.
_FACTORIES: ContextVar[ClientFactories] = ContextVar("mtc75_factories", default=REAL_FACTORIES)


@contextmanager
def building_on(factories: ClientFactories) -> Iterator[None]:
    """Consumers built in this block (this thread or task only) build their Kafka clients with ``factories``."""
    token = _FACTORIES.set(factories)
    try:
        yield
    finally:
        _FACTORIES.reset(token)


class Consumer:
    """Consume ``topic`` as ``group_id``, calling ``handler(message)`` on at most ``max_thread_count`` threads.

    ``topic`` is a name, several (a list, or one comma-separated string), or a pattern starting with ``^``
    (librdkafka's regular expression: topics created later that match are consumed too); README "Several topics
    and patterns".

    ``handler`` gets a ``confluent_kafka.Message`` -- with ``key_deserializer`` / ``value_deserializer`` (a
    callable, a ``confluent_kafka`` schema-registry deserializer, or ``"json"``, ``"str"``, ``"bytes"``) a
    :class:`~mtc75.kafka.deserializers.DecodedMessage` whose ``key()`` / ``value()`` are decoded
    (docs/deserializers.md); an ``async def`` handler is awaited on one event-loop
    thread instead, ``max_thread_count`` then bounding the coroutines in flight (docs/async.md).
    Returning means done (its offset may be committed),
    raising means failed (retried per ``max_attempts``, then ``on_failure``: ``dlq``, ``skip`` or ``stop``).
    Any other setting of docs/settings.md is a lower-case keyword (``pause_interval=1.0``,
    ``on_failure="skip"``, ``ordering="key"``, ...); ``librdkafka`` adds consumer properties, applied
    last. Bad values raise :class:`~mtc75.errors.ConfigError` here, before anything connects. A
    consumer runs once.
    ``on_status(stats)`` is called on the poll thread about every ``status_interval`` seconds while it
    runs (a dashboard, a metrics exporter); each of ``observers`` (:class:`~mtc75.runtime.invoker.CallObserver`)
    is told every handler call's duration, on the thread that made it. :meth:`from_settings` takes a whole
    Settings instead of keywords.
    ``on_error(failure)`` is told of every failed attempt and of what became of each message that did not
    succeed: a :class:`~mtc75.core.failures.Failure` with the fetched message, the exception, the attempt and
    the ``outcome`` (``"retry"``, then a final ``"dead_lettered"``, ``"skipped"``, ``"stopped"`` or
    ``"abandoned"``). It runs on a thread of its own, one call at a time, in the order the failures happened:
    it never holds a worker or the poll loop; what it raises is logged and ignored.
    ``metrics_port`` serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``metrics_addr`` while it runs (0: any
    free port, then see :attr:`metrics_port`); ``metrics_registry`` (a ``prometheus_client`` registry, e.g.
    ``prometheus_client.REGISTRY``) gets MTC75's metrics while it runs instead of a registry of its own. Both
    need prometheus-client (``pip install 'mtc75[metrics]'``). :meth:`health` answers without them.
    """

    def __init__(
        self,
        handler: Callable[[Any], object],
        *,
        topic: str | Sequence[str],
        group_id: str,
        bootstrap_servers: str = _DEFAULTS.BOOTSTRAP_SERVERS,
        max_thread_count: int | str = _DEFAULTS.MAX_THREAD_COUNT,
        librdkafka: Mapping[str, Any] | None = None,
        on_status: Callable[[Stats], None] | None = None,
        status_interval: float = 1.0,
        observers: Sequence[CallObserver] = (),
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
        metrics_registry: Any = None,
        key_deserializer: DeserializerSpec = None,
        value_deserializer: DeserializerSpec = None,
        on_error: Callable[[Failure], object] | None = None,
        **settings: Any,
    ) -> None:
        keywords = {"topic": topic, "group_id": group_id, "bootstrap_servers": bootstrap_servers,
                    "max_thread_count": max_thread_count, **settings}
        self._setup(handler, settings_from_keywords(keywords), librdkafka, on_status, status_interval, observers,
                    _FACTORIES.get(), (key_deserializer, value_deserializer), on_error)
        self._ask_metrics(metrics_port, metrics_addr, metrics_registry)

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
        metrics_port: int | None = None,
        metrics_addr: str = "127.0.0.1",
        metrics_registry: Any = None,
        key_deserializer: DeserializerSpec = None,
        value_deserializer: DeserializerSpec = None,
        on_error: Callable[[Failure], object] | None = None,
    ) -> Consumer:
        """A consumer from a whole :class:`~mtc75.settings.Settings` (e.g. ``mtc75.settings.load_settings``:
        defaults, a config file, ``MTC75_*`` environment variables), instead of keywords.

        The other keywords are those of the constructor; settings a consumer does not use (the
        producer's, the default handler's) are ignored.
        """
        consumer = cls.__new__(cls)
        consumer._setup(handler, settings, librdkafka, on_status, status_interval, observers, _FACTORIES.get(),
                        (key_deserializer, value_deserializer), on_error)
        consumer._ask_metrics(metrics_port, metrics_addr, metrics_registry)
        return consumer

    def _setup(
        self, handler: Callable[[Any], object], settings: Settings, librdkafka: Mapping[str, Any] | None,
        on_status: Callable[[Stats], None] | None, status_interval: float, observers: Sequence[CallObserver],
        factories: ClientFactories, deserializers: tuple[DeserializerSpec, DeserializerSpec] = (None, None),
        on_error: Callable[[Failure], object] | None = None,
    ) -> None:
        self._on_error = check_on_error(on_error)
        key, value = deserializers
        decode = decoder(_deserializer(key, settings.KEY_FORMAT, "key"),
                         _deserializer(value, settings.VALUE_FORMAT, "value"))
        # refuses what no runner can run (an async generator), or what cannot reach worker processes
        invoker = Invoker(handler, decode=decode, batches=settings.BATCH_SIZE > 1,
                          processes=settings.worker_processes())
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
        self._lock = threading.Lock()  # the run state: run()/start()/close() may race from several threads
        self._state = NEW
        self._closed = False
        self._ended = threading.Event()  # the run (or the decision not to run) is over: close() waits on it
        self._poll_ident: int | None = None  # the thread running the poll loop (run()'s caller, or mtc75-poll)
        self._stats: Stats = self._idle_stats()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # what ended the background run
        self._health = HealthWatch(_max_poll_interval(self._settings.consumer_config(self._librdkafka)))
        self._metrics: Any = None  # mtc75.observe.metrics.Metrics, when asked for
        self._endpoints: Any = None  # mtc75.observe.server.Endpoints, while serving
        self._serve_on: tuple[int, str] | None = None
        self.metrics_port: int | None = None  # the port /metrics, /healthz and /readyz listen on, while they do

    def _ask_metrics(self, port: int | None, addr: str, registry: Any) -> None:
        """metrics_port / metrics_registry: checked and built now, served and registered once it runs."""
        if port is None and registry is None:
            return
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
            raise ConfigError(f"invalid metrics_port={port!r}: must be a port number (0-65535; 0: any free one)")
        if not isinstance(addr, str) or not addr:
            raise ConfigError(f"invalid metrics_addr={addr!r}: must be an address to listen on, e.g. '0.0.0.0'")
        if registry is not None and not callable(getattr(registry, "register", None)):
            raise ConfigError(f"invalid metrics_registry={registry!r}: must be a prometheus_client CollectorRegistry")
        try:
            from mtc75.observe.metrics import Metrics
        except ImportError as err:
            raise ConfigError(f"metrics_port / metrics_registry need prometheus-client ({err}): "
                              "pip install 'mtc75[metrics]'") from None
        self._metrics = Metrics(self._settings.GROUP_ID, registry, self.health)
        self._invoker.attach(self._metrics)
        self._serve_on = (port, addr) if port is not None else None

    # -- the owning thread ----------------------------------------------------------------------------

    def run(self, max_messages: int | None = None, idle_exit: float | None = None) -> Stats:
        """Consume on this thread until :meth:`stop`, ``max_messages`` handled, or ``idle_exit`` seconds idle.

        Finishes in-flight handlers (bounded by ``shutdown_timeout``), commits and closes before it
        returns the final :class:`Stats`; raises a :class:`~mtc75.errors.Mtc75Error` on failure.
        """
        engine = self._launch(max_messages, idle_exit)
        try:
            if engine is None:
                return self._stats
            try:
                self._stats = engine.run()
            except BaseException:
                self._stats = engine.stats()
                raise
            return self._stats
        finally:
            self._end()

    def start(self, max_messages: int | None = None, idle_exit: float | None = None) -> None:
        """Run on a background thread; :meth:`close` stops it, waits and re-raises its failure."""
        engine = self._launch(max_messages, idle_exit, background=True)
        # A daemon thread: a program that never calls close() can still exit (uncommitted work is redelivered).
        self._thread = threading.Thread(target=self._background, args=(engine,), name="mtc75-poll", daemon=True)
        try:
            self._thread.start()
        except BaseException:  # no thread to be had: no run
            self._thread = None
            self._end()
            raise

    def close(self, timeout: float | None = None) -> Stats:
        """Stop, wait for the run to finish (at most ``timeout`` seconds) and return its final Stats.

        Re-raises, once, the error that ended a background run (a ``run()`` raises its own to its
        caller); ``TimeoutError`` if it is still shutting down after ``timeout`` (call again to wait
        more). Closing a consumer that never ran returns its idle Stats; it can no longer run. A second
        ``close()`` returns the same Stats. From one of this consumer's handlers or its ``on_status``
        it raises MisuseError at once: it would wait for itself (call ``stop()`` there).
        """
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                    or not timeout >= 0):
            raise ConfigError(f"invalid timeout={timeout!r}: must be None or a number >= 0")
        self._refuse_on_own_thread("close()")
        with self._lock:
            self._closed = True
            ran = self._state != NEW
        self.stop()
        if ran:
            if not self._ended.wait(timeout):
                raise TimeoutError(f"MTC75 consumer still shutting down after {timeout}s")
            thread = self._thread
            if thread is not None:
                thread.join()  # it only has to return: the run is over
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

    def health(self) -> Health:
        """Alive (the poll loop turned within ``max.poll.interval.ms``) and ready (alive, partitions assigned, a
        broker reachable), with the reason when not: what ``/healthz`` and ``/readyz`` answer."""
        return self._health.judge(time.monotonic())

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
        batch_size: int | None = None, batch_wait: float | None = None,
    ) -> None:
        """Change the thread bound (a count or "auto"), the pause interval, the rate limits (0: off) and, for a
        batch handler, the batch size and wait; a running consumer applies it within 0.1 s. None leaves a
        setting as it is."""
        changes = live_changes(max_thread_count=max_thread_count, pause_interval=pause_interval,
                               max_rate=max_rate, key_rate=key_rate, rate_burst=rate_burst,
                               batch_size=batch_size, batch_wait=batch_wait)
        if self._state == ENDED or (self._closed and self._state == NEW):
            raise MisuseError("retune() on an mtc75.Consumer that has finished or was closed: nothing to retune")
        engine = self._engine
        if engine is not None:
            engine.retune(**changes)
        else:
            self._settings = self._settings.replace(**changes)
            self._stats = self._idle_stats()  # stats() before the run shows the bound it will start with

    # -- internals ------------------------------------------------------------------------------------

    def _launch(
        self, max_messages: int | None, idle_exit: float | None, background: bool = False
    ) -> Engine | None:
        """Build the engine for one run (None when stop() came first); refuses a second run."""
        check_bounds(max_messages, idle_exit)
        with self._lock:  # check and claim at once: of two threads calling run()/start() together, one runs
            if self._closed:
                raise MisuseError("this mtc75.Consumer is closed; make a new one")
            if self._state == RUNNING:
                where = self._own_thread()
                raise MisuseError("this mtc75.Consumer is already running" + (f" (called from {where})" if where
                                                                                else ""))
            if self._state == ENDED:
                raise MisuseError("this mtc75.Consumer has already run; make a new one")
            self._state = RUNNING
            if not background:
                self._poll_ident = threading.get_ident()
        if self._stop_requested:
            return None
        try:
            kind = ShareEngine if self._settings.GROUP_TYPE == "share" else Engine  # docs/share-groups.md
            engine = kind(
                self._settings, self._invoker, overrides=self._librdkafka, max_messages=max_messages,
                idle_exit=idle_exit, on_status=self._snapshot,
                status_interval=min(SNAPSHOT_INTERVAL, self._status_interval), factories=self._factories,
                on_error=self._on_error,
            )
            self._open_metrics()  # ConfigError (port taken, registry holding MTC75's metrics) before anything runs
        except BaseException:
            with self._lock:  # no run: it may be tried again with what was wrong put right
                self._state = NEW
                self._poll_ident = None
            raise
        self._health.started(time.monotonic())
        self._engine = engine
        if self._stop_requested:  # stop() ran while the engine was being built
            engine.stop()
        return engine

    def _idle_stats(self) -> Stats:
        settings = self._settings
        return Stats.idle(settings.initial_threads(), "auto" if settings.auto_threads else "fixed", settings.ORDERING)

    def _background(self, engine: Engine | None) -> None:
        self._poll_ident = threading.get_ident()
        try:
            if engine is not None:
                self._stats = engine.run()
        except BaseException as err:  # handed to close(), on the owning thread
            self._stats = engine.stats() if engine is not None else self._stats
            self._error = err
        finally:
            self._end()

    def _end(self) -> None:
        """The run is over (poll thread, last): /healthz says so and the metrics endpoints close, a service's
        registry gets its names back, close() may return, a later run() is refused. The metrics get the final
        snapshot first: a scrape or a push as the run ends shows its totals."""
        if self._metrics is not None:
            self._metrics.update(self._stats)
        self._close_metrics()
        with self._lock:
            self._state = ENDED
            self._poll_ident = None
        self._ended.set()

    def _open_metrics(self) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        metrics.register()
        if self._serve_on is not None:
            from mtc75.observe.server import Endpoints

            endpoints = Endpoints(metrics.registry, self.health)
            try:
                self.metrics_port = endpoints.serve(*self._serve_on)
            except BaseException:
                metrics.unregister()
                raise
            self._endpoints = endpoints
            logger.info("metrics at http://%s:%d/metrics, health at /healthz and /readyz", self._serve_on[1],
                        self.metrics_port)

    def _close_metrics(self) -> None:
        self._health.ended()
        endpoints, self._endpoints = self._endpoints, None
        if endpoints is not None:
            endpoints.close()
            self.metrics_port = None
        if self._metrics is not None and not self._metrics.own:
            self._metrics.unregister()

    def _own_thread(self) -> str | None:
        """What part of this running consumer the calling thread is, if any (it must not wait for the run)."""
        if threading.get_ident() == self._poll_ident:
            return "its on_status, on the thread that runs it"
        engine = self._engine
        if engine is not None and engine.on_handler_thread():
            return "one of its handlers"
        if engine is not None and engine.on_error_thread():
            return "its on_error"
        return None

    def _refuse_on_own_thread(self, call: str) -> None:
        if self._state != RUNNING:
            return
        where = self._own_thread()
        if where is not None:
            raise MisuseError(f"{call} called from {where}: it would wait for itself to finish; call stop() "
                              "there (it returns at once, and the run ends once the handler returned)")

    def _snapshot(self, stats: Stats) -> None:
        """Poll thread: keep the snapshot stats() returns; pass it on at the user's status interval."""
        self._stats = stats
        self._health.update(time.monotonic(), stats)
        if self._metrics is not None:
            self._metrics.update(stats)
        if self._on_status is not None:
            now = time.monotonic()
            if now >= self._next_status:
                self._next_status = now + self._status_interval
                self._on_status(stats)


def _deserializer(given: DeserializerSpec, format_setting: str, field: str) -> DeserializerSpec:
    """``key_deserializer=`` / ``value_deserializer=``, else KEY_FORMAT / VALUE_FORMAT; both set differently
    is a ConfigError (which one was meant?)."""
    if given is None or given == format_setting:
        return format_setting
    if format_setting != "bytes":
        raise ConfigError(f"{field}_deserializer= and {field.upper()}_FORMAT={format_setting!r} are both set: "
                          "give one")
    return given


def settings_from_keywords(keywords: Mapping[str, Any]) -> Settings:
    """Validated Settings from lower-case keywords; unknown or non-consumer names are ConfigErrors."""
    values: dict[str, Any] = {}
    for keyword, raw in keywords.items():
        name = keyword.upper()
        if keyword != keyword.lower() or name not in SPECS:
            raise ConfigError(f"unknown setting {keyword!r} (settings are the lower-case names of docs/settings.md)")
        if name not in CONSUMER_SETTINGS:
            raise ConfigError(f"{keyword!r} is not a consumer setting")
        values[name] = coerce(SPECS[name], raw, f"keyword {keyword}")
    return Settings(**values)



def _max_poll_interval(conf: Mapping[str, Any]) -> float:
    """``max.poll.interval.ms`` in seconds (librdkafka refuses a bad value when the client is built)."""
    try:
        return float(conf.get("max.poll.interval.ms", DEFAULT_MAX_POLL_INTERVAL * 1000)) / 1000
    except (TypeError, ValueError):
        return DEFAULT_MAX_POLL_INTERVAL
