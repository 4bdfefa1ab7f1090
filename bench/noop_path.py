"""The engine's own cost per message on the no-op path, without a broker: ``python -m bench.noop_path``.

Feeds pre-built ``confluent_kafka.Message`` objects (batches of 500, each one partition's run by default,
as ``consume()`` returns them on a backlog: one run per batch in 95-99 % of the engine's batches on the
limit shapes) through the poll thread's real steps -- the ledger's ``admit`` (tracker) and the
dispatcher's ``put``, the workers running a no-op handler, the ledger's ``settle`` (watermarks) -- and
reports wall-clock and process CPU microseconds per message, for several thread counts. No Kafka call
is made: this is what MTC75 adds on top of the client, measured without the noise of a broker sharing
the two cores, and process CPU per message is steady under load where a rate is not.

``--engine`` runs the whole engine instead (``mtc75.testing`` on the in-memory fake of tests/fake_kafka.py,
whose logs hold real ``Message`` objects): the poll loop's every step, the gate, fair intake, commits; the
fake's own ``consume``/``poll`` time (thread CPU, on the poll thread) is left out of the figure, which is
then the engine's process CPU per message beside what the client costs.

Options: ``--profile`` profiles every thread (the poll thread and each worker, cProfile) and prints each
function's own time in µs per message (cProfile's overhead inflates every figure about alike: compare
them with each other and with another ``--profile`` run, not with the plain figures); ``--ordering key
--keys N`` runs the key scheduler on messages of N keys; ``--batch-size B`` a no-op batch handler;
``--runs R`` cuts each batch into R partition runs; ``--value-format json`` (or ``str``) decodes each
value first, as ``value_deserializer=`` does.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import threading
import time
from typing import Any

from confluent_kafka import Message

from mtc75.core.batching import BatchScheduler
from mtc75.core.ordering import new_scheduler
from mtc75.engine.ledger import Ledger
from mtc75.kafka.deserializers import BUILT_INS, decoder
from mtc75.runtime import runner as runner_module
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.invoker import Invoker

BATCH = 500
PARTITIONS = 6
VALUE = b'{"id": 1, "pad": "' + b"x" * 80 + b'"}'  # 100 bytes of JSON (UTF-8 too): every format decodes it


def batches(count: int, runs: int = 1, keys: int = 0) -> list[list[Any]]:
    """``count`` messages over PARTITIONS partitions in batches of BATCH, each cut into ``runs`` partition
    runs (partitions in turn); message i of a partition has key ``k<i % keys>`` when ``keys`` is given."""
    out: list[list[Any]] = []
    next_offset = [0] * PARTITIONS
    length = BATCH // runs
    made = turn = 0
    while made < count:
        batch = []
        for _ in range(runs):
            p = turn % PARTITIONS
            turn += 1
            for _ in range(length):
                offset = next_offset[p]
                key = b"k%d" % (offset % keys) if keys else None
                batch.append(Message(topic="t", partition=p, offset=offset, value=VALUE, key=key))
                next_offset[p] += 1
        made += len(batch)
        out.append(batch)
    return out


# Where a thread waits (off the CPU): left out of the profile's table
WAITS = ("<method 'get' of '_queue.SimpleQueue' objects>", "<built-in method time.sleep>",
         "<method 'acquire' of '_thread.lock' objects>", "<method 'wait' of '_thread.lock' objects>")


class Profiles:
    """cProfile on the calling thread and on every worker thread the runner starts from now on."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._mark = runner_module.mark_worker
        self._lock = threading.Lock()

    def start(self) -> None:
        mark, profiles, lock = self._mark, self.profiles, self._lock

        def profiled(steps: object) -> None:  # a worker thread's initializer: profile the thread from here on
            mark(steps)
            profile = cProfile.Profile()
            with lock:
                profiles.append(profile)
            profile.enable()

        runner_module.mark_worker = profiled

    def begin(self) -> None:
        """Profile the calling thread (the poll thread's steps) from here on."""
        main = cProfile.Profile()
        self.profiles.insert(0, main)
        main.enable()

    def stop(self, messages: int, top: int = 25) -> None:
        self.profiles[0].disable()
        runner_module.mark_worker = self._mark
        stats = pstats.Stats(self.profiles[0])
        for profile in self.profiles[1:]:
            stats.add(profile)
        rows = sorted(((k, v) for k, v in stats.stats.items() if k[2] not in WAITS),  # type: ignore[attr-defined]
                      key=lambda kv: -kv[1][2])
        total = sum(v[2] for _, v in rows)
        print(f"  own time per message, every thread ({len(self.profiles)} profiled; {total / messages * 1e6:.2f} "
              "µs of CPU in all under cProfile, waits left out):")
        for (file, line, name), (_cc, calls, tottime, _cum, _callers) in rows[:top]:
            where = f"{os.path.relpath(file)}:{line}" if file != "~" else ""
            print(f"  {tottime / messages * 1e6:7.3f} µs  {calls / messages:7.3f} calls  {name}  {where}")


