"""The engine glue of MAX_THREAD_COUNT = "auto" (mtc75/engine/autothreads.py) without a broker.

A fake clock, a fake CPU clock and a fake pool driven by a workload model (thread count -> throughput,
latency, CPU): the glue must build its samples from them, resize the pool only through ``resize``,
log each change with its reason, stop growing on a full CPU or an empty backlog, and switch modes.
The latency meter is tested fed by the invoker (real threads, sync and async handlers, injected clocks).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from mtc75.core.offsets import PartitionState
from mtc75.core.work import Work
from mtc75.engine.autothreads import SAMPLE_INTERVAL, TREND_SHOWN, AutoThreads, LatencyMeter
from mtc75.runtime.invoker import Invoker
from mtc75.settings import Settings
from tests import process_handlers
from tests.fake_kafka import FakeMessage

Model = Callable[[int], tuple[float, float, float]]  # threads -> (msg/s, latency s, cpu share of the machine)


def degrading(n: int) -> tuple[float, float, float]:
    """The issue-14 service: 20 slots of 20 ms, every call slower by excess/20 beyond 20 outstanding."""
    served = 0.02 * (1 + max(0, n - 20) / 20)
    rate = min(n, 20) / served
    return rate, n / rate, 0.1


def cpu_bound(n: int) -> tuple[float, float, float]:
    """5 ms of CPU per message under the GIL: one core's worth whatever the count, the process at 50 %+."""
    return 200.0, 0.005 * n, 0.5


def sleeping(n: int) -> tuple[float, float, float]:
    """20 ms of sleep, no downstream limit: throughput grows with every thread."""
    return n / 0.02, 0.02, 0.05


class FakeMeter:
    """Stands in for LatencyMeter: the pool reports the model's calls and latency."""

    wants_cpu = True

    def __init__(self) -> None:
        self.pending = (0, 0.0)
        self.share: float | None = None  # the handlers' CPU share of their time (None: not measured)

    def call_ended(self, seconds: float, cpu: float | None) -> None:
        pass

    def read(self) -> tuple[int, float]:
        out, self.pending = self.pending, (0, 0.0)
        return out

    def read_cpu(self) -> float | None:
        return self.share


class FakePool:
    """A dispatcher whose permits follow ``resize``; ``advance`` runs the model for some seconds."""

    def __init__(self, model: Model, limit: int, meter: FakeMeter, cores: int, waiting: int = 500) -> None:
        self.model = model
        self.demand: float | None = None  # messages arriving per second (None: an endless backlog)
        self.max_thread_count = limit
        self.meter = meter
        self.cores = cores
        self.waiting = waiting
        self.delayed = 0  # failed messages waiting out a backoff
        self.blocked = 0  # messages waiting behind a running one of their key (ORDERING=key)
        self.resizes: list[int] = []
        self.processed = 0
        self.cpu = 0.0
        self.history: list[tuple[float, int, float]] = []  # (t, limit, rate)
        self.share_of: Callable[[int], float | None] = lambda _n: None  # threads -> handlers' CPU share
        self._carry = 0.0

    @property
    def active_thread_count(self) -> int:
        if self.demand is not None:  # Little's law: arrivals x latency threads busy
            rate, latency, _ = self.model(self.max_thread_count)
            return min(self.max_thread_count, round(min(rate, self.demand) * latency))
        return self.max_thread_count if self.waiting else 0

    @property
    def ready(self) -> int:
        return self.waiting

    @property
    def backlog(self) -> int:  # what a glue reading the wrong figure would see
        return self.waiting + self.delayed + self.blocked

    def resize(self, limit: int) -> None:
        assert limit >= 1
        self.resizes.append(limit)
        self.max_thread_count = limit

    def advance(self, t: float, seconds: float) -> None:
        rate, latency, cpu = self.model(self.max_thread_count)
        if self.demand is not None:
            self.waiting = 0 if rate >= self.demand else 500
            rate = min(rate, self.demand)
        elif not self.waiting:
            return
        self._carry += rate * seconds
        done = int(self._carry)
        self._carry -= done
        self.processed += done
        self.meter.pending = (self.meter.pending[0] + done, latency)
        self.meter.share = self.share_of(self.max_thread_count)
        self.cpu += cpu * self.cores * seconds
        self.history.append((t, self.max_thread_count, rate))


