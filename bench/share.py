"""Share groups: one and two members of a share group on a ONE-partition topic, side by side (issue 31).

A consumer group can use at most as many members as the topic has partitions: on one partition a second
process only waits. A share group (GROUP_TYPE="share", Kafka 4.2+) hands every member records of every
partition, so the partition count no longer caps parallelism. Each member is ``mtc75_consumer.py
--group-type share`` as a user runs it, with ``--threads`` threads and an I/O-bound handler
(bench/io_handler.py: it waits ``--work`` seconds, so one member tops out at ``--threads / --work`` records
a second whatever the CPU). One backlog of ``--messages`` records is produced once; each run reads all of it
with a new share group of 1, then 2 members started together. The rate is taken, from the handler's own
timestamps, between the moment every member has handled its first record and the moment 90 % of the
backlog is handled. Every record must be handled (duplicates are counted, not expected: nothing here
outlives its lock). Not part of ``make test``; ``make bench`` runs it.

    .venv/bin/python -m bench.share                  # own broker on 29996 (MTC75_BENCH_SHARE_PORT) or the next
                                                     # free pair, stopped after; ~1-2 minutes here
    .venv/bin/python -m bench.share --bootstrap host:9092 --messages 8000   # an existing cluster instead

Prints a table and writes bench/results/share.json (bench/record.py; BENCHMARKS.md's table comes from it).

Thread contract: a command-line tool; everything runs on the caller's thread (members are processes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench import record
from bench.scaleout import member_run, own_broker, run_members, steady_rate
from mtc75.kafka.topics import create_topic

PORT = int(os.environ.get("MTC75_BENCH_SHARE_PORT", "29996"))
RUN_TIMEOUT = 300.0


def produce_backlog(bootstrap: str, topic: str, count: int, batch_bytes: int) -> None:
    """``count`` small JSON records on a new one-partition topic, in producer batches of ``batch_bytes``.

    A share group hands out whole producer batches; librdkafka's default batch.size (1 MB) makes batches of
    thousands of these records, of which the first member to poll keeps up to its threads plus MAX_BACKLOG
    (docs/share-groups.md). The default here is a Java producer's (16 KB).
    """
    create_topic({"bootstrap.servers": bootstrap}, topic, 1, 0)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all", "batch.size": batch_bytes})
    for i in range(count):
        while True:
            try:
                producer.produce(topic, key=str(i).encode(), value=json.dumps({"id": i}).encode())
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(60):
        raise RuntimeError("backlog not fully delivered")


def _handled(folder: Path) -> dict[str, list[tuple[float, float, str]]]:
    """Per member: (start, end, partition:offset) of each handled record (bench/io_handler.py's lines)."""
    out = {}
    for path in folder.glob("*.txt"):
        rows = [line.split() for line in path.read_text().splitlines()]
        out[path.stem] = [(float(a), float(b), c) for a, b, c in (r for r in rows if len(r) == 3)]
    return out


def run(bootstrap: str, topic: str, members: int, args: argparse.Namespace) -> dict[str, Any]:
    """``members`` share members in a new group over the whole backlog; their steady rate."""
    folder, cmd, env = member_run(bootstrap, topic, "share", members, args, "bench.io_handler:handle_offset",
                                  "--group-type", "share")
    run_members(cmd, env, members,
                lambda: len({r[2] for rows in _handled(folder).values() for r in rows}) < args.messages,
                f"run with {members} members did not finish (see {folder})")
    handled = _handled(folder)
    shutil.rmtree(folder, ignore_errors=True)
    counts = Counter(r[2] for rows in handled.values() for r in rows)
    rate, window = steady_rate(handled, args.messages)
    return {"members": members, "active_members": len(handled), "rate_msg_s": round(rate, 1),
            "window_s": round(window, 2), "handled": len(counts),
            "duplicates": sum(counts.values()) - len(counts), "per_member": sorted(len(v) for v in handled.values()),
            "ideal_msg_s": members * args.threads / args.work}


def markdown(figures: dict[str, Any]) -> str:
    """BENCHMARKS.md's table (bench/docs.py TABLES["share"])."""
    out = ["| members | msg/s | ratio to one member | of ideal | handled (duplicates) | per member | window |",
           "|---|---|---|---|---|---|---|"]
    for row in figures["runs"]:
        out.append(f"| {row['members']} | {row['rate_msg_s']:,.0f} | **{row['ratio_to_one']:.2f}** "
                   f"| {row['of_ideal']:.3f} | {row['handled']:,} ({row['duplicates']}) "
                   f"| {' / '.join(f'{n:,}' for n in row['per_member'])} | {row['window_s']:.1f} s |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.share", description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="an existing cluster (default: start a broker of this run)")
    parser.add_argument("--port", type=int, default=PORT, help="port of the broker this run starts (< 32768)")
    parser.add_argument("--messages", type=int, default=16_000)
    parser.add_argument("--threads", type=int, default=8, help="MAX_THREAD_COUNT of each member")
    parser.add_argument("--work", type=float, default=0.01, help="seconds the handler waits per record")
    parser.add_argument("--batch-bytes", type=int, default=16_384, help="the producer's batch.size")
    parser.add_argument("--note", default="", help="free text for the result file (e.g. a brief run)")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="share-kafka-"))
    kafka = None if args.bootstrap else own_broker(home, args.port)
    bootstrap = args.bootstrap or kafka.bootstrap  # type: ignore[union-attr]
    given = argv if argv is not None else sys.argv[1:]
    this_run = record.Run.start("share", " ".join(["python -m bench.share", *given]))
    try:
        topic = f"share-{uuid.uuid4().hex[:8]}"
        produce_backlog(bootstrap, topic, args.messages, args.batch_bytes)
        results = [run(bootstrap, topic, k, args) for k in (1, 2)]
    finally:
        if kafka is not None:
            kafka.stop()
        shutil.rmtree(home, ignore_errors=True)
    base = results[0]["rate_msg_s"]
    for row in results:
        row["ratio_to_one"] = round(row["rate_msg_s"] / base, 2)
        row["of_ideal"] = round(row["rate_msg_s"] / row["ideal_msg_s"], 3)
    meta = {"messages": args.messages, "partitions": 1, "threads": args.threads, "work_s": args.work,
            "producer_batch_bytes": args.batch_bytes}
    figures = {"meta": meta, "runs": results}
    print(markdown(figures))
    print(f"results: {this_run.write(figures, note=args.note)}")
    return 0 if all(row["handled"] == args.messages for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
