"""``MAX_THREAD_COUNT = "auto"`` in the engine: sample the pool, ask the AutoTuner, resize the dispatcher.

The glue between :class:`mtc75.core.autotune.AutoTuner` (pure policy) and a running consumer. The
engine makes two calls: :meth:`AutoThreads.tick` on every poll-loop turn (a comparison unless a sample
is due), and :meth:`AutoThreads.retune` when MAX_THREAD_COUNT changes while running (a number <-> "auto").
While the mode is "auto" its :class:`LatencyMeter` observes every handler call of the invoker
(:mod:`mtc75.runtime.invoker`); in fixed mode it is detached and costs nothing.

Every ``SAMPLE_INTERVAL`` a :class:`~mtc75.core.autotune.Sample` is built from: completions (the engine's
processed count), handler latency (the mean of the calls that ended since the last sample), busy
permits, messages that could start now (the dispatcher's ``ready``: retries waiting out a backoff and
messages blocked behind their key or partition are no demand),
the process's CPU time over wall time and cores, and the handlers' CPU in cores (their time in
progress times the share of it their threads spent on a CPU: a core's worth that another thread
does not raise is the GIL, see :mod:`mtc75.core.autotune`). A changed limit goes through
``dispatcher.resize`` -- the live resize, which never cancels a running handler -- and one debug line
with the tuner's reason.

Threads: everything here is poll-thread only, except :meth:`LatencyMeter.call_ended`, which the invoker
calls on worker threads (or the event loop thread of an async handler). Each call writes only its own
thread's tally, so no lock is on the hot path; the poll thread only reads tallies (a float and an int
whose reads are atomic) and takes a lock once per new thread, to list its tally.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from mtc75.core.autotune import AutoTuner, Sample
from mtc75.runtime.invoker import Invoker
from mtc75.settings import AUTO, Settings

logger = logging.getLogger(__name__)

# Samples go to the tuner four times a second: its windows last at least a second (AutoTuner.interval),
# and "messages were waiting in at least half of the samples" needs several samples per window.
SAMPLE_INTERVAL = 0.25
TREND_SHOWN = 5.0  # seconds a change keeps its arrow on the dashboard; then the count shows as holding


class Pool(Protocol):
    """What the glue needs of :class:`mtc75.runtime.dispatcher.Dispatcher` (tests pass a fake)."""

    @property
    def max_thread_count(self) -> int: ...

    @property
    def active_thread_count(self) -> int: ...

    @property
    def ready(self) -> int: ...

    def resize(self, limit: int) -> None: ...


class _Tally:
    """One thread's handler calls: written only by that thread."""

    __slots__ = ("count", "cpu", "cpu_wall", "thread", "total")

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.total = 0.0  # seconds spent in the handler
        self.count = 0  # calls ended
        self.cpu = 0.0  # thread CPU seconds of the calls whose CPU was measured
        self.cpu_wall = 0.0  # wall seconds of those same calls


