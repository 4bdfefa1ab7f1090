"""Exactly-once against a real broker: kill -9, a rebalance storm and a killed node, checked by a read_committed reader.

Consumers run as subprocesses (mtc75_consumer.py with tests/transform_handler.py, which returns one
``mtc75.Output`` per input naming it) so that kill -9 is a real crash, also in the middle of a transaction.
The verifier reads the output topic with ``isolation.level=read_committed`` and counts each input's outputs:
exactly_once must show every input exactly once; at_least_once every input at least once, the duplicates
counted and bounded. Each test prints a ``FIGURES {...}`` line (RELIABILITY.md's rows, scenario keys
``eos_*``). Marked ``faults``: run with ``pytest -m faults`` (``make faults``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from mtc75.kafka.topics import create_topic
from mtc75.tools.broker import LocalCluster
from tests.conftest import TEST_PORT
from tests.kafka_helpers import (
    all_offsets,
    committed_offsets,
    end_offsets,
    kill_9_at,
    produce_numbered,
    report_figures,
    script_env,
    start_consumer,
    stop_process,
    wait_until,
)
from tests.local_kafka import owned_cluster, session_folder

pytestmark = [pytest.mark.kafka, pytest.mark.faults, pytest.mark.timeout(600)]

N, PARTITIONS, THREADS = 10_000, 3, 16
HANDLER = ("--handler", "tests.transform_handler:handle")
CLUSTER_PORT = int(os.environ.get("MTC75_TEST_CLUSTER_KAFKA_PORT", str(TEST_PORT + 20))) + 6  # not test_cluster's


def read_outputs(
    bootstrap: str, topic: str, want: int, timeout: float = 90, idle: float = 3.0
) -> Counter[tuple[int, int]]:
    """Each input's ``(partition, offset)`` -> how many outputs a read_committed reader sees; reads until it
    saw ``want`` distinct inputs and then nothing new for ``idle`` seconds (so duplicates are seen too)."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"mtc75-eos-verifier-{time.monotonic_ns()}",
                       "auto.offset.reset": "earliest", "enable.auto.commit": False,
                       "isolation.level": "read_committed"})
    reader.subscribe([topic])
    counts: Counter[tuple[int, int]] = Counter()
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = reader.poll(0.2)
            if msg is not None and msg.error() is None:
                body = json.loads(msg.value())
                counts[(body["p"], body["o"])] += 1
                last_new = time.monotonic()
            elif len(counts) >= want and time.monotonic() - last_new >= idle:
                break
    finally:
        reader.close()
    return counts


def fed_topics(bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], n: int
               ) -> tuple[str, str, str, dict[int, int]]:
    """An input topic holding ``n`` numbered messages, an output topic and a group: (input, output, group, the
    input's end offsets)."""
    topic, out, group = make_topic(partitions=PARTITIONS), make_topic(partitions=PARTITIONS, prefix="out"), unique("g")
    produce_numbered(bootstrap, topic, n)
    return topic, out, group, end_offsets(bootstrap, topic)


def outcome(counts: Counter[tuple[int, int]], ends: dict[int, int]) -> tuple[int, int]:
    """(missing inputs, duplicate outputs)."""
    wanted = all_offsets(ends)
    missing = len(wanted - set(counts))
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    assert set(counts) <= wanted, "an output names an input that does not exist"
    return missing, duplicates


def lines(record: Path) -> int:
    return len(record.read_text().splitlines()) if record.exists() else 0


def args(topic: str, group: str, guarantee: str, member: str | None, commit_interval: float = 0.5,
         quiet: bool = True) -> list[str]:
    """The consumer script's arguments; ``quiet=False`` keeps its INFO lines (assignments, commits' troubles),
    for a test whose failure must tell what the run went through."""
    out = ["--topic", topic, "--group-id", group, "--max-thread-count", str(THREADS), "--processing-guarantee",
           guarantee, "--commit-interval", str(commit_interval), "--on-failure", "skip", *(["-q"] if quiet else []),
           *HANDLER, "-X", "session.timeout.ms=10000"]
    if member is not None:  # static membership: the restart fences its predecessor's producer at once
        out += ["-X", f"group.instance.id={member}"]
    return out


