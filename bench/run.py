"""``make bench``: MTC75's throughput, overhead, memory and CPU against the local Kafka, as ratios.

Every figure is a ratio of numbers taken in this one run (the machine is shared and noisy), and
contenders that are compared take turns on the same backlog. Sections (``--only``, repeatable):

- ``limit`` (issue 30): the engine (no-op handler, 16 threads) against **the tuned loop**, the fastest
  plain ``consume()`` loop (librdkafka with TUNED_LOOP's fetch settings: the limit every no-op figure is
  a ratio of), and the same loop on librdkafka's defaults (the default-settings loop), on 1,000,000
  messages of uncompressed 100 B and lz4 100 B on 6 partitions and lz4 100 B on 60; PASSES passes in
  turns, every pass's rates, ratios and peak RSS kept (the docs show min / median / max);
- ``shapes``: the peers on 100 B, lz4 100 B and 10 KB: the engine at its default 75 threads, the plain
  "acquire; submit" pool, arroyo, and the engine on its previous queue settings (PREVIOUS_SETTINGS) and
  with large fetches (LARGE_FETCHES), each as a ratio of the tuned loop of the same pass;
- ``saturation``: throughput against the ideal N/W for a ``sleep(W)`` handler; the plain pool and
  sentry-arroyo's RunTaskInThreads at N = 75, W = 10 ms, timed the same way;
- ``peer``: the peer workload (10 000 messages, 1 partition, 0-5 ms, 16 threads): MTC75, Confluent
  Parallel Consumer 0.5.3.3 (bench/parallel-consumer, when Maven is there) and arroyo;
- ``batch`` (issue 25): batch handlers (BATCH_SIZE > 1) against the tuned loop on the 6-partition limit
  shapes: a no-op batch handler (BATCH_SIZE 500, 16 threads) and one sleeping 10 ms per call (BATCH_SIZE
  100, 16 threads: at most 16 x 100 / 10 ms = 160,000 msg/s), in turns with the tuned loop, PASSES passes;
- ``bursts`` (issue 30 item 3): MAX_THREAD_COUNT="auto" (from 1 thread, MAX_THREAD_LIMIT = the workload's
  N) against fixed counts on short bursts (20,000 x 10 ms on 6 partitions, N = 75; 10,000 x 2 ms on one
  partition, N = 16): rates over the whole backlog, auto as a ratio of the best fixed count of the pass;
- ``cpu``: CPU per message at a fixed 2 000 msg/s;
- ``async``: async handlers against threads (bench/async_bench.py);
- ``reference`` (not in the default set): candidate fetch settings for the tuned loop, side by side,
  to choose TUNED_LOOP (the fastest is kept there).

Each no-op contender runs in its own process (bench/child.py) with its own peak RSS and GIL. Each
section writes its result file, bench/results/<section>.json (bench/record.py: command, UTC date,
commit, machine and load, the raw figures); ``python -m bench.docs`` makes BENCHMARKS.md's tables from
them, and the same tables are printed at the end of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

import mtc75
from bench import record
from mtc75.core.stats import Stats
from mtc75.kafka.topics import create_topic
from mtc75.settings import Settings
from mtc75.tools.broker import LocalKafka

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent
PC_DIR = OUT / "parallel-consumer"
BENCH_PORT = int(os.environ.get("MTC75_BENCH_KAFKA_PORT", "29692"))  # below the ephemeral range (32768+)

SECTIONS = ("limit", "batch", "shapes", "saturation", "peer", "bursts", "cpu", "async")  # default set, in order
EXTRA_SECTIONS = ("reference",)
THREADS = (1, 16, 75, 200)
WORK_SECONDS = (0.001, 0.010, 0.050)
WARMUP = 1.0  # seconds after the first completion not counted in a steady-state rate
PASSES = 3  # turns each contender takes on a shape (limit, shapes: every pass kept; saturation, peer: the best)
ARROYO_PENDING = (1, 10)  # arroyo's max_pending_futures, as multiples of its concurrency
LIMIT_THREADS = 16  # issue 30's setting for the engine against the tuned loop
TARGETS = {
    "saturation_75_10ms": 0.97,
    "peer_workload_ratio": 0.90,
    "limit_6_partitions": 0.8,  # engine (16 threads) / tuned loop, 6 partitions (issue 30)
    "limit_60_partitions": 0.6,
    "limit_rss_mb": 150.0,  # the engine's peak RSS on every limit shape
    "rss_small_mb": 150.0,  # 1 000 000 small messages
    "rss_large_mb": 200.0,  # 10 KB messages
    "batch_noop": 0.9,  # no-op batch handler (BATCH_SIZE 500) / tuned loop (issue 25)
    "batch_sleep": 0.85,  # 10 ms per call, BATCH_SIZE 100, 16 threads / min(its ideal, the tuned loop)
    "batch_rss_mb": 150.0,
    "burst_auto": 0.8,  # MAX_THREAD_COUNT="auto" / the best fixed count, over a whole short burst (issue 30)
}
BATCH_NOOP = 500  # issue 25's batch sizes and work
BATCH_SLEEP, BATCH_SLEEP_SECONDS = 100, 0.010


@dataclass(frozen=True)
class Burst:
    """A short burst of sleeping handlers (issue 30 item 3): ``count`` x ``work`` seconds on ``partitions``,
    "auto" limited to ``limit`` threads against the fixed counts ``fixed``."""

    name: str
    count: int
    partitions: int
    work: float
    limit: int
    fixed: tuple[int, ...]


BURSTS = (
    Burst("20,000 x 10 ms, 6 partitions", 20_000, 6, 0.010, 75, (16, 75)),
    Burst("10,000 x 2 ms, 1 partition", 10_000, 1, 0.002, 16, (8, 16)),
)

# The tuned loop: the bare consume() loop of bench/child.py on fetch settings for throughput, not memory.
# Chosen with `python -m bench.run --only reference` (candidates: REFERENCE_CANDIDATES): the fastest kept.
TUNED_LOOP = ("-X", "fetch.queue.backoff.ms=1", "-X", "queued.max.messages.kbytes=65536",
              "-X", "fetch.max.bytes=52428800", "-X", "max.partition.fetch.bytes=10485760")


@dataclass(frozen=True)
class Shape:
    """One kind of topic a user has: message size, compression, partitions, backlog."""

    name: str
    size: int  # bytes per message value
    compression: str
    count: int  # backlog, consumed whole by the engine and the loops
    partitions: int = 6
    others: int = 100_000  # messages the plain pool and the previous-settings engine consume
    arroyo: int = 50_000  # messages arroyo consumes (it is the slowest here: 5-10k msg/s)

    @property
    def topic_key(self) -> tuple[int, str, int, int]:
        return (self.size, self.compression, self.partitions, self.count)

    @property
    def rss_target(self) -> float:
        return TARGETS["rss_large_mb"] if self.size > 1000 else TARGETS["rss_small_mb"]

    @property
    def limit_target(self) -> float:
        return TARGETS["limit_60_partitions"] if self.partitions >= 60 else TARGETS["limit_6_partitions"]


LIMIT_SHAPES = (
    Shape("uncompressed 100 B", 100, "none", 1_000_000),
    Shape("lz4 100 B", 100, "lz4", 1_000_000),
    Shape("lz4 100 B", 100, "lz4", 1_000_000, partitions=60),
)
SHAPES = (
    LIMIT_SHAPES[0],
    LIMIT_SHAPES[1],
    # 200,000 (2 GB): a run of 40,000 lasted under a second and its passes spread 0.56-0.98 of the raw loop
    Shape("uncompressed 10 KB", 10_000, "none", 200_000, others=40_000, arroyo=40_000),
)
REFERENCE_SHAPES = LIMIT_SHAPES


def _with(settings: tuple[str, ...], **changes: str) -> tuple[str, ...]:
    """``settings`` (-X pairs, --batch) with the given keys (dots as underscores) changed or added."""
    pairs = dict(zip(settings[::2], settings[1::2], strict=True))
    props = {v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in pairs.items() if k == "-X"}
    batch = pairs.get("--batch")
    for key, value in changes.items():
        if key == "batch":
            batch = value
        else:
            props[key.replace("_", ".")] = value
    out: list[str] = []
    for key, value in props.items():
        out += ["-X", f"{key}={value}"]
    return (*out, *(("--batch", batch) if batch else ()))


# Nearby settings tried against TUNED_LOOP (the --only reference section): larger byte and count
# bounds of the local queue, librdkafka's default partition fetch, larger consume() batches.
REFERENCE_CANDIDATES = {
    "issue 30": TUNED_LOOP,
    "+ queued.min.messages=1000000": _with(TUNED_LOOP, queued_min_messages="1000000"),
    "queued.max.messages.kbytes=262144": _with(TUNED_LOOP, queued_max_messages_kbytes="262144"),
    "max.partition.fetch.bytes=1048576": _with(TUNED_LOOP, max_partition_fetch_bytes="1048576"),
    "consume(10000)": _with(TUNED_LOOP, batch="10000"),
}


# The settings before issue 16 (librdkafka's backoff and count bound, a 4 MB byte bound, and the fixed
# 2 MB / 512 KB fetches that FETCH_SIZES="auto" now replaces): what the current defaults are worth. And
# librdkafka's own fetch sizes on top of the defaults (set with -X, so no probe runs): what large
# uncompressed records gain from them, and what they cost compressed small ones (BENCHMARKS.md).
PREVIOUS_SETTINGS = ("-X", "fetch.queue.backoff.ms=1000", "-X", "queued.min.messages=100000",
                     "-X", "queued.max.messages.kbytes=4096",
                     "-X", "fetch.max.bytes=2097152", "-X", "max.partition.fetch.bytes=524288")
LARGE_FETCHES = ("-X", "fetch.max.bytes=52428800", "-X", "max.partition.fetch.bytes=1048576")


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


# -- limit, shapes, reference: no-op contenders in turns ---------------------------------------------

Contender = tuple[str, int, tuple[str, ...]]  # (bench/child.py mode, messages, extra arguments)


def contest(bootstrap: str, topic: str, contenders: dict[str, Contender], passes: int) -> dict[str, Any]:
    """Every contender runs ``passes`` times, taking turns (the first of a pass rotates).

    Returns each contender's per-pass figures (rate, peak RSS, CPU per message; the engine's chosen
    fetch sizes) and the load average (1 min) at the start of each pass. Nothing is aggregated here:
    the result file keeps every pass, and bench/docs.py shows min / median / max.
    """
    names = list(contenders)
    kept: dict[str, dict[str, list[Any]]] = {n: {"rate": [], "peak_rss_mb": [], "cpu_us_per_message": [],
                                                 "messages": []} for n in names}
    loads = []
    for p in range(passes):
        loads.append(round(os.getloadavg()[0], 1))
        for name in names[p % len(names):] + names[:p % len(names)]:
            mode, count, extra = contenders[name]
            r = child(bootstrap, mode, topic, count, *extra)
            k = kept[name]
            k["rate"].append(round(r["rate"]))
            k["peak_rss_mb"].append(round(r["peak_rss_mb"], 1))
            k["cpu_us_per_message"].append(round(r["cpu_s"] / max(1, r["handled"]) * 1e6, 2))
            k["messages"].append(r["handled"])
            if r.get("thread_cpu_s"):  # Python threads' CPU (not librdkafka's) per message, at the count-th
                k.setdefault("python_us_per_message", []).append(
                    round(r["thread_cpu_s"]["python"] / max(1, min(r["handled"], count)) * 1e6, 2))
            if r.get("fetch_sizes"):
                k.setdefault("fetch_sizes", []).append(r["fetch_sizes"])
    return {"contenders": kept, "load_avg_at_passes": loads}


def ratios(runs: dict[str, Any], of: str, to: str) -> list[float]:
    """Per pass: rate of ``of`` / rate of ``to`` (runs of one pass were made minutes apart at most)."""
    c = runs["contenders"]
    return [round(a / b, 3) for a, b in zip(c[of]["rate"], c[to]["rate"], strict=True)]


def shape_fields(shape: Shape) -> dict[str, Any]:
    return {"shape": shape.name, "size": shape.size, "compression": shape.compression,
            "partitions": shape.partitions, "backlog": shape.count}


def limit_row(bootstrap: str, shape: Shape, topic: str, passes: int) -> dict[str, Any]:
    """Issue 30's figure: the engine (no-op, 16 threads) and the default-settings loop against the tuned loop."""
    runs = contest(bootstrap, topic, {
        "tuned_loop": ("raw", shape.count, TUNED_LOOP),
        "default_loop": ("raw", shape.count, ()),
        "engine_16": ("engine", shape.count, ("--threads", str(LIMIT_THREADS))),
    }, passes)
    return {**shape_fields(shape), **runs,
            "ratios": {"engine_16_vs_tuned": ratios(runs, "engine_16", "tuned_loop"),
                       "default_vs_tuned": ratios(runs, "default_loop", "tuned_loop")},
            "target": shape.limit_target, "rss_target_mb": TARGETS["limit_rss_mb"]}