class LatencyMeter:
    """Handler durations, summed per thread without a lock; :meth:`read` returns what ended since the last read.

    A call observer of the invoker (:class:`mtc75.runtime.invoker.CallObserver`) while attached: the
    invoker measures, the meter sums. Calls of a plain handler also bring their thread CPU time now and
    then: :meth:`read_cpu` gives the share of handler time spent on a CPU, which tells a GIL-bound handler
    from one that waits (a coroutine's thread runs other coroutines between its awaits: async calls bring none).
    """

    wants_cpu = True

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _tallies (appended by a thread's first call, read by the poll thread)
        self._tallies: list[_Tally] = []
        self._gone_count = 0  # totals of threads that ended (their tallies are dropped)
        self._gone_total = 0.0
        self._seen = (0, 0.0)  # (count, total) at the last read
        self._gone_cpu = (0.0, 0.0)  # (cpu, cpu_wall) of threads that ended
        self._seen_cpu = (0.0, 0.0)  # (cpu, cpu_wall) at the last read_cpu

    def call_ended(self, seconds: float, cpu: float | None) -> None:
        """One handler call ended on this thread (the invoker's report)."""
        try:
            t = self._local.tally
        except AttributeError:
            t = self._tally()
        if cpu is not None:
            t.cpu += cpu
            t.cpu_wall += seconds
        t.total += seconds
        t.count += 1  # after total: a read between the two sees the old count, never a short total

    def _tally(self) -> _Tally:
        try:
            return self._local.tally  # type: ignore[no-any-return]
        except AttributeError:
            t = _Tally(threading.current_thread())
            with self._lock:
                self._tallies.append(t)
            self._local.tally = t
            return t

    def read(self) -> tuple[int, float]:
        """(calls ended since the last read, their mean duration in seconds). Poll thread only."""
        with self._lock:
            tallies: list[_Tally] = []
            ended: list[_Tally] = []
            for t in self._tallies:  # one is_alive() per thread: a thread ending meanwhile lands in one list
                (tallies if t.thread.is_alive() else ended).append(t)
            if ended:  # a resize replaces the executor: its old threads end; keep their sums, not their objects
                self._tallies = tallies
        for t in ended:
            self._gone_count += t.count
            self._gone_total += t.total
            self._gone_cpu = (self._gone_cpu[0] + t.cpu, self._gone_cpu[1] + t.cpu_wall)
        count = self._gone_count + sum(t.count for t in tallies)
        total = self._gone_total + sum(t.total for t in tallies)
        seen_count, seen_total = self._seen
        self._seen = (count, total)
        calls = count - seen_count
        return calls, ((total - seen_total) / calls if calls > 0 else 0.0)

    def read_cpu(self) -> float | None:
        """CPU share of the handler calls measured since the last call (0..1), None if none were. Poll thread
        only; call it after :meth:`read`, which retires the tallies of ended threads. A call ending during
        the read may count its CPU and not its wall time (or the reverse): one call in a window, at most."""
        with self._lock:
            tallies = list(self._tallies)
        cpu = self._gone_cpu[0] + sum(t.cpu for t in tallies)
        wall = self._gone_cpu[1] + sum(t.cpu_wall for t in tallies)
        seen_cpu, seen_wall = self._seen_cpu
        self._seen_cpu = (cpu, wall)
        if wall - seen_wall <= 0:
            return None
        return min(1.0, max(0.0, (cpu - seen_cpu) / (wall - seen_wall)))


class AutoThreads:
    """Owns the tuner of one consumer; ``mode`` is "auto" or "fixed". Poll thread only (see the module notes)."""

    def __init__(
        self,
        settings: Settings,
        invoker: Invoker,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
        cores: int | None = None,
        meter: LatencyMeter | None = None,
        interval: float = SAMPLE_INTERVAL,
    ) -> None:
        self.min_threads = settings.MIN_THREAD_COUNT
        self.max_threads = settings.MAX_THREAD_LIMIT
        self.initial = settings.initial_threads()
        self.limit = self.initial  # the permit count in effect (what Stats.max_thread_count reports)
        self.meter = meter if meter is not None else LatencyMeter()
        self._invoker = invoker
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._cores = cores or _cores()
        self._interval = interval
        self._tuner: AutoTuner | None = None
        self._next = 0.0
        self._mark: tuple[float, float, int] | None = None  # (wall, cpu, processed) at the last sample
        self._changed_at = -TREND_SHOWN  # when the tuner last changed the count
        self._gil_told = 0  # the tuner's GIL verdicts already logged
        if settings.auto_threads:
            self._start(self.initial)

    @property
    def mode(self) -> str:
        return AUTO if self._tuner is not None else "fixed"

    @property
    def trend(self) -> int:
        """+1 within TREND_SHOWN of a step up, -1 of a step down, else 0 (holding, or fixed)."""
        if self._tuner is None or self._clock() - self._changed_at > TREND_SHOWN:
            return 0
        return self._tuner.trend

    def tick(self, processed: int, pool: Pool) -> None:
        """One poll-loop turn: when a sample is due, step the tuner and apply its decision."""
        tuner = self._tuner
        if tuner is None:
            return
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self._interval
        cpu_now = self._cpu_clock()
        mark, self._mark = self._mark, (now, cpu_now, processed)
        calls, latency = self.meter.read()
        share = self.meter.read_cpu()
        if mark is None:
            return  # the first sample only sets the reference point
        wall = now - mark[0]
        cpu = min(1.0, max(0.0, (cpu_now - mark[1]) / (wall * self._cores))) if wall > 0 else None
        # handler seconds per second (the mean number of calls in progress) times their CPU share
        handler_cpu = share * calls * latency / wall if share is not None and wall > 0 else None
        completed = max(0, processed - mark[2])
        sample = Sample(
            now=now, completed=completed, latency=latency if calls else 0.0,
            busy=pool.active_thread_count, waiting=pool.ready, cpu=cpu, handler_cpu=handler_cpu,
        )
        decision = tuner.step(sample)
        if decision.changed:
            self._changed_at = now
            self._resize(pool, decision.limit)
            logger.debug("auto threads %s", decision.reason)
        if tuner.gil_verdicts != self._gil_told:
            self._gil_told = tuner.gil_verdicts
            self._tell_gil(handler_cpu)

    def _tell_gil(self, handler_cpu: float | None) -> None:
        """Once per GIL verdict of the tuner: what would help (threads cannot)."""
        if self._invoker.processes:
            return  # already in worker processes: each has a GIL of its own
        cores = f"{handler_cpu:.2f} cores" if handler_cpu is not None else "a core"
        logger.info(
            "auto threads: the handlers hold the GIL (they use %s between them at %d threads): more threads "
            "cannot run them faster; RUNNER=\"processes\" would run them in worker processes, one per core "
            "(%d here)", cores, self.limit, self._cores,
        )

    def retune(self, value: int | str, pool: Pool) -> None:
        """MAX_THREAD_COUNT changed while running: "auto" starts tuning from the current count; a number stops it."""
        if value == AUTO:
            if self._tuner is None:
                start = min(self.max_threads, max(self.min_threads, self.limit))
                if start != self.limit:
                    self._resize(pool, start)
                self._start(start)
                logger.debug("auto threads: tuning from %d (bounds %d..%d)", start, self.min_threads, self.max_threads)
            return
        self._tuner = None
        self._invoker.detach(self.meter)
        self._resize(pool, int(value))

    def _resize(self, pool: Pool, limit: int) -> None:
        pool.resize(limit)
        self.limit = limit

    def _start(self, initial: int) -> None:
        self._tuner = AutoTuner(self.min_threads, self.max_threads, initial)
        self._gil_told = 0
        self._mark = None
        self._next = 0.0
        self._invoker.attach(self.meter)
        self.meter.read()  # forget calls timed before this start
        self.meter.read_cpu()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
