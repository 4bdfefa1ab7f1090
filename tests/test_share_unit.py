"""GROUP_TYPE="share" without a broker: the lease arithmetic, the share ledger, and the share engine on the
in-memory share group (tests/fake_share.py). The real-broker proofs are in tests/test_share_e2e.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import AcknowledgeType, KafkaError

import mtc75
from mtc75 import testing
from mtc75.commands import consumer as mtc75_consumer
from mtc75.core.lease import LOCK_MARGIN, Lease, first_attempt, keep, last_delivery
from mtc75.core.work import Work
from mtc75.engine.failure import FailurePolicy
from mtc75.engine.share import LeaseRetry
from mtc75.engine.shareledger import NOT_STARTED, ShareLedger
from mtc75.errors import ConfigError, MessageFailed
from mtc75.settings import Settings
from tests.fake_kafka import FakeKafka, FakeMessage
from tests.fake_share import ACKED, ARCHIVED, AVAILABLE, FakeShareGroups, ShareMessage

ACCEPT, RELEASE = AcknowledgeType.ACCEPT, AcknowledgeType.RELEASE

pytestmark = pytest.mark.timeout(60)


# -- settings -----------------------------------------------------------------------------------------


def test_share_mode_refuses_ordering_and_an_error_reset_with_one_line() -> None:
    with pytest.raises(ConfigError, match="share groups give no order"):
        Settings(GROUP_TYPE="share", ORDERING="key")
    with pytest.raises(ConfigError, match="starts at earliest or latest"):
        Settings(GROUP_TYPE="share", AUTO_OFFSET_RESET="error")
    with pytest.raises(ConfigError, match="must be one of consumer, share"):
        Settings().replace(GROUP_TYPE="queue")
    Settings(GROUP_TYPE="consumer", ORDERING="key")  # a consumer group keeps its orderings


def test_the_cli_refuses_share_with_ordering_in_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    empty = tmp_path / "config.py"
    empty.write_text("")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = mtc75_consumer.main(["--group-type", "share", "--ordering", "partition", "--no-reload",
                                    "--config", str(empty)])
    finally:  # the script points the root logger at this test's captured stderr
        root.handlers[:], root.level = handlers, level
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["mtc75-consumer: error: invalid ORDERING='partition' with GROUP_TYPE='share': share groups "
                   "give no order"]


def test_the_share_consumer_config_is_explicit_and_sized_by_the_threads() -> None:
    conf = Settings(GROUP_TYPE="share", MAX_THREAD_COUNT=8).share_consumer_config()
    assert conf["share.acknowledgement.mode"] == "explicit" and conf["max.poll.records"] == 500
    assert "auto.offset.reset" not in conf and "enable.auto.commit" not in conf  # refused by a share consumer
    assert Settings(MAX_THREAD_COUNT=200).share_consumer_config()["max.poll.records"] == 800
    assert Settings(MAX_THREAD_COUNT=8, MAX_BACKLOG=100).share_consumer_config()["max.poll.records"] == 108
    assert Settings().share_consumer_config({"max.poll.records": "50"})["max.poll.records"] == "50"
    with pytest.raises(ConfigError, match="acknowledges each record"):
        Settings().share_consumer_config({"share.acknowledgement.mode": "implicit"})


# -- the lease arithmetic (mtc75/core/lease.py) -------------------------------------------------------


def test_keep_takes_what_the_free_threads_finish_within_the_lock_and_all_while_the_handler_time_is_unknown() -> None:
    assert keep(5000, 0, 30.0, 0.01, 30.0) == 0  # no free thread: nothing
    assert keep(5000, 8, 30.0, None, 30.0) == 5000  # handler time unknown: all (the point of no return decides)
    assert keep(50_000, 8, 30.0, 0.01, 30.0) == int(8 * (30.0 - LOCK_MARGIN) / 0.01)  # what they finish
    assert keep(500, 8, 30.0, 0.01, 30.0) == 500  # a batch that fits is kept whole: a release costs a delivery
    assert keep(5000, 8, 3.0, 1.0, 30.0) == 16  # 2 s usable left: two rounds of 8
    assert keep(5000, 8, 1.5, 1.0, 30.0) == 8  # never fewer than the free threads start now
    assert keep(5000, 8, 30.0, 40.0, 30.0) == 8  # slower than the lock: start what starts, none waits


def test_a_lease_ends_at_the_lock_from_before_the_poll_and_its_point_of_no_return_leaves_one_handler_time() -> None:
    lease = Lease(100.0, 30.0)
    assert lease.deadline == 130.0
    assert lease.release_at(None) == 130.0 - LOCK_MARGIN
    assert lease.release_at(5.0) == 130.0 - LOCK_MARGIN - 5.0
    assert lease.release_at(40.0) == 130.0 - LOCK_MARGIN  # a handler slower than the lock: nothing to leave
    assert lease.retry_fits(110.0, 5.0) and not lease.retry_fits(125.0, 5.0)


def test_attempts_count_deliveries_and_the_limit_makes_the_last_one() -> None:
    assert [first_attempt(c) for c in (None, 0, 1, 2, 5)] == [0, 0, 0, 1, 4]
    assert not last_delivery(4, 5) and last_delivery(5, 5) and not last_delivery(None, 5)


def test_a_retry_that_would_end_after_the_point_of_no_return_is_declined() -> None:
    handler = type("H", (), {"seconds": 1.0})()
    retry = LeaseRetry(3, 10.0, 10.0, handler)  # type: ignore[arg-type]
    retry.jitter = 0.0
    work = Work(FakeMessage("t", 0, 0), _state(), 0)
    work.attempts = 1
    assert retry.next_delay(work, 0.0) == 10.0  # no batch yet: the plain policy
    retry.lease = Lease(0.0, 30.0)
    assert retry.next_delay(work, 0.0) == 10.0  # ends at 11 s, well before 28 s
    assert retry.next_delay(work, 18.5) is None  # would start at 28.5 s: too late for a 1 s handler
    work.attempts = 3
    assert retry.next_delay(work, 0.0) is None  # out of attempts


# -- the share ledger (mtc75/engine/shareledger.py) ---------------------------------------------------


class Acks:
    def __init__(self) -> None:
        self.calls: list[tuple[int, AcknowledgeType]] = []

    def __call__(self, msg: Any, kind: AcknowledgeType) -> None:
        self.calls.append((msg.offset(), kind))


class Recording(FailurePolicy):
    def __init__(self) -> None:
        super().__init__()
        self.works: list[Work] = []

    def failed(self, work: Work) -> bool:
        self.works.append(work)
        return True


def _state() -> Any:
    from mtc75.core.offsets import PartitionState

    return PartitionState(("t", 0))


def _records(*counts: int, start: int = 0) -> list[ShareMessage]:
    return [ShareMessage(FakeMessage("t", 0, start + i, b"v"), count) for i, count in enumerate(counts)]


def _ledger(limit: int = 5, attempts: int = 3) -> tuple[ShareLedger, Acks]:
    acks = Acks()
    ledger = ShareLedger(acks, attempts, limit, lambda err: None)
    return ledger, acks


def test_admit_keeps_what_fits_releases_the_rest_and_puts_the_last_delivery_first() -> None:
    ledger, acks = _ledger(limit=3)
    works = ledger.admit(_records(1, 1, 3, 1, 2, 1), Lease(0.0, 30.0), 0.0, free=1, per_call=10.0)
    assert [w.offset for w in works] == [2, 0, 1]  # the last delivery (offset 2) first, kept beyond what fits
    assert [w.attempts for w in works] == [2, 0, 0]  # attempts count the earlier deliveries
    assert acks.calls == [(3, RELEASE), (4, RELEASE), (5, RELEASE)]  # one thread finishes two in 29 s
    assert ledger.acquired == 6 and ledger.released == 3 and dict(ledger.deliveries) == {1: 4, 2: 1, 3: 1}
    assert not ledger.done and {k[2] for k in ledger.held} == {0, 1, 2}


def test_settle_accepts_successes_and_hands_the_last_failure_to_on_failure() -> None:
    ledger, acks = _ledger(attempts=2)
    ledger.failure = policy = Recording()
    ok, bad = ledger.admit(_records(1, 2), Lease(0.0, 30.0), 0.0, 4, None)
    bad.attempts, bad.failed, bad.error = 2, True, "ValueError: boom"
    assert ledger.settle(deque([ok, bad])) == []
    assert acks.calls == [(0, ACCEPT), (1, ACCEPT)]  # skip-like policy: finished, so accepted
    assert policy.works == [bad] and ledger.failed == 1 and ledger.processed == 2 and ledger.done


def test_a_failure_with_attempts_left_that_the_lock_cannot_retry_is_released_unless_it_is_the_last_delivery() -> None:
    ledger, acks = _ledger(limit=3, attempts=5)
    ledger.failure = policy = Recording()
    last, early = ledger.admit(_records(1, 3), Lease(0.0, 30.0), 0.0, 4, None)  # the last one first
    for work in (early, last):
        work.attempts += 1
        work.failed, work.error = True, "ValueError: boom"
    ledger.settle(deque([last, early]))
    assert acks.calls == [(1, ACCEPT), (0, RELEASE)]  # the last delivery is never given back: ON_FAILURE
    assert policy.works == [last] and ledger.released == 1


def test_retire_releases_what_did_not_start_and_a_last_delivery_goes_to_on_failure_as_not_started() -> None:
    ledger, acks = _ledger(limit=2)
    ledger.failure = policy = Recording()
    last, _running, waiting = ledger.admit(_records(1, 1, 2), Lease(0.0, 30.0), 0.0, 4, None)
    assert ledger.retire([waiting, last]) == 2
    assert sorted(acks.calls) == [(1, RELEASE), (2, ACCEPT)]
    assert policy.works == [last] and last.error == NOT_STARTED
    assert list(ledger.held) == [("t", 0, 0)]  # the running one stays held until it finishes or the lock ends


def test_at_the_deadline_running_handlers_are_released_counted_and_their_late_outcome_is_dropped() -> None:
    ledger, acks = _ledger()
    slow, = ledger.admit(_records(1), Lease(0.0, 30.0), 0.0, 4, None)
    assert ledger.expire() == 1
    assert acks.calls == [(0, RELEASE)] and ledger.lock_expired == 1 and ledger.done
    assert not slow.state.alive  # nothing of it is retried any more
    ledger.settle(deque([slow]))  # it finished after all: no longer this member's
    assert acks.calls == [(0, RELEASE)] and ledger.dropped_late == 1 and ledger.processed == 0


def test_a_redelivery_of_a_record_still_running_here_waits_and_takes_its_outcome() -> None:
    ledger, acks = _ledger()
    first, = ledger.admit(_records(1), Lease(0.0, 30.0), 0.0, 4, None)
    ledger.expire()
    assert ledger.admit(_records(2), Lease(30.0, 30.0), 30.0, 3, None) == []  # not run a second time
    ledger.settle(deque([first]))
    assert acks.calls == [(0, RELEASE), (0, ACCEPT)] and ledger.rejoined == 1 and ledger.processed == 1


def test_a_redelivery_whose_first_handler_failed_runs_itself() -> None:
    ledger, acks = _ledger()
    first, = ledger.admit(_records(1), Lease(0.0, 30.0), 0.0, 4, None)
    ledger.expire()
    ledger.admit(_records(2), Lease(30.0, 30.0), 30.0, 3, None)
    first.attempts, first.failed = 1, True
    again = ledger.settle(deque([first]))
    assert [(w.offset, w.attempts) for w in again] == [(0, 1)] and ledger.rejoined == 0
    assert acks.calls == [(0, RELEASE)]


def test_acknowledgements_the_broker_refuses_are_counted_when_they_were_acceptances() -> None:
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    ledger, _ = _ledger()
    a, _b = ledger.admit(_records(1, 1), Lease(0.0, 30.0), 0.0, 4, None)
    ledger.settle(deque([a]))
    ledger.expire()  # b: RELEASE
    refused = KafkaException(KafkaError(KafkaError.INVALID_RECORD_STATE))
    ledger.on_acks({TopicPartition("t", 0): {0, 1}}, refused)
    assert ledger.refused == 1  # the ACCEPT of 0; a refused RELEASE only means the lock had ended


# -- the share engine on the in-memory share group ----------------------------------------------------


def _run(groups: FakeShareGroups, handler: Any, n: int, **settings: Any) -> Any:
    settings = {"topic": "t", "group_id": "g", "group_type": "share", "max_thread_count": 4, "retry_backoff": 0,
                **settings}
    return testing.consumer(groups.factories(), handler, **settings).run(max_messages=n)


def _cluster(counts: dict[int, int]) -> FakeShareGroups:
    cluster = FakeKafka()
    cluster.create_topic("t", len(counts))
    cluster.fill("t", counts)
    return FakeShareGroups(cluster)


def test_every_record_is_accepted_once_and_the_group_starts_where_auto_offset_reset_says() -> None:
    groups = _cluster({0: 150, 1: 150})
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def handler(msg: Any) -> None:
        with lock:
            seen.append((msg.partition(), msg.offset()))

    stats = _run(groups, handler, 300, on_failure="skip")
    assert sorted(seen) == [(p, o) for p in (0, 1) for o in range(150)]
    assert groups.states("g") == {ACKED: 300}
    assert groups.group("g").configs["share.auto.offset.reset"] == "earliest" and groups.alters == 1
    assert stats.processed == 300 and stats.share is not None
    assert (stats.share.acquired, stats.share.accepted, stats.share.released) == (300, 300, 0)
    assert stats.share.deliveries == {1: 300} and not any(refused for _k, _t, refused in groups.acks)
    summary = stats.summary()
    assert summary["group_type"] == "share" and summary["share"]["deliveries"] == {"1": 300}
    json.dumps(summary)


def test_a_poll_far_over_max_poll_records_is_kept_whole_when_it_fits_and_nothing_burns_a_delivery() -> None:
    groups = _cluster({0: 400})
    groups.oversize = 1000  # the broker completes producer batches: far over max.poll.records
    stats = _run(groups, lambda msg: None, 400, max_thread_count=2, max_backlog=10, on_failure="skip")
    assert groups.consumers[0].polls[0] == 400  # asked for 12 (threads + MAX_BACKLOG), got the whole topic
    assert groups.states("g") == {ACKED: 400} and stats.max_active_threads <= 2
    assert stats.share.released == 0 and stats.share.deliveries == {1: 400}  # a release would cost a delivery


def test_poison_records_are_retried_dead_lettered_then_accepted() -> None:
    groups = _cluster({0: 100})

    def handler(msg: Any) -> None:
        if json.loads(msg.value())["id"] % 10 == 9:
            raise ValueError("poison")

    stats = _run(groups, handler, 100, max_attempts=3, on_failure="dlq")
    dead = [json.loads(m.value())["id"] for m in groups.cluster.messages("t.dlq")]
    assert sorted(dead) == list(range(9, 100, 10))
    headers = dict(groups.cluster.messages("t.dlq")[0].headers())
    assert headers["mtc75.attempts"] == b"3"
    assert groups.states("g") == {ACKED: 100}
    assert (stats.retried, stats.failed, stats.dead_lettered, stats.share.accepted) == (20, 10, 10, 100)


def test_on_failure_skip_accepts_and_stop_releases_and_raises() -> None:
    groups = _cluster({0: 30})

    def handler(msg: Any) -> None:
        if msg.offset() == 7:
            raise ValueError("poison")

    stats = _run(groups, handler, 30, max_attempts=2, on_failure="skip")
    assert stats.skipped == 1 and groups.states("g") == {ACKED: 30}

    groups = _cluster({0: 30})
    with pytest.raises(MessageFailed, match=r"t\[0\]@7 failed 2 attempts .* released for another delivery"):
        _run(groups, handler, 30, max_attempts=2, on_failure="stop")
    assert groups.group("g").records[("t", 0, 7)].state == AVAILABLE  # released: it comes back
    assert groups.states("g").get(ARCHIVED, 0) == 0


def test_a_retry_the_lock_cannot_hold_is_released_and_the_last_delivery_goes_to_on_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    groups = _cluster({0: 5})
    groups.group("g").configs.update({"share.record.lock.duration.ms": "15000", "share.delivery.count.limit": "2"})
    calls: list[int] = []

    def handler(msg: Any) -> None:
        if msg.offset() == 2:
            calls.append(msg.delivery_count())
            raise ValueError("boom")

    with caplog.at_level(logging.DEBUG):  # a 20-40 s backoff (jittered) never fits a 15 s lock: no retry here
        stats = _run(groups, handler, 5, max_attempts=5, retry_backoff=40, retry_backoff_max=40, on_failure="skip")
    assert calls == [1, 2]  # one attempt per delivery; the second delivery is the group's last
    assert [kind for key, kind, _r in groups.acks if key == ("t", 0, 2)] == [RELEASE, ACCEPT]
    assert stats.skipped == 1 and stats.retried == 0 and groups.states("g") == {ACKED: 5}
    failed_lines = [r for r in caplog.records if "handler failed for t[0]@2" in r.getMessage()]
    assert [r.levelno for r in failed_lines] == [logging.DEBUG, logging.DEBUG]  # ON_FAILURE's, not final here


def test_an_async_handler_and_auto_threads_run_in_share_mode() -> None:
    groups = _cluster({0: 60})
    done: list[int] = []

    async def handler(msg: Any) -> None:
        await asyncio.sleep(0)
        done.append(msg.offset())

    stats = _run(groups, handler, 60, max_thread_count="auto", on_failure="skip")
    assert sorted(done) == list(range(60)) and stats.workers == "coroutines" and stats.thread_mode == "auto"
    assert groups.states("g") == {ACKED: 60}


def test_stop_releases_what_did_not_start_and_accepts_what_finished() -> None:
    groups = _cluster({0: 50})
    started = threading.Event()
    gate = threading.Event()
    released = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "not started; released" in record.getMessage():
                released.set()

    def handler(msg: Any) -> None:
        started.set()
        gate.wait(10)

    watch, log = Watch(), logging.getLogger("mtc75.engine.share")
    level = log.level
    log.addHandler(watch)
    log.setLevel(logging.INFO)
    consumer = testing.consumer(groups.factories(), handler, topic="t", group_id="g", group_type="share",
                                max_thread_count=2, on_failure="skip")
    try:
        consumer.start()
        assert started.wait(10)
        consumer.stop()
        assert released.wait(10)  # the shutdown released what had not started, while two handlers still run
        gate.set()
        stats = consumer.close(20)
    finally:
        gate.set()
        log.removeHandler(watch)
        log.setLevel(level)
    states = groups.states("g")
    assert states == {ACKED: 2, AVAILABLE: 48}, states  # the two running finished; the rest went back
    assert stats.share.accepted == 2 and stats.share.released == 48 and groups.consumers[0].closed


# -- what the app shows of a share run -----------------------------------------------------------------


def _share_stats() -> Any:
    from mtc75.core.stats import ShareCounts
    from tests.stats_factory import make_stats

    counts = ShareCounts(acquired=130, accepted=100, released=30, lock_expired=2, rejoined=1, refused=3,
                         deliveries={1: 100, 2: 25, 3: 5})
    return make_stats(share=counts, assigned=0, lag={})


def test_the_status_line_dashboard_and_summary_show_the_acknowledgements_and_delivery_counts() -> None:
    from rich.console import Console

    from mtc75.app.dashboard import render
    from mtc75.app.status import format_status

    stats = _share_stats()
    line = format_status(stats, color=False)
    assert "acquired 130: accepted 100, released 30, redelivered 30, lock expired 2 (rejoined 1), refused 3" in line
    console = Console(record=True, width=200, color_system=None, force_terminal=False)
    console.print(render(stats, []))
    text = console.export_text()
    assert "acquired 130: accepted 100" in text and "by delivery count 1: 100  2: 25  3: 5" in text
    assert "a share group member" in text and "partitions assigned" not in text
    assert "share group: acquired 130" in mtc75_consumer._summary_line(stats)
    assert "share" not in format_status(dataclasses.replace(stats, share=None), color=False)


def test_metrics_serve_the_share_counters_and_deliveries_by_count() -> None:
    from prometheus_client import generate_latest

    from mtc75.observe.metrics import Metrics
    from tests.test_metrics import samples

    metrics = Metrics()
    metrics.update(_share_stats())
    got = samples(generate_latest(metrics.registry).decode())
    assert got[("mtc75_share_acquired_total", ())] == 130 and got[("mtc75_share_released_total", ())] == 30
    assert got[("mtc75_share_lock_expired_total", ())] == 2 and got[("mtc75_share_refused_total", ())] == 3
    assert got[("mtc75_share_deliveries_total", (("delivery_count", "2"),))] == 25
    metrics.update(dataclasses.replace(_share_stats(), share=None))
    assert not any(name.startswith("mtc75_share") for name, _ in samples(generate_latest(metrics.registry).decode()))


def test_a_refused_acceptance_of_the_current_batch_drops_the_rest_of_it() -> None:
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    ledger, acks = _ledger()
    done, running, waiting = ledger.admit(_records(1, 1, 1), Lease(0.0, 30.0), 0.0, 4, None)
    ledger.settle(deque([done]))
    gone = KafkaException(KafkaError(KafkaError.INVALID_SHARE_SESSION_EPOCH))
    ledger.on_acks({TopicPartition("t", 0): {0}}, gone)  # before the deadline: the broker lost the locks
    assert ledger.lost is not None and ledger.refused == 1
    assert ledger.lose([waiting]) == 1
    assert ledger.done and ledger.lost is None and not running.state.alive
    assert acks.calls == [(0, ACCEPT), (1, RELEASE), (2, RELEASE)]
    ledger.settle(deque([running]))  # finished after all: not this member's any more
    assert ledger.dropped_late == 1 and ledger.processed == 1
    ledger.on_acks({TopicPartition("t", 0): {1, 2}}, gone)  # refused releases: nothing to count
    assert ledger.refused == 1 and ledger.lost is None


def test_a_work_of_several_records_that_failed_as_a_whole_is_settled_record_by_record() -> None:
    ledger, acks = _ledger(attempts=2)
    ledger.failure = policy = Recording()
    works = ledger.admit(_records(1, 1, 1), Lease(0.0, 30.0), 0.0, 4, None)
    batch = Work.chunk([w.message for w in works], works[0].state, 0)  # a batch handler's Work
    batch.failed, batch.attempts, batch.error = True, 2, "ValueError: the whole batch"
    ledger.settle(deque([batch]))
    assert [(w.offset, w.attempts, w.error) for w in policy.works] == [(i, 2, "ValueError: the whole batch")
                                                                       for i in range(3)]
    assert acks.calls == [(0, ACCEPT), (1, ACCEPT), (2, ACCEPT)] and ledger.done and ledger.failed == 3


def test_share_mode_refuses_exactly_once_and_batches_with_one_line() -> None:
    with pytest.raises(ConfigError, match="cannot join a Kafka transaction"):
        Settings(GROUP_TYPE="share", PROCESSING_GUARANTEE="exactly_once")
    with pytest.raises(ConfigError, match="handles records one by one"):
        Settings(GROUP_TYPE="share", BATCH_SIZE=10)


def test_output_records_are_written_before_their_record_is_accepted_also_through_a_failed_delivery() -> None:
    groups = _cluster({0: 40})
    groups.cluster.create_topic("out", 1)
    groups.cluster.fail_deliveries(KafkaError(KafkaError._MSG_TIMED_OUT, "fake: timed out"), 3)  # sent again

    def handler(msg: Any) -> mtc75.Output:
        return mtc75.Output("out", b"%d" % msg.offset())

    stats = _run(groups, handler, 40, on_failure="skip", retry_backoff_max=0.05)  # resent after 0.05 s
    written = sorted(int(m.value()) for m in groups.cluster.messages("out"))
    assert written == list(range(40))  # each once: a failed delivery is sent again, not counted done
    assert groups.states("g") == {ACKED: 40} and stats.processed == 40


def test_max_rate_holds_in_share_mode() -> None:
    groups = _cluster({0: 40})
    starts: list[float] = []

    def handler(msg: Any) -> None:
        starts.append(time.monotonic())

    _run(groups, handler, 40, on_failure="skip", max_rate=100.0, rate_burst=0.05)
    starts.sort()
    assert starts[-1] - starts[0] >= (40 - 5) / 100.0 * 0.99  # 5 at once (the burst), then 100 a second


def test_on_error_hears_retries_and_outcomes_in_share_mode() -> None:
    groups = _cluster({0: 20})
    told: list[tuple[int, int, str]] = []

    def handler(msg: Any) -> None:
        if msg.offset() == 5:
            raise ValueError("poison")

    _run(groups, handler, 20, max_attempts=2, on_failure="skip",
         on_error=lambda f: told.append((f.message.offset(), f.attempt, f.outcome)))
    assert told == [(5, 1, "retry"), (5, 2, "skipped")]
    assert groups.states("g") == {ACKED: 20}


def test_a_share_member_takes_several_named_topics_and_refuses_a_pattern() -> None:
    cluster = FakeKafka()
    for topic in ("a", "b"):
        cluster.create_topic(topic, 1)
        cluster.fill(topic, {0: 10})
    groups = FakeShareGroups(cluster)
    seen: list[str] = []
    stats = testing.consumer(groups.factories(), lambda m: seen.append(m.topic()), topic=["a", "b"], group_id="g",
                             group_type="share", on_failure="skip").run(max_messages=20)
    assert sorted(seen) == ["a"] * 10 + ["b"] * 10 and stats.processed == 20
    with pytest.raises(ConfigError, match="not to a pattern"):
        Settings(GROUP_TYPE="share", TOPIC="^orders-.*")
