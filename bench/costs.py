"""Where a no-op consumer's CPU goes, per thread and per step of the poll loop: ``python -m bench.costs``.

Issue 30 asks, where the GIL is the wall, how many µs of Python per message are left and in which step. This
measures it against the broker, not on the fake: each contender runs in its own process (bench/child.py
``--costs``) on a backlog of 1,000,000 messages, and reports, per message, between its first message and its
count-th completion:

- the CPU of each kind of thread: the *fetching* thread (the engine's poll loop, or the bare loop), the
  handler threads (``mtc75-worker-*``), librdkafka's threads (``rdk:*``) and any other; the first two share
  the GIL, so their sum is the Python work a message costs;
- the fetching thread's CPU per step (``time.thread_time`` around each): ``consume()``/``poll()`` (the
  client building Message objects), the rest of ``Backpressure.fetch`` (fair intake, the room), the
  ledger's ``admit`` (tracking offsets, making Works), the dispatcher's ``put`` (the scheduler), the
  ledger's ``settle`` (watermarks), ``Backpressure.turn`` (the gate), and the rest of the loop. The bare
  loop has only ``consume()`` and the rest (recording each message, as every contender's handler does).

The timers cost about two ``thread_time`` calls per step per loop turn (a turn takes up to 500 messages):
a few hundredths of a µs per message. Contenders (3 passes, in turns, medians kept; every pass in the file):
the tuned loop, the engine (16 threads), a batch handler (BATCH_SIZE 500) on 1,000,000 x 100 B over 6
partitions; and on 1,000,000 x 100 B in one partition with 10,000 keys, the engine unordered and with
``ORDERING=key``. Writes bench/results/costs.json (BENCHMARKS.md, "Where the time goes").

    .venv/bin/python -m bench.costs                       # own broker on 127.0.0.1:29992 (or the next free pair)
    .venv/bin/python -m bench.costs --bootstrap host:9092 --passes 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

PORT = int(os.environ.get("MTC75_BENCH_COSTS_PORT", "29992"))  # below the ephemeral range (32768+)
COUNT = 1_000_000
KEYS = 10_000
# The fetching thread's steps, in loop order: (step, class path, method). "fetch" is reported without its
# consume()/poll(), which are timed on their own.
STEPS = (("fetch", "mtc75.engine.backpressure", "Backpressure", "fetch"),
         ("admit", "mtc75.engine.ledger", "Ledger", "admit"),
         ("put", "mtc75.runtime.dispatcher", "Dispatcher", "put"),
         ("settle", "mtc75.engine.ledger", "Ledger", "settle"),
         ("turn", "mtc75.engine.backpressure", "Backpressure", "turn"))
KINDS = ("fetching thread", "handler threads", "librdkafka", "other")


# -- in the child ------------------------------------------------------------------------------------


def _kind(name: str, fetcher: int | None, native: int) -> str:
    if native == fetcher:
        return "fetching thread"
    if name.startswith("mtc75-worker"):
        return "handler threads"
    if name.startswith("rdk:"):
        return "librdkafka"
    return "other"


class Costs:
    """A bench child's timers: per kind of thread (from /proc, clock ticks) and per step of the fetching
    thread (``time.thread_time``). The fetching thread is the one that calls :meth:`install` (the main
    thread: the engine's poll loop and the bare loop both run there)."""

    def __init__(self) -> None:
        self.fetcher = threading.get_native_id()
        self.steps: Counter[str] = Counter()
        self._at_first: Counter[str] = Counter()
        self._at_count: Counter[str] = Counter()
        self._steps_at_first: Counter[str] = Counter()
        self._steps_at_count: Counter[str] = Counter()

    def install_engine(self) -> None:
        """Time the engine's poll-loop steps and its client's consume()/poll() (on the fetching thread only)."""
        import importlib

        from mtc75.kafka import client as client_module

        for step, module, cls, method in STEPS:
            owner = getattr(importlib.import_module(module), cls)
            setattr(owner, method, self.timed(getattr(owner, method), step))
        plain_init = client_module.KafkaClient.__init__

        def init(client: Any, *args: Any, **kwargs: Any) -> None:
            plain_init(client, *args, **kwargs)
            client.consume = self.timed(client.consume, "consume")
            client.poll = self.timed(client.poll, "consume")

        client_module.KafkaClient.__init__ = init  # type: ignore[method-assign]

    def timed(self, call: Callable[..., Any], step: str) -> Callable[..., Any]:
        steps, fetcher, clock, ident = self.steps, self.fetcher, time.thread_time, threading.get_native_id

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            if ident() != fetcher:
                return call(*args, **kwargs)
            started = clock()
            try:
                return call(*args, **kwargs)
            finally:
                steps[step] += clock() - started

        return timed_call

    def first(self) -> None:
        """The first message came out of the client (any thread)."""
        self._at_first = self.by_kind()
        self._steps_at_first = Counter(self.steps)

    def counted(self) -> None:
        """The count-th message completed (any thread)."""
        self._at_count = self.by_kind()
        self._steps_at_count = Counter(self.steps)

    def by_kind(self) -> Counter[str]:
        names = {t.native_id: t.name for t in threading.enumerate()}
        tick = os.sysconf("SC_CLK_TCK")
        out: Counter[str] = Counter()
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # ended meanwhile
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            native = int(tid)
            out[_kind(names.get(native, comm), self.fetcher, native)] += (int(fields[11]) + int(fields[12])) / tick
        return out

    def figures(self, messages: int) -> dict[str, Any]:
        """µs per message, between the first message and the count-th completion."""
        per = 1e6 / max(1, messages)
        threads = {k: round((self._at_count[k] - self._at_first[k]) * per, 3) for k in KINDS}
        steps = {k: (self._steps_at_count[k] - self._steps_at_first[k]) * per for k in self._steps_at_count}
        if "fetch" in steps:
            steps["fetch"] -= steps.get("consume", 0.0)  # consume()/poll() run inside fetch: counted once
        steps["rest of the loop"] = threads["fetching thread"] - sum(steps.values())
        return {"threads": threads, "steps": {k: round(v, 3) for k, v in steps.items()}}


# -- the run -----------------------------------------------------------------------------------------


def contenders(tuned: list[str]) -> list[tuple[str, str, str, list[str]]]:
    """(name, topic kind, child mode, child arguments), in the order of each pass."""
    return [
        ("tuned loop", "spread", "raw", tuned),
        ("engine, 16 threads", "spread", "engine", ["--threads", "16"]),
        ("engine, BATCH_SIZE 500", "spread", "engine", ["--threads", "16", "--batch-size", "500"]),
        ("engine, 1 partition", "keyed", "engine", ["--threads", "16"]),
        (f"engine, ORDERING=key, {KEYS:,} keys", "keyed", "engine", ["--threads", "16", "--ordering", "key"]),
    ]


def main(argv: list[str] | None = None) -> int:
    from bench import record
    from bench.run import TUNED_LOOP, child, produce_backlog
    from bench.scaleout import cluster_for

    parser = argparse.ArgumentParser(prog="python -m bench.costs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", help="an existing cluster (default: a broker of this run)")
    parser.add_argument("--port", type=int, default=PORT, help="port of the broker this run starts (< 32768)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--count", type=int, default=COUNT, help="messages per topic")
    args = parser.parse_args(argv)
    run = record.Run.start("costs", " ".join(["python -m bench.costs", *(sys.argv[1:] if argv is None else argv)]))
    kept: dict[str, dict[str, Any]] = {}
    with cluster_for(args.bootstrap, args.port, "costs") as bootstrap:
        topics = {"spread": f"bench-costs-{uuid.uuid4().hex[:8]}", "keyed": f"bench-costs-keyed-{uuid.uuid4().hex[:8]}"}
        print(f"producing {args.count:,} x 100 B to {topics['spread']} (6 partitions) and {topics['keyed']} "
              f"(1 partition, {KEYS:,} keys) ...", flush=True)
        produce_backlog(bootstrap, topics["spread"], args.count, 6, compression="none")
        produce_backlog(bootstrap, topics["keyed"], args.count, 1, compression="none", keys=KEYS)
        for turn in range(args.passes):
            for name, kind, mode, extra in contenders(list(TUNED_LOOP)):
                r = child(bootstrap, mode, topics[kind], args.count, "--costs", *extra)
                k = kept.setdefault(name, {"topic": kind, "rate": [], "passes": []})
                k["rate"].append(round(r["rate"]))
                k["passes"].append(r["costs"])
                print(f"  pass {turn + 1}, {name}: {r['rate']:,.0f} msg/s, {r['costs']}", flush=True)
    for k in kept.values():
        k["median"] = medians(k["passes"])
    figures = {"count": args.count, "passes": args.passes, "keys": KEYS, "tuned_loop": list(TUNED_LOOP),
               "contenders": kept}
    print(f"results: {run.write(figures)}")
    from bench.docs import t_costs
    print(t_costs(figures))
    return 0


def medians(passes: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each figure's median over the passes (a step a contender lacks is left out)."""
    out: dict[str, dict[str, float]] = {}
    for part in ("threads", "steps"):
        names = [name for name in passes[0][part]]
        out[part] = {name: round(statistics.median(p[part].get(name, 0.0) for p in passes), 3) for name in names}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
