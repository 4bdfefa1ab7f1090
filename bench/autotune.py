"""``make bench`` (part 2): MAX_THREAD_COUNT = "auto" against a sweep of fixed counts, per workload.

Three workloads (issue 14), each consumed from its own pre-produced backlog:

* ``degrading``: the simulated service of mtc75/tools/simservice.py (20 slots of 20 ms, every call
  slower by excess/20 beyond 20 outstanding calls);
* ``sleep``: ``time.sleep(SLEEP)`` -- no downstream limit, so only the process caps throughput;
* ``cpu``: ``burn(CPU_WORK)`` of pure Python -- the GIL allows one core's worth, whatever the count.

For each: every fixed count of its sweep for FIXED_SECONDS, then "auto" (from MIN_THREAD_COUNT = 1) for
AUTO_SECONDS. Rates are completions per 5 s window; the best fixed count is the one with the highest
rate from WARMUP on. The targets of issue 14, judged on the auto run:

1. within 60 s, a 5 s window at >= 0.9 of the best fixed rate;
2. over 60-90 s, every 5 s window within +-20 % of the mean of those windows;
3. p99 handler latency over 60-90 s <= 1.5 x the best fixed count's p99 (over its measured window).

Results: stdout, bench/results/autotune.json (bench/record.py; BENCHMARKS.md's table comes from it),
and bench/autotune.png (thread count over time, with the rate).
Run alone: ``python -m bench.autotune [--quick] [--port P]`` (starts its own broker on P unless
KAFKA_BOOTSTRAP_SERVERS names one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import record
from bench.run import produce_backlog
from mtc75.api import Consumer
from mtc75.core.stats import Stats
from mtc75.settings import Settings
from mtc75.tools.broker import LocalKafka
from mtc75.tools.simservice import DegradingService, burn

OUT = Path(__file__).resolve().parent
PORT = int(os.environ.get("MTC75_BENCH_AUTOTUNE_PORT", "29792"))  # below the ephemeral range; not scaleout's 29992
WINDOW = 5.0  # seconds per rate window (the "rate per 5 s")
WARMUP = 5.0  # seconds of a fixed run not counted (join, first fetch, pool start)
FIXED_SECONDS = 20.0
AUTO_SECONDS = 90.0
SLEEP = 0.1  # 256 threads (MAX_THREAD_LIMIT) at most 2 560 msg/s: a backlog this machine can produce in time
CPU_WORK = 0.002
# One backlog for every run (each run is a new group): more than the fastest run consumes in AUTO_SECONDS
# (the sleep workload at 256 threads: 90 s x 2 560 msg/s = 230 400).
MESSAGES = 250_000


@dataclass(frozen=True)
class Workload:
    name: str
    sweep: tuple[int, ...]
    make: Callable[[], Callable[[Any], None]]  # a fresh handler per run (the service keeps state)
    note: str


def _sleep_handler() -> Callable[[Any], None]:
    return lambda _m: time.sleep(SLEEP)


def _cpu_handler() -> Callable[[Any], None]:
    return lambda _m: burn(CPU_WORK)


WORKLOADS = (
    Workload("degrading", (10, 20, 30, 40, 75), lambda: DegradingService(20, 0.02).handler,
             "issue-14 service: 20 slots x 20 ms, degrading beyond 20 outstanding"),
    Workload("sleep", (32, 128, 256), _sleep_handler, f"time.sleep({SLEEP})"),
    Workload("cpu", (1, 2, 4, 16), _cpu_handler, f"{CPU_WORK * 1e3:g} ms of pure-Python CPU"),
)


class Decisions(logging.Handler):
    """Keeps the tuner's change lines (mtc75.engine.autothreads, debug) with their time."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic(), record.getMessage()))


class Recorder:
    """Wraps a handler: (start, end) per call, appended from worker threads (list.append is atomic)."""

    def __init__(self, handler: Callable[[Any], None]) -> None:
        self._handler = handler
        self.spans: list[tuple[float, float]] = []

    def __call__(self, message: Any) -> None:
        start = time.monotonic()
        self._handler(message)
        self.spans.append((start, time.monotonic()))


