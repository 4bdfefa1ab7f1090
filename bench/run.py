"""``make bench``: MTC75's throughput, overhead, memory and CPU against the local Kafka, as ratios.

Every figure is a ratio of numbers taken in this one run (the machine is shared and noisy), and
contenders that are compared take turns on the same backlog (figure 3: each pass's ratios, the median
of PASSES passes; figures 1-2: each keeping its best pass):

1. saturation: throughput against the ideal N/W for a ``sleep(W)`` handler; the plain pool and
   sentry-arroyo's RunTaskInThreads at N = 75, W = 10 ms, timed the same way (same warm-up, same window);
2. the peer workload (10 000 messages, 1 partition, 0-5 ms, 16 threads): MTC75, Confluent Parallel
   Consumer 0.5.3.3 (bench/parallel-consumer, when Maven is there) and arroyo, on one list of work times;
3. topic shapes (uncompressed 150 B, lz4 100 B, uncompressed 10 KB) with a no-op handler: the engine,
   a raw ``consume()`` loop, the plain "acquire; submit" pool, arroyo, and the engine on its previous
   queue settings (PREVIOUS_SETTINGS) and with large fetches (LARGE_FETCHES), each in its own process
   (bench/child.py) with its peak RSS;
4. CPU per message at a fixed 2 000 msg/s.

Results go to stdout (tables), bench/results.json and bench/throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

import mtc75
from mtc75.core.stats import Stats
from mtc75.kafka.topics import create_topic
from mtc75.settings import Settings
from mtc75.tools.broker import LocalKafka

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent
PC_DIR = OUT / "parallel-consumer"
BENCH_PORT = int(os.environ.get("MTC75_BENCH_KAFKA_PORT", "29692"))  # below the ephemeral range (32768+)

THREADS = (1, 16, 75, 200)
WORK_SECONDS = (0.001, 0.010, 0.050)
WARMUP = 1.0  # seconds after the first completion not counted in a steady-state rate
PASSES = 3  # turns each contender takes on a shape (figure 3: the median counts; 1-2: the best)
ARROYO_PENDING = (1, 10)  # arroyo's max_pending_futures, as multiples of its concurrency
TARGETS = {
    "saturation_75_10ms": 0.97,
    "peer_workload_ratio": 0.90,
    "noop_vs_plain_pool": 3.0,  # uncompressed shapes
    "noop_vs_raw": 0.8,  # uncompressed shapes
    "noop_vs_raw_lz4": 0.5,
    "rss_small_mb": 150.0,  # 1 000 000 small messages
    "rss_large_mb": 200.0,  # 10 KB messages
}


@dataclass(frozen=True)
class Shape:
    """One kind of topic a user has: message size, compression, backlog."""

    name: str
    size: int  # bytes per message value
    compression: str
    count: int  # backlog, consumed whole by the engine and the raw loop
    partitions: int = 6
    others: int = 100_000  # messages the plain pool consumes (its RSS is not a target)
    arroyo: int = 50_000  # messages arroyo consumes (it is the slowest here: 5-10k msg/s)

    @property
    def rss_target(self) -> float:
        return TARGETS["rss_large_mb"] if self.size > 1000 else TARGETS["rss_small_mb"]

    @property
    def raw_target(self) -> float:
        return TARGETS["noop_vs_raw_lz4"] if self.compression != "none" else TARGETS["noop_vs_raw"]


SHAPES = (
    Shape("uncompressed 150 B", 150, "none", 1_000_000),
    Shape("lz4 100 B", 100, "lz4", 1_000_000),
    # 200,000 (2 GB): a run of 40,000 lasted under a second and its passes spread 0.56-0.98 of the raw loop
    Shape("uncompressed 10 KB", 10_000, "none", 200_000, others=40_000, arroyo=40_000),
)


# The settings before issue 16 (librdkafka's backoff and count bound, a 4 MB byte bound, and the fixed
# 2 MB / 512 KB fetches that FETCH_SIZES="auto" now replaces): what the current defaults are worth. And
# librdkafka's own fetch sizes on top of the defaults (set with -X, so no probe runs): what large
# uncompressed records gain from them, and what they cost compressed small ones (BENCHMARKS.md).
PREVIOUS_SETTINGS = ("-X", "fetch.queue.backoff.ms=1000", "-X", "queued.min.messages=100000",
                     "-X", "queued.max.messages.kbytes=4096",
                     "-X", "fetch.max.bytes=2097152", "-X", "max.partition.fetch.bytes=524288")
LARGE_FETCHES = ("-X", "fetch.max.bytes=52428800", "-X", "max.partition.fetch.bytes=1048576")
ENGINE_VARIANTS = {"engine_previous_settings": PREVIOUS_SETTINGS, "engine_large_fetches": LARGE_FETCHES}


# -- setup --------------------------------------------------------------------------------------------


def payload(i: int, size: int) -> bytes:
    """A JSON record of ``size`` bytes; the id makes each one different, the filler compresses like text."""
    head = b'{"id": %d, "name": "Jane Doe", "email": "jane@example.com", "company": "Example Ltd", "note": "' % i
    return head + b"lorem ipsum " * max(0, (size - len(head) - 2) // 12) + b" " * ((size - len(head) - 2) % 12) + b'"}'


def produce_backlog(bootstrap: str, topic: str, count: int, partitions: int, size: int = 100,
                    compression: str = "lz4", keys: int | None = None) -> None:
    """``count`` messages of ``size`` bytes, produced as fast as the client allows (this is not timed).

    Message i has key ``str(i)``, or ``k<i % keys>`` when ``keys`` is given (bench/ordering.py).
    """
    create_topic({"bootstrap.servers": bootstrap}, topic, partitions, 1)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000,
                         "queue.buffering.max.messages": 500000, "queue.buffering.max.kbytes": 1048576,
                         "compression.type": compression})
    for i in range(count):
        value = payload(i, size)
        while True:
            try:
                producer.produce(topic, value=value, key=b"k%d" % (i % keys) if keys else str(i).encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    if producer.flush(300):
        raise SystemExit("bench: backlog not fully delivered")


def _settings(bootstrap: str, topic: str, threads: int, **kw: Any) -> Settings:
    return Settings().replace(BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=f"bench-{uuid.uuid4().hex[:8]}",
                              MAX_THREAD_COUNT=threads, **kw)


def _group() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


def steady_rate(stamps: list[float], warmup: float = WARMUP) -> tuple[float, float, int]:
    """(rate, window seconds, messages) of completions from ``warmup`` after the first one to the last.

    Every steady-state figure (the engine's, the plain pool's, arroyo's) goes through this one function.
    """
    stamps = sorted(stamps)
    start_at = stamps[0] + warmup
    window = [t for t in stamps if t >= start_at]
    if len(window) < 2:
        raise SystemExit("bench: too few completions after the warm-up to time a steady rate")
    span = window[-1] - window[0]
    return (len(window) - 1) / span, span, len(window)


def window_for(threads: int, work: float) -> float:
    """Seconds counted for a steady rate: at least 3 s or 2 000 messages, at most 8 s."""
    return min(8.0, max(3.0, 2000.0 / (threads / work)))


# -- children (bench/child.py) ----------------------------------------------------------------------


def child(bootstrap: str, mode: str, topic: str, count: int, *extra: str) -> dict[str, Any]:
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, NO_COLOR="1", PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(OUT / "child.py"), mode, "--topic", topic, "--count", str(count),
                           *extra], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {mode} child failed: {proc.stderr.strip()[-800:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return report


# -- figure 1: saturation efficiency ------------------------------------------------------------------


def measure_rate(bootstrap: str, topic: str, threads: int, work: float) -> dict[str, float]:
    """Steady-state throughput of the engine with a ``time.sleep(work)`` handler (see :func:`steady_rate`)."""
    ideal = threads / work
    window = window_for(threads, work)
    done: list[float] = []
    consumer: mtc75.Consumer | None = None

    def handle(_msg: Any) -> None:
        time.sleep(work)
        done.append(time.monotonic())

    def on_status(_stats: Stats) -> None:
        if done and time.monotonic() - done[0] >= WARMUP + window:
            assert consumer is not None
            consumer.stop()

    consumer = mtc75.Consumer.from_settings(handle, _settings(bootstrap, topic, threads), on_status=on_status,
                                            status_interval=0.05)
    final = consumer.run()
    rate, span, messages = steady_rate(done)
    return {"threads": threads, "work_s": work, "rate": rate, "ideal": ideal, "ratio": rate / ideal,
            "pauses": final.pauses, "window_s": span, "messages": messages}


def plain_pool_rate(bootstrap: str, topic: str, threads: int, work: float) -> dict[str, float]:
    """The plain pattern, semaphore.acquire(); executor.submit() per message, timed like the engine."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": _group(),
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    sem = threading.Semaphore(threads)
    done: list[float] = []
    stop_after = WARMUP + window_for(threads, work)

    def task() -> None:
        time.sleep(work)
        done.append(time.monotonic())
        sem.release()

    with ThreadPoolExecutor(threads) as pool:
        while not (done and time.monotonic() - done[0] >= stop_after):
            for msg in consumer.consume(500, timeout=0.1):
                if msg.error():
                    continue
                sem.acquire()
                pool.submit(task)
    consumer.close()
    rate, span, messages = steady_rate(done)
    ideal = threads / work
    return {"threads": threads, "work_s": work, "rate": rate, "ratio": rate / ideal, "window_s": span,
            "messages": messages}


def arroyo_rate(bootstrap: str, topic: str, threads: int, work: float, pending: int) -> dict[str, float]:
    """sentry-arroyo's RunTaskInThreads on the same workload, timed like the engine."""
    seconds = WARMUP + window_for(threads, work)
    report = child(bootstrap, "arroyo", topic, 10_000_000, "--threads", str(threads), "--work", f"sleep:{work}",
                   "--max-pending", str(pending), "--seconds", str(seconds), "--stamps")
    rate, span, messages = steady_rate(report["stamps"])
    return {"threads": threads, "work_s": work, "max_pending_futures": pending, "rate": rate,
            "ratio": rate / (threads / work), "window_s": span, "messages": messages}


# -- figure 2: the peer workload ------------------------------------------------------------------


def peer_workload(bootstrap: str, count: int = 10_000, threads: int = 16) -> dict[str, Any]:
    """10 000 messages, 1 partition, uniformly random 0-5 ms of work, 16 threads: MTC75 and the peers.

    Each one's time runs from its first handler start to its last handler end; ideal = total work / threads.
    """
    topic = f"bench-peer-{uuid.uuid4().hex[:8]}"
    produce_backlog(bootstrap, topic, count, partitions=1)
    rng = random.Random(75)
    work = [rng.uniform(0.0, 0.005) for _ in range(count)]
    ideal = sum(work) / threads
    work_file = Path(tempfile.mkstemp(prefix="mtc75-bench-work-", suffix=".txt")[1])
    work_file.write_text("".join(f"{w:.9f}\n" for w in work))
    first: list[float] = []
    last = [0.0]

    def handle(msg: Any) -> None:
        if not first:
            first.append(time.monotonic())
        time.sleep(work[msg.offset()])
        last[0] = max(last[0], time.monotonic())

    mtc75.Consumer.from_settings(handle, _settings(bootstrap, topic, threads)).run(max_messages=count)
    elapsed = last[0] - first[0]
    result: dict[str, Any] = {"messages": count, "threads": threads, "ideal_s": ideal, "elapsed_s": elapsed,
                              "ratio": ideal / elapsed, "peers": []}
    try:
        for multiple in ARROYO_PENDING:
            pending = multiple * threads
            r = child(bootstrap, "arroyo", topic, count, "--threads", str(threads), "--work", f"file:{work_file}",
                      "--max-pending", str(pending))
            result["peers"].append({"peer": "sentry-arroyo RunTaskInThreads", "max_pending_futures": pending,
                                    "elapsed_s": r["elapsed_s"], "ratio": ideal / r["elapsed_s"]})
        pc = parallel_consumer(bootstrap, topic, threads, work_file)
        if pc is not None:
            result["peers"].append({"peer": "Confluent Parallel Consumer 0.5.3.3 (UNORDERED)",
                                    "elapsed_s": pc["elapsed_s"], "ratio": ideal / pc["elapsed_s"]})
    finally:
        work_file.unlink()
    return result


def parallel_consumer(bootstrap: str, topic: str, threads: int, work_file: Path) -> dict[str, Any] | None:
    """Run bench/parallel-consumer (built by ``make bench``); None when Java or its build is missing."""
    classpath = PC_DIR / "target" / "classpath.txt"
    classes = PC_DIR / "target" / "classes"
    java = shutil.which("java")
    if java is None or not classpath.exists() or not classes.exists():
        print("  (Parallel Consumer not built: run 'make bench' with Maven and Java to include it)", flush=True)
        return None
    cp = f"{classes}{os.pathsep}{classpath.read_text().strip()}"
    proc = subprocess.run([java, "-cp", cp, "mtc75.bench.PcPeer", bootstrap, topic, str(threads), str(work_file)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"bench: Parallel Consumer run failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- figure 3: topic shapes, no-op handler ----------------------------------------------------------


def shape_row(bootstrap: str, shape: Shape, topic: str, passes: int) -> dict[str, Any]:
    """The contenders take turns on the same backlog, ``passes`` times.

    A pass's ratios (engine / raw loop, engine / pool) compare runs made minutes apart, so the machine's
    load moves them less than it moves the rates; the row gives the median of each, the median rate of
    each contender, its highest peak RSS, and the load average at the start of each pass.
    """
    kept: dict[str, dict[str, Any]] = {}
    ratios: dict[str, list[float]] = {"vs_raw": [], "vs_pool": [], "default_vs_previous": [],
                                      "large_fetches_vs_raw": []}
    loads = []
    for _ in range(passes):
        loads.append(round(os.getloadavg()[0], 1))
        runs = {
            "raw": child(bootstrap, "raw", topic, shape.count),
            "engine": child(bootstrap, "engine", topic, shape.count),
            **{name: child(bootstrap, "engine", topic, shape.count, *extra) for name, extra in ENGINE_VARIANTS.items()},
            "pool": child(bootstrap, "pool", topic, shape.others),
        }
        for multiple in ARROYO_PENDING:
            runs[f"arroyo_x{multiple}"] = child(bootstrap, "arroyo", topic, shape.arroyo,
                                               "--max-pending", str(75 * multiple))
        engine = runs["engine"]["rate"]
        ratios["vs_raw"].append(engine / runs["raw"]["rate"])
        ratios["vs_pool"].append(engine / runs["pool"]["rate"])
        ratios["default_vs_previous"].append(engine / runs["engine_previous_settings"]["rate"])
        ratios["large_fetches_vs_raw"].append(runs["engine_large_fetches"]["rate"] / runs["raw"]["rate"])
        for name, r in runs.items():
            k = kept.setdefault(name, {"peak_rss_mb": 0.0, "rates": [], "cpu_us": []})
            k["rates"].append(round(r["rate"]))
            k["peak_rss_mb"] = max(k["peak_rss_mb"], r["peak_rss_mb"])
            k["messages"] = r["handled"]
            k["cpu_us"].append(r["cpu_s"] / max(1, r["handled"]) * 1e6)
            if name.startswith("engine"):
                k["rss_samples"] = r["rss_samples"]
                k["fetch_sizes"] = r.get("fetch_sizes", "")  # the engine's: what FETCH_SIZES="auto" chose
    for k in kept.values():
        k["rate"] = statistics.median(k["rates"])
        k["cpu_us_per_message"] = statistics.median(k.pop("cpu_us"))
    return {"shape": shape.name, "size": shape.size, "compression": shape.compression, "backlog": shape.count,
            "partitions": shape.partitions, "contenders": kept, "load_avg_at_passes": loads,
            **{name: statistics.median(values) for name, values in ratios.items()},
            "ratios_per_pass": {name: [round(v, 3) for v in values] for name, values in ratios.items()},
            "raw_target": shape.raw_target, "rss_target": shape.rss_target}


# -- figure 4: CPU per message at a fixed rate ------------------------------------------------------


def rate_feeder(bootstrap: str, topic: str, rate: float, seconds: float, stop: threading.Event) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    sent, start = 0, time.monotonic()
    while not stop.is_set() and time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate)
        while sent < due:
            producer.produce(topic, value=payload(sent, 100))
            sent += 1
        producer.poll(0)
        time.sleep(0.005)
    producer.flush(30)
    return sent


def cpu_figure(bootstrap: str, run: str, seconds: float, rate: float = 2000.0) -> dict[str, float]:
    topic = f"bench-cpu-{run}"
    create_topic({"bootstrap.servers": bootstrap}, topic, 4, 1)
    stop = threading.Event()
    feeder = threading.Thread(target=rate_feeder, args=(bootstrap, topic, rate, seconds, stop))
    feeder.start()
    expected = int(rate * seconds)
    try:
        cpu = child(bootstrap, "engine", topic, expected, "--idle-exit", "20")
    finally:
        stop.set()
        feeder.join()
    return {"rate": rate, "messages": cpu["handled"], "cpu_s": cpu["cpu_s"],
            "us_per_message": cpu["cpu_s"] / max(1, cpu["handled"]) * 1e6}


# -- report -----------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(WORK_SECONDS), figsize=(5 * len(WORK_SECONDS), 4), sharex=True)
    for ax, work in zip(axes, WORK_SECONDS, strict=True):
        rows = [r for r in results["saturation"] if r["work_s"] == work]
        xs = [r["threads"] for r in rows]
        ax.plot(xs, [r["ideal"] for r in rows], "k--", label="ideal N/W")
        ax.plot(xs, [r["rate"] for r in rows], "o-", label="MTC75")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"W = {work * 1000:g} ms")
        ax.set_xlabel("threads (MAX_THREAD_COUNT)")
        ax.set_ylabel("messages/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("MTC75 throughput against threads, per handler time W")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer points, smaller backlogs (a smoke run)")
    parser.add_argument("--only", choices=("saturation", "peer", "shapes", "cpu", "async"), action="append",
                        help="run only these figures (repeatable)")
    args = parser.parse_args(argv)
    only = set(args.only or ("saturation", "peer", "shapes", "cpu", "async"))
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker, started = None, False
    if not bootstrap:
        broker = LocalKafka(port=BENCH_PORT)
        broker.fetch()
        started = broker.start()
        bootstrap = broker.bootstrap
    t0 = time.monotonic()
    given = sys.argv[1:] if argv is None else argv
    command = "make bench" if not given else "python -m bench.run " + " ".join(given)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_at_start": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": command,
    }
    shapes = [Shape(s.name, s.size, s.compression, s.count // 5, s.partitions, s.others // 5, s.arroyo // 5)
              for s in SHAPES] \
        if args.quick else list(SHAPES)
    try:
        run = uuid.uuid4().hex[:8]
        topics = {}
        for shape in shapes if only - {"async"} else ():  # the async figure produces its own backlog
            topics[shape.name] = f"bench-{shape.compression}-{shape.size}-{run}"
            print(f"producing {shape.count:,} x {shape.name} to {topics[shape.name]} ...", flush=True)
            produce_backlog(bootstrap, topics[shape.name], shape.count, shape.partitions, shape.size,
                            shape.compression)
        lz4_topic = topics.get(SHAPES[1].name, "")

        if "saturation" in only:
            threads = (1, 16, 75) if args.quick else THREADS
            results["saturation"] = []
            for work in WORK_SECONDS:
                for n in threads:
                    row = measure_rate(bootstrap, lz4_topic, n, work)
                    results["saturation"].append(row)
                    print(f"  saturation N={n:>3} W={work * 1000:>4g} ms: {row['rate']:9.1f} msg/s "
                          f"= {row['ratio']:.3f} of ideal ({row['pauses']} pauses)", flush=True)
            results["saturation_peers"] = [plain_pool_rate(bootstrap, lz4_topic, 75, 0.010) | {"peer": "plain pool"}]
            for multiple in ARROYO_PENDING:
                row = arroyo_rate(bootstrap, lz4_topic, 75, 0.010, 75 * multiple)
                results["saturation_peers"].append(row | {"peer": "sentry-arroyo RunTaskInThreads"})
            for row in results["saturation_peers"]:
                pending = row.get("max_pending_futures", "")
                print(f"  saturation N=75 W=10 ms, {row['peer']} {pending}: {row['rate']:.1f} msg/s "
                      f"= {row['ratio']:.3f} of ideal", flush=True)

        if "peer" in only:
            results["peer"] = peer_workload(bootstrap)
            p = results["peer"]
            print(f"  peer workload: MTC75 {p['elapsed_s']:.2f} s = {p['ratio']:.3f} of ideal", flush=True)
            for peer in p["peers"]:
                print(f"  peer workload: {peer['peer']} {peer.get('max_pending_futures', '')} "
                      f"{peer['elapsed_s']:.2f} s = {peer['ratio']:.3f}", flush=True)

        if "shapes" in only:
            results["shapes"] = []
            for shape in shapes:
                row = shape_row(bootstrap, shape, topics[shape.name], 1 if args.quick else PASSES)
                results["shapes"].append(row)
                c = row["contenders"]
                print(f"  {shape.name}: engine {c['engine']['rate']:,.0f}/s ({c['engine']['peak_rss_mb']:.0f} MB, "
                      f"fetch sizes {c['engine'].get('fetch_sizes', '?')}), "
                      f"raw {c['raw']['rate']:,.0f}/s, pool {c['pool']['rate']:,.0f}/s, previous settings "
                      f"{c['engine_previous_settings']['rate']:,.0f}/s, large fetches "
                      f"{c['engine_large_fetches']['rate']:,.0f}/s ({c['engine_large_fetches']['peak_rss_mb']:.0f} MB)"
                      f" -> {row['vs_raw']:.2f} of raw, {row['vs_pool']:.2f}x pool (medians; load "
                      f"{row['load_avg_at_passes']})", flush=True)

        if "cpu" in only:
            results["cpu"] = cpu_figure(bootstrap, run, 5.0 if args.quick else 10.0)
            print(f"  CPU at {results['cpu']['rate']:.0f} msg/s: {results['cpu']['us_per_message']:.0f} µs per message",
                  flush=True)

        if "async" in only:  # async handlers against threads (bench/async_bench.py, issue 12)
            from bench import async_bench

            results["async"] = async_bench.figure(bootstrap, 1 if args.quick else async_bench.PASSES)
            async_bench.print_table(results["async"])
    finally:
        if broker is not None and started:
            broker.stop()
    results["elapsed_s"] = time.monotonic() - t0
    results["load_avg_at_end"] = os.getloadavg()
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if "saturation" in results:
        plot(results, OUT / "throughput.png")
    print_tables(results)
    return 0


def print_tables(r: dict[str, Any]) -> None:
    print(f"\n{r['command']} on {r['date']}, {r['elapsed_s']:.0f} s, load average at start "
          f"{r['machine']['load_avg_at_start'][0]:.1f}")
    if "saturation" in r:
        sat = {(row["threads"], row["work_s"]): row for row in r["saturation"]}
        ns = sorted({k[0] for k in sat})
        print("\n| W \\ N | " + " | ".join(str(n) for n in ns) + " |")
        print("|---|" + "---|" * len(ns))
        for work in WORK_SECONDS:
            cells = [f"{sat[(n, work)]['ratio']:.3f}" for n in ns if (n, work) in sat]
            print(f"| {work * 1000:g} ms | " + " | ".join(cells) + " |")
        print("\n| N = 75, W = 10 ms | msg/s | of ideal |")
        print("|---|---|---|")
        key = sat.get((75, 0.010))
        if key:
            target = TARGETS["saturation_75_10ms"]
            print(f"| MTC75 | {key['rate']:,.0f} | **{key['ratio']:.3f}** (target >= {target}) |")
        for row in r["saturation_peers"]:
            name = row["peer"] + (f", max_pending_futures={row['max_pending_futures']}"
                                  if "max_pending_futures" in row else "")
            print(f"| {name} | {row['rate']:,.0f} | {row['ratio']:.3f} |")
    if "peer" in r:
        p = r["peer"]
        print(f"\n| 10 000 msgs, 1 partition, 0-5 ms, 16 threads (ideal {p['ideal_s']:.2f} s) | elapsed | of ideal |")
        print("|---|---|---|")
        print(f"| MTC75 | {p['elapsed_s']:.2f} s | **{p['ratio']:.3f}** (target >= {TARGETS['peer_workload_ratio']}) |")
        for peer in p["peers"]:
            name = peer["peer"] + (f", max_pending_futures={peer['max_pending_futures']}"
                                   if "max_pending_futures" in peer else "")
            print(f"| {name} | {peer['elapsed_s']:.2f} s | {peer['ratio']:.3f} |")
    if "shapes" in r:
        print("\n| shape (no-op handler) | engine msg/s (peak RSS) | raw loop msg/s (RSS) | plain pool msg/s "
              "| engine / raw | engine / pool | arroyo msg/s by max_pending_futures | engine, previous settings "
              "(peak RSS) | engine, large fetches (peak RSS) | load average |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in r["shapes"]:
            c = row["contenders"]
            arroyo = ", ".join(f"{75 * m}: {c[f'arroyo_x{m}']['rate']:,.0f}" for m in ARROYO_PENDING)
            prev, large = c["engine_previous_settings"], c["engine_large_fetches"]
            print(f"| {row['shape']} ({row['backlog']:,} msgs) | {c['engine']['rate']:,.0f} "
                  f"({c['engine']['peak_rss_mb']:.0f} MB, target <= {row['rss_target']:.0f}; fetch sizes "
                  f"{c['engine'].get('fetch_sizes', '?')}) "
                  f"| {c['raw']['rate']:,.0f} ({c['raw']['peak_rss_mb']:.0f} MB) | {c['pool']['rate']:,.0f} "
                  f"| **{row['vs_raw']:.2f}** (>= {row['raw_target']}) | **{row['vs_pool']:.2f}x** | {arroyo} "
                  f"| {prev['rate']:,.0f} ({prev['peak_rss_mb']:.0f} MB): default {row['default_vs_previous']:.2f}x"
                  f" | {large['rate']:,.0f} ({large['peak_rss_mb']:.0f} MB): {row['large_fetches_vs_raw']:.2f} of raw "
                  f"| {', '.join(str(x) for x in row['load_avg_at_passes'])} |")
    if "cpu" in r:
        c = r["cpu"]
        print(f"\nCPU per message at {c['rate']:.0f} msg/s (no-op, start-up included): {c['us_per_message']:.0f} µs")


if __name__ == "__main__":
    sys.exit(main())
