"""Scale-out throughput: 1, 2 and 3 consumer processes in one group on the same backlog, as ratios to one.

Each process is ``mtc75_consumer.py`` as a user runs it, with an I/O-bound handler (bench/io_handler.py:
it sleeps ``--work`` seconds, so one process tops out at ``--threads / --work`` messages a second
whatever the CPU). The backlog (``--messages`` small records on ``--partitions`` partitions) is produced
once; each run reads all of it with a new group. The rate of a run is taken between the moment every
process has handled its first message (the group has settled) and the moment 90 % of the backlog is
handled (before the tail, where partitions run dry one by one). Not part of ``make test``.

    .venv/bin/python -m bench.scaleout                 # own broker on a free port, ~2 minutes here
    .venv/bin/python -m bench.scaleout --bootstrap host:9092   # an existing cluster instead

Prints a table and writes bench/results/scaleout.json (bench/record.py; BENCHMARKS.md's table comes from it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench import record
from mtc75.errors import BrokerError
from mtc75.kafka.topics import create_topic
from mtc75.tools.broker import LocalKafka

ROOT = Path(__file__).resolve().parent.parent
PORT = int(os.environ.get("MTC75_BENCH_SCALEOUT_PORT", "29992"))
RUN_TIMEOUT = 300.0


def own_broker(home: Path, port: int) -> LocalKafka:
    """A broker of this run in ``home``, on ``port`` or the next free pair (never one found running)."""
    libs = ROOT / ".kafka" / "libs"
    LocalKafka(port, libs=libs).fetch()
    for candidate in range(port, port + 40, 2):
        kafka = LocalKafka(candidate, home=home, libs=libs)
        try:
            if kafka.start():
                return kafka
        except BrokerError as err:
            if "in use" not in str(err):
                raise
    raise BrokerError(f"no free pair of ports in {port}-{port + 40}")


@contextlib.contextmanager
def cluster_for(bootstrap: str | None, port: int, label: str) -> Iterator[str]:
    """``bootstrap`` when given, else a broker of this run (:func:`own_broker`, in a temporary home): its
    bootstrap; the broker is stopped and its home removed when the block ends."""
    if bootstrap:
        yield bootstrap
        return
    home = Path(tempfile.mkdtemp(prefix=f"mtc75-bench-{label}-"))
    broker: LocalKafka | None = None
    try:
        broker = own_broker(home, port)
        yield broker.bootstrap
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(home, ignore_errors=True)


def produce_backlog(bootstrap: str, topic: str, count: int, partitions: int) -> None:
    create_topic({"bootstrap.servers": bootstrap}, topic, partitions, 0)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all"})
    for i in range(count):
        while True:
            try:
                producer.produce(topic, key=str(i).encode(), value=json.dumps({"id": i}).encode())
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(60):
        raise RuntimeError("backlog not fully delivered")


def _handled(folder: Path) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for path in folder.glob("*.txt"):
        rows = [line.split() for line in path.read_text().splitlines()]
        out[path.stem] = [(float(a), float(b)) for a, b in (r for r in rows if len(r) == 2)]
    return out


def run_members(cmd: list[str], env: dict[str, str], count: int, running: Callable[[], bool], failure: str) -> None:
    """Start ``count`` copies of ``cmd`` (consumers); while ``running()``, wait (at most RUN_TIMEOUT; one that
    exits early fails the run with ``failure``); then SIGTERM them all and wait for each (kill after 60 s)."""
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(count)]
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while running():
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(failure)
            time.sleep(0.2)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def run(bootstrap: str, topic: str, processes: int, args: argparse.Namespace) -> dict[str, Any]:
    """``processes`` consumers in a new group over the whole backlog; their steady rate."""
    folder, cmd, env = member_run(bootstrap, topic, "scaleout", processes, args, "bench.io_handler:handle")
    run_members(cmd, env, processes, lambda: sum(len(v) for v in _handled(folder).values()) < args.messages,
                f"run with {processes} processes did not finish (see {folder})")
    handled = _handled(folder)
    shutil.rmtree(folder, ignore_errors=True)
    rate, window = steady_rate(handled, args.messages)
    return {"processes": processes, "active_processes": len(handled), "rate_msg_s": round(rate, 1),
            "window_s": round(window, 2), "handled": sum(len(rows) for rows in handled.values()),
            "ideal_msg_s": processes * args.threads / args.work}


def member_run(bootstrap: str, topic: str, label: str, count: int, args: argparse.Namespace, handler: str,
               *extra: str) -> tuple[Path, list[str], dict[str, str]]:
    """A new group's record folder, mtc75_consumer.py command (``extra`` flags added) and environment for
    ``count`` members handling with ``handler`` (bench/io_handler.py) on ``args.threads`` threads each."""
    folder = Path(tempfile.mkdtemp(prefix=f"{label}-{count}-"))
    group = f"{label}-{count}-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTC75_")}
    env.update(KAFKA_BOOTSTRAP_SERVERS=bootstrap, PYTHONPATH=str(ROOT), NO_COLOR="1",
               MTC75_BENCH_RECORD_DIR=str(folder), MTC75_BENCH_WORK=str(args.work))
    cmd = [sys.executable, str(ROOT / "mtc75_consumer.py"), "--topic", topic, "--group-id", group, *extra,
           "--max-thread-count", str(args.threads), "--handler", handler, "-q", "--no-reload"]
    return folder, cmd, env


def steady_rate(handled: dict[str, list[tuple[Any, ...]]], messages: int) -> tuple[float, float]:
    """Messages per second and the window's seconds: from when the last member had started (its first
    record's start) until 90 % of ``messages`` were done. Each record is ``(start, end, ...)``."""
    settled = max(min(r[0] for r in rows) for rows in handled.values())
    ends = sorted(r[1] for rows in handled.values() for r in rows)
    done_90 = ends[int(0.9 * messages) - 1]
    in_window = sum(1 for end in ends if settled <= end <= done_90)
    return in_window / (done_90 - settled), done_90 - settled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="an existing cluster (default: start a broker of this run)")
    parser.add_argument("--messages", type=int, default=24_000)
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--threads", type=int, default=8, help="MAX_THREAD_COUNT of each process")
    parser.add_argument("--work", type=float, default=0.01, help="seconds the handler waits per message")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="scaleout-kafka-"))
    kafka = None if args.bootstrap else own_broker(home, PORT)
    bootstrap = args.bootstrap or kafka.bootstrap  # type: ignore[union-attr]
    given = argv if argv is not None else sys.argv[1:]
    this_run = record.Run.start("scaleout", " ".join(["python -m bench.scaleout", *given]))
    try:
        topic = f"scaleout-{uuid.uuid4().hex[:8]}"
        produce_backlog(bootstrap, topic, args.messages, args.partitions)
        results = [run(bootstrap, topic, k, args) for k in args.processes]
    finally:
        if kafka is not None:
            kafka.stop()
        shutil.rmtree(home, ignore_errors=True)
    base = results[0]["rate_msg_s"]
    for row in results:
        row["ratio_to_one"] = round(row["rate_msg_s"] / base, 2)
        row["of_ideal"] = round(row["rate_msg_s"] / row["ideal_msg_s"], 3)
    print(f"{'processes':>9} {'msg/s':>9} {'ratio':>6} {'of ideal':>9} {'window s':>9}")
    for row in results:
        print(f"{row['processes']:>9} {row['rate_msg_s']:>9,.0f} {row['ratio_to_one']:>6.2f} "
              f"{row['of_ideal']:>9.3f} {row['window_s']:>9.1f}")
    meta = {"messages": args.messages, "partitions": args.partitions, "threads": args.threads, "work_s": args.work}
    print(f"results: {this_run.write({'meta': meta, 'runs': results})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