def batch_row(bootstrap: str, shape: Shape, topic: str, passes: int) -> dict[str, Any]:
    """Issue 25's figures: a no-op batch handler and a sleeping one against the tuned loop, in turns."""
    threads = str(LIMIT_THREADS)
    ideal = LIMIT_THREADS * BATCH_SLEEP / BATCH_SLEEP_SECONDS
    runs = contest(bootstrap, topic, {
        "tuned_loop": ("raw", shape.count, TUNED_LOOP),
        "batch_noop": ("engine", shape.count, ("--threads", threads, "--batch-size", str(BATCH_NOOP))),
        "batch_sleep": ("engine", shape.count, ("--threads", threads, "--batch-size", str(BATCH_SLEEP),
                                                "--work", f"sleep:{BATCH_SLEEP_SECONDS}")),
    }, passes)
    c = runs["contenders"]
    sleep_vs = [round(s / min(ideal, t), 3) for s, t in zip(c["batch_sleep"]["rate"], c["tuned_loop"]["rate"],
                                                            strict=True)]
    return {**shape_fields(shape), **runs, "threads": LIMIT_THREADS, "batch_noop": BATCH_NOOP,
            "batch_sleep": BATCH_SLEEP, "sleep_s": BATCH_SLEEP_SECONDS, "sleep_ideal": ideal,
            "ratios": {"noop_vs_tuned": ratios(runs, "batch_noop", "tuned_loop"), "sleep_vs_bound": sleep_vs},
            "targets": {"noop": TARGETS["batch_noop"], "sleep": TARGETS["batch_sleep"],
                        "rss_mb": TARGETS["batch_rss_mb"]}}


