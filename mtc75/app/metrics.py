"""Prometheus metrics for ``--metrics-port``: the engine's status snapshots, served at ``/metrics``.

The counters and gauges are read from the latest :class:`~mtc75.core.stats.Stats` when Prometheus scrapes
(a custom collector), so the engine keeps no second set of counters. The handler duration histogram is
fed as a call observer of the one handler path (:class:`mtc75.runtime.invoker.CallObserver`): it never
wraps the handler, so it keeps whatever kind the handler is. Everything lives in an own registry, never
the global one, so several consumers (or tests) in one process do not collide.

Threads: the script's main thread builds, serves and closes; ``update`` runs on the poll thread (the
status callback) and swaps one reference that scrapes on the HTTP server's thread read; ``call_ended``
runs on worker threads or the event loop (prometheus_client's Histogram has its own lock).
"""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
)


class StatsCollector(Collector):
    """Serves the latest snapshot; values move once per status interval."""

    def __init__(self) -> None:
        self._stats: Stats | None = None

    def update(self, stats: Stats) -> None:
        self._stats = stats  # one reference swap: scrapes on the HTTP thread see a whole snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        if stats is None:
            return
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
            f"{PREFIX}_lag", "end offset minus committed offset, per partition", labels=["topic", "partition"]
        )
        for (topic, partition), value in sorted(stats.lag.items()):
            lag.add_metric([topic, str(partition)], float(value))
        yield lag


class Metrics:
    """The registry behind ``/metrics``: status snapshots, handler durations, and this process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._collector = StatsCollector()
        self.registry.register(self._collector)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes
        self.handler_duration = Histogram(
            f"{PREFIX}_handler_duration_seconds", "time one handler call took (failures included)",
            buckets=DURATION_BUCKETS, registry=self.registry,
        )
        self._server: WSGIServer | None = None

    def update(self, stats: Stats) -> None:
        """Called with each status snapshot (on the poll thread)."""
        self._collector.update(stats)

    wants_cpu = False  # a call observer of the invoker: durations only

    def call_ended(self, seconds: float, cpu: float | None) -> None:
        """One handler call ended (on its thread): into the duration histogram."""
        self.handler_duration.observe(seconds)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on a daemon thread; returns the bound port (useful with ``port=0``)."""
        try:
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as err:
            raise ConfigError(f"--metrics-port {port}: cannot listen on {addr}:{port}: {err.strerror or err}") from None
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
