"""Liveness and readiness of one consumer, judged from its status snapshots: what ``/healthz`` and ``/readyz``
answer, and what ``mtc75.Consumer.health()`` returns.

Alive: the run has started and not ended, and the poll loop turned (a snapshot came: the loop hands one over
every quarter second while it turns) within ``max.poll.interval.ms`` -- past that librdkafka itself leaves
the group. Ready: alive, with partitions assigned and a broker reachable.

Pure: no clock of its own (callers pass ``now``, monotonic seconds). Threads: the poll thread calls
:meth:`HealthWatch.update` (one reference swap), the owning thread :meth:`HealthWatch.started` /
:meth:`HealthWatch.ended`; any thread (an HTTP server's) calls :meth:`HealthWatch.judge`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtc75.core.stats import Stats

DEFAULT_MAX_POLL_INTERVAL = 300.0  # librdkafka's max.poll.interval.ms default, in seconds


@dataclass(frozen=True)
class Health:
    """One answer: ``alive`` (``/healthz``), ``ready`` (``/readyz``) and why not, for people and probes."""

    alive: bool
    ready: bool
    reason: str  # "ok", or what is wrong
    last_poll_age: float | None  # seconds since the poll loop last turned (None: it never did)
    assigned: int


class HealthWatch:
    """Keeps the latest snapshot and when it came; judges liveness and readiness on demand."""

    def __init__(self, max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL) -> None:
        self.max_poll_interval = max_poll_interval
        self._seen: tuple[float, Stats] | None = None  # (when, snapshot): swapped whole
        self._started_at: float | None = None
        self._ended = False

    def started(self, now: float) -> None:
        """The run starts: start-up (connecting, checking the topic) counts as turning until the first snapshot."""
        self._started_at = now

    def update(self, now: float, stats: Stats) -> None:
        self._seen = (now, stats)

    def ended(self) -> None:
        self._ended = True

    def judge(self, now: float) -> Health:
        seen, started_at = self._seen, self._started_at
        age = now - seen[0] if seen is not None else None
        assigned = seen[1].assigned if seen is not None else 0
        if started_at is None:
            return Health(False, False, "not started", age, assigned)
        if self._ended:
            return Health(False, False, "stopped", age, assigned)
        since = age if age is not None else now - started_at
        if since > self.max_poll_interval:
            return Health(False, False, f"the poll loop has not turned for {since:.1f}s (max.poll.interval.ms "
                                        f"{self.max_poll_interval * 1000:.0f})", age, assigned)
        if seen is None:
            return Health(True, False, "starting", age, assigned)
        if seen[1].brokers_down:
            return Health(True, False, "no broker reachable", age, assigned)
        if assigned == 0:
            return Health(True, False, "no partitions assigned", age, assigned)
        return Health(True, True, "ok", age, assigned)
