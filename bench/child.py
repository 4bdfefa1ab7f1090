"""One contender of a bench figure in its own process, so each gets its own peak RSS and its own GIL.

    python bench/child.py MODE --topic T --count N [--threads 75|auto] [--thread-limit L]
                          [--work noop|sleep:S|file:PATH] [--seconds S] [--max-pending P] [--batch B]
                          [--batch-size B] [--ordering unordered|partition|key] [--costs] [-X key=value ...]

MODE is one of:
  engine  MTC75 (``mtc75.Consumer.from_settings``, default settings, ``-X`` overrides on top; so
          FETCH_SIZES="auto" probes the topic first, unless ``-X`` sets a fetch size or MTC75_FETCH_SIZES is set);
          with ``--batch-size B`` > 1 a batch handler (BATCH_SIZE = B): ``--work`` once per call, the
          call's messages counted at once
  raw     a bare ``consume(B)`` loop that records each message (last offset per partition, count), on
          librdkafka's default settings with ``-X`` overrides on top: with none, the default-settings loop;
          with bench/run.py's TUNED_LOOP, the tuned loop (the fastest plain loop: the limit of figure 3)
  pool    the plain pattern: ``semaphore.acquire(); executor.submit(handler)`` per message, no commits
  arroyo  sentry-arroyo's ``RunTaskInThreads`` (``--threads`` = concurrency, ``--max-pending`` =
          max_pending_futures) followed by ``CommitOffsets``, on arroyo's own consumer configuration

``--costs`` (engine, raw): the report also says where the CPU went, per kind of thread and per step of the
fetching thread's loop (bench/costs.py).

Stops after ``--count`` handled messages, or ``--seconds`` after the first completion when given.
Prints one JSON line, read by bench/run.py: handled messages, the time from the first fetched message
to the last completion, completion time stamps when ``--stamps`` is given (for steady-state rates),
peak RSS (VmHWM) and RSS at each tenth of the run, CPU seconds of the process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process so far: ``librdkafka`` (its ``rdk:*`` threads) and ``python`` (every
    other thread, ended ones included: the poll or bare loop and the handler threads, which share one GIL).
    Their ``python`` seconds per message are the serial cost a no-op consumer pays besides the client's
    own threads: steadier under load than a rate. Read at the count-th completion, before close() ends
    librdkafka's threads."""
    tick = os.sysconf("SC_CLK_TCK")
    client = 0.0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.index("(") + 1:stat.rindex(")")].startswith("rdk:"):
            fields = stat[stat.rindex(")") + 2:].split()
            client += (int(fields[11]) + int(fields[12])) / tick
    cpu = os.times()
    return {"python": round(cpu.user + cpu.system - client, 3), "librdkafka": round(client, 3)}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