def run_one(bootstrap: str, topic: str, threads: int | str, seconds: float, handler: Callable[[Any], None]
            ) -> dict[str, Any]:
    """Consume ``topic`` as a new group for ``seconds`` from the first completion; the timeline and spans."""
    recorder = Recorder(handler)
    timeline: list[tuple[float, int, int]] = []  # (monotonic, thread count, active)
    settings = Settings().replace(
        BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=f"bench-auto-{uuid.uuid4().hex[:8]}",
        MAX_THREAD_COUNT=threads, SHUTDOWN_TIMEOUT=10.0,
    )

    def on_status(stats: Stats) -> None:
        timeline.append((time.monotonic(), stats.max_thread_count, stats.active_threads))

    decisions = Decisions()
    glue_log = logging.getLogger("mtc75.engine.autothreads")
    glue_log.addHandler(decisions)
    glue_log.setLevel(logging.DEBUG)
    engine = Consumer.from_settings(recorder, settings, on_status=on_status, status_interval=0.5)
    cpu0 = time.process_time()
    runner = threading.Thread(target=engine.run, name="bench-poll", daemon=True)
    runner.start()
    deadline = time.monotonic() + 120
    while not recorder.spans and time.monotonic() < deadline:
        time.sleep(0.05)
    if not recorder.spans:
        engine.stop()
        raise SystemExit(f"bench: no message handled within 120 s ({topic}, {threads} threads)")
    t0 = recorder.spans[0][1]
    time.sleep(max(0.0, t0 + seconds - time.monotonic()))
    engine.stop()
    runner.join(60)
    glue_log.removeHandler(decisions)
    cpu = time.process_time() - cpu0
    spans = [(s - t0, e - t0) for s, e in recorder.spans if e - t0 <= seconds]
    return {
        "threads": threads, "seconds": seconds, "cpu_s": round(cpu, 2),
        "spans": spans, "timeline": [(t - t0, n, a) for t, n, a in timeline if 0 <= t - t0 <= seconds],
        "decisions": [(round(t - t0, 2), line) for t, line in decisions.lines],
    }