def burst_row(bootstrap: str, burst: Burst, topic: str, passes: int) -> dict[str, Any]:
    """Issue 30 item 3: "auto" from one thread against fixed counts, each over the whole burst, in turns."""
    work = ("--work", f"sleep:{burst.work}")
    contenders: dict[str, Contender] = {
        f"fixed_{n}": ("engine", burst.count, ("--threads", str(n), *work)) for n in burst.fixed}
    contenders["auto"] = ("engine", burst.count, ("--threads", "auto", "--thread-limit", str(burst.limit), *work))
    runs = contest(bootstrap, topic, contenders, passes)
    c = runs["contenders"]
    best = [max(c[f"fixed_{n}"]["rate"][p] for n in burst.fixed) for p in range(passes)]
    return {"burst": burst.name, "count": burst.count, "partitions": burst.partitions, "work_s": burst.work,
            "limit": burst.limit, "fixed": list(burst.fixed), **runs,
            "auto_vs_best_fixed": [round(a / b, 3) if b else 0.0 for a, b in zip(c["auto"]["rate"], best,
                                                                                   strict=True)],
            "target": TARGETS["burst_auto"]}


def shape_row(bootstrap: str, shape: Shape, topic: str, passes: int) -> dict[str, Any]:
    """The peers on one shape, each as a ratio of the tuned loop of the same pass."""
    contenders: dict[str, Contender] = {
        "tuned_loop": ("raw", shape.count, TUNED_LOOP),
        "default_loop": ("raw", shape.count, ()),
        "engine": ("engine", shape.count, ()),
        "pool": ("pool", shape.others, ()),
        **{f"arroyo_x{m}": ("arroyo", shape.arroyo, ("--max-pending", str(75 * m))) for m in ARROYO_PENDING},
        "engine_previous_settings": ("engine", shape.others, PREVIOUS_SETTINGS),
        "engine_large_fetches": ("engine", shape.count, LARGE_FETCHES),
    }
    runs = contest(bootstrap, topic, contenders, passes)
    return {**shape_fields(shape), **runs,
            "ratios": {f"{name}_vs_tuned": ratios(runs, name, "tuned_loop") for name in contenders
                       if name != "tuned_loop"},
            "rss_target_mb": shape.rss_target}


