"""``make bench``'s exactly-once section: exactly_once against at_least_once outputs, side by side.

    .venv/bin/python -m bench.eos            # own broker on 127.0.0.1:29992 (or the next free pair)
    .venv/bin/python -m bench.eos --quick    # one pass, 5,000 messages

The workload (issue 26): a handler that works 5 ms and returns one ``mtc75.Output`` per input, 16 threads,
inputs on 3 partitions. Each pass times both guarantees in turns on a backlog of their own: the rate is the
inputs over the time from the first handler call to the last input committed; the latency is each output's
time from its handler's return to a ``read_committed`` reader seeing it (the output carries the return time),
leaving out the first WARMUP second (the producers connect then).
exactly_once also runs at COMMIT_INTERVAL 0.1 and 2.0: its latency grows with the interval (a transaction's
outputs become visible when it commits), at_least_once's does not (outputs are visible at once).
Target: exactly_once (COMMIT_INTERVAL 0.5) >= 0.8 of at_least_once's rate. Writes bench/results/eos.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from statistics import median, quantiles
from typing import Any

from confluent_kafka import Consumer

import mtc75
from bench import record
from bench.scaleout import cluster_for, produce_backlog
from mtc75.kafka.topics import create_topic

PORT = 29992
WORK = 0.005  # seconds of work per message (issue 26)
THREADS, PARTITIONS = 16, 3
TARGET = 0.8  # exactly_once / at_least_once
WARMUP = 1.0  # seconds of outputs (by handler return) left out of the latency: connections being set up
RUNS = (("at_least_once", 0.5), ("exactly_once", 0.5), ("exactly_once", 0.1), ("exactly_once", 2.0))


def read_latencies(bootstrap: str, topic: str, count: int, out: list[tuple[float, float]], stop: threading.Event,
                   ready: threading.Event) -> None:
    """A read_committed reader: for each output, now - the handler's return time it carries. ``ready`` is set
    once it has its partitions (the consumer starts then: the reader's group join is not latency)."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-eos-reader-{uuid.uuid4().hex[:8]}",
                       "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                       "fetch.wait.max.ms": 10})
    reader.subscribe([topic], on_assign=lambda _c, parts: ready.set() if parts else None)
    try:
        while len(out) < count and not stop.is_set():
            msg = reader.poll(0.05)
            if msg is not None and msg.error() is None:
                returned = json.loads(msg.value())["t"]
                out.append((returned, time.time() - returned))
    finally:
        reader.close()


def run_once(bootstrap: str, guarantee: str, interval: float, count: int) -> dict[str, Any]:
    topic, out = f"bench-eos-in-{uuid.uuid4().hex[:8]}", f"bench-eos-out-{uuid.uuid4().hex[:8]}"
    produce_backlog(bootstrap, topic, count, PARTITIONS)
    create_topic({"bootstrap.servers": bootstrap}, out, PARTITIONS, 0)
    stamps: list[float] = []

    def handle(message: Any) -> mtc75.Output:
        started = time.monotonic()
        time.sleep(WORK)
        stamps.append(started)
        return mtc75.Output(out, json.dumps({"t": time.time()}).encode(), key=message.key())

    seen: list[tuple[float, float]] = []  # (handler return time, latency) per output
    stop, ready = threading.Event(), threading.Event()
    reader = threading.Thread(target=read_latencies, args=(bootstrap, out, count, seen, stop, ready),
                              daemon=True)
    reader.start()
    if not ready.wait(60):
        raise RuntimeError(f"the read_committed reader of {out} got no partitions within 60 s")
    consumer = mtc75.Consumer(handle, topic=topic, group_id=f"bench-eos-{uuid.uuid4().hex[:8]}",
                              bootstrap_servers=bootstrap, max_thread_count=THREADS, processing_guarantee=guarantee,
                              commit_interval=interval, on_failure="skip")
    stats = consumer.run(max_messages=count)  # returns once the last one is committed (shutdown commits)
    ended = time.monotonic()
    reader.join(60)
    stop.set()
    first = min(stamps)
    start = min(t for t, _ in seen) + WARMUP if seen else 0.0
    latencies = [lat for t, lat in seen if t >= start]  # the producers' connection set-up is not latency
    p = quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"guarantee": guarantee, "commit_interval": interval, "messages": stats.processed,
            "rate": count / (ended - first), "outputs_seen": len(seen),
            "latency_p50_ms": round(median(latencies) * 1000, 1) if latencies else None,
            "latency_p99_ms": round(p[98] * 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", help="an existing cluster (default: a broker of this run)")
    parser.add_argument("--port", type=int, default=PORT, help="port of the broker this run starts (< 32768)")
    parser.add_argument("--count", type=int, default=10_000, help="inputs per run")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one pass, 5,000 messages")
    args = parser.parse_args(argv)
    if args.quick:
        args.passes, args.count = 1, 5_000
    run = record.Run.start("eos", "python -m bench.eos " + " ".join(sys.argv[1:] if argv is None else argv))
    rows: list[dict[str, Any]] = []
    with cluster_for(args.bootstrap, args.port, "eos") as bootstrap:
        for turn in range(args.passes):
            order = RUNS if turn % 2 == 0 else tuple(reversed(RUNS))
            for guarantee, interval in order:
                row = {"pass": turn, **run_once(bootstrap, guarantee, interval, args.count)}
                rows.append(row)
                print(f"  pass {turn}: {guarantee:>13} at COMMIT_INTERVAL {interval:.1f}: {row['rate']:7,.0f}/s, "
                      f"latency p50 {row['latency_p50_ms']} ms, p99 {row['latency_p99_ms']} ms", flush=True)

    def best(guarantee: str, interval: float) -> float:
        return max(r["rate"] for r in rows if r["guarantee"] == guarantee and r["commit_interval"] == interval)

    ratio = best("exactly_once", 0.5) / best("at_least_once", 0.5)
    result = {"work_s": WORK, "threads": THREADS, "partitions": PARTITIONS, "count": args.count,
              "passes": args.passes, "runs": rows, "eos_vs_alo": round(ratio, 3), "target": TARGET}
    print(f"results: {run.write(result, note='--quick: one pass, 5,000 messages' if args.quick else '')}")
    print(f"exactly_once / at_least_once (best of {args.passes}): {ratio:.2f} (target >= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
