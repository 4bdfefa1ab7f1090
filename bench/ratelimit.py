"""What a rate limit that never binds costs: ``MAX_RATE`` far above what a no-op handler reaches, against none.

Issue 29's target: ``MAX_RATE`` far above what the handlers reach costs <= 3 % throughput on the no-op
bench. Two measures, each a ratio of figures taken in this one run, contenders taking turns pass by pass:

- ``broker``: the engine reading one backlog (lz4 100 B records, 6 partitions, ``--threads`` 16) with a
  no-op handler, from the start with a new group each time; its steady rate (bench/run.py ``steady_rate``).
  Contenders: ``off`` (no limit), ``max_rate`` (``MAX_RATE`` = ``FAR``, a rate no handler reaches) and, for
  information, ``key_rate`` (``KEY_RATE`` = ``FAR``: under a key limit the fast path takes single
  messages, so a key a chunk would hold back cannot hold the others: its cost is that of no chunks);
- ``path``: the poll thread's and workers' steps without a broker (bench/noop_path.py's shape: pre-built
  messages admitted, put, run by a no-op handler and settled), process CPU microseconds per message.

    .venv/bin/python -m bench.ratelimit                  # own broker on 127.0.0.1:29942 (or the next free pair)
    .venv/bin/python -m bench.ratelimit --bootstrap host:9092
    .venv/bin/python -m bench.ratelimit --quick          # one pass, smaller backlog: checks it works

Writes bench/results/ratelimit.json (bench/record.py). The machine is shared: run the figures that are
quoted on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import Any

from bench import record
from bench.noop_path import batches
from bench.run import produce_backlog, steady_rate
from bench.scaleout import cluster_for
from mtc75.api import Consumer
from mtc75.core.stats import Stats
from mtc75.engine.ledger import Ledger
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.invoker import Invoker
from mtc75.settings import Settings

PORT = int(os.environ.get("MTC75_BENCH_RATELIMIT_PORT", "29942"))
FAR = 1e9  # messages per second: far above any handler here
TARGET = 0.97  # MAX_RATE far above / no limit, no-op handler
CONTENDERS: dict[str, dict[str, float]] = {"off": {}, "max_rate": {"MAX_RATE": FAR}, "key_rate": {"KEY_RATE": FAR}}


def broker_once(bootstrap: str, topic: str, limits: dict[str, float], threads: int, count: int,
                window: float, warmup: float) -> dict[str, Any]:
    """The engine reads ``topic`` from the start with a no-op handler: its steady rate."""
    done: list[float] = []
    stamp = time.monotonic
    append = done.append
    consumer: Consumer | None = None

    def handle(_msg: Any) -> None:
        append(stamp())

    def on_status(_stats: Stats) -> None:
        if done and stamp() - done[0] >= warmup + window:
            assert consumer is not None
            consumer.stop()

    settings = Settings().replace(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=f"bench-{uuid.uuid4().hex[:8]}",
                                  MAX_THREAD_COUNT=threads, **limits)
    consumer = Consumer.from_settings(handle, settings, on_status=on_status, status_interval=0.05)
    stats = consumer.run(max_messages=count)
    rate, span, messages = steady_rate(done, warmup)
    return {"rate": rate, "window_s": round(span, 2), "messages": messages, "throttled_s": stats.throttled_seconds}


def path_once(limits: dict[str, float], threads: int, count: int) -> dict[str, Any]:
    """bench/noop_path.py's loop with these limits: process CPU and wall microseconds per message."""
    ledger = Ledger(lambda err: None)
    dispatcher = Dispatcher(Invoker(lambda _m: None), threads)
    dispatcher.limit_rates(limits.get("MAX_RATE", 0.0), limits.get("KEY_RATE", 0.0), 0.1)
    ledger.tracker.assign([("t", p) for p in range(6)])
    work = batches(count)
    total = sum(len(b) for b in work)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for batch in work:
        dispatcher.put(ledger.admit(batch))
        ledger.settle(dispatcher.completions)
        while dispatcher.backlog > 1000:  # about two consume() batches waiting, as the engine's gate keeps it
            dispatcher.wait_backlog_at_most(500, 0.01)
            ledger.settle(dispatcher.completions)
    while ledger.processed < total:
        dispatcher.wait_idle(0.01)
        ledger.settle(dispatcher.completions)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0  # every thread of the process, at the clock's resolution (not ticks)
    dispatcher.shutdown(wait=True)
    return {"cpu_us": cpu / total * 1e6, "wall_us": wall / total * 1e6, "rate": total / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", help="an existing cluster (default: a broker of this run)")
    parser.add_argument("--port", type=int, default=PORT, help="port of the broker this run starts (< 32768)")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--count", type=int, default=1_000_000, help="messages in the backlog")
    parser.add_argument("--path-count", type=int, default=300_000, help="messages per broker-free pass")
    parser.add_argument("--window", type=float, default=3.0, help="seconds of steady state timed per run")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one pass, 300 000 messages")
    args = parser.parse_args(argv)
    warmup = 0.5  # seconds after the first completion not timed (the fetcher's start)
    if args.quick:
        args.passes, args.count, args.path_count, args.window, warmup = 1, 300_000, 100_000, 0.5, 0.2
    run = record.Run.start("ratelimit", "python -m bench.ratelimit " + " ".join(sys.argv[1:] if argv is None else argv))
    names = list(CONTENDERS)
    path: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for turn in range(args.passes):
        for name in names if turn % 2 == 0 else reversed(names):
            path[name].append(path_once(CONTENDERS[name], args.threads, args.path_count))
    best_path = {name: min(runs, key=lambda r: r["cpu_us"]) for name, runs in path.items()}
    for name, r in best_path.items():
        print(f"path {name:>8}: {r['cpu_us']:.2f} µs CPU, {r['wall_us']:.2f} µs wall per message", flush=True)
    with cluster_for(args.bootstrap, args.port, "ratelimit") as bootstrap:
        topic = f"bench-ratelimit-{uuid.uuid4().hex[:8]}"
        print(f"producing {args.count:,} messages to {topic} ...", flush=True)
        produce_backlog(bootstrap, topic, args.count, 6)
        engine: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for turn in range(args.passes):
            for name in names if turn % 2 == 0 else reversed(names):
                r = broker_once(bootstrap, topic, CONTENDERS[name], args.threads, args.count, args.window, warmup)
                engine[name].append(r)
                print(f"  pass {turn + 1} {name:>8}: {r['rate']:,.0f} msg/s", flush=True)
    best = {name: max(runs, key=lambda r: r["rate"]) for name, runs in engine.items()}
    ratio = best["max_rate"]["rate"] / best["off"]["rate"]
    key_ratio = best["key_rate"]["rate"] / best["off"]["rate"]
    path_ratio = best_path["off"]["cpu_us"] / best_path["max_rate"]["cpu_us"]
    result = {
        "threads": args.threads, "count": args.count, "passes": args.passes, "far": FAR, "target": TARGET,
        "broker": {name: runs for name, runs in engine.items()},
        "path": {name: runs for name, runs in path.items()},
        "max_rate_vs_off": round(ratio, 3), "key_rate_vs_off": round(key_ratio, 3),
        "path_off_vs_max_rate_cpu": round(path_ratio, 3), "met": ratio >= TARGET,
    }
    note = "--quick: one pass, 300 000 messages" if args.quick else ""
    print(f"results: {run.write(result, note=note)}")
    print(f"MAX_RATE={FAR:g} / no limit, no-op engine: {ratio:.3f} (target >= {TARGET}); KEY_RATE={FAR:g}: "
          f"{key_ratio:.3f}; broker-free path, CPU per message off / MAX_RATE: {path_ratio:.3f}")
    print(f"load average {run.load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