def reference_row(bootstrap: str, shape: Shape, topic: str, passes: int) -> dict[str, Any]:
    """The candidate settings of the tuned loop side by side, as ratios of TUNED_LOOP's own run."""
    contenders = {name: ("raw", shape.count, settings) for name, settings in REFERENCE_CANDIDATES.items()}
    runs = contest(bootstrap, topic, contenders, passes)
    first = next(iter(contenders))
    return {**shape_fields(shape), **runs,
            "settings": {name: list(settings) for name, settings in REFERENCE_CANDIDATES.items()},
            "ratios": {f"{name}_vs_first": ratios(runs, name, first) for name in contenders}}


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


def plot(grid: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(WORK_SECONDS), figsize=(5 * len(WORK_SECONDS), 4), sharex=True)
    for ax, work in zip(axes, WORK_SECONDS, strict=True):
        rows = [r for r in grid if r["work_s"] == work]
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


class Bench:
    """One ``bench.run`` invocation: its broker, its topics (produced once, shared by sections), its options."""

    def __init__(self, bootstrap: str, quick: bool, passes: int | None, out: Path) -> None:
        self.bootstrap = bootstrap
        # the plot beside BENCHMARKS.md's other pictures, unless the result files go elsewhere (a trial run)
        self.plot_path = OUT / "throughput.png" if out == record.BENCH_RESULTS else out / "throughput.png"
        self.quick = quick
        self.passes = passes if passes is not None else (1 if quick else PASSES)
        self.run_id = uuid.uuid4().hex[:8]
        self.topics: dict[tuple[int, str, int, int], str] = {}

    def shape(self, shape: Shape) -> Shape:
        return replace(shape, count=shape.count // 5, others=shape.others // 5, arroyo=shape.arroyo // 5) \
            if self.quick else shape

    def topic(self, shape: Shape) -> str:
        if shape.topic_key not in self.topics:
            name = f"bench-{shape.compression}-{shape.size}-p{shape.partitions}-{self.run_id}"
            print(f"producing {shape.count:,} x {shape.name} on {shape.partitions} partitions to {name} ...",
                  flush=True)
            produce_backlog(self.bootstrap, name, shape.count, shape.partitions, shape.size, shape.compression)
            self.topics[shape.topic_key] = name
        return self.topics[shape.topic_key]

    def rows(self, shapes: tuple[Shape, ...], row: Any) -> list[dict[str, Any]]:
        out = []
        for base in shapes:
            shape = self.shape(base)
            out.append(row(self.bootstrap, shape, self.topic(shape), self.passes))
            print(f"  {shape.name} on {shape.partitions} partitions: done (load {os.getloadavg()[0]:.1f})", flush=True)
        return out

    def section(self, name: str) -> dict[str, Any]:
        if name == "limit":
            return {"threads": LIMIT_THREADS, "tuned_loop": list(TUNED_LOOP), "passes": self.passes,
                    "rows": self.rows(LIMIT_SHAPES, limit_row)}
        if name == "batch":
            return {"tuned_loop": list(TUNED_LOOP), "passes": self.passes,
                    "rows": self.rows(tuple(s for s in LIMIT_SHAPES if s.partitions == 6), batch_row)}
        if name == "shapes":
            return {"tuned_loop": list(TUNED_LOOP), "passes": self.passes, "rows": self.rows(SHAPES, shape_row)}
        if name == "reference":
            return {"passes": self.passes, "rows": self.rows(REFERENCE_SHAPES, reference_row)}
        if name == "saturation":
            topic = self.topic(self.shape(LIMIT_SHAPES[1]))
            threads = (1, 16, 75) if self.quick else THREADS
            grid = []
            for work in WORK_SECONDS:
                for n in threads:
                    row = measure_rate(self.bootstrap, topic, n, work)
                    grid.append(row)
                    print(f"  saturation N={n:>3} W={work * 1000:>4g} ms: {row['rate']:9.1f} msg/s "
                          f"= {row['ratio']:.3f} of ideal ({row['pauses']} pauses)", flush=True)
            peers = [plain_pool_rate(self.bootstrap, topic, 75, 0.010) | {"peer": "plain pool"}]
            for multiple in ARROYO_PENDING:
                peers.append(arroyo_rate(self.bootstrap, topic, 75, 0.010, 75 * multiple)
                             | {"peer": "sentry-arroyo RunTaskInThreads"})
            plot(grid, self.plot_path)
            return {"grid": grid, "peers": peers, "target": TARGETS["saturation_75_10ms"]}
        if name == "peer":
            return peer_workload(self.bootstrap) | {"target": TARGETS["peer_workload_ratio"]}
        if name == "bursts":
            rows = []
            for burst in BURSTS:
                count = burst.count // 5 if self.quick else burst.count
                shape = Shape(burst.name, 100, "none", count, partitions=burst.partitions)
                rows.append(burst_row(self.bootstrap, replace(burst, count=count), self.topic(shape), self.passes))
                print(f"  burst {burst.name}: auto / best fixed {rows[-1]['auto_vs_best_fixed']}", flush=True)
            return {"rows": rows}
        if name == "cpu":
            return cpu_figure(self.bootstrap, self.run_id, 5.0 if self.quick else 10.0)
        if name == "async":  # async handlers against threads (bench/async_bench.py, issue 12)
            from bench import async_bench

            return async_bench.figure(self.bootstrap, 1 if self.quick else async_bench.PASSES)
        raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fifth of the backlogs, one pass (a smoke run; "
                        "its result files say so)")
    parser.add_argument("--only", choices=SECTIONS + EXTRA_SECTIONS, action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--passes", type=int, help=f"passes per shape (default {PASSES}; --quick: 1)")
    parser.add_argument("--out", type=Path, default=record.BENCH_RESULTS, help="where result files go")
    parser.add_argument("--note", default="", help="stored in each result file (say why a run is not final)")
    args = parser.parse_args(argv)
    chosen = [s for s in SECTIONS + EXTRA_SECTIONS if s in (args.only or SECTIONS)]
    given = sys.argv[1:] if argv is None else argv
    command = "make bench" if not given else "python -m bench.run " + " ".join(given)
    note = args.note or ("--quick: a fifth of the backlogs, one pass; a smoke run, not a figure to quote"
                         if args.quick else "")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker, started = None, False
    if not bootstrap:
        broker = LocalKafka(port=BENCH_PORT)
        broker.fetch()
        started = broker.start()
        bootstrap = broker.bootstrap
    from bench import docs

    bench = Bench(bootstrap, args.quick, args.passes, args.out)
    t0 = time.monotonic()
    written: list[dict[str, Any]] = []
    try:
        for name in chosen:
            print(f"== {name}", flush=True)
            run = record.Run.start(name, command)
            document = run.document(bench.section(name), note)
            path = record.write(document, args.out)
            written.append(document)
            print(f"  {name}: {document['seconds']:.0f} s -> {path}", flush=True)
    finally:
        if broker is not None and started:
            broker.stop()
    for document in written:
        print(f"\n## {document['section']}\n\n{docs.tables_of(document)}")
    print(f"\n{command}: {time.monotonic() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
