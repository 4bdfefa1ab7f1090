"""GROUP_TYPE="share" against a real broker (Kafka 4.4): what the share mode promises when things go wrong.

Members are ``mtc75_consumer.py --group-type share`` processes as a user runs them, with tests/share_handler.py
recording every handled record (``partition:offset:delivery_count:pid:time``) outside the process. Each test
prints a ``FIGURES {...}`` line (RELIABILITY.md rows 44-49 quote them; ``make faults`` records them).

The lock is the group's ``share.record.lock.duration.ms``; tests that wait for it set it to the broker's
minimum, 15 s (tests/test_share_groups.py ``set_group_config``). The broker-loss tests stop and start a broker
of their own (MTC75_TEST_FAULT_KAFKA_PORT or the next free pair), never the session's.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mtc75.kafka.deadletter import H_ATTEMPTS, H_OFFSET
from mtc75.kafka.topics import create_topic
from mtc75.tools.broker import LocalKafka
from tests.conftest import TEST_PORT, WORKER
from tests.kafka_helpers import (
    produce_numbered,
    read_colon_lines,
    read_topic,
    report_figures,
    script_env,
    start_consumer,
    stop_process,
    wait_until,
)
from tests.local_kafka import restartable_broker
from tests.test_share_groups import produce_small_batches, set_group_config

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

FAULT_PORT = int(os.environ.get("MTC75_TEST_FAULT_KAFKA_PORT", str(TEST_PORT + 10))) + 2 * WORKER
HANDLER = ("--handler", "tests.share_handler:handle")
SHORT_LOCK_MS = "15000"  # the broker's group.share.min.record.lock.duration.ms


def _handled(path: Path) -> list[tuple[int, int, int, int, float]]:
    """``(partition, offset, delivery_count, pid, time)`` per handled record (tests/share_handler.py)."""
    return [(int(p), int(o), int(d), int(pid), float(t)) for p, o, d, pid, t in read_colon_lines(path, 5)]


def _args(topic: str, group: str, threads: int, *extra: str) -> list[str]:
    return ["--topic", topic, "--group-id", group, "--group-type", "share", "--max-thread-count", str(threads),
            "--no-reload", "-q", *HANDLER, *extra]


def _summary(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())


def _sigterm(proc: object, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    return int(proc.wait(timeout=timeout))  # type: ignore[attr-defined]


# -- two members on one partition ----------------------------------------------------------------------


def test_two_share_members_on_one_partition_both_work_and_every_record_is_handled_once(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n, threads = 6000, 8
    topic, group = make_topic(1, "share2"), unique("share2-g")
    # Producer batches of 100 (a Java producer's 16 KB batch.size holds about 300 such records): the broker
    # hands out whole batches, and one of the whole topic would leave a member holding MAX_BACKLOG of it.
    produce_small_batches(bootstrap, topic, n, batch=100)
    record = tmp_path / "handled.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.02")
    summaries = [tmp_path / f"member{i}.json" for i in range(2)]
    procs = [start_consumer(_args(topic, group, threads, "--idle-exit", "5", "--summary-json", str(s)), env,
                            tmp_path / f"member{i}.log") for i, s in enumerate(summaries)]
    try:
        wait_until(lambda: len({(p, o) for p, o, *_ in _handled(record)}) >= n, timeout=180,
                   what="every record handled")
        codes = [proc.wait(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            stop_process(proc)
    assert codes == [0, 0], [(tmp_path / f"member{i}.log").read_text()[-2000:] for i in range(2)]
    handled = _handled(record)
    counts = Counter((p, o) for p, o, *_ in handled)
    per_member = Counter(pid for *_, pid, _t in handled)
    assert set(counts) == {(0, o) for o in range(n)}  # nothing lost
    assert max(counts.values()) == 1  # nothing overran its lock, so nothing was handled twice
    assert len(per_member) == 2, per_member  # one partition, and both members worked on it
    shares = [_summary(s)["share"] for s in summaries]
    assert sum(s["accepted"] for s in shares) == n and all(s["refused"] == 0 for s in shares)
    report_figures("share_pair", messages=n, lost=n - len(set(counts)), duplicates=sum(counts.values()) - len(counts),
                   per_member=sorted(per_member.values()), released=sum(s["released"] for s in shares),
                   acquired=sum(s["acquired"] for s in shares))


# -- a member killed -9, or frozen ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_a_share_member_killed_9_or_frozen_loses_nothing_and_its_duplicates_are_what_it_had_not_accepted(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path, how: str
) -> None:
    """kill -9: the kernel closes the member's connections and the broker releases what it held at once.
    Frozen (SIGSTOP: a host that stops answering, its connections open): what it held comes back when
    the lock ends. Either way every record is handled, and a duplicate is a record the member handled
    whose acceptance had not gone out."""
    n, threads, poll_records, producer_batch, lock_s = 6000, 8, 200, 100, float(SHORT_LOCK_MS) / 1000
    topic, group = make_topic(1, "share-kill"), unique("share-kill-g")
    set_group_config(bootstrap, group, share_auto_offset_reset="earliest", share_record_lock_duration_ms=SHORT_LOCK_MS)
    produce_small_batches(bootstrap, topic, n, batch=producer_batch)
    record = tmp_path / "handled.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.01")
    args = _args(topic, group, threads, "-X", f"max.poll.records={poll_records}")
    victim, survivor = (start_consumer(args, env, tmp_path / f"member{i}.log") for i in range(2))
    try:
        wait_until(lambda: sum(1 for *_, pid, _t in _handled(record) if pid == victim.pid) >= 500, timeout=120,
                   what="500 records handled by the member to stop")
        victim.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_until(lambda: len({(p, o) for p, o, *_ in _handled(record)}) >= n, timeout=180,
                   what="every record handled")
        assert _sigterm(survivor) == 0
    finally:
        stop_process(victim)
        stop_process(survivor)
    handled = _handled(record)
    counts = Counter((p, o) for p, o, *_ in handled)
    assert set(counts) == {(0, o) for o in range(n)}  # nothing lost
    twice = {key for key, c in counts.items() if c > 1}
    by_victim = {(p, o) for p, o, _d, pid, _t in handled if pid == victim.pid}
    assert twice <= by_victim  # a duplicate is a record the stopped member handled and did not get to accept
    assert len(twice) <= poll_records + producer_batch  # at most one poll (and the rest of a producer batch)
    back = [t - stopped_at for p, o, d, pid, t in handled if pid == survivor.pid and d >= 2]
    first_back = min(back) if back else None
    if how == "freeze" and first_back is not None:
        assert first_back >= lock_s - 5, first_back  # what it held came back only when its lock ended
    report_figures(f"share_{how}", messages=n, lost=n - len(set(counts)), duplicates=sum(counts.values()) - len(counts),
                   duplicate_bound=poll_records + producer_batch, lock_s=lock_s, stopped_member_handled=len(by_victim),
                   redelivered=len(back), first_redelivered_after_s=round(first_back, 2) if back else None)


# -- poison records -----------------------------------------------------------------------------------------


def test_share_poison_records_are_retried_then_dead_lettered_and_every_other_record_accepted(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n, every = 2000, 100
    topic, group = make_topic(1, "share-poison"), unique("share-poison-g")
    produce_numbered(bootstrap, topic, n)
    record, summary = tmp_path / "handled.txt", tmp_path / "summary.json"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_POISON_EVERY=str(every))
    proc = start_consumer(_args(topic, group, 8, "--max-attempts", "3", "--retry-backoff", "0.05",
                                "--on-failure", "dlq", "--max-messages", str(n), "--summary-json", str(summary)),
                          env, tmp_path / "consumer.log")
    started = time.monotonic()
    try:
        assert proc.wait(timeout=180) == 0, (tmp_path / "consumer.log").read_text()[-2000:]
    finally:
        stop_process(proc)
    seconds = time.monotonic() - started
    poison = n // every
    letters = read_topic(bootstrap, f"{topic}.dlq", poison)
    assert sorted(json.loads(m.value())["id"] % every for m in letters) == [every - 1] * poison
    assert all(dict(m.headers())[H_ATTEMPTS] == b"3" for m in letters)
    offsets = {int(dict(m.headers())[H_OFFSET]) for m in letters}
    counts = Counter((p, o) for p, o, *_ in _handled(record))
    assert set(counts) | {(0, o) for o in offsets} == {(0, o) for o in range(n)}  # every other one handled
    stats = _summary(summary)
    assert (stats["dead_lettered"], stats["failed"], stats["retried"]) == (poison, poison, 2 * poison)
    assert stats["share"]["accepted"] == n and stats["share"]["released"] == 0
    lost = {(0, o) for o in range(n)} - set(counts) - {(0, o) for o in offsets}
    report_figures("share_poison_dlq", messages=n, poison=poison, lost=len(lost),
                   duplicates=sum(counts.values()) - len(counts), retried=stats["retried"],
                   dead_lettered=stats["dead_lettered"], accepted=stats["share"]["accepted"],
                   run_seconds=round(seconds, 1))


# -- a handler slower than the lock ----------------------------------------------------------------------


def test_a_handler_slower_than_the_lock_is_counted_and_its_redelivery_here_takes_its_outcome(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n, slow_s, lock_s = 30, 20.0, float(SHORT_LOCK_MS) / 1000
    topic, group = make_topic(1, "share-slow"), unique("share-slow-g")
    set_group_config(bootstrap, group, share_auto_offset_reset="earliest", share_record_lock_duration_ms=SHORT_LOCK_MS)
    produce_numbered(bootstrap, topic, n)
    record, started, summary = tmp_path / "handled.txt", tmp_path / "started.txt", tmp_path / "summary.json"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_STARTED=str(started),
                     MTC75_TEST_SLOW="0:5", MTC75_TEST_SLOW_SECONDS=str(slow_s))
    proc = start_consumer(_args(topic, group, 4, "--max-messages", str(n), "--summary-json", str(summary)), env,
                          tmp_path / "consumer.log")
    try:
        assert proc.wait(timeout=120) == 0, (tmp_path / "consumer.log").read_text()[-2000:]
    finally:
        stop_process(proc)
    log = (tmp_path / "consumer.log").read_text()
    starts = [(o, d) for _p, o, d, _pid, _t in _handled(started)]
    counts = Counter((p, o) for p, o, *_ in _handled(record))
    assert set(counts) == {(0, o) for o in range(n)} and max(counts.values()) == 1
    assert starts.count((5, 1)) == 1 and (5, 2) not in starts  # its redelivery did not run it a second time
    stats = _summary(summary)
    share = stats["share"]
    assert (share["lock_expired"], share["rejoined"], share["accepted"]) == (1, 1, n), share
    assert share["deliveries"] == {"1": n, "2": 1}
    assert "1 handlers still running when their records' lock (15s) ended" in log
    report_figures("share_slow_handler", messages=n, handler_s=slow_s, lock_s=lock_s, lost=n - len(set(counts)),
                   duplicates=sum(counts.values()) - len(counts), lock_expired=share["lock_expired"],
                   rejoined=share["rejoined"], slow_record_runs=starts.count((5, 1)) + starts.count((5, 2)))


# -- SIGTERM while saturated ------------------------------------------------------------------------------


def test_share_sigterm_while_saturated_finishes_and_accepts_what_started_and_releases_the_rest(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n, threads = 80, 4
    topic, group = make_topic(1, "share-term"), unique("share-term-g")
    produce_numbered(bootstrap, topic, n)
    record, started, summary = tmp_path / "handled.txt", tmp_path / "started.txt", tmp_path / "summary.json"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_STARTED=str(started),
                     MTC75_TEST_SLEEP="0.3")
    log = tmp_path / "consumer.log"
    proc = start_consumer(_args(topic, group, threads, "--summary-json", str(summary)), env, log)

    def running() -> int:
        return len(_handled(started)) - len(_handled(record))

    try:
        wait_until(lambda: len(_handled(record)) >= 8, timeout=60, what="8 handled records")
        wait_until(lambda: running() == threads, timeout=30, what="every thread busy")
        assert _sigterm(proc) == 0, log.read_text()[-2000:]
    finally:
        stop_process(proc)
    first = [(p, o) for p, o, *_ in _handled(record)]
    assert len(first) < n
    assert Counter((p, o) for p, o, *_ in _handled(started)) == Counter(first)  # every started handler finished
    share = _summary(summary)["share"]
    assert share["accepted"] == len(first) and share["accepted"] + share["released"] == share["acquired"]

    rest = start_consumer(_args(topic, group, threads, "--idle-exit", "3"), env, log)
    try:
        assert rest.wait(timeout=120) == 0, log.read_text()[-2000:]
    finally:
        stop_process(rest)
    counts = Counter((p, o) for p, o, *_ in _handled(record))
    assert set(counts) == {(0, o) for o in range(n)}  # nothing lost
    assert max(counts.values()) == 1  # what was accepted never came back
    report_figures("share_graceful_stop", messages=n, handled_before_sigterm=len(first),
                   released_at_sigterm=share["released"], lost=n - len(set(counts)),
                   duplicates=sum(counts.values()) - len(counts))


# -- broker loss ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_broker(local_kafka: LocalKafka | None) -> Iterator[LocalKafka]:
    """A broker these tests may stop and restart: started by this module, stopped at its end."""
    with restartable_broker(local_kafka, "share-fault-kafka", FAULT_PORT) as broker:
        yield broker


def test_share_member_rides_out_a_broker_restart_and_loses_nothing(
    own_broker: LocalKafka, unique: Callable[[str], str], tmp_path: Path
) -> None:
    own_broker.start()
    bootstrap, n = own_broker.bootstrap, 3000
    topic, group = unique("share-restart"), unique("share-restart-g")
    create_topic({"bootstrap.servers": bootstrap}, topic, 1, 1)
    produce_numbered(bootstrap, topic, n)
    record, summary = tmp_path / "handled.txt", tmp_path / "summary.json"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.02")  # 200/s: 15 s in all
    log = tmp_path / "consumer.log"
    proc = start_consumer(_args(topic, group, 4, "--summary-json", str(summary)), env, log)
    try:
        wait_until(lambda: len(_handled(record)) >= 300, timeout=120, what="300 handled before the restart")
        stopped_at = time.monotonic()
        own_broker.stop()
        time.sleep(3)
        own_broker.start()
        back_at = time.monotonic()
        wait_until(lambda: len({(p, o) for p, o, *_ in _handled(record)}) >= n, timeout=180,
                   what="every record handled after the restart")
        first_after = min(t for *_, t in _handled(record) if t > back_at)
        assert _sigterm(proc) == 0, log.read_text()[-2000:]
    finally:
        stop_process(proc)
    share = _summary(summary)["share"]
    during = len(_handled(record))
    # What the broker did not take as accepted (refused while it was down or after, its locks gone with the
    # restart) is still the group's: a second member gets it. It must find nothing else.
    rest = start_consumer(_args(topic, group, 4, "--idle-exit", "3"), env, log)
    try:
        assert rest.wait(timeout=120) == 0, log.read_text()[-2000:]
    finally:
        stop_process(rest)
    counts = Counter((p, o) for p, o, *_ in _handled(record))
    assert set(counts) == {(0, o) for o in range(n)}  # nothing lost
    assert len(_handled(record)) - during <= share["refused"]  # the second member only redid what was refused
    if share["refused"]:  # the restart voided the batch's locks: the rest of it was dropped, not run for nothing
        assert "locks are gone" in log.read_text(), log.read_text()[-2000:]
    report_figures("share_broker_restart", messages=n, lost=n - len(set(counts)),
                   duplicates=sum(counts.values()) - len(counts),
                   outage_s=round(back_at - stopped_at, 1), restart_to_first_handled_s=round(first_after - back_at, 2),
                   refused=share["refused"], redone_by_next_member=len(_handled(record)) - during)


def test_share_member_exits_3_when_the_broker_stays_gone(
    own_broker: LocalKafka, unique: Callable[[str], str], tmp_path: Path
) -> None:
    own_broker.start()
    bootstrap, n, budget = own_broker.bootstrap, 400, 5.0
    topic, group = unique("share-gone"), unique("share-gone-g")
    create_topic({"bootstrap.servers": bootstrap}, topic, 1, 1)
    produce_numbered(bootstrap, topic, n)
    record = tmp_path / "handled.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.05")
    log = tmp_path / "consumer.log"
    proc = start_consumer(_args(topic, group, 2, "--broker-down-timeout", str(budget)), env, log)
    try:
        wait_until(lambda: len(_handled(record)) >= 20, timeout=120, what="20 handled")
        stopping_at = time.monotonic()
        own_broker.stop()
        stopped_at = time.monotonic()
        code = proc.wait(timeout=60)
        exited_at = time.monotonic()
        exited_after = exited_at - stopped_at
    finally:
        stop_process(proc)
        own_broker.start()
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("mtc75_consumer.py: error: ")]
    assert code == 3 and len(errors) == 1 and "BROKER_DOWN_TIMEOUT" in errors[0], text[-2000:]
    # The budget counts from when the member saw the broker down: between the start of the stop (the broker may
    # close its listener early in its shutdown, which takes seconds more on a loaded machine) and its end.
    assert budget - 1 <= exited_at - stopping_at and exited_after <= budget + 8, (exited_at - stopping_at,
                                                                                   exited_after)
    # Nothing lost: what it had not accepted goes to the next member once the broker is back.
    handled_before = {(p, o) for p, o, *_ in _handled(record)}
    rest = start_consumer(_args(topic, group, 4, "--idle-exit", "3"), env, log)
    try:
        assert rest.wait(timeout=180) == 0, log.read_text()[-2000:]
    finally:
        stop_process(rest)
    counts = Counter((p, o) for p, o, *_ in _handled(record))
    assert set(counts) == {(0, o) for o in range(n)}
    report_figures("share_broker_gone", messages=n, handled=len(handled_before), budget_s=budget,
                   exited_after_s=round(exited_after, 1), exit_code=code, lost=n - len(set(counts)),
                   duplicates=sum(counts.values()) - len(counts))