def measure(count: int, threads: int, profile: bool = False, value_format: str = "bytes", runs: int = 1,
            ordering: str = "unordered", keys: int = 0, batch_size: int = 1) -> dict[str, float]:
    def noop(_msg: Any) -> None:
        return None

    ledger = Ledger(lambda err: None)
    scheduler = BatchScheduler(ordering, batch_size, 0.05) if batch_size > 1 else new_scheduler(ordering)
    invoker = Invoker(noop, decode=decoder(None, value_format), batches=batch_size > 1)
    profiles = Profiles() if profile else None
    if profiles is not None:
        profiles.start()  # before the dispatcher: its runner's threads start profiled
    dispatcher = Dispatcher(invoker, threads, scheduler=scheduler)
    ledger.batching = batch_size > 1
    ledger.tracker.assign([("t", p) for p in range(PARTITIONS)])
    work = batches(count, runs, keys)
    total = sum(len(b) for b in work)
    high = max(2 * BATCH, 2 * batch_size)
    if profiles is not None:
        profiles.begin()
    cpu0, wall0 = os.times(), time.perf_counter()
    for batch in work:
        dispatcher.put(ledger.admit(batch))
        dispatcher.release_due()
        ledger.settle(dispatcher.completions)
        # keep at most ~2 batches waiting, as the engine's high watermark does
        while dispatcher.backlog > high:
            dispatcher.wait_backlog_at_most(high // 2, 0.01)
            dispatcher.release_due()
            ledger.settle(dispatcher.completions)
    while ledger.processed < total:
        dispatcher.wait_idle(0.01)
        dispatcher.release_due()
        ledger.settle(dispatcher.completions)
    wall = time.perf_counter() - wall0
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    dispatcher.shutdown(wait=True)
    if profiles is not None:
        profiles.stop(total)
    return {"threads": threads, "messages": ledger.processed, "wall_us": wall / total * 1e6,
            "cpu_us": cpu / total * 1e6, "rate": total / wall}


def measure_engine(count: int, threads: int, profile: bool = False, ordering: str = "unordered", keys: int = 0,
                   batch_size: int = 1) -> dict[str, float]:
    """The whole engine on the in-memory fake: process CPU per message, the fake's consume/poll left out."""
    from mtc75.testing import consumer as fake_consumer
    from tests.fake_kafka import FakeConsumer, FakeKafka

    cluster = FakeKafka()
    cluster.poll_wait = None
    cluster.create_topic("t", PARTITIONS)
    per = -(-count // PARTITIONS)
    for p in range(PARTITIONS):
        cluster._logs["t"][p] = [Message(topic="t", partition=p, offset=o, value=VALUE,
                                         key=b"k%d" % (o % keys) if keys else None) for o in range(per)]
    inside = [0.0]
    thread_time = time.thread_time
    plain_consume, plain_poll = FakeConsumer.consume, FakeConsumer.poll

    def consume(self: Any, num_messages: int = 1, timeout: float = -1) -> Any:
        started = thread_time()
        try:
            return plain_consume(self, num_messages, timeout)
        finally:
            inside[0] += thread_time() - started

    def poll(self: Any, timeout: float = -1) -> Any:
        got = consume(self, 1, timeout)
        return got[0] if got else None

    FakeConsumer.consume, FakeConsumer.poll = consume, poll  # type: ignore[method-assign]

    def noop(_msg: Any) -> None:
        return None

    profiles = Profiles() if profile else None
    try:
        run = fake_consumer(cluster.factories(), noop, topic="t", group_id="noop-path", max_thread_count=threads,
                            ordering=ordering, batch_size=batch_size, fetch_sizes="small")
        if profiles is not None:
            profiles.start()
            profiles.begin()
        cpu0, wall0 = os.times(), time.perf_counter()
        stats = run.run(max_messages=count)
        wall = time.perf_counter() - wall0
        cpu1 = os.times()
    finally:
        FakeConsumer.consume, FakeConsumer.poll = plain_consume, plain_poll  # type: ignore[method-assign]
    if profiles is not None:
        profiles.stop(count)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system) - inside[0]
    return {"threads": threads, "messages": stats.processed, "wall_us": wall / count * 1e6, "cpu_us": cpu / count * 1e6,
            "rate": count / wall, "client_us": inside[0] / count * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--threads", type=int, action="append")
    parser.add_argument("--profile", action="store_true", help="per-function µs per message, every thread")
    parser.add_argument("--repeat", type=int, default=5, help="runs per thread count; the least CPU counts")
    parser.add_argument("--runs", type=int, default=1, help="partition runs per batch of 500 (default 1)")
    parser.add_argument("--ordering", default="unordered", choices=("unordered", "partition", "key", "fifo"))
    parser.add_argument("--keys", type=int, default=0, help="distinct keys per partition (0: no keys)")
    parser.add_argument("--batch-size", type=int, default=1, help="a batch handler of this BATCH_SIZE")
    parser.add_argument("--engine", action="store_true", help="the whole engine on the in-memory fake client")
    parser.add_argument("--value-format", choices=tuple(BUILT_INS), default="bytes",
                        help="decode each value first, as value_deserializer= does (default: bytes, no decoding)")
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.count:,} messages, {args.runs} run(s) per batch of {BATCH}, "
          f"ordering {args.ordering}, keys {args.keys}, batch size {args.batch_size}", flush=True)
    for threads in args.threads or (1, 4, 16, 75):
        runs = [measure_engine(args.count, threads, args.profile, args.ordering, args.keys, args.batch_size)
                if args.engine else
                measure(args.count, threads, args.profile, args.value_format, args.runs, args.ordering, args.keys,
                        args.batch_size) for _ in range(1 if args.profile else args.repeat)]
        r = min(runs, key=lambda x: x["cpu_us"])
        spread = f" (runs {min(x['cpu_us'] for x in runs):.2f}-{max(x['cpu_us'] for x in runs):.2f})" \
            if len(runs) > 1 else ""
        client = f"; the fake client's consume(): {r['client_us']:.2f} µs more" if "client_us" in r else ""
        print(f"threads={threads:>3}: {r['wall_us']:.2f} µs wall, {r['cpu_us']:.2f} µs CPU per message{spread} "
              f"({r['rate']:,.0f} msg/s{client})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
