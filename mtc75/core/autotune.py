"""``MAX_THREAD_COUNT = "auto"``: the controller that picks the permit count. Pure policy, no clock.

Poll thread only (no lock): the engine calls :meth:`AutoTuner.step` about every ``interval`` seconds
with a :class:`Sample` of what happened since the previous call, and applies the returned limit
through the dispatcher's live resize (which never cancels running work). Time comes in with the
sample, so tests drive it with a fake clock.

The algorithm: a probing hill-climber on throughput, with a latency guard.

* **Measure.** A window lasts at least ``interval`` and ``min_completions`` completions, and starts
  only once the last change has settled (one interval, or twice the handler latency if longer:
  completions of work started under the old count would blur the reading). It yields throughput
  ``X`` (completions per second) and mean handler latency ``L``.
* **Probe.** While saturated (messages waiting for a permit *and*, by Little's law, ``X * L`` at
  least 0.8 of the permits busy) the controller tries a neighbouring count and keeps it only if it
  pays: going up by a factor ``r`` must raise ``X`` by at least half (``GAIN``) of the ``r - 1``
  that linear scaling would give; going down may lose at most 0.3 (``LOSS``) of the proportional
  share (stricter: a down-probe kept by noise costs throughput, an up-probe kept by noise only
  threads). A verdict within 3 % of its bar is measured over one more window first.
* **Step sizes.** From ``min_threads`` the count doubles (slow start) until a probe fails: each
  doubling is judged on 10 completions per thread (not ``min_completions``) and, when kept, the next
  one starts at once; after the doubling that fails, the next probe bisects upwards (the doubling
  before it paid). A count given at start is a guess (the configured 75, say) and is probed
  downwards first. Later up-probes
  bisect towards the ceiling (the lowest count found no better than a lower one); probes that keep
  paying in one direction double their stride (10 %, 20 %, 40 %, at most 50 %). The smallest step
  is 10 % (at least 1): smaller changes hide in the noise of one window. A failed smallest step
  reverts and waits a hold-off that doubles with each failure (``hold``, up to ``max_hold``),
  alternating down and up: at the best count it sits still, with a short excursion now and then
  that keeps it honest when the workload moves. Throughput moving 25 % at a steady count restarts
  the exploration at once.
* **Bursts.** With the backlog known (the consumer's lag, :class:`Sample` ``backlog``), a backlog that
  would keep the current count busy for more than ``BURST_SECONDS`` in slow start while the handlers
  wait (under ``BURST_CPU`` cores between them and ``BURST_CPU_PER_THREAD`` each, the process under its
  CPU ceiling) is a burst: windows shrink
  to ``BURST_WINDOW`` (at least 5 handler latencies), a change settles in two latencies, and each
  slow-start step jumps to the count that would drain the backlog in ``BURST_DRAIN`` (at most
  ``BURST_STEP`` times the current one, at least double). A step up is kept when it drains
  ``BURST_GAIN`` faster, whatever its latency (a wide step shows less than GAIN per thread added, and
  longer sleeps while its threads start on a loaded machine; too many threads for a downstream show
  in the next window's latency: the guard below), and a window with permits idle (the client still
  fetching what the new threads need) is not judged: up to ``BURST_UNFED`` windows wait for a
  saturated one. At ``max_threads`` a burst does not probe down. From 1 thread, 20,000 messages of
  10 ms reach 75 threads in three short windows (1, 8, 64) instead of seven 2 s ones (issue 30).
* **Latency guard.** The lowest window latency seen is the uncontended baseline. When a saturated
  window shows ``L >= tolerance * baseline`` (2, Gradient2's default) the count drops at once to
  ``count / ratio`` (at most halving): overload of a downstream service shows up in latency first.
  If latency does not fall with the count, the service itself slowed down: the baseline moves up
  to the new latency instead of the count collapsing further.
* **Stay put** when there is nothing to learn: no completions (idle), no backlog or permits unused
  (demand is the limit: more threads cannot help, and an idle consumer must not ratchet up), and no
  growth while process CPU is at ``cpu_ceiling`` of the machine's cores (the process is the limit).
* **The GIL.** Handlers whose CPU adds up to a core's worth (``GIL_BUSY``) may be held by the GIL:
  then another thread only halves each call's speed (a CPU-bound handler at 2 threads: the same
  throughput, twice the latency). One up-probe tells: if it fails and the handlers still use no more
  than a core (``GIL_FREE``), the count stops growing while they keep a core busy, and the next
  up-probe waits ``GIL_RECHECK`` (300 s) instead of the hold-off (each probe doubled the latency for
  its window: 2.12x the best fixed count's p99 on the CPU-bound bench, ``python -m bench.autotune
  --only cpu``). Handlers using more than a core during the probe release the GIL; only the CPU
  guard bounds them. Once found, the verdict holds while the handlers use 0.4 of a core or more
  (``GIL_HOLD``: readings dip on a shared machine); handlers that start waiting are probed as usual.

Why this and not Gradient2 or AIMD alone: Gradient2 (Netflix concurrency-limits) grows whenever
latency holds, so on a sleep handler it climbs to the limit even where the process (GIL, poll
thread) already caps throughput, and its long-term latency average drifts up with the load it
causes. AIMD saws between the knee and a fraction of it, on every cycle. Judging each probe by the
throughput it bought finds the knee of the issue-14 service (20 slots: 20 threads 992 msg/s, 40
threads 499) from both sides, stops on a flat curve, and then holds still; the latency guard adds
the fast reaction to a service that degrades under a steady count.

Simulated (``tests/test_autotune.py``: windows of 1 s, noise 3 % on throughput and 2 % on latency;
200 seeds each; rates against the best fixed count of a sweep; "first" is the end of the first 5 s
window at >= 0.9 of it; "worst" the lowest 5 s window after 60 s, i.e. a probe's excursion):

========================================  ===============  ========================  =====  =====
workload                                  held count       rate 60-90 s / best       first  worst
========================================  ===============  ========================  =====  =====
issue-14 service, from 1 / from 75        20 / 20          0.994 / 0.994             25 s   0.96
20 ms sleep, process capped at 3,000/s    57-64 (knee 60)  0.94-1.00 (median 0.996)  20 s   0.86
50 ms sleep, no cap (limit 256)           256              0.995                     20 s   0.97
500 ms sleep (the seed's default handler) 256              0.98-0.99                 40 s   0.94
CPU-bound under the GIL, from 1 / 40      1 / 1            1.00                      5 s    1.00
CPU-bound, GIL released, 2 cores          2 (CPU guard)    0.967                     20 s   0.85
========================================  ===============  ========================  =====  =====

With twice the noise (6 % on both), 0-2 runs in 100 miss a target, and a flat curve is no longer
walked down reliably (one run in 100 held a CPU-bound handler at its starting 40 threads, at full
throughput): windows that noisy need a longer ``interval`` or more ``min_completions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GAIN = 0.5  # share of linear scaling an up-probe must gain to be kept
# share of its proportional throughput a down-probe may lose and still be kept: stricter than GAIN,
# since a down-probe kept by noise costs throughput, an up-probe kept by noise only threads
LOSS = 0.3
MIN_STEP = 0.10  # smallest probe, as a fraction of the count: below ~10 % one window's noise hides it
SATURATED_BUSY = 0.8  # Little's-law busy fraction above which the permits are the constraint
CLOSE_CALL = 0.03  # a probe within 3 % of its bar is measured one more window before the verdict
DRIFT = 0.25  # throughput moving this much at a steady count means the workload changed: explore again
SLOW_START_PER_THREAD = 10  # completions per thread a slow-start window needs (see AutoTuner._min_completions)
# Handlers using this many cores' worth of CPU between them already fill the one core the GIL allows
# (the poll thread takes the rest): a CPU-bound handler measured 0.85-0.95 at 1 thread here.
GIL_BUSY = 0.75
# Handlers using more than this many cores during an up-probe run with the GIL released (C code): the
# process CPU guard (``cpu_ceiling``), not the GIL rule, bounds them.
GIL_FREE = 1.25
# How long a GIL verdict holds before one up-probe checks it again: each check doubles the latency for
# its ~2 s, so one in 300 s stays below what a p99 sees. Not cleared when throughput drifts: a shared
# machine's drift would clear it and let a probe into the latency window (BENCHMARKS.md, the "auto" sweep).
GIL_RECHECK = 300.0
# Once the verdict is in, it holds while the handlers use this many cores or more: readings of 0.75 and
# up set it, and a CPU-bound handler on a shared machine reads below that (its thread waits for a core
# too); a handler that has turned into a wait reads ~0.05 and is let go (BENCHMARKS.md, the "auto" sweep).
GIL_HOLD = 0.4
# Bursts (see the module notes): a backlog worth more than BURST_SECONDS at the current count, of handlers
# that wait, is drained fast. Windows of BURST_WINDOW: a 10 ms handler's 10 completions per thread.
BURST_SECONDS = 2.0
BURST_DRAIN = 1.0  # a burst step aims at the count that drains the backlog in this long
BURST_STEP = 8  # at most this factor per burst step (a downstream that slows with the count: 8 -> 64, not 256)
BURST_WINDOW = 0.1
BURST_CPU = 0.5  # handlers using more cores than this between them may be the limit themselves: no burst
BURST_CPU_PER_THREAD = 0.25  # nor handlers using this share of a core each (half CPU, half waiting: the GIL rule's)
BURST_GAIN = 0.25  # a burst's step up is kept when it drained 25 % faster (not GAIN per thread added)
BURST_UNFED = 5  # windows a burst's step up may wait for the fetched backlog to feed its threads


@dataclass(frozen=True)
class Sample:
    """What happened since the previous sample (counts) and how things stand now (gauges)."""

    now: float  # the caller's monotonic clock, seconds
    completed: int  # handlers finished since the previous sample
    latency: float  # their mean duration in seconds (ignored when completed == 0)
    busy: int  # permits held now
    waiting: int  # messages fetched and waiting for a permit now (not those waiting out a retry backoff)
    cpu: float | None = None  # process CPU time / (wall time x cores) since the previous sample, 0..1
    # CPU the handlers used since the previous sample, in cores (their thread CPU seconds per wall second)
    handler_cpu: float | None = None
    backlog: int | None = None  # messages not yet handled, fetched or not (the consumer's lag); None: unknown


@dataclass(frozen=True)
class Decision:
    limit: int  # the permit count to apply (unchanged when ``changed`` is False)
    changed: bool
    reason: str  # one line for the debug log


class AutoTuner:
    """Chooses the permit count between ``min_threads`` and ``max_threads`` from successive samples."""

    def __init__(
        self,
        min_threads: int = 1,
        max_threads: int = 256,
        initial: int | None = None,
        *,
        interval: float = 1.0,
        min_completions: int = 50,
        tolerance: float = 2.0,
        cpu_ceiling: float = 0.9,
        hold: float = 2.0,
        max_hold: float = 30.0,
    ) -> None:
        if min_threads < 1:
            raise ValueError(f"min_threads must be >= 1, got {min_threads}")
        if max_threads < min_threads:
            raise ValueError(f"max_threads must be >= min_threads ({min_threads}), got {max_threads}")
        if initial is not None and not min_threads <= initial <= max_threads:
            raise ValueError(f"initial must be within {min_threads}..{max_threads}, got {initial}")
        if interval <= 0 or hold <= 0 or max_hold < hold:
            raise ValueError("interval and hold must be > 0, max_hold >= hold")
        if min_completions < 1:
            raise ValueError(f"min_completions must be >= 1, got {min_completions}")
        if tolerance <= 1:
            raise ValueError(f"tolerance must be > 1, got {tolerance}")
        if not 0 < cpu_ceiling <= 1:
            raise ValueError(f"cpu_ceiling must be within (0, 1], got {cpu_ceiling}")
        self.min_threads = min_threads
        self.max_threads = max_threads
        self.interval = interval
        self.min_completions = min_completions
        self.tolerance = tolerance
        self.cpu_ceiling = cpu_ceiling
        self.hold = hold
        self.max_hold = max_hold
        self._limit = min_threads if initial is None else initial
        self.trend = 0  # direction of the last change: +1, -1 or 0 (for the dashboard)
        self.changes = 0
        self._last_now: float | None = None
        self._settle_until = -math.inf
        self._window = _Window()
        self._ref: list[tuple[float, float]] = []  # (throughput, latency) windows at the current count
        self._baseline = math.inf  # lowest window latency seen: the uncontended handler latency
        self._guarded_from: float | None = None  # latency that made the guard cut the count
        self._probe_from: int | None = None  # count before the probe now being measured
        self._probe_seen: list[tuple[float, float]] = []  # its windows so far
        self._ceiling: int | None = None  # lowest count found no better than a lower one
        # doubling until the first probe fails, only from the lowest count: a count given at start is a guess
        # (often the configured 75) and is probed downwards first
        self._slow_start = self._limit == min_threads
        self._direction = -1 if self._limit > min_threads else 1  # next probe: +1 up, -1 down
        self._streak = 0  # probes kept in a row in this direction: each one doubles the next step
        self._failures = 0  # probes failed in a row: the hold-off doubles with each
        self._next_probe_at = -math.inf
        # until when an up-probe from a core's worth of handler CPU is known to fail: the last one did, and
        # the handlers still used no more than about a core (they take turns on the GIL)
        self._gil_until = -math.inf
        self.gil_verdicts = 0  # times a probe found the GIL to be the limit (read by the engine's glue)
        self._probe_cpu: float | None = None  # handler CPU (cores) when the probe now measured started
        self.bursting = False  # the last sample showed a burst (see the module notes): short windows
        self.windows = 0  # windows evaluated so far
        self._backlog: int | None = None  # the last sample's backlog
        self._unfed = 0  # windows the probe now measured spent with permits idle in a burst (module notes)

    @property
    def limit(self) -> int:
        return self._limit

    def step(self, sample: Sample) -> Decision:
        """Take one sample; return the permit count to use from now on and why."""
        _check(sample)
        last, self._last_now = self._last_now, sample.now
        if last is not None and sample.now < last:
            raise ValueError(f"time went backwards: {sample.now} < {last}")
        if last is None or last < self._settle_until:
            # the first sample, or one that covers time before the last change settled: not measured
            self._window = _Window(start=sample.now)
            return self._keep("settling")
        self._window.add(sample)
        window = self._window
        if window.completed == 0 and sample.busy == 0 and sample.waiting == 0:
            self._window = _Window(start=sample.now)
            self.bursting = False
            return self._keep("idle")
        self._backlog = sample.backlog
        self.bursting = self._slow_start and self._burst(
            window.latency(), sample.backlog, sample.handler_cpu, sample.cpu)
        if sample.now - window.start < self._interval(window) or window.completed < self._min_completions():
            return self._keep(f"measuring ({window.completed} completions)")
        self._window = _Window(start=sample.now)
        self.windows += 1
        return self._evaluate(sample.now, window)

    def _burst(self, lat: float, backlog: int | None, handler_cpu: float | None, cpu: float | None) -> bool:
        """A backlog worth more than BURST_SECONDS at the current count, of handlers that wait (module notes)."""
        if backlog is None or lat <= 0 or backlog * lat / self._limit <= BURST_SECONDS:
            return False
        if handler_cpu is not None and handler_cpu >= min(BURST_CPU, BURST_CPU_PER_THREAD * self._limit):
            return False
        return cpu is None or cpu < self.cpu_ceiling

    def _interval(self, window: _Window) -> float:
        """How long a window lasts at least: ``interval``, or in a burst BURST_WINDOW or 5 latencies."""
        if self.bursting:
            return min(self.interval, max(BURST_WINDOW, 5 * window.latency()))
        return self.interval

    def _min_completions(self) -> int:
        """Completions a window needs. In slow start 10 per thread do: a doubling must show +50 %, and
        the edges of a window blur it by at most one completion per thread (10 %). A 0.5 s handler from
        1 thread waited 25 s for its first window of 50 and reached 256 threads after 90 s (simulated,
        tests/test_autotune.py); with 10 per thread, after 45 s.
        """
        if self._slow_start:
            return min(self.min_completions, SLOW_START_PER_THREAD * self._limit)
        return self.min_completions

    # -- decisions ----------------------------------------------------------------------------------

    def _evaluate(self, now: float, w: _Window) -> Decision:
        x, lat = w.throughput(now), w.latency()
        self._baseline = min(self._baseline, lat)
        saturated = w.backlogged and x * lat >= SATURATED_BUSY * self._limit
        if self._probe_from is not None:
            return self._judge(now, x, lat, w.cpu if saturated else None, saturated, w.handler_cpu)
        if self._guarded_from is not None:
            guarded, self._guarded_from = self._guarded_from, None
            if lat >= 0.9 * guarded:
                self._baseline = lat
                self._ref = [(x, lat)]
                return self._keep(f"latency {lat * 1e3:.1f} ms did not fall with the count: new baseline")
        ratio = lat / self._baseline
        if saturated and ratio >= self.tolerance:
            target = max(self.min_threads, min(self._limit - 1, math.floor(self._limit * max(0.5, 1 / ratio))))
            if target < self._limit:
                self._guarded_from = lat
                self._ref = []
                self._ceiling = self._limit if self._ceiling is None else min(self._ceiling, self._limit)
                self._failures, self._direction, self._next_probe_at, self._streak = 0, 1, now, 0
                self._slow_start = False
                return self._change(
                    now, target, lat, f"latency {ratio:.1f}x the uncontended {self._baseline * 1e3:.1f} ms"
                )
        if self.bursting and self._slow_start and now >= self._next_probe_at:
            # a burst's first windows see the client start fetching (permits idle, the rate moving):
            # the backlog says there is work, so slow start steps at once
            self._ref = [(x, lat)]
            return self._start_probe(now, lat, w.cpu, w.handler_cpu)
        if self._ref and abs(x / _mean_x(self._ref) - 1) > DRIFT:
            self._ref, self._failures, self._next_probe_at, self._ceiling = [], 0, now, None
            # a new workload: its handler's latency is not the old one's (a 5 ms CPU-bound handler turning
            # into a 20 ms wait kept failing its up-probes on the old 5 ms baseline)
            self._baseline = lat
            self._ref.append((x, lat))
            return self._keep(f"throughput moved to {x:.0f}/s at {self._limit}: exploring again")
        self._ref = [*self._ref[-3:], (x, lat)]
        if not saturated:
            why = "no backlog" if not w.backlogged else f"permits idle ({x * lat:.1f} of {self._limit} busy)"
            return self._keep(f"{why}: {x:.0f}/s")
        if now < self._next_probe_at:
            return self._keep(f"steady at {x:.0f}/s, {lat * 1e3:.1f} ms")
        return self._start_probe(now, lat, w.cpu, w.handler_cpu)

    def _start_probe(self, now: float, lat: float, cpu: float | None, handler_cpu: float | None = None) -> Decision:
        n = self._limit
        cpu_bound = cpu is not None and cpu >= self.cpu_ceiling
        gil_bound = now < self._gil_until and handler_cpu is not None and handler_cpu >= GIL_HOLD
        can_up = n < self.max_threads and not cpu_bound and not gil_bound
        can_down = n > self.min_threads
        if not (can_up or can_down):
            if gil_bound:
                return self._keep(f"handlers use {handler_cpu:.2f} cores: the GIL is the limit at the lowest count")
            return self._keep("cpu saturated at the lowest count" if cpu_bound else "min = max")
        up = (self._direction > 0 and can_up) or not can_down
        if self.bursting and not up and n >= self.max_threads:
            # draining a burst at the limit: fewer threads would only drain it slower (too many show in
            # latency first: the latency guard)
            return self._keep(f"burst of {self._backlog} at the limit")
        step = max(1, math.ceil(n * MIN_STEP))
        # strides double while probes keep paying: from a far-off count the best one is a few probes away
        streak = self._streak if (1 if up else -1) == self._direction else 0
        stride = max(step, round(n * min(0.5, MIN_STEP * 2**streak)))
        if up:
            if self._slow_start and self.bursting and self._backlog is not None:
                drain = math.ceil(self._backlog * lat / BURST_DRAIN)
                target, how = min(n * BURST_STEP, max(2 * n, drain)), f"burst of {self._backlog}"
            elif self._slow_start:
                target, how = 2 * n, "slow start"
            elif self._ceiling is not None and n + step < self._ceiling:
                target, how = n + max(step, (self._ceiling - n) // 2), f"towards {self._ceiling}"
            else:
                target, how = n + stride, "probe up"
            target = min(self.max_threads, target)
        else:
            target, how = max(self.min_threads, n - stride), "probe down"
        self._probe_from, self._unfed = n, 0
        self._probe_cpu = handler_cpu
        note = f" (cpu {cpu:.0%})" if cpu_bound else " (handlers hold the GIL)" if gil_bound else ""
        if handler_cpu is not None and not note:
            note = f" (handlers {handler_cpu:.2f} cores)"
        return self._change(now, target, lat, how + note)

    def _judge(
        self, now: float, x: float, lat: float, cpu: float | None = None, saturated: bool = False,
        handler_cpu: float | None = None,
    ) -> Decision:
        """Keep the probed count if it paid, else go back to where it started.

        A doubling kept in slow start is followed at once by the next one (still saturated): the window
        that judged it is the reference for the next, so a second window at the same count would only
        double the ramp (a 0.5 s handler reached 256 threads after 45 s with it, after 28 s without).
        """
        assert self._probe_from is not None
        start = self._probe_from
        n = self._limit
        if (self.bursting and n > start and not saturated and lat < self.tolerance * self._baseline
                and self._unfed < BURST_UNFED):
            # the new threads wait for messages the client is still fetching: that window measured the
            # fetch catching up, not the count
            self._unfed += 1
            return self._keep(f"{start}->{n}: permits idle while the backlog is fetched ({x * lat:.1f} of "
                              f"{n} busy): one more window")
        self._unfed = 0
        self._probe_seen.append((x, lat))
        x = _mean_x(self._probe_seen)
        ref_x = _mean_x(self._ref) if self._ref else 0.0
        r = n / start
        need = ref_x * (1 + GAIN * (r - 1)) if n > start else ref_x * (1 - LOSS * (1 - r))
        if self.bursting and n > start:
            need = min(need, ref_x * (1 + BURST_GAIN))  # a burst keeps any step that drains it faster
        verdict = f"{start}->{n}: {x:.0f}/s vs {ref_x:.0f}/s (needed {need:.0f})"
        if len(self._probe_seen) < 2 and abs(x / need - 1) < CLOSE_CALL:
            return self._keep(f"close call {verdict}: one more window")
        self._probe_from, self._probe_seen = None, []
        # a burst's step that paid is kept even with latency up (a loaded machine's sleeps take longer);
        # a downstream it overloads shows in the next window: the latency guard
        ok = x >= need and (n < start or lat < self.tolerance * self._baseline or (self.bursting and n > start))
        if ok:
            if n > start and self._ceiling is not None and n > self._ceiling:
                self._ceiling = None  # beyond the old ceiling and still paying: the workload changed
            if n < start:  # fewer threads did as well: more than ``start`` are not worth trying first
                self._ceiling = start if self._ceiling is None else min(self._ceiling, start)
            direction = 1 if n > start else -1
            self._streak = self._streak + 1 if direction == self._direction else 1
            self._ref = [(x, lat)]
            self._failures, self._next_probe_at, self._direction = 0, now, direction
            if self._slow_start and direction > 0 and saturated and n < self.max_threads:
                decision = self._start_probe(now, lat, cpu, handler_cpu)
                return Decision(decision.limit, decision.changed, f"kept {verdict}; {decision.reason}")
            return self._keep(f"kept {verdict}")
        self._streak = 0
        if n > start and _within_a_core(self._probe_cpu, handler_cpu):
            self._gil_until = now + GIL_RECHECK  # more threads, no more CPU for the handlers: the GIL
            self.gil_verdicts += 1
        # a failed doubling of slow start: its previous doubling paid, so the best count is more likely
        # between the two than below -- bisect up first rather than try fewer
        doubled, self._slow_start = self._slow_start, False
        if doubled:
            # the reference was measured while ramping (a burst's first windows see the fetch start): the
            # next window at ``start`` is the reference, not a drift that would drop the ceiling just found
            self._ref = []
        if n > start:
            self._ceiling = n if self._ceiling is None else min(self._ceiling, n)
        small = abs(n - start) <= max(1, math.ceil(start * MIN_STEP))
        if n > start and not small and not doubled and x < ref_x * (1 + GAIN * (r - 1) / 2):
            self._direction, self._next_probe_at = -1, now  # not even half the gain needed: try fewer first
        elif n > start and not small:
            self._next_probe_at = now  # it helped, not enough: bisect towards the ceiling next
        else:
            self._failures += 1
            self._direction = -1 if n > start else 1
            self._next_probe_at = now + min(self.max_hold, self.hold * 2 ** (self._failures - 1))
        return self._change(now, start, lat, f"back, {verdict}")

    # -- helpers ------------------------------------------------------------------------------------

    def _change(self, now: float, target: int, lat: float, reason: str) -> Decision:
        old = self._limit
        self._limit = target
        self.trend = (target > old) - (target < old)
        self.changes += 1
        # completions of work started under the old count would blur the next window
        self._settle_until = now + (2 * lat if self.bursting else max(self.interval, 2 * lat))
        self._window = _Window(start=now)
        return Decision(target, True, f"{old} -> {target}: {reason}")

    def _keep(self, reason: str) -> Decision:
        return Decision(self._limit, False, reason)


class _Window:
    """Samples summed since the window started."""

    __slots__ = ("backlogged_n", "completed", "cpu", "cpu_n", "handler_cpu", "handler_cpu_n", "latency_sum",
                 "samples", "start")

    def __init__(self, start: float = 0.0) -> None:
        self.start = start
        self.completed = 0
        self.latency_sum = 0.0
        self.samples = 0
        self.backlogged_n = 0  # samples that found messages waiting for a permit
        self.cpu: float | None = None
        self.cpu_n = 0
        self.handler_cpu: float | None = None
        self.handler_cpu_n = 0

    def add(self, sample: Sample) -> None:
        self.completed += sample.completed
        self.latency_sum += sample.latency * sample.completed
        self.samples += 1
        self.backlogged_n += sample.waiting > 0
        if sample.cpu is not None:
            self.cpu_n += 1
            self.cpu = _running_mean(self.cpu, sample.cpu, self.cpu_n)
        if sample.handler_cpu is not None:
            self.handler_cpu_n += 1
            self.handler_cpu = _running_mean(self.handler_cpu, sample.handler_cpu, self.handler_cpu_n)

    @property
    def backlogged(self) -> bool:
        """Messages were waiting for a permit in at least half of the samples."""
        return 2 * self.backlogged_n >= self.samples > 0

    def throughput(self, now: float) -> float:
        return self.completed / max(now - self.start, 1e-9)

    def latency(self) -> float:
        return self.latency_sum / self.completed if self.completed else 0.0


def _running_mean(mean: float | None, value: float, n: int) -> float:
    return value if mean is None else mean + (value - mean) / n


def _within_a_core(before: float | None, after: float | None) -> bool:
    """Handlers used a core's worth of CPU before a probe and no more than about one during it."""
    return before is not None and after is not None and before >= GIL_BUSY and after <= GIL_FREE


def _mean_x(ref: list[tuple[float, float]]) -> float:
    return sum(x for x, _ in ref) / len(ref)


def _check(sample: Sample) -> None:
    if sample.completed < 0 or sample.busy < 0 or sample.waiting < 0:
        raise ValueError(f"counts must be >= 0: {sample}")
    if sample.completed and not (sample.latency >= 0 and math.isfinite(sample.latency)):
        raise ValueError(f"latency must be finite and >= 0: {sample}")
    if not math.isfinite(sample.now):
        raise ValueError(f"now must be finite: {sample}")