class Recorder:
    """Completion bookkeeping shared by every mode: counts, first/last times, RSS at each tenth.

    :meth:`done` runs on every contender's handler threads, once per message, and takes no lock: a
    lock taken per message by 75 threads is a workload of its own. With one, the engine's no-op run
    of 500 000 x 150 B did 42-52k msg/s at 75 threads and 167k at 1 (the lock's convoy under the GIL);
    a handler that only counts did 169-197k at 1-75 threads (2026-11-27, load ~1). ``next()`` of an
    ``itertools.count`` is one C call, atomic under the GIL, so each message gets its own number.
    """

    def __init__(self, count: int, seconds: float | None, stamps: bool) -> None:
        self.count = count
        self.seconds = seconds
        self.keep_stamps = stamps
        self.stamps: list[float] = []  # list.append is atomic
        self.first_seen = 0.0  # first message out of the client
        self.first_done = 0.0
        self.last_done = 0.0  # completion time of the last message counted (the count-th, or the last)
        self.samples: list[tuple[int, float]] = []
        self.finished = threading.Event()
        self.fetch_sizes = ""  # engine: the fetch sizes the run chose (its start-up probe)
        self._numbers = itertools.count(1)
        self._tenth = max(1, count // 10)
        self._handled = 0  # set once the run is over (report)
        self.cpu_at_count: dict[str, float] = {}  # thread_cpu() at the count-th completion
        self._lock = threading.Lock()  # done_many (a batch handler: one call per batch, a lock costs nothing)
        self._many = 0  # messages counted by done_many
        self.costs: Any = None  # bench.costs.Costs with --costs: told of the first message and the count-th

    def seen(self) -> None:
        if not self.first_seen:
            self.first_seen = time.monotonic()
            if self.costs is not None:
                self.costs.first()

    def done(self) -> None:
        now = time.monotonic()
        n = next(self._numbers)
        if n == 1:
            self.first_done = now
        if n <= self.count:
            self.last_done = max(self.last_done, now)
        if self.keep_stamps:
            self.stamps.append(now)
        if n % self._tenth == 0 and n <= self.count:
            self.samples.append((n, round(_status_mb("VmRSS:"), 1)))
        if n >= self.count or (self.seconds is not None and self.first_done and now - self.first_done >= self.seconds):
            self._counted()

    def done_many(self, count: int) -> None:
        """A batch handler's call ended: ``count`` messages done (instead of :meth:`done` per message)."""
        now = time.monotonic()
        with self._lock:
            before = self._many
            self._many = after = before + count
            if before == 0:
                self.first_done = now
            if before < self.count:
                self.last_done = max(self.last_done, now)
            if before // self._tenth != after // self._tenth and before < self.count:
                self.samples.append((after, round(_status_mb("VmRSS:"), 1)))
        timed_out = self.seconds is not None and self.first_done and now - self.first_done >= self.seconds
        if after >= self.count or timed_out:
            self._counted()

    def _counted(self) -> None:
        """The count-th completion (or the time's up): the CPU figures at that moment, once; the run ends."""
        if not self.finished.is_set():
            self.cpu_at_count = thread_cpu()
            if self.costs is not None:
                self.costs.counted()
        self.finished.set()

    @property
    def handled(self) -> int:
        """Messages counted so far (reading it uses up one number: only once the run is over)."""
        if not self._handled:
            self._handled = next(self._numbers) - 1 + self._many
        return self._handled

    def report(self) -> dict[str, Any]:
        elapsed = self.last_done - (self.first_seen or self.first_done)
        cpu = os.times()
        return {
            "handled": self.handled, "elapsed_s": elapsed,
            "rate": min(self.handled, self.count) / elapsed if elapsed > 0 else 0.0,  # last_done: the count-th
            "peak_rss_mb": _status_mb("VmHWM:"), "rss_samples": self.samples, "cpu_s": cpu.user + cpu.system,
            "stamps": self.stamps if self.keep_stamps else [], "fetch_sizes": self.fetch_sizes,
            "thread_cpu_s": self.cpu_at_count,
            **({"costs": self.costs.figures(min(self.handled, self.count))} if self.costs is not None else {}),
        }


def make_work(spec: str) -> Callable[[int], None] | None:
    """The handler's work for a message at ``offset``: None for a no-op."""
    if spec == "noop":
        return None
    kind, _, arg = spec.partition(":")
    if kind == "sleep":
        seconds = float(arg)
        return lambda _offset: time.sleep(seconds)
    if kind == "file":
        with open(arg) as f:
            table = [float(line) for line in f if line.strip()]
        return lambda offset: time.sleep(table[offset])
    raise SystemExit(f"bench child: unknown --work {spec!r}")


def plain_conf(topic: str) -> dict[str, Any]:
    return {"bootstrap.servers": KAFKA, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest", "enable.auto.commit": False}


def run_raw(args: argparse.Namespace, rec: Recorder) -> None:
    from confluent_kafka import Consumer

    from mtc75.settings import parse_properties

    consumer = Consumer(plain_conf(args.topic) | parse_properties(args.properties))
    consumer.subscribe([args.topic])
    last: dict[int, int] = {}
    batch = args.batch
    consume = consumer.consume if rec.costs is None else rec.costs.timed(consumer.consume, "consume")
    while not rec.finished.is_set():
        for msg in consume(batch, timeout=1):
            if msg.error() is not None:
                continue
            rec.seen()
            last[msg.partition()] = msg.offset()
            rec.done()
    consumer.close()


def run_pool(args: argparse.Namespace, rec: Recorder, work: Callable[[int], None] | None) -> None:
    from confluent_kafka import Consumer

    consumer = Consumer(plain_conf(args.topic))
    consumer.subscribe([args.topic])
    sem = threading.Semaphore(args.threads)

    def task(offset: int) -> None:
        if work is not None:
            work(offset)
        rec.done()
        sem.release()

    with ThreadPoolExecutor(args.threads) as pool:
        while not rec.finished.is_set():
            for msg in consumer.consume(500, timeout=0.1):
                if msg.error() is not None:
                    continue
                rec.seen()
                sem.acquire()
                pool.submit(task, msg.offset())
                if rec.finished.is_set():
                    break
    consumer.close()


def run_engine(args: argparse.Namespace, rec: Recorder, work: Callable[[int], None] | None) -> None:
    from mtc75.api import Consumer
    from mtc75.core.stats import Stats
    from mtc75.settings import load_settings, parse_properties

    flags: dict[str, Any] = {"TOPIC": args.topic, "GROUP_ID": f"bench-{uuid.uuid4().hex[:8]}",
                             "MAX_THREAD_COUNT": args.threads, "BATCH_SIZE": args.batch_size,
                             "ORDERING": args.ordering}
    if rec.costs is not None:
        rec.costs.install_engine()
    if args.thread_limit is not None:
        flags["MAX_THREAD_LIMIT"] = args.thread_limit
    settings = load_settings(None, flags=flags)
    consumer: Consumer | None = None

    def handle(msg: Any) -> None:
        rec.seen()
        if work is not None:
            work(msg.offset())
        rec.done()

    def handle_batch(messages: list[Any]) -> None:
        rec.seen()
        if work is not None:
            work(messages[0].offset())
        rec.done_many(len(messages))

    def on_status(_stats: Stats) -> None:
        if rec.finished.is_set() and consumer is not None:
            consumer.stop()

    consumer = Consumer.from_settings(handle_batch if args.batch_size > 1 else handle, settings,
                                      librdkafka=parse_properties(args.properties),
                                      on_status=on_status, status_interval=0.05)
    # FETCH_SIZES="auto" unless -X sets a fetch size
    rec.fetch_sizes = consumer.run(max_messages=args.count, idle_exit=args.idle_exit).fetch_sizes


def run_arroyo(args: argparse.Namespace, rec: Recorder, work: Callable[[int], None] | None) -> None:
    from arroyo.backends.kafka import KafkaConsumer
    from arroyo.backends.kafka.configuration import build_kafka_consumer_configuration
    from arroyo.processing import StreamProcessor
    from arroyo.processing.strategies import CommitOffsets, RunTaskInThreads
    from arroyo.processing.strategies.abstract import ProcessingStrategy, ProcessingStrategyFactory
    from arroyo.types import Commit, Message, Partition, Topic

    processor: StreamProcessor[Any] | None = None

    def handle(message: Message[Any]) -> None:
        rec.seen()
        if work is not None:
            work(message.value.offset)
        rec.done()
        if rec.finished.is_set() and processor is not None:
            processor.signal_shutdown()

    class Factory(ProcessingStrategyFactory[Any]):
        def create_with_partitions(self, commit: Commit, partitions: dict[Partition, int]) -> ProcessingStrategy[Any]:
            return RunTaskInThreads(handle, args.threads, args.max_pending, CommitOffsets(commit))

    conf = build_kafka_consumer_configuration({}, bootstrap_servers=[KAFKA],
                                              group_id=f"bench-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest")
    processor = StreamProcessor(KafkaConsumer(conf), Topic(args.topic), Factory())
    processor.run()


def _threads(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("engine", "raw", "pool", "arroyo"))
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--threads", type=_threads, default=75, help='a count, or "auto" (engine only)')
    parser.add_argument("--thread-limit", type=int, default=None, help="engine: MAX_THREAD_LIMIT (for auto)")
    parser.add_argument("--work", default="noop")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--stamps", action="store_true")
    parser.add_argument("--max-pending", type=int, default=1000)
    parser.add_argument("--idle-exit", type=float, default=None, help="engine: stop after this long without messages")
    parser.add_argument("--batch", type=int, default=1000, help="raw: messages per consume() call")
    parser.add_argument("--batch-size", type=int, default=1, help="engine: BATCH_SIZE (> 1: a batch handler)")
    parser.add_argument("--ordering", default="unordered", help="engine: ORDERING")
    parser.add_argument("--costs", action="store_true",
                        help="engine, raw: CPU per message per kind of thread and poll-loop step (bench.costs)")
    parser.add_argument("-X", dest="properties", action="append", default=[],
                        help="engine, raw: librdkafka property on top of the defaults")
    args = parser.parse_args(argv)
    if args.threads == "auto" and args.mode != "engine":
        parser.error('--threads auto: the engine only')
    rec = Recorder(args.count, args.seconds, args.stamps)
    if args.costs:
        from bench.costs import Costs
        rec.costs = Costs()  # on the main thread: the one that fetches, in every mode
    work = make_work(args.work)
    if args.mode == "raw":
        run_raw(args, rec)
    elif args.mode == "pool":
        run_pool(args, rec, work)
    elif args.mode == "engine":
        run_engine(args, rec, work)
    else:
        run_arroyo(args, rec, work)
    print(json.dumps({"mode": args.mode, **rec.report()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
