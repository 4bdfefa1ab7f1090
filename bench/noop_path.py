"""The engine's own cost per message on the no-op path, without a broker: ``python -m bench.noop_path``.

Feeds pre-built ``confluent_kafka.Message`` objects (batches of 500 in runs of one partition, as
``consume()`` returns them) through the poll thread's real steps — the ledger's ``admit`` (tracker) and the
dispatcher's ``put``, the workers running a no-op handler, the ledger's ``settle`` (watermarks) — and reports
wall-clock and process CPU microseconds per message, for several thread counts. With ``--profile``
it prints the poll thread's cProfile (the workers' share is the difference to the total). With
``--value-format json`` (or ``str``) the invoker decodes each value first, as ``value_deserializer=`` does.
No Kafka call is made: this is what MTC75 adds on top of the client, measured without the noise of
a broker sharing the two cores.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from typing import Any

from confluent_kafka import Message

from mtc75.engine.ledger import Ledger
from mtc75.kafka.deserializers import BUILT_INS, decoder
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.invoker import Invoker

BATCH = 500
PARTITIONS = 6
VALUE = b'{"id": 1, "pad": "' + b"x" * 80 + b'"}'  # 100 bytes of JSON (UTF-8 too): every format decodes it


def batches(count: int) -> list[list[Any]]:
    """``count`` messages over PARTITIONS partitions, in batches of BATCH made of per-partition runs."""
    out: list[list[Any]] = []
    next_offset = [0] * PARTITIONS
    run = BATCH // PARTITIONS
    made = 0
    while made < count:
        batch = []
        for p in range(PARTITIONS):
            for _ in range(run):
                batch.append(Message(topic="t", partition=p, offset=next_offset[p], value=VALUE))
                next_offset[p] += 1
        made += len(batch)
        out.append(batch)
    return out


def measure(count: int, threads: int, profile: bool = False, value_format: str = "bytes") -> dict[str, float]:
    handled = [0]

    def noop(_msg: Any) -> None:
        return None

    ledger = Ledger(lambda err: None)
    dispatcher = Dispatcher(Invoker(noop, decode=decoder(None, value_format)), threads)
    ledger.tracker.assign([("t", p) for p in range(PARTITIONS)])
    work = batches(count)
    total = sum(len(b) for b in work)
    prof = cProfile.Profile() if profile else None
    cpu0, wall0 = os.times(), time.perf_counter()
    if prof:
        prof.enable()
    for batch in work:
        dispatcher.put(ledger.admit(batch))
        ledger.settle(dispatcher.completions)
        # keep at most ~2 batches waiting, as the engine's high watermark does
        while dispatcher.backlog > 2 * BATCH:
            dispatcher.wait_backlog_at_most(BATCH, 0.01)
            ledger.settle(dispatcher.completions)
    while ledger.processed < total:
        dispatcher.wait_idle(0.01)
        ledger.settle(dispatcher.completions)
    if prof:
        prof.disable()
    wall = time.perf_counter() - wall0
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    dispatcher.shutdown(wait=True)
    handled[0] = ledger.processed
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return {"threads": threads, "messages": handled[0], "wall_us": wall / total * 1e6, "cpu_us": cpu / total * 1e6,
            "rate": total / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300_000)
    parser.add_argument("--threads", type=int, action="append")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--repeat", type=int, default=5, help="runs per thread count; the least CPU counts")
    parser.add_argument("--value-format", choices=tuple(BUILT_INS), default="bytes",
                        help="decode each value first, as value_deserializer= does (default: bytes, no decoding)")
    args = parser.parse_args(argv)
    for threads in args.threads or (1, 4, 75):
        r = min((measure(args.count, threads, args.profile, args.value_format) for _ in range(args.repeat)),
                key=lambda x: x["cpu_us"])
        print(f"threads={threads:>3}: {r['wall_us']:.2f} µs wall, {r['cpu_us']:.2f} µs CPU per message "
              f"({r['rate']:,.0f} msg/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
