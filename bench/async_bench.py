"""Async handlers against threads: 20,000 messages, a 0.1 s wait each, 1,000 in flight (issue 12).

The ideal is 1,000 / 0.1 s = 10,000 msg/s, so 20,000 messages take 2.0 s at best. Contenders, each in
its own process (its own OS thread count, RSS and GIL), on the same backlog, each with a new group:

  async   ``async def handle(msg): await asyncio.sleep(0.1)``, MAX_THREAD_COUNT=1000 (coroutines)
  thread  ``def handle(msg): time.sleep(0.1)``, MAX_THREAD_COUNT = each of THREADS; the best one is
          the thread runner's figure

A run's time goes from its first handler start to its last completion (group join and fetch start-up
excluded, the ramp-up and tail included). Each process reports its peak OS thread count (``Threads:``
of /proc/self/status, librdkafka's threads included, sampled every 50 ms on the poll thread), its peak
RSS (VmHWM) and, for async, the event loop's worst heartbeat delay.

    .venv/bin/python -m bench.async_bench --port 29792        # its own broker on a free port, ~2 min
    .venv/bin/python -m bench.async_bench --bootstrap host:port
    make bench                                                # also runs it (bench/run.py, figure "async")

Prints a table and writes bench/results/async.json (bench/record.py; BENCHMARKS.md's table comes from it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import record

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = 20_000
WORK = 0.1  # seconds each handler waits
IN_FLIGHT = 1_000
IDEAL_RATE = IN_FLIGHT / WORK  # 10,000 msg/s
PARTITIONS = 6
THREADS = (250, 500, 1000)  # the thread runner's bounds tried; its best counts
TARGET_RATIO = 0.8
TARGET_THREADS = 20
PASSES = 2  # turns each contender takes; the best counts (the machine is shared)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return -1


# -- child: one contender in this process ----------------------------------------------------------------


def run_child(bootstrap: str, topic: str, mode: str, bound: int, count: int) -> dict[str, Any]:
    from mtc75.api import Consumer
    from mtc75.core.stats import Stats
    from mtc75.settings import Settings

    starts: list[float] = []
    ends: list[float] = []
    peak_threads = [0]

    if mode == "async":
        async def handle(_msg: Any) -> None:
            starts.append(time.monotonic())
            await asyncio.sleep(WORK)
            ends.append(time.monotonic())
        handler: Any = handle
    else:
        def handle_sync(_msg: Any) -> None:
            starts.append(time.monotonic())
            time.sleep(WORK)
            ends.append(time.monotonic())
        handler = handle_sync

    def on_status(_stats: Stats) -> None:
        peak_threads[0] = max(peak_threads[0], _status("Threads:"))

    settings = Settings().replace(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, MAX_THREAD_COUNT=bound,
                                  GROUP_ID=f"bench-async-{uuid.uuid4().hex[:8]}")
    consumer = Consumer.from_settings(handler, settings, on_status=on_status, status_interval=0.05)
    cpu_before = os.times()
    final = consumer.run(max_messages=count)
    cpu_after = os.times()
    elapsed = max(ends) - min(starts)
    report: dict[str, Any] = {
        "mode": mode, "bound": bound, "handled": len(ends), "processed": final.processed, "elapsed_s": elapsed,
        "rate": len(ends) / elapsed, "peak_threads": peak_threads[0], "peak_rss_mb": _status("VmHWM:") / 1024,
        "max_in_flight": final.max_active_threads,
        # CPU of the whole run (group join and shutdown included) per message: what a loaded machine cannot hide
        "cpu_us_per_message": ((cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system))
        / max(1, len(ends)) * 1e6,
    }
    loop = _loop_of(consumer)
    if loop is not None:
        report["loop"] = loop.kind
        report["worst_loop_lag_s"] = loop.worst_lag
        report["blocked_warnings"] = loop.blocked_warnings
    return report


def _loop_of(consumer: Any) -> Any:
    """The consumer's event-loop thread, if it ran an async handler (bench-only peek at private state)."""
    parts = getattr(getattr(consumer, "_engine", None), "_parts", None)
    runner = getattr(getattr(parts, "dispatcher", None), "_runner", None)
    return getattr(runner, "loop_thread", None)


# -- parent --------------------------------------------------------------------------------------------