def windows(spans: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """Completions per second in each WINDOW from ``start`` to ``end``."""
    ends = [e for _, e in spans]
    out = []
    t = start
    while t + WINDOW <= end + 1e-9:
        out.append(sum(1 for e in ends if t <= e < t + WINDOW) / WINDOW)
        t += WINDOW
    return out


def p99(spans: list[tuple[float, float]], start: float, end: float) -> float:
    durations = sorted(e - s for s, e in spans if start <= e < end)
    if not durations:
        return float("nan")
    return durations[min(len(durations) - 1, int(0.99 * len(durations)))]


def judge(auto: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """The three targets of issue 14 for one auto run against the best fixed count."""
    rates = windows(auto["spans"], 0.0, AUTO_SECONDS)
    first = next((WINDOW * (i + 1) for i, r in enumerate(rates) if r >= 0.9 * best["rate"]), None)
    late = windows(auto["spans"], 60.0, 90.0)
    mean = sum(late) / len(late) if late else 0.0
    spread = max(abs(r / mean - 1) for r in late) if mean else float("inf")
    lat = p99(auto["spans"], 60.0, 90.0)
    counts = [n for t, n, _ in auto["timeline"] if t >= 60.0]
    return {
        "rate_60_90": round(mean, 1),
        "vs_best": round(mean / best["rate"], 3),
        "first_0_9_at_s": first,
        "windows_60_90": [round(r, 1) for r in late],
        "max_deviation_60_90": round(spread, 3),
        "p99_ms_60_90": round(lat * 1e3, 2),
        "p99_vs_best": round(lat / best["p99_s"], 2),
        "count_60_90": [min(counts), max(counts)] if counts else None,
        "targets": {
            "0.9_within_60s": first is not None and first <= 60.0,
            "steady_20pct_60_90s": spread <= 0.20,
            "p99_within_1.5x": lat <= 1.5 * best["p99_s"],
        },
    }


def bench_workload(bootstrap: str, topic: str, w: Workload, quick: bool) -> dict[str, Any]:
    fixed = []
    fixed_seconds = 12.0 if quick else FIXED_SECONDS
    for n in (w.sweep[:3] if quick else w.sweep):
        run = run_one(bootstrap, topic, n, fixed_seconds, w.make())
        rates = windows(run["spans"], WARMUP, fixed_seconds)
        mean = sum(rates) / len(rates)
        # how steady a fixed count's own 5 s windows are on this machine: the yardstick for target 2
        row = {"threads": n, "rate": mean, "p99_s": p99(run["spans"], WARMUP, fixed_seconds),
               "cpu_s": run["cpu_s"], "windows": [round(r, 1) for r in rates],
               "max_deviation": round(max(abs(r / mean - 1) for r in rates), 3) if mean else None}
        fixed.append(row)
        print(f"  {w.name} fixed {n:>3}: {row['rate']:8.1f} msg/s, p99 {row['p99_s'] * 1e3:7.1f} ms", flush=True)
    best = max(fixed, key=lambda r: r["rate"])
    auto_seconds = 45.0 if quick else AUTO_SECONDS
    auto = run_one(bootstrap, topic, "auto", auto_seconds, w.make())
    verdict = judge(auto, best) if not quick else {}
    counts = [n for _, n, _ in auto["timeline"]]
    print(f"  {w.name} auto: counts {min(counts)}..{max(counts)}, final {counts[-1]}; {verdict}", flush=True)
    return {
        "workload": w.name, "note": w.note, "fixed": fixed, "best": best,
        "auto": {"timeline": auto["timeline"], "cpu_s": auto["cpu_s"], "decisions": auto["decisions"],
                 "rates": windows(auto["spans"], 0.0, auto_seconds), **verdict},
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2 * len(results)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(results), 1, squeeze=False)[:, 0]
    for ax, r in zip(axes, results, strict=True):
        t = [p[0] for p in r["auto"]["timeline"]]
        ax.step(t, [p[1] for p in r["auto"]["timeline"]], where="post", color="black", label="auto: thread count")
        ax.axhline(r["best"]["threads"], color="tab:blue", linestyle=":",
                   label=f"best fixed count ({r['best']['threads']})")
        ax.set_ylabel("threads")
        ax.set_ylim(bottom=0)
        rate_ax = ax.twinx()
        rates = r["auto"]["rates"]
        rate_ax.step([WINDOW * i for i in range(len(rates) + 1)], [*rates, rates[-1] if rates else 0], where="post",
                     color="tab:green", alpha=0.7, label="auto: msg/s per 5 s")
        rate_ax.axhline(r["best"]["rate"], color="tab:green", linestyle="--", alpha=0.6,
                        label=f"best fixed: {r['best']['rate']:.0f} msg/s")
        rate_ax.set_ylabel("messages/s")
        rate_ax.set_ylim(bottom=0)
        ax.set_title(f"{r['workload']}: {r['note']}")
        lines = ax.get_legend_handles_labels()
        more = rate_ax.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize="small")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since the first completion")
    fig.savefig(path)


def markdown(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md tables of one run."""
    out = ["| workload | fixed counts: msg/s (p99 ms) | best | auto 60-90 s | vs best | first 5 s window >= 0.9 "
           "| 5 s windows 60-90 s: max deviation | p99 60-90 s (vs best) | auto's count 60-90 s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results["workloads"]:
        a = r["auto"]
        sweep = ", ".join(f"{f['threads']}: {f['rate']:.0f} ({f['p99_s'] * 1e3:.0f})" for f in r["fixed"])
        met = a.get("targets", {})

        def mark(key: str, met: dict[str, bool] = met) -> str:
            return "" if met.get(key) else " **missed**"

        first = f"{a['first_0_9_at_s']:.0f} s" if a.get("first_0_9_at_s") is not None else "never"
        out.append(
            f"| {r['workload']} | {sweep} | {r['best']['threads']} | {a['rate_60_90']:.0f} | {a['vs_best']:.2f} "
            f"| {first}{mark('0.9_within_60s')} | {a['max_deviation_60_90'] * 100:.0f} %{mark('steady_20pct_60_90s')} "
            f"| {a['p99_ms_60_90']:.1f} ms ({a['p99_vs_best']:.2f}x){mark('p99_within_1.5x')} "
            f"| {a['count_60_90'][0]}-{a['count_60_90'][1]} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.autotune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer counts (a smoke run)")
    parser.add_argument("--port", type=int, default=PORT, help="port of the broker this run starts")
    parser.add_argument("--only", choices=[w.name for w in WORKLOADS], action="append")
    parser.add_argument("--markdown", type=Path, metavar="JSON", help="print the tables of a result file")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        document = json.loads(args.markdown.read_text())
        print(markdown(document.get("figures", document)))
        return 0
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker, started = None, False
    if not bootstrap:
        broker = LocalKafka(port=args.port)
        broker.fetch()
        started = broker.start()
        bootstrap = broker.bootstrap
    suffix = ("-quick" if args.quick else "") + ("-" + "-".join(args.only) if args.only else "")
    given = sys.argv[1:] if argv is None else argv
    run = record.Run.start(f"autotune{suffix}", "python -m bench.autotune" + (" " + " ".join(given) if given else ""))
    results: dict[str, Any] = {}
    rows = []
    try:
        topic = f"bench-auto-{uuid.uuid4().hex[:8]}"
        count = MESSAGES // 4 if args.quick else MESSAGES
        print(f"producing {count:,} messages to {topic} ...", flush=True)
        t0 = time.monotonic()
        produce_backlog(bootstrap, topic, count, partitions=6, size=100)
        print(f"  produced in {time.monotonic() - t0:.0f} s", flush=True)
        for w in WORKLOADS:
            if args.only and w.name not in args.only:
                continue
            rows.append(bench_workload(bootstrap, topic, w, args.quick))
    finally:
        if broker is not None and started:
            broker.stop()
    results["workloads"] = rows
    path = run.write(results, note="--quick: shorter runs, three counts per sweep" if args.quick else "")
    plot(rows, OUT / f"autotune{suffix}.png")
    if not args.quick:
        print(markdown(results))
    print(f"results: {path}, bench/autotune{suffix}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
