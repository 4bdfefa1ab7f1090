"""What a running consumer reports: the :class:`Stats` snapshot and the one throughput estimator.

Pure: no Kafka, no clock of its own (callers pass ``now``). Threads: the poll thread builds ``Stats``
and feeds :class:`Throughput`; a ``Stats`` is frozen, so any thread may read one it was handed
(observers: the app's dashboard, status line, metrics and report, the library API).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from mtc75.core.offsets import Partition

RATE_WINDOW = 0.25  # seconds between throughput samples
RATE_SMOOTHING = 0.5  # weight of the newest sample in the smoothed rate


class Throughput:
    """Completions per second, sampled at most every ``window`` seconds and smoothed.

    One instance per consumer: the pause gate sizes its watermarks from it and the status snapshot
    shows it. Poll thread only (no lock).
    """

    def __init__(self, window: float = RATE_WINDOW, smoothing: float = RATE_SMOOTHING) -> None:
        self._window = window
        self._smoothing = smoothing
        self._rate = 0.0
        self._sample_at: float | None = None
        self._sample_count = 0

    def observe(self, now: float, completed_total: int) -> None:
        """Feed the running count of finished messages; cheap enough to call every loop turn."""
        if self._sample_at is None:
            self._sample_at, self._sample_count = now, completed_total
            return
        elapsed = now - self._sample_at
        if elapsed < self._window:
            return
        rate = (completed_total - self._sample_count) / elapsed
        self._rate = rate if self._rate == 0 else (1 - self._smoothing) * self._rate + self._smoothing * rate
        self._sample_at, self._sample_count = now, completed_total

    @property
    def rate(self) -> float:
        return self._rate


@dataclass(frozen=True)
class ShareCounts:
    """A share-group run's acknowledgements (GROUP_TYPE="share"; docs/share-groups.md): running totals."""

    acquired: int = 0  # records polled (each delivery counts once)
    accepted: int = 0  # acknowledged ACCEPT: handled, skipped, or dead-lettered and confirmed
    released: int = 0  # acknowledged RELEASE: not run in time, failed with deliveries left, or at shutdown
    lock_expired: int = 0  # handlers still running when their record's lock ended: the record went back
    rejoined: int = 0  # redeliveries that took the outcome of this member's still-running handler
    refused: int = 0  # ACCEPTs the broker refused (the lock had ended first): delivered again, a duplicate
    deliveries: Mapping[int, int] = field(default_factory=dict)  # delivery count -> records acquired with it

    @property
    def redelivered(self) -> int:
        """Records acquired on a second or later delivery."""
        return sum(n for count, n in self.deliveries.items() if count > 1)


@dataclass(frozen=True)
class Stats:
    """A snapshot for status lines and summaries (taken on the poll thread)."""

    active_threads: int
    max_thread_count: int
    paused: bool
    paused_for: float
    next_check_in: float
    processed: int
    failed: int
    rate: float  # finished messages per second (Throughput: samples every RATE_WINDOW, smoothed)
    in_flight: int
    backlog: int
    pauses: int
    paused_seconds: float
    elapsed_seconds: float
    max_active_threads: int
    assigned: int
    retried: int = 0  # retries scheduled after a handler raised
    dead_lettered: int = 0  # messages confirmed on <topic>.dlq after their last attempt
    skipped: int = 0  # messages given up after their last attempt (ON_FAILURE=skip)
    dropped_late: int = 0  # completions after their partition was revoked or lost: not counted, not committed
    abandoned: int = 0  # handlers still running when a revoke or shutdown stopped waiting for them
    workers: str = "threads"  # what MAX_THREAD_COUNT bounds: "threads", or "coroutines" for an async handler
    # end offset minus committed offset per assigned partition (refreshed with each status snapshot)
    lag: Mapping[Partition, int] = field(default_factory=dict)
    thread_mode: str = "fixed"  # "auto" while MAX_THREAD_COUNT = "auto" tunes max_thread_count
    thread_trend: int = 0  # +1 / -1 just after auto stepped the count up / down, 0 holding (or fixed)

    ordering: str = "unordered"  # ORDERING: unordered, partition or key
    blocked: int = 0  # waiting messages that must wait for an earlier one of their key or partition
    fetch_sizes: str = ""  # e.g. "large (50 MB / 1 MB)": FETCH_SIZES' choice for this run ("" before it ran)
    pause_interval: float = 0.0  # PAUSE_INTERVAL in effect (it may change live)
    brokers_down: bool = False  # librdkafka reported every broker down and none has answered since
    max_rate: float = 0.0  # MAX_RATE in effect, messages per second (0: no limit; it may change live)
    key_rate: float = 0.0  # KEY_RATE in effect, messages per second per key (0: no limit)
    throttled: int = 0  # waiting messages whose start waits for rate tokens (part of backlog)
    throttled_seconds: float = 0.0  # seconds during which at least one message waited for a MAX_RATE token
    key_throttled_seconds: float = 0.0  # seconds during which at least one message waited for its key's token
    batch_size: int = 1  # BATCH_SIZE in effect: above 1 the handler takes lists (a batch handler)
    batches: int = 0  # a batch handler's calls that completed (their messages count in processed)

    @property
    def mean_batch(self) -> float:
        """Messages per completed batch call (0 before the first)."""
        return self.processed / self.batches if self.batches else 0.0
    share: ShareCounts | None = None  # GROUP_TYPE="share": the acknowledgements (None for a consumer group)

    @classmethod
    def idle(cls, max_thread_count: int, thread_mode: str = "fixed", ordering: str = "unordered") -> Stats:
        """The snapshot before a run has started."""
        return cls(
            active_threads=0, max_thread_count=max_thread_count, paused=False, paused_for=0.0, next_check_in=0.0,
            processed=0, failed=0, rate=0.0, in_flight=0, backlog=0, pauses=0, paused_seconds=0.0,
            elapsed_seconds=0.0, max_active_threads=0, assigned=0, thread_mode=thread_mode,
            ordering=ordering,
        )

    def summary(self) -> dict[str, Any]:
        """The run summary as a JSON-ready dict (the CLI's ``--summary-json`` document)."""
        keys = (
            "processed", "failed", "retried", "dead_lettered", "skipped", "pauses", "paused_seconds",
            "elapsed_seconds", "max_active_threads", "abandoned",
        )
        data = asdict(self)
        out = {k: data[k] for k in keys}
        out["paused_seconds"] = round(out["paused_seconds"], 3)
        out["elapsed_seconds"] = round(out["elapsed_seconds"], 3)
        out["max_thread_count"] = self.max_thread_count
        out["thread_mode"] = self.thread_mode
        out["ordering"] = self.ordering
        out["fetch_sizes"] = self.fetch_sizes
        out["max_rate"] = self.max_rate
        out["key_rate"] = self.key_rate
        out["throttled_seconds"] = round(self.throttled_seconds, 3)
        out["key_throttled_seconds"] = round(self.key_throttled_seconds, 3)
        out["batch_size"] = self.batch_size
        out["calls"] = self.batches if self.batch_size > 1 else self.processed  # handler calls that completed
        out["group_type"] = "consumer" if self.share is None else "share"
        if self.share is not None:
            out["share"] = {**asdict(self.share), "deliveries": {str(k): v for k, v in
                                                                 sorted(self.share.deliveries.items())}}
        return out
