"""Ordering modes against unordered, on the same backlog: ``ORDERING=key`` with 1, 5, 20, 100 and 10 000 keys.

For each key count one topic (1 partition, lz4, 100 B records keyed ``k<i % keys>``) is produced once;
then every contender reads it from the start with a new group, taking turns, each keeping its best
pass (every pass's rate and the key / unordered ratio of each pass are kept too, for the spread), with
two handlers:

- ``sleep``: ``time.sleep(0.002)`` on ``--threads`` (16) threads, the shape of issue 11's measurement;
  the rate is steady-state (bench/run.py ``steady_rate``: from 1 s after the first completion, over
  about ``--window`` seconds);
- ``noop``: a handler that returns at once; the same rate over the whole backlog after the warm-up (1 s,
  or the run's first tenth when that is shorter). The backlog (1 000 000 messages) outlasts librdkafka's
  prefetch queue and keeps a no-op run going for seconds: 200 000 lasted 0.3-0.6 s, which was noise.

Contenders: ``unordered`` (the default: partitions take turns, FairFifoScheduler), ``key`` and, as the
reference for what fairness costs, ``fifo`` (the plain first-fetched-first-run FIFO of earlier
releases; only with ``--with-fifo``, set by ``make bench``). Every figure is a ratio of rates taken in
this one run; the load average is printed because the machine is shared.

    .venv/bin/python -m bench.ordering                     # own broker on 127.0.0.1:29892 (or the next free pair)
    .venv/bin/python -m bench.ordering --bootstrap host:9092
    .venv/bin/python -m bench.ordering --quick             # one pass, 100 000 messages per topic

Writes bench/results/ordering.json (bench/record.py; BENCHMARKS.md's table comes from it). Targets
(issue 11): key mode >= 0.9 of unordered at >= 20 keys with 2 ms of work; no-op key mode >= 0.5 of
no-op unordered.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import Any

import mtc75.engine.startup as startup
from bench import record
from bench.run import WARMUP, produce_backlog, steady_rate
from bench.scaleout import cluster_for
from mtc75.api import Consumer
from mtc75.core.scheduler import FifoScheduler
from mtc75.core.stats import Stats
from mtc75.settings import Settings

PORT = int(os.environ.get("MTC75_BENCH_ORDERING_PORT", "29892"))
KEYS = (1, 5, 20, 100, 10_000)
WORK = 0.002
COUNT = 1_000_000  # messages per topic: a no-op run lasts seconds, past librdkafka's prefetch queue (#30)
TARGET_SLEEP = 0.9  # key / unordered at >= 20 keys, 2 ms of work
TARGET_NOOP = 0.5  # key / unordered, no-op handler


def run_once(bootstrap: str, topic: str, ordering: str, threads: int, work: float, count: int,
             window: float) -> dict[str, Any]:
    """One contender reads ``topic`` from the start: its steady rate (messages per second)."""
    done: list[float] = []
    stamp = time.monotonic
    append = done.append
    consumer: Consumer | None = None

    if work > 0:
        def handle(_msg: Any) -> None:
            time.sleep(work)
            append(stamp())
    else:
        def handle(_msg: Any) -> None:
            append(stamp())

    def on_status(_stats: Stats) -> None:
        if done and stamp() - done[0] >= 1.0 + window:
            assert consumer is not None
            consumer.stop()

    mode = "unordered" if ordering == "fifo" else ordering
    settings = Settings().replace(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=f"bench-{uuid.uuid4().hex[:8]}",
                                  MAX_THREAD_COUNT=threads, ORDERING=mode)
    factory = startup.new_scheduler
    if ordering == "fifo":  # the earlier default, for the cost of fairness: swapped in for this run only
        startup.new_scheduler = lambda _mode: FifoScheduler()  # type: ignore[assignment]
    try:
        consumer = Consumer.from_settings(handle, settings, on_status=on_status, status_interval=0.05)
        stats = consumer.run(max_messages=count)
    finally:
        startup.new_scheduler = factory  # type: ignore[assignment]
    # a no-op run may drain the whole backlog within the usual warm-up: its first tenth is the warm-up then
    warmup = WARMUP if work > 0 else min(WARMUP, (max(done) - min(done)) / 10) if done else WARMUP
    rate, span, messages = steady_rate(done, warmup)
    return {"ordering": ordering, "rate": rate, "window_s": span, "messages": messages, "pauses": stats.pauses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ordering", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", help="an existing cluster (default: a broker of this run)")
    parser.add_argument("--port", type=int, default=PORT, help="port of the broker this run starts (< 32768)")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--count", type=int, default=COUNT, help="messages per topic")
    parser.add_argument("--window", type=float, default=3.0, help="seconds of steady state timed per run")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--keys", type=int, nargs="+", default=list(KEYS))
    parser.add_argument("--with-fifo", action="store_true", help="also time the plain FIFO (fairness's cost)")
    parser.add_argument("--quick", action="store_true", help="one pass, 100 000 messages per topic")
    args = parser.parse_args(argv)
    if args.quick:
        args.passes, args.count = 1, 100_000
    run = record.Run.start("ordering", "python -m bench.ordering " + " ".join(sys.argv[1:] if argv is None else argv))
    load_start = os.getloadavg()
    with cluster_for(args.bootstrap, args.port, "ordering") as bootstrap:
        contenders = ["unordered", "key"] + (["fifo"] if args.with_fifo else [])
        rows = []
        for keys in args.keys:
            topic = f"bench-ordering-{keys}-{uuid.uuid4().hex[:8]}"
            print(f"producing {args.count:,} messages with {keys:,} keys to {topic} ...", flush=True)
            produce_backlog(bootstrap, topic, args.count, 1, keys=keys)
            row: dict[str, Any] = {"keys": keys, "sleep": {}, "noop": {}}
            for handler, work in (("sleep", WORK), ("noop", 0.0)):
                best: dict[str, dict[str, Any]] = {}
                rates: dict[str, list[float]] = {c: [] for c in contenders}
                for turn in range(args.passes):
                    order = contenders if turn % 2 == 0 else list(reversed(contenders))
                    for ordering in order:
                        r = run_once(bootstrap, topic, ordering, args.threads, work, args.count, args.window)
                        rates[ordering].append(round(r["rate"]))
                        if ordering not in best or r["rate"] > best[ordering]["rate"]:
                            best[ordering] = r
                for ordering, r in best.items():
                    row[handler][ordering] = {**r, "passes": rates[ordering]}
                ratio = best["key"]["rate"] / best["unordered"]["rate"]
                row[handler]["key_vs_unordered"] = ratio  # best against best
                row[handler]["key_vs_unordered_passes"] = [round(k / u, 3) for k, u in
                                                           zip(rates["key"], rates["unordered"], strict=True)]
                extra = ""
                if "fifo" in best:
                    row[handler]["unordered_vs_fifo"] = best["unordered"]["rate"] / best["fifo"]["rate"]
                    extra = f", unordered/fifo {row[handler]['unordered_vs_fifo']:.2f}"
                print(f"  {keys:>6,} keys, {handler:>5}: unordered {best['unordered']['rate']:9,.0f}/s, "
                      f"key {best['key']['rate']:9,.0f}/s -> key/unordered {ratio:.2f} (passes "
                      f"{row[handler]['key_vs_unordered_passes']}){extra}", flush=True)
            rows.append(row)
    result = {"threads": args.threads, "work_s": WORK, "count": args.count, "passes": args.passes, "rows": rows}
    print(f"results: {run.write(result, note='--quick: one pass, 100 000 messages' if args.quick else '')}")
    print(f"\nload average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print("| keys | 2 ms: key / unordered | no-op: key / unordered | no-op: unordered / fifo |")
    print("|---:|---:|---:|---:|")
    misses = 0
    for row in rows:
        s, n = row["sleep"]["key_vs_unordered"], row["noop"]["key_vs_unordered"]
        fifo = row["noop"].get("unordered_vs_fifo")
        print(f"| {row['keys']:,} | {s:.2f} | {n:.2f} | {'' if fifo is None else f'{fifo:.2f}'} |")
        if row["keys"] >= 20 and s < TARGET_SLEEP:
            misses += 1
        if n < TARGET_NOOP and row["keys"] >= 20:
            misses += 1
    print(f"targets: 2 ms key/unordered >= {TARGET_SLEEP} at >= 20 keys, no-op key/unordered >= {TARGET_NOOP}: "
          f"{'met' if not misses else f'{misses} missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