def produce(bootstrap: str, topic: str, count: int) -> None:
    from confluent_kafka import Producer

    from mtc75.kafka.topics import create_topic

    create_topic({"bootstrap.servers": bootstrap}, topic, PARTITIONS, 1)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4"})
    for i in range(count):
        while True:
            try:
                producer.produce(topic, value=json.dumps({"id": i}).encode(), key=str(i).encode())
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        raise SystemExit("async bench: backlog not fully delivered")


def contender(bootstrap: str, topic: str, mode: str, bound: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.async_bench", "--child", mode, "--bound", str(bound), "--topic", topic,
         "--bootstrap", bootstrap],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"async bench: {mode} {bound} failed: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def figure(bootstrap: str, passes: int = PASSES) -> dict[str, Any]:
    """Every contender on one backlog; the dict bench/run.py stores as ``results["async"]``."""
    topic = f"bench-async-{uuid.uuid4().hex[:8]}"
    produce(bootstrap, topic, MESSAGES)
    load_start = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for _ in range(passes):
        runs.append(contender(bootstrap, topic, "async", IN_FLIGHT))
        for bound in THREADS:
            runs.append(contender(bootstrap, topic, "thread", bound))
    for run in runs:
        run["ratio"] = run["rate"] / IDEAL_RATE
    best_async = max((r for r in runs if r["mode"] == "async"), key=lambda r: r["rate"])
    best_thread = max((r for r in runs if r["mode"] == "thread"), key=lambda r: r["rate"])
    return {
        "messages": MESSAGES, "work_s": WORK, "in_flight": IN_FLIGHT, "ideal_rate": IDEAL_RATE,
        "load_avg_at_start": load_start, "load_avg_at_end": os.getloadavg(), "runs": runs,
        "async": best_async, "thread_best": best_thread,
        "targets": {"ratio": TARGET_RATIO, "threads": TARGET_THREADS},
    }


def print_table(fig: dict[str, Any]) -> None:
    print(f"\n{fig['messages']:,} messages, await/sleep {fig['work_s']:g} s, {fig['in_flight']:,} in flight "
          f"(ideal {fig['ideal_rate']:,.0f} msg/s); load average {fig['load_avg_at_start'][0]:.1f} -> "
          f"{fig['load_avg_at_end'][0]:.1f}")
    print("\n| runner | bound | msg/s | of ideal | OS threads (peak) | peak RSS | CPU per message |")
    print("|---|---|---|---|---|---|---|")
    for run in sorted(fig["runs"], key=lambda r: (r["mode"], r["bound"], -r["rate"])):
        best = " (best)" if run is fig["async"] or run is fig["thread_best"] else ""
        print(f"| {run['mode']}{best} | {run['bound']} | {run['rate']:,.0f} | {run['ratio']:.3f} "
              f"| {run['peak_threads']} | {run['peak_rss_mb']:.0f} MB | {run['cpu_us_per_message']:.0f} µs |")
    a = fig["async"]
    print(f"\nasync: {a['ratio']:.3f} of ideal (target >= {TARGET_RATIO}), {a['peak_threads']} OS threads "
          f"(target <= {TARGET_THREADS}), worst loop lag {a.get('worst_loop_lag_s', float('nan')):.3f} s "
          f"({a.get('loop', '?')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.async_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", help="an existing cluster (default: start a broker of this run)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MTC75_BENCH_ASYNC_PORT", "29792")),
                        help="first port tried for the broker of this run (keep it below 32768)")
    parser.add_argument("--passes", type=int, default=PASSES)
    parser.add_argument("--child", choices=("async", "thread"), help=argparse.SUPPRESS)
    parser.add_argument("--bound", type=int, default=IN_FLIGHT, help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.bootstrap, args.topic, args.child, args.bound, MESSAGES)))
        return 0
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        from bench.scaleout import own_broker

        broker = own_broker(Path(tempfile.mkdtemp(prefix="mtc75-async-bench-")), args.port)
        bootstrap = broker.bootstrap
    run = record.Run.start("async", "python -m bench.async_bench " + " ".join(argv or sys.argv[1:]))
    try:
        fig = figure(bootstrap, args.passes)
    finally:
        if broker is not None:
            broker.stop()
    print(f"results: {run.write(fig)}")
    print_table(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
