"""RUNNER="processes" against threads on a CPU-bound handler: ``python -m bench.processes``.

Two figures, each a ratio of rates taken in this one run (contenders take turns on one backlog, a new group
each time, ``--passes`` turns in alternating order, the best turn of each kept):

- **speed-up**: a pure-Python handler of 2 ms of CPU (bench/cpu_handler.py) on one partition: the process
  runner with ``--processes`` workers against the best of the thread counts ``--threads`` (the GIL lets one
  thread compute at a time, so the best thread count runs at about one core). Issue 27's target: >= 1.7 on
  two cores with two workers.
- **overhead**: a 1 ms handler, one at a time in one worker process (``MAX_THREAD_COUNT=2``: the pool hands
  the next message on as the reply arrives): the time per message beyond the handler's 1 ms, as a share of
  it (``1000 / rate - 1``): what the process runner costs per message (pickling, the socket, the
  hand-overs), the consumer's own work included. Target: <= 10 %. One thread on the same handler is
  timed too, for reference (its poll thread takes GIL time from the handler).

A run's rate is taken from the consumer's status snapshots: completions between ``WARMUP`` seconds after
the first one and ``--window`` seconds later (worker processes start before anything is fetched, so their
start-up is not in it). Writes bench/results/processes.json (bench/record.py). A CPU-bound speed-up needs
idle cores: on a loaded machine it says more about the load than the runner (the file keeps the load).

    .venv/bin/python -m bench.processes            # own broker, ~2 minutes
    .venv/bin/python -m bench.processes --quick    # a smoke run: one pass, short windows
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

import mtc75
from bench import record
from bench.cpu_handler import spin_1ms, spin_2ms
from bench.scaleout import cluster_for
from mtc75.core.stats import Stats
from mtc75.kafka.topics import create_topic
from mtc75.settings import Settings

PORT = int(os.environ.get("MTC75_BENCH_PROCESSES_PORT", "29492"))
WARMUP = 1.0  # seconds after the first completion not counted
TARGETS = {"speedup": 1.7, "overhead": 0.10}


def produce(bootstrap: str, topic: str, count: int) -> None:
    create_topic({"bootstrap.servers": bootstrap}, topic, 1, 1)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i in range(count):
        while True:
            try:
                producer.produce(topic, key=str(i).encode(), value=b'{"id": %d}' % i)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        raise SystemExit("bench: backlog not fully delivered")


def rate_of(bootstrap: str, topic: str, handler: Any, window: float, **settings: Any) -> dict[str, Any]:
    """One contender from the start of ``topic``: its steady rate over ``window`` seconds."""
    seen: list[tuple[float, int]] = []
    consumer: mtc75.Consumer | None = None

    def on_status(stats: Stats) -> None:
        now = time.monotonic()
        seen.append((now, stats.processed))
        first = next((t for t, n in seen if n > 0), None)
        if first is not None and now - first >= WARMUP + window:
            assert consumer is not None
            consumer.stop()

    base = Settings().replace(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=f"bench-{uuid.uuid4().hex[:8]}",
                              MAX_BACKLOG=2000, **settings)
    consumer = mtc75.Consumer.from_settings(handler, base, on_status=on_status, status_interval=0.05)
    final = consumer.run()
    first = next(t for t, n in seen if n > 0)
    start = next((t, n) for t, n in seen if t >= first + WARMUP)
    end = next(((t, n) for t, n in seen if t >= first + WARMUP + window), seen[-1])
    span = end[0] - start[0]
    return {"rate": (end[1] - start[1]) / span if span > 0 else 0.0, "window_s": round(span, 2),
            "messages": end[1] - start[1], "pauses": final.pauses,
            **{k.lower(): v for k, v in settings.items()}}


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: r["rate"])


def measure(bootstrap: str, topic: str, args: argparse.Namespace) -> dict[str, Any]:
    window = args.window
    contenders: dict[str, tuple[Any, dict[str, Any]]] = {
        f"threads_{n}": (spin_2ms, {"RUNNER": "threads", "MAX_THREAD_COUNT": n}) for n in args.threads
    }
    contenders["processes"] = (spin_2ms, {"RUNNER": "processes", "PROCESS_COUNT": args.processes,
                                          "MAX_THREAD_COUNT": 2 * args.processes})
    overhead = {
        "threads_1_1ms": (spin_1ms, {"RUNNER": "threads", "MAX_THREAD_COUNT": 1}),
        "processes_1_1ms": (spin_1ms, {"RUNNER": "processes", "PROCESS_COUNT": 1, "MAX_THREAD_COUNT": 2}),
    }
    turns: dict[str, list[dict[str, Any]]] = {}
    for turn in range(args.passes):
        for group in (contenders, overhead):
            names = list(group) if turn % 2 == 0 else list(reversed(group))
            for name in names:
                handler, settings = group[name]
                r = rate_of(bootstrap, topic, handler, window, **settings)
                turns.setdefault(name, []).append(r)
                print(f"  pass {turn + 1} {name:>16}: {r['rate']:8.1f} msg/s over {r['window_s']:.1f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    best = {name: best_of(runs) for name, runs in turns.items()}
    threads_best = max((best[f"threads_{n}"] for n in args.threads), key=lambda r: r["rate"])
    speedup = best["processes"]["rate"] / threads_best["rate"]
    cost = 1000.0 / best["processes_1_1ms"]["rate"] - 1
    return {
        "handler_ms": 2.0, "processes": args.processes, "threads": list(args.threads), "passes": args.passes,
        "window_s": window, "runs": turns, "best_thread_count": threads_best["max_thread_count"],
        "speedup": speedup, "overhead_1ms": cost,
        "threads_1_1ms_overhead": 1000.0 / best["threads_1_1ms"]["rate"] - 1, "targets": TARGETS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", help="an existing cluster (default: a broker of this run)")
    parser.add_argument("--port", type=int, default=PORT, help="port of the broker this run starts (< 32768)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4], help="thread counts to try")
    parser.add_argument("--window", type=float, default=5.0, help="seconds of steady state timed per run")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one pass, 2 s windows (a smoke run)")
    parser.add_argument("--out", type=Path, default=record.BENCH_RESULTS, help="where the result file goes")
    parser.add_argument("--note", default="", help="stored in the result file (say why a run is not final)")
    args = parser.parse_args(argv)
    if args.quick:
        args.passes, args.window = 1, 2.0
    note = args.note or ("--quick: one pass, 2 s windows; a smoke run, not a figure to quote" if args.quick else "")
    run = record.Run.start("processes", "python -m bench.processes " + " ".join(sys.argv[1:] if argv is None
                                                                             else argv))
    with cluster_for(args.bootstrap, args.port, "processes") as bootstrap:
        topic = f"bench-processes-{uuid.uuid4().hex[:8]}"
        # enough for the fastest contender's warm-up and window, every turn reading from the start
        count = int(1000 * args.processes * (WARMUP + args.window + 5))
        print(f"producing {count:,} messages to {topic} (1 partition) ...", flush=True)
        produce(bootstrap, topic, count)
        figures = measure(bootstrap, topic, args)
    path = record.write(run.document(figures, note), args.out)
    from bench import docs

    print(f"results: {path}\n\n{docs.tables_of(record.load(path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