class Harness:
    def __init__(self, model: Model, *, cores: int = 2, waiting: int = 500, **settings: Any) -> None:
        self.t = 0.0
        self.meter = FakeMeter()
        self.settings = Settings().replace(**{"MAX_THREAD_COUNT": "auto", **settings})
        self.pool = FakePool(model, self.settings.initial_threads(), self.meter, cores, waiting)
        self.invoker = Invoker(lambda m: None)
        self.glue = AutoThreads(self.settings, self.invoker, clock=lambda: self.t, cpu_clock=lambda: self.pool.cpu,
                                cores=cores, meter=self.meter)  # type: ignore[arg-type]

    def run(self, seconds: float) -> None:
        end = self.t + seconds
        while self.t < end:
            self.pool.advance(self.t, SAMPLE_INTERVAL)
            self.t += SAMPLE_INTERVAL
            self.glue.tick(self.pool.processed, self.pool)

    def rate(self, start: float, end: float) -> float:
        rows = [r for t, _, r in self.pool.history if start <= t < end]
        return sum(rows) / len(rows)


def test_degrading_service_settles_on_its_20_slots(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(degrading)
    assert h.glue.mode == "auto" and h.pool.max_thread_count == 1  # starts at MIN_THREAD_COUNT
    with caplog.at_level(logging.DEBUG, logger="mtc75.engine.autothreads"):
        h.run(90)
    assert 18 <= h.pool.max_thread_count <= 24, h.pool.resizes
    assert h.glue.limit == h.pool.max_thread_count  # what Stats reports
    assert h.rate(60, 90) >= 0.9 * 1000  # the best fixed count (20) serves 1000/s
    assert h.pool.resizes and h.pool.resizes[0] == 2  # slow start doubles from 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto threads")]
    assert len(lines) == len(h.pool.resizes)  # one debug line per change, with its reason
    assert "1 -> 2: slow start" in lines[0]


def test_starting_from_a_number_switched_to_auto_comes_down_from_75() -> None:
    h = Harness(degrading, MAX_THREAD_COUNT=75)
    h.pool.max_thread_count = 75
    h.glue.retune("auto", h.pool)
    h.run(90)
    assert 18 <= h.pool.max_thread_count <= 24, h.pool.resizes
    assert h.pool.resizes[0] < 75  # a configured count is probed downwards first


def test_cpu_bound_handler_stays_at_the_bottom() -> None:
    h = Harness(cpu_bound, cores=2)
    h.run(60)
    assert max(n for _, n, _ in h.pool.history) <= 2  # flat throughput: more threads never paid
    assert h.pool.max_thread_count <= 2


def test_gil_bound_handler_is_probed_up_once_then_held() -> None:
    """5 ms of CPU under the GIL: each of n threads gets 1/n of a core (0.9 of it: the poll thread takes
    the rest). One up-probe to 2 finds that; no more excursions after it (each doubled the latency)."""
    h = Harness(cpu_bound, cores=2)
    h.pool.share_of = lambda n: 0.9 / n
    h.run(120)
    assert h.pool.resizes == [2, 1]
    assert [n for t, n, _ in h.pool.history if t >= 10] == [1] * len([t for t, _, _ in h.pool.history if t >= 10])


@pytest.mark.parametrize("runner", ["threads", "processes"])
def test_a_gil_bound_handler_is_told_once_that_the_process_runner_would_help(
    caplog: pytest.LogCaptureFixture, runner: str
) -> None:
    h = Harness(cpu_bound, cores=2)
    h.pool.share_of = lambda n: 0.9 / n
    if runner == "processes":  # already in worker processes: nothing to tell
        h.glue._invoker = Invoker(process_handlers.noop, processes=2)
    with caplog.at_level(logging.INFO, logger="mtc75.engine.autothreads"):
        h.run(120)
    told = [r.getMessage() for r in caplog.records if "GIL" in r.getMessage() and r.levelno == logging.INFO]
    if runner == "threads":
        assert len(told) == 1, told  # once per verdict, not once per sample
        assert 'RUNNER="processes" would run them in worker processes, one per core (2 here)' in told[0]
    else:
        assert told == []


def test_a_waiting_handler_is_never_told_about_the_gil(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(degrading)
    with caplog.at_level(logging.INFO, logger="mtc75.engine.autothreads"):
        h.run(60)
    assert not [r for r in caplog.records if "GIL" in r.getMessage()]


def test_handler_cpu_is_their_cpu_share_times_their_busy_time() -> None:
    seen: list[Any] = []
    h = Harness(lambda n: (100.0, 0.02, 0.25), cores=4)  # 100 calls of 20 ms a second: two in progress
    h.pool.share_of = lambda _n: 0.5
    h.glue._tuner.step = lambda sample: seen.append(sample) or _keep()  # type: ignore[union-attr, method-assign]
    h.run(3)
    assert len(seen) >= 8 and all(s.handler_cpu == pytest.approx(1.0, rel=0.3) for s in seen[1:])
    h.pool.share_of = lambda _n: None  # nothing measured (async handlers): nothing claimed
    seen.clear()
    h.run(1)
    assert seen and all(s.handler_cpu is None for s in seen)


def test_full_cpu_stops_growth_even_when_threads_would_pay() -> None:
    def hot(n: int) -> tuple[float, float, float]:
        rate, latency, _ = sleeping(n)
        return rate, latency, 0.95  # the process uses 95 % of the machine's cores

    h = Harness(hot)
    h.run(30)
    assert h.pool.resizes == [] and h.pool.max_thread_count == 1


def test_sleep_handler_grows_to_the_limit() -> None:
    h = Harness(sleeping, MAX_THREAD_LIMIT=64)
    h.run(60)
    assert h.pool.max_thread_count == 64
    assert max(h.pool.resizes) == 64  # never past MAX_THREAD_LIMIT


def test_a_limit_between_two_doublings_caps_the_count_there() -> None:
    """Slow start doubles 1, 2, 4 ... 32; the next doubling would be 64: MAX_THREAD_LIMIT=50 stops it at 50,
    and no later probe goes past it (a power of two as the limit would never exercise the cap)."""
    h = Harness(sleeping, MAX_THREAD_LIMIT=50)
    h.run(90)
    assert h.pool.resizes[:6] == [2, 4, 8, 16, 32, 50]
    assert max(h.pool.resizes) == 50 and h.pool.max_thread_count == 50 and h.glue.limit == 50


def test_idle_consumer_stays_put() -> None:
    h = Harness(sleeping, waiting=0)
    h.run(30)
    assert h.pool.resizes == []


def test_no_backlog_no_growth() -> None:
    """200 msg/s arrive; 4 threads of 20 ms serve them. Busy, never backlogged: the count must not ratchet up."""
    h = Harness(sleeping, MIN_THREAD_COUNT=8)
    h.pool.demand = 200.0
    h.run(60)
    assert h.pool.resizes == [] and h.pool.processed >= 200 * 59
    h.pool.demand = 2000.0  # demand beyond 8 threads: now it grows, and stops where demand is met
    h.run(60)
    assert 40 <= h.pool.max_thread_count <= 90, h.pool.resizes


def test_retries_and_blocked_messages_are_not_demand() -> None:
    """4 threads serve all 200 msg/s arriving; 400 failed messages wait out a backoff and 400 wait behind a
    busy key: no thread could start them, so nothing to grow for."""
    h = Harness(sleeping, MIN_THREAD_COUNT=4)
    h.pool.demand = 200.0
    h.pool.delayed = 400
    h.pool.blocked = 400
    h.run(30)
    assert h.pool.resizes == [] and h.pool.processed >= 200 * 29


def test_fixed_mode_never_resizes_and_does_not_time() -> None:
    h = Harness(degrading, MAX_THREAD_COUNT=75)
    assert h.glue.mode == "fixed" and h.glue.trend == 0 and h.glue.initial == 75
    h.pool.max_thread_count = 75
    h.run(20)
    assert h.pool.resizes == [] and h.invoker.observers == ()


def test_retune_switches_modes_and_clamps_to_the_bounds() -> None:
    h = Harness(degrading, MAX_THREAD_COUNT=300, MAX_THREAD_LIMIT=64)
    h.pool.max_thread_count = 300
    h.glue.retune("auto", h.pool)
    assert h.glue.mode == "auto" and h.invoker.observers == (h.meter,) and h.pool.resizes == [64]
    h.run(10)
    h.glue.retune(12, h.pool)
    assert h.glue.mode == "fixed" and h.invoker.observers == () and h.pool.max_thread_count == h.glue.limit == 12
    changes = len(h.pool.resizes)
    h.run(10)
    assert len(h.pool.resizes) == changes  # fixed again: the tuner is gone
    h.glue.retune("auto", h.pool)
    assert h.pool.max_thread_count == 12 and len(h.pool.resizes) == changes  # within bounds: no resize


def test_trend_shows_the_last_step_then_fades() -> None:
    h = Harness(sleeping, MAX_THREAD_LIMIT=4)
    while not h.pool.resizes:
        h.run(SAMPLE_INTERVAL)
    assert h.glue.trend == 1
    h.run(TREND_SHOWN + 30)  # at the limit: no more changes
    assert h.pool.max_thread_count == 4 and h.glue.trend == 0


def test_cpu_is_measured_over_wall_time_and_cores() -> None:
    seen: list[Any] = []
    h = Harness(lambda n: (100.0, 0.01, 0.25), cores=4)
    h.glue._tuner.step = lambda sample: seen.append(sample) or _keep()  # type: ignore[union-attr, method-assign]
    h.run(2)
    assert seen and all(s.cpu == pytest.approx(0.25) for s in seen)
    assert all(s.waiting == 500 and s.busy == 1 for s in seen)
    assert sum(s.completed for s in seen) == pytest.approx(100 * (2 - SAMPLE_INTERVAL), abs=26)


def _keep() -> Any:
    from mtc75.core.autotune import Decision

    return Decision(1, False, "test")


# -- the latency meter, fed by the invoker --------------------------------------------------------------


def _timed(handler: Any, meter: LatencyMeter, **clocks: Any) -> Callable[[int], Any]:
    """``handler`` run through an invoker the meter observes: call(offset) -> the outcome."""
    invoker = Invoker(handler, **clocks)
    invoker.attach(meter)
    state = PartitionState(("t", 0))
    return lambda offset: invoker.invoke(Work(FakeMessage("t", 0, offset), state, offset))


def test_meter_times_calls_on_many_threads_without_losing_any() -> None:
    ticks = threading.local()

    def clock() -> float:  # per thread: each call "takes" exactly 0.25 s
        ticks.t = getattr(ticks, "t", 0.0) + 0.25
        return ticks.t

    meter = LatencyMeter()
    timed = _timed(lambda m: None, meter, clock=clock)
    threads = [threading.Thread(target=lambda: [timed(i) for i in range(1000)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    calls, mean = meter.read()
    assert calls == 8000 and mean == pytest.approx(0.25)
    assert meter.read() == (0, 0.0)  # only what ended since the last read


def test_meter_tells_a_cpu_bound_handler_from_a_waiting_one() -> None:
    """The share is the handlers' CPU seconds over their wall seconds, both from injected clocks: a real
    reading would depend on how much CPU the machine's other work leaves this thread."""
    clocks = threading.local()

    def wall() -> float:
        return getattr(clocks, "wall", 0.0)

    def cpu() -> float:
        return getattr(clocks, "cpu", 0.0)

    def handler(share: float) -> Callable[[Any], None]:
        def handle(_m: Any) -> None:  # 2 ms, ``share`` of it on a CPU
            clocks.wall, clocks.cpu = wall() + 0.002, cpu() + 0.002 * share
        return handle

    meter = LatencyMeter()
    for share in (0.9, 0.05):
        timed = _timed(handler(share), meter, clock=wall, cpu_clock=cpu)
        for i in range(50):
            timed(i)
        assert meter.read() == (50, pytest.approx(0.002))
        assert meter.read_cpu() == pytest.approx(share)  # each 2 ms call is slow enough to be measured
    assert meter.read_cpu() is None  # no calls since the last read
    half = _timed(handler(0.5), meter, clock=wall, cpu_clock=cpu)
    other = threading.Thread(target=lambda: [half(i) for i in range(10)])
    other.start()
    other.join(10)
    meter.read()
    assert meter.read_cpu() == pytest.approx(0.5)  # another thread's calls, on its own clocks


def test_meter_samples_cpu_on_short_calls_only_now_and_then() -> None:
    reads = [0]

    def cpu_clock() -> float:
        reads[0] += 1
        return 0.0

    slow = LatencyMeter()
    timed = _timed(lambda m: None, slow, clock=iter(range(10**6)).__next__, cpu_clock=cpu_clock)  # each call 1 s
    for i in range(32):
        timed(i)
    assert reads[0] == 64  # slow calls: every one measured (two clock reads each)
    reads[0] = 0
    fast = LatencyMeter()
    timed = _timed(lambda m: None, fast, clock=lambda: 0.0, cpu_clock=cpu_clock)  # each call 0 s
    for i in range(64):
        timed(i)
    assert reads[0] == 2 * 64 // 16  # calls 0, 16, 32 and 48 of the thread


def test_meter_counts_failures_and_the_invoker_reports_them() -> None:
    meter = LatencyMeter()

    def boom(_m: Any) -> None:
        raise KeyError("x")

    assert isinstance(_timed(boom, meter)(1), KeyError)
    assert meter.read()[0] == 1


def test_meter_sees_nothing_until_attached_and_nothing_once_detached() -> None:
    meter = LatencyMeter()
    invoker = Invoker(lambda m: None)
    state = PartitionState(("t", 0))
    invoker.invoke(Work(FakeMessage("t", 0, 0), state, 0))
    assert meter.read() == (0, 0.0)
    invoker.attach(meter)
    invoker.invoke(Work(FakeMessage("t", 0, 1), state, 1))
    invoker.detach(meter)
    invoker.invoke(Work(FakeMessage("t", 0, 2), state, 2))
    assert meter.read()[0] == 1 and invoker.observers == ()


def test_meter_times_an_async_handler_awaited_by_the_invoker() -> None:
    meter = LatencyMeter()
    seen: list[int] = []

    async def handle(m: Any) -> None:
        await asyncio.sleep(0.01)
        seen.append(m.offset())

    invoker = Invoker(handle)
    invoker.attach(meter)
    assert invoker.is_async
    outcome = asyncio.run(invoker.invoke_async(Work(FakeMessage("t", 0, 7), PartitionState(("t", 0)), 7)))
    assert outcome is None and seen == [7]
    calls, mean = meter.read()
    assert calls == 1 and 0.008 <= mean < 1.0
    assert meter.read_cpu() is None  # a coroutine's thread runs other coroutines: no CPU share