def finish(bootstrap: str, argv: list[str], env: dict[str, str], log: Path, topic: str, group: str,
           ends: dict[int, int]) -> None:
    """A last consumer runs until every input is committed, then stops gracefully (exit 0)."""
    final = start_consumer(argv, env, log)
    try:
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == ends, timeout=240, what="commits at the end")
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        stop_process(final)


def crash_loop(bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path,
               guarantee: str, kills: int) -> dict[str, object]:
    """``kills`` runs, each killed with -9 at a random moment after it committed something of its own (so
    outputs it wrote or committed are at stake, and the kill lands inside an open transaction: one commits
    every second); then a last run finishes, and the read_committed verifier counts."""
    topic, out, group, ends = fed_topics(bootstrap, make_topic, unique, N)
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(bootstrap, MTC75_TEST_OUT=out, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.02")
    argv = args(topic, group, guarantee, f"{group}-member", commit_interval=1.0)
    committed_at_kill: list[int] = []

    def committed() -> int:
        return sum(max(0, o) for o in committed_offsets(bootstrap, group, topic).values())

    for k in range(kills):
        before = committed()
        proc = start_consumer(argv, env, log)
        try:
            wait_until(lambda before=before: committed() > before, timeout=120, what=f"run {k} committed something")
            target = lines(record) + rng.randint(50, 600)  # then a random moment: 0.06-0.75 s of work later
            kill_9_at(proc, lambda: lines(record), target, timeout=120, what=f"run {k}")
            committed_at_kill.append(committed())
        finally:
            stop_process(proc)
    assert committed_at_kill[-1] < N, "the kills came after the work was done"
    finish(bootstrap, argv, env, log, topic, group, ends)
    counts = read_outputs(bootstrap, out, N)
    missing, duplicates = outcome(counts, ends)
    return {"seed": seed, "messages": N, "partitions": PARTITIONS, "threads": THREADS, "kills": kills,
            "committed_at_kill": committed_at_kill, "missing": missing, "duplicates": duplicates,
            "handler_calls": lines(record)}


def test_exactly_once_kill_9_at_random_points_every_output_exactly_once(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    figures = crash_loop(bootstrap, make_topic, unique, tmp_path, "exactly_once", kills=6)
    report_figures("eos_crash_loop", **figures)
    assert figures["missing"] == 0 and figures["duplicates"] == 0, figures
    assert int(figures["handler_calls"]) > N  # the kills did make work run again: it was not written twice


def test_at_least_once_outputs_kill_9_loses_none_and_duplicates_are_bounded(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    kills = 6
    figures = crash_loop(bootstrap, make_topic, unique, tmp_path, "at_least_once", kills=kills)
    report_figures("alo_outputs_crash_loop", **figures)
    assert figures["missing"] == 0, figures
    # A duplicate output is a handler run again after a crash; a crash repeats at most what had not been
    # committed: the running handlers and the fetched backlog (MAX_BACKLOG 5,000) at the most.
    reruns = int(figures["handler_calls"]) - N
    assert int(figures["duplicates"]) <= reruns <= kills * (THREADS + 5_000), figures


def test_exactly_once_rebalance_storm_every_output_exactly_once(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Members come and go (started, killed -9, stopped) while 10,000 inputs are transformed."""
    topic, out, group, ends = fed_topics(bootstrap, make_topic, unique, N)
    seed = random.randrange(1_000_000)
    rng = random.Random(seed)
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(bootstrap, MTC75_TEST_OUT=out, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.002")
    members: dict[str, subprocess.Popen[bytes]] = {}
    events: list[str] = []
    try:
        for step in range(8):
            name = f"{group}-m{rng.randrange(4)}"
            running = members.get(name)
            if running is not None and running.poll() is None:
                sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
                running.send_signal(sig)
                running.wait(timeout=60)
                events.append(f"{'kill' if sig == signal.SIGKILL else 'stop'} {name[-2:]}")
            else:
                members[name] = start_consumer(args(topic, group, "exactly_once", name), env, log)
                events.append(f"add {name[-2:]}")
            base = lines(record)
            if any(p.poll() is None for p in members.values()) and base < N:
                wait_until(lambda base=base: lines(record) >= min(N, base + rng.randint(200, 800)) or
                           committed_offsets(bootstrap, group, topic) == ends, timeout=120, what=f"progress {step}")
    finally:
        for proc in members.values():
            stop_process(proc)
    finish(bootstrap, args(topic, group, "exactly_once", f"{group}-m0"), env, log, topic, group, ends)
    missing, duplicates = outcome(read_outputs(bootstrap, out, N), ends)
    report_figures("eos_rebalance_storm", seed=seed, messages=N, events=events, missing=missing, duplicates=duplicates,
                   handled_lines=lines(record))
    assert (missing, duplicates) == (0, 0), events


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("killing cluster nodes needs the local cluster (KAFKA_BOOTSTRAP_SERVERS is set)")
    with session_folder("eos-cluster") as home:
        local = owned_cluster(home, CLUSTER_PORT, 3)
        try:
            yield local
        finally:
            local.stop()


def test_exactly_once_a_killed_node_of_three_every_output_exactly_once(
    cluster: LocalCluster, unique: Callable[[str], str], tmp_path: Path
) -> None:
    bootstrap = cluster.bootstrap
    topic, out, group = unique("t"), unique("out"), unique("g")
    for name in (topic, out):
        create_topic({"bootstrap.servers": bootstrap}, name, PARTITIONS, 3)
    produce_numbered(bootstrap, topic, N)
    ends = end_offsets(bootstrap, topic)
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(bootstrap, MTC75_TEST_OUT=out, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.002")
    # A random transactional.id (no group.instance.id): a "fenced" librdkafka reports after the coordinator's
    # failover cannot be a zombie's, so the run makes a new producer and goes on.
    argv = args(topic, group, "exactly_once", None, quiet=False)
    proc = start_consumer(argv, env, log)
    try:
        wait_until(lambda: lines(record) >= 2_000, timeout=120, what="2,000 handled")
        admin = AdminClient({"bootstrap.servers": bootstrap})
        leaders = {p.id: p.leader for p in admin.list_topics(topic, timeout=10).topics[topic].partitions.values()}
        victim = cluster.node(leaders[0])  # a leader of the input: of outputs and offsets too, likely
        pid = victim.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed_at = lines(record)
        try:
            wait_until(lambda: committed_offsets(bootstrap, group, topic) == ends or proc.poll() is not None,
                       timeout=300, what="all committed with a node down")
        except AssertionError as err:  # say what the run went through (1 in 5 under CI's load: not understood yet)
            handled = Counter(line.split(":")[0] for line in record.read_text().split())
            raise AssertionError(f"{err}; handled per partition {dict(handled)} (node {victim.node_id} killed at "
                                 f"{killed_at}); committed {committed_offsets(bootstrap, group, topic)} of {ends}; "
                                 f"consumer log: {log.read_text()[-6000:]}") from None
        exited = proc.poll()
    finally:
        stop_process(proc)
    assert exited is None, f"the consumer stopped (exit {exited}): {log.read_text()[-2000:]}"
    missing, duplicates = outcome(read_outputs(bootstrap, out, N), ends)
    recovered = log.read_text().count("making a new one")
    report_figures("eos_node_killed", messages=N, killed_node=victim.node_id, killed_at_handled=killed_at,
                   new_producers=recovered, missing=missing, duplicates=duplicates)
    assert (missing, duplicates) == (0, 0)


def test_a_transactional_input_only_committed_records_are_transformed_and_the_commit_covers_them(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """The input written in transactions, every third one aborted: control markers and aborted records are
    never handed to the handler; every committed input's output exactly once; the commit covers the last
    transaction's marker too (each partition's end offset: lag 0), as a plain consumer's does."""
    topic, out, group = make_topic(partitions=PARTITIONS), make_topic(partitions=PARTITIONS, prefix="out"), unique("g")
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": unique("input-writer")})
    producer.init_transactions(30)
    kept: set[int] = set()
    for batch in range(30):
        producer.begin_transaction()
        for i in range(batch * 50, batch * 50 + 50):
            producer.produce(topic, key=f"k{i}", value=json.dumps({"id": i}).encode())
        if batch % 3 == 2:
            producer.abort_transaction(30)
        else:
            producer.commit_transaction(30)
            kept.update(range(batch * 50, batch * 50 + 50))
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    env = script_env(bootstrap, MTC75_TEST_OUT=out, MTC75_TEST_RECORD=str(record))
    proc = start_consumer(args(topic, group, "exactly_once", None), env, log)
    try:
        wait_until(lambda: lines(record) >= len(kept), timeout=120, what="every committed input handled")
        time.sleep(2.0)  # a commit interval and more: nothing else may arrive
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        stop_process(proc)
    assert lines(record) == len(kept)  # aborted records never reached the handler
    counts = read_outputs(bootstrap, out, len(kept))
    assert sorted(counts.values()) == [1] * len(kept)
    ends = end_offsets(bootstrap, topic)
    committed = committed_offsets(bootstrap, group, topic)
    assert committed == ends, (committed, ends)
    report_figures("eos_transactional_input", records=1500, committed_inputs=len(kept), outputs=sum(counts.values()),
                   committed=committed, ends=ends)


def test_exactly_once_a_zombie_is_fenced_stops_at_once_and_writes_nothing_more(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """A member frozen (SIGSTOP) mid-run is replaced by a new instance of itself (same group.instance.id, so
    the same transactional.id); thawed, the zombie stops with exit 6; every output exactly once."""
    n = 3_000
    topic, out, group, ends = fed_topics(bootstrap, make_topic, unique, n)
    record, log_a, log_b = tmp_path / "handled.txt", tmp_path / "zombie.log", tmp_path / "successor.log"
    env = script_env(bootstrap, MTC75_TEST_OUT=out, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.02")
    argv = args(topic, group, "exactly_once", f"{group}-member")

    def committed() -> int:
        return sum(max(0, o) for o in committed_offsets(bootstrap, group, topic).values())

    zombie = start_consumer(argv, env, log_a)
    successor = None
    try:
        wait_until(lambda: committed() > 0, timeout=120, what="the first instance committed something")
        zombie.send_signal(signal.SIGSTOP)
        frozen_at = committed()
        successor = start_consumer(argv, env, log_b)
        wait_until(lambda: committed() > frozen_at, timeout=120, what="the successor committed something")
        zombie.send_signal(signal.SIGCONT)
        thawed = time.monotonic()
        assert zombie.wait(timeout=60) == 6, log_a.read_text()[-2000:]
        stopped_after = time.monotonic() - thawed
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == ends, timeout=240, what="all committed")
        successor.send_signal(signal.SIGTERM)
        assert successor.wait(timeout=60) == 0, log_b.read_text()[-2000:]
    finally:
        for proc in (zombie, successor):
            if proc is not None:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                stop_process(proc)
    missing, duplicates = outcome(read_outputs(bootstrap, out, n), ends)
    report_figures("eos_zombie_fenced", messages=n, zombie_exit=6, stopped_after_thaw_s=round(stopped_after, 1),
                   missing=missing, duplicates=duplicates)
    assert (missing, duplicates) == (0, 0)
