"""Prometheus metrics of one consumer: its status snapshots and handler durations, on a registry.

The counters and gauges are read from the latest :class:`~mtc75.core.stats.Stats` when Prometheus scrapes
(a custom collector), so the engine keeps no second set of counters. The handler duration histogram is
fed as a call observer of the one handler path (:class:`mtc75.runtime.invoker.CallObserver`): it never
wraps the handler, so it keeps whatever kind the handler is. The registry is the consumer's own (with the
process's CPU and memory) unless the service hands its own (``metrics_registry=``): then MTC75's
collectors are registered on it while the consumer runs, and a second consumer on the same registry is a
ConfigError (the names would collide).

Threads: the owning thread builds, registers and unregisters; ``update`` runs on the poll thread (the
status callback) and swaps one reference that scrapes on the HTTP server's thread read; ``call_ended``
runs on worker threads or the event loop (prometheus_client's Histogram has its own lock).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mtc75.core.health import Health
from mtc75.core.stats import Stats
from mtc75.errors import ConfigError

PREFIX = "mtc75"
# Handler durations from a fast in-memory handler up to slow I/O.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# (name, help, Stats attribute): every counter is a running total in the snapshot
COUNTERS = (
    ("processed", "messages whose handler finished (successfully or not)", "processed"),
    ("failed", "messages whose handler raised", "failed"),
    ("retried", "handler retries", "retried"),
    ("dead_lettered", "messages sent to the dead-letter topic", "dead_lettered"),
    ("pauses", "times the consumer paused its partitions because every thread was busy", "pauses"),
    ("batches", "a batch handler's completed calls (BATCH_SIZE > 1); processed / batches is the mean size", "batches"),
    ("throttled_seconds", "seconds during which a message waited for a MAX_RATE token", "throttled_seconds"),
    ("key_throttled_seconds", "seconds during which a message waited for its key's KEY_RATE token",
     "key_throttled_seconds"),
)
# GROUP_TYPE="share": the acknowledgements (mtc75.core.stats.ShareCounts), as mtc75_share_<name>_total
SHARE_COUNTERS = (
    ("acquired", "records this share member polled (each delivery counts)"),
    ("accepted", "records acknowledged ACCEPT (handled, skipped, or dead-lettered)"),
    ("released", "records acknowledged RELEASE: delivered again, to any member"),
    ("lock_expired", "handlers still running when their record's lock ended"),
    ("rejoined", "redeliveries that took the outcome of this member's still-running handler"),
    ("refused", "acceptances the broker refused: those records are delivered again"),
)
GAUGES = (
    ("active_threads", "handlers running now (permits held; ACTIVE_THREAD_COUNT)", "active_threads"),
    ("max_threads", 'the bound on running handlers (MAX_THREAD_COUNT; under "auto" the tuned count)',
     "max_thread_count"),
    ("paused", "1 while the assigned partitions are paused", "paused"),
    ("in_flight", "messages fetched and not yet finished (running plus waiting)", "in_flight"),
    ("backlog", "fetched messages waiting for a free thread", "backlog"),
    ("assigned_partitions", "partitions assigned to this consumer", "assigned"),
    ("max_rate", "MAX_RATE: most messages started per second (0: no limit)", "max_rate"),
    ("key_rate", "KEY_RATE: most messages started per second per key (0: no limit)", "key_rate"),
    ("throttled", "fetched messages waiting for a rate token (part of the backlog)", "throttled"),
)


class StatsCollector(Collector):
    """Serves the latest snapshot; values move once per status interval. ``group``: the consumer group, the
    ``group`` label of ``mtc75_lag`` (the consumer-group lag exporters' label). ``health``: judged at each
    scrape (``mtc75_alive``, ``mtc75_ready``, ``mtc75_poll_age_seconds``), so a poll loop that stopped turning
    shows although its last snapshot does not move."""

    def __init__(self, group: str = "", health: Callable[[], Health] | None = None) -> None:
        self._stats: Stats | None = None
        self._group = group
        self._health = health

    def update(self, stats: Stats) -> None:
        self._stats = stats  # one reference swap: scrapes on the HTTP thread see a whole snapshot

    def describe(self) -> Iterator[Metric]:
        """The names, without values: a registry checks them for collisions when this is registered."""
        yield from self._families(Stats.idle(0))
        yield from self._judged(Health(False, False, "", 0.0, 0))

    def collect(self) -> Iterator[Metric]:
        if self._health is not None:
            yield from self._judged(self._health())
        stats = self._stats
        if stats is None:
            return
        yield from self._families(stats)

    def _judged(self, health: Health) -> Iterator[Metric]:
        yield GaugeMetricFamily(f"{PREFIX}_alive", "1 while the poll loop turns within max.poll.interval.ms "
                                "(what /healthz says)", value=float(health.alive))
        yield GaugeMetricFamily(f"{PREFIX}_ready", "1 while alive with partitions assigned and a broker reachable "
                                "(what /readyz says)", value=float(health.ready))
        if health.last_poll_age is not None:
            yield GaugeMetricFamily(f"{PREFIX}_poll_age_seconds", "seconds since the poll loop last turned",
                                    value=health.last_poll_age)

    def _families(self, stats: Stats) -> Iterator[Metric]:
        for name, help_text, attr in COUNTERS:
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=float(getattr(stats, attr)))
        for name, help_text, attr in GAUGES:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=float(getattr(stats, attr)))
        mode = GaugeMetricFamily(
            f"{PREFIX}_thread_mode", 'the thread count\'s mode: 1 for the one in effect ("auto" or "fixed")',
            labels=["mode"],
        )
        for name in ("auto", "fixed"):
            mode.add_metric([name], float(stats.thread_mode == name))
        yield mode
        yield GaugeMetricFamily(
            f"{PREFIX}_thread_trend", "+1 / -1 just after auto stepped the thread count up / down, 0 holding",
            value=float(stats.thread_trend),
        )
        if stats.share is not None:
            for name, help_text in SHARE_COUNTERS:
                yield CounterMetricFamily(f"{PREFIX}_share_{name}", help_text, value=float(getattr(stats.share, name)))
            deliveries = CounterMetricFamily(
                f"{PREFIX}_share_deliveries", "records acquired, by their delivery count", labels=["delivery_count"]
            )
            for count, n in sorted(stats.share.deliveries.items()):
                deliveries.add_metric([str(count)], float(n))
            yield deliveries
        lag = GaugeMetricFamily(
            f"{PREFIX}_lag", "end offset minus committed offset, per assigned partition",
            labels=["group", "topic", "partition"],
        )
        for (topic, partition), value in sorted(stats.lag.items()):
            lag.add_metric([self._group, topic, str(partition)], float(value))
        yield lag


class Metrics:
    """MTC75's collectors: status snapshots and handler durations, on ``registry`` or an own one.

    An own registry also carries this process's CPU and memory (``process_*``) and is registered at once;
    a service's registry gets MTC75's collectors by :meth:`register` (and gives them back by :meth:`unregister`).
    """

    def __init__(self, group: str = "", registry: CollectorRegistry | None = None,
                 health: Callable[[], Health] | None = None) -> None:
        self.own = registry is None
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        self._collector = StatsCollector(group, health)
        self.handler_duration = Histogram(
            f"{PREFIX}_handler_duration_seconds", "time one handler call took (failures included)",
            buckets=DURATION_BUCKETS, registry=None,
        )
        self._registered = False
        if self.own:
            ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes
            self.register()

    def register(self) -> None:
        """Put MTC75's collectors on the registry (ConfigError: it holds them already, e.g. another consumer's)."""
        if self._registered:
            return
        try:
            self.registry.register(self._collector)
        except ValueError as err:
            raise ConfigError(f"metrics_registry already has MTC75's metrics (another consumer's?): {err}") from None
        try:
            self.registry.register(self.handler_duration)
        except ValueError as err:
            self.registry.unregister(self._collector)
            raise ConfigError(f"metrics_registry already has MTC75's metrics (another consumer's?): {err}") from None
        self._registered = True

    def unregister(self) -> None:
        """Take MTC75's collectors off the registry (a later consumer may register its own)."""
        if self._registered:
            self.registry.unregister(self._collector)
            self.registry.unregister(self.handler_duration)
            self._registered = False

    def update(self, stats: Stats) -> None:
        """Called with each status snapshot (on the poll thread)."""
        self._collector.update(stats)

    wants_cpu = False  # a call observer of the invoker: durations only

    def call_ended(self, seconds: float, cpu: float | None) -> None:
        """One handler call ended (on its thread): into the duration histogram."""
        self.handler_duration.observe(seconds)
