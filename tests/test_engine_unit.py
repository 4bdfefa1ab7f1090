"""The real engine against the in-memory fake of confluent-kafka (tests/fake_kafka.py): no broker.

Each test runs ``mtc75.Consumer.run`` (built on the fake through :mod:`mtc75.testing`) on its own thread
(the poll thread), drives rebalances and faults from the test thread, and checks exact outcomes: which
offsets were handled, which were committed, what ``run`` returned or raised. Every wait is bounded;
handlers that block wait on events the test (or its teardown) sets.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition

from mtc75 import testing
from mtc75.core import offsets as offsets_module
from mtc75.core.offsetmap import decode, encode
from mtc75.core.stats import Stats
from mtc75.engine import faults as faults_module
from mtc75.engine import topicguard as topicguard_module
from mtc75.errors import (
    BrokerUnreachable,
    HandlerRefused,
    KafkaFatalError,
    KafkaUnavailable,
    MessageFailed,
    TopicGone,
    TopicNotFound,
)
from mtc75.kafka.deadletter import H_ATTEMPTS, H_OFFSET, H_PARTITION, H_TOPIC, H_TRUNCATED, TRUNCATED_VALUE_BYTES
from mtc75.runtime import pacing
from mtc75.settings import Settings
from tests.fake_kafka import FakeKafka
from tests.kafka_helpers import wait_until

pytestmark = pytest.mark.timeout(60)

TOPIC, GROUP = "orders", "billing"
P0, P1, P2 = (TOPIC, 0), (TOPIC, 1), (TOPIC, 2)
WAIT = 10.0  # bound of every wait for something that normally takes milliseconds


def fast_settings(**changes: Any) -> Settings:
    """Small timeouts so a whole scenario takes well under a second."""
    values: dict[str, Any] = {
        "TOPIC": TOPIC, "GROUP_ID": GROUP, "MAX_THREAD_COUNT": 4, "PAUSE_INTERVAL": 0.05, "COMMIT_INTERVAL": 0.02,
        "REVOKE_TIMEOUT": 5.0, "SHUTDOWN_TIMEOUT": 5.0, "MAX_ATTEMPTS": 1, "RETRY_BACKOFF": 0.0,
        "RETRY_BACKOFF_MAX": 0.0, "ON_FAILURE": "skip",
    }
    values.update(changes)
    return Settings().replace(**values)


class Recorder:
    """A handler that records each call; ``block`` offsets wait for ``release``, ``fail`` ones raise."""

    def __init__(self, block: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
                 fail: Callable[[int, int, int], bool] = lambda p, o, n: False) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[tuple[int, int]] = Counter()
        self.done: list[tuple[int, int]] = []
        self.started: set[tuple[int, int]] = set()
        self.block = block
        self.fail = fail
        self.release = threading.Event()

    def __call__(self, message: Any) -> None:
        where = (message.partition(), message.offset())
        with self._lock:
            self.calls[where] += 1
            self.started.add(where)
            call = self.calls[where]
        if where in self.block:
            self.release.wait(WAIT * 3)
        if self.fail(where[0], where[1], call):
            raise ValueError(f"fails at {where} (call {call})")
        with self._lock:
            self.done.append(where)

    def handled(self) -> set[tuple[int, int]]:
        with self._lock:
            return set(self.done)


class Run:
    """``consumer.run()`` on a background thread; snapshots come from the poll thread via on_status."""

    def __init__(self, cluster: FakeKafka, handler: Any, settings: Settings, **kw: Any) -> None:
        self.latest: Stats | None = None
        self.consumer = testing.from_settings(cluster.factories(), handler, settings, on_status=self._status,
                                              status_interval=0.01)
        self._run_kw = kw
        self.result: Stats | None = None
        self.error: BaseException | None = None
        self.returned_at = 0.0
        self._thread = threading.Thread(target=self._run, name="test-poll-thread", daemon=True)
        self._thread.start()

    def _status(self, stats: Stats) -> None:
        self.latest = stats

    def _run(self) -> None:
        try:
            self.result = self.consumer.run(**self._run_kw)
        except BaseException as err:
            self.error = err
        self.returned_at = time.monotonic()

    def stats(self) -> Stats:
        wait_until(lambda: self.latest is not None, WAIT, step=0.002, what="a first status snapshot")
        assert self.latest is not None
        return self.latest

    def join(self, timeout: float = WAIT) -> Stats:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"run() did not return within {timeout}s"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def stop(self) -> Stats:
        self.consumer.stop()
        return self.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


@pytest.fixture
def cluster() -> Iterator[FakeKafka]:
    fake = FakeKafka()
    fake.create_topic(TOPIC, 3)
    yield fake
    assert fake.violations == []  # every client call came from the poll thread


@contextlib.contextmanager
def runs_on(cluster: FakeKafka, **defaults: Any) -> Iterator[Callable[..., Run]]:
    """``begin(handler, **changes)`` starts a Run (``defaults`` under ``changes``); when the block ends, blocked
    Recorders are released and every run is stopped (bounded). The ``start`` fixtures of the engine's tests."""
    runs: list[tuple[Run, Recorder | None]] = []

    def begin(handler: Any, **changes: Any) -> Run:
        changes = {**defaults, **changes}
        kw = {k: changes.pop(k) for k in ("max_messages", "idle_exit") if k in changes}
        run = Run(cluster, handler, fast_settings(**changes), **kw)
        runs.append((run, handler if isinstance(handler, Recorder) else None))
        return run

    yield begin
    for run, recorder in runs:
        if recorder is not None:
            recorder.release.set()
        run.consumer.stop()
        run._thread.join(WAIT)


@pytest.fixture
def start(cluster: FakeKafka) -> Iterator[Callable[..., Run]]:
    """Start runs; at teardown release blocked handlers and stop every run (bounded)."""
    with runs_on(cluster) as begin:
        yield begin


def until(condition: Callable[[], bool], what: str) -> None:
    wait_until(condition, WAIT, step=0.002, what=what)


def commits_of(cluster: FakeKafka, tp: tuple[str, int], since: int = 0) -> list[int]:
    """Offsets successfully committed for ``tp`` by commit calls number ``since`` and later."""
    return [c.offsets[tp] for c in cluster.commits[since:] if tp in c.offsets and c.error is None]


# -- the plain path -------------------------------------------------------------------------------------


def test_every_message_is_handled_once_and_committed_to_the_end(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 20, 1: 20, 2: 20})
    recorder = Recorder()
    stats = start(recorder, max_messages=60).join()
    assert stats.processed == 60 and stats.failed == 0
    assert recorder.calls == Counter({(p, o): 1 for p in range(3) for o in range(20)})
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [20, 20, 20]
    assert all(not c.outside for c in cluster.commits)  # never a commit of a partition not assigned
    assert stats.max_active_threads <= 4


def test_a_fast_handler_runs_as_runs_with_every_message_once_and_a_failure_settled_alone(
    cluster: FakeKafka, start: Callable[..., Run], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path end to end (mtc75/core/work.py): runs form, and their commits stay exact."""
    monkeypatch.setattr(pacing, "FAST_HANDLER", 0.01)  # runs form even on a loaded machine
    runs: list[int] = []
    complete_range = offsets_module.OffsetTracker.complete_range

    def spy(state: Any, first: int, count: int) -> bool:
        runs.append(count)
        return complete_range(state, first, count)

    monkeypatch.setattr(offsets_module.OffsetTracker, "complete_range", staticmethod(spy))
    cluster.fill(TOPIC, {0: 3000, 1: 3000, 2: 3000})
    recorder = Recorder(fail=lambda p, o, n: (p, o) == (1, 2500))
    stats = start(recorder, max_messages=9000).join()
    assert recorder.calls == Counter({(p, o): 1 for p in range(3) for o in range(3000)})
    assert stats.processed == 9000 and stats.failed == 1  # ON_FAILURE=skip: counted, committed past
    assert max(runs) > 1  # messages travelled as runs
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [3000, 3000, 3000]


# -- rebalance --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_revoke_waits_for_running_handlers_and_commits_their_work(
    cluster: FakeKafka, start: Callable[..., Run], strategy: str
) -> None:
    cluster.fill(TOPIC, {0: 3, 1: 2})
    recorder = Recorder(block={(0, 2)})
    run = start(recorder, CONSUMER_CONFIG={"partition.assignment.strategy": strategy})
    until(lambda: recorder.handled() == {(0, 0), (0, 1), (1, 0), (1, 1)} and (0, 2) in recorder.started,
          "all but the blocked handler to finish")
    consumer = cluster.consumer()
    revoked = consumer.rebalance(revoke=[P0])
    assert not revoked.wait(0.2), "the revoke returned while a handler of the partition was still running"
    recorder.release.set()
    assert revoked.wait(WAIT)
    assert cluster.committed(GROUP, TOPIC, 0) == 3  # the revoke committed the running handler's work
    assert consumer.assignment_now() == {P1, P2}
    cluster.fill(TOPIC, {0: 1, 1: 1})  # p0 is someone else's now: only p1's new message comes here
    until(lambda: (1, 2) in recorder.handled(), "the new p1 message")
    stats = run.stop()
    assert (0, 3) not in recorder.calls
    assert stats.processed == 6 and stats.dropped_late == 0
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(2)] == [3, 3]
    assert all(not c.outside for c in cluster.commits)


def test_revoke_timeout_commits_the_done_prefix_and_the_late_completion_is_dropped(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 3})
    recorder = Recorder(block={(0, 1)})
    run = start(recorder, REVOKE_TIMEOUT=0.2)
    until(lambda: recorder.handled() == {(0, 0), (0, 2)} and (0, 1) in recorder.started, "offsets 0 and 2")
    consumer = cluster.consumer()
    assert consumer.rebalance(revoke=[P0]).wait(WAIT)
    assert cluster.committed(GROUP, TOPIC, 0) == 1  # 1 still runs: the watermark stops before it
    after_revoke = len(cluster.commits)
    recorder.release.set()  # the handler of offset 1 now finishes, for an assignment that is gone
    until(lambda: run.stats().dropped_late == 1, "the late completion to be dropped")
    assert commits_of(cluster, P0, since=after_revoke) == []
    assert run.stats().processed == 2
    # The partition comes back: the next owner (us again) reads from the committed offset 1; offset 2
    # finished before the revoke, and the offset map committed with 1 says so: it is not run again.
    assert consumer.rebalance(assign=[P0]).wait(WAIT)
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 3, "offset 1 handled again and 1..2 committed")
    run.stop()
    assert recorder.calls == Counter({(0, 0): 1, (0, 1): 2, (0, 2): 1})  # at least once, never lost


def test_lost_partitions_are_neither_waited_for_nor_committed(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 3})
    recorder = Recorder(block={(0, 1)})
    # Commit only at the start and at the end: what is finished when the loss comes is not yet committed.
    run = start(recorder, REVOKE_TIMEOUT=30.0, COMMIT_INTERVAL=300.0)
    until(lambda: recorder.handled() == {(0, 0), (0, 2)} and (0, 1) in recorder.started, "offsets 0 and 2")
    consumer = cluster.consumer()
    began = time.monotonic()
    assert consumer.lose().wait(WAIT)
    assert time.monotonic() - began < 5.0  # not the 30 s REVOKE_TIMEOUT: a lost partition is not waited for
    assert consumer.assignment_now() == set()
    recorder.release.set()
    until(lambda: run.stats().dropped_late == 1, "the late completion to be dropped")
    stats = run.stop()
    assert commits_of(cluster, P0) == []  # another member may own it now: never committed by us
    assert cluster.committed(GROUP, TOPIC, 0) is None
    assert stats.processed == 2 and stats.assigned == 0


def test_a_retry_waiting_at_revoke_is_dropped_and_the_next_assignment_reads_the_message_again(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 2})
    recorder = Recorder(fail=lambda p, o, n: (p, o, n) == (0, 0, 1))  # offset 0 fails its first call only
    run = start(recorder, MAX_ATTEMPTS=3, RETRY_BACKOFF=60.0, RETRY_BACKOFF_MAX=60.0)
    until(lambda: run.stats().retried == 1 and recorder.handled() == {(0, 1)}, "offset 0 to wait for its retry")
    consumer = cluster.consumer()
    began = time.monotonic()
    assert consumer.rebalance(revoke=[P0]).wait(WAIT)
    assert time.monotonic() - began < 2.0  # a message waiting for its backoff holds up no revoke
    # offset 0 never finished: the commit stays at it (with the offset map noting 1 as finished), never past it
    assert cluster.committed(GROUP, TOPIC, 0) == 0
    # the retry went with the partition (a snapshot taken after the revoke: 2 partitions left)
    until(lambda: (lambda s: (s.assigned, s.backlog) == (2, 0))(run.stats()), "the retry to be dropped")
    assert consumer.rebalance(assign=[P0]).wait(WAIT)
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 2, "offset 0 handled by the new assignment")
    stats = run.stop()
    assert recorder.calls == Counter({(0, 0): 2, (0, 1): 1})  # 1 finished before: the offset map skips it
    assert stats.retried == 1 and stats.failed == 0


# -- the offset map --------------------------------------------------------------------------------------


def test_a_broker_refusing_the_offset_map_gets_offsets_alone_from_then_on_and_the_commits_go_on(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    """``OFFSET_METADATA_TOO_LARGE`` (a broker whose offset.metadata.max.bytes is below the map's bound)."""
    cluster.fill(TOPIC, {0: 10})
    cluster.fail_commits(KafkaError(KafkaError.OFFSET_METADATA_TOO_LARGE, "metadata too large"), count=1)
    recorder = Recorder(block={(0, 2)})  # 3..9 finish above it: every commit of P0 would carry a map
    run = start(recorder)
    until(lambda: recorder.handled() >= {(0, o) for o in range(10)} - {(0, 2)}, "all but offset 2 done")
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 2, "a commit below the blocked offset")
    refused = [i for i, c in enumerate(cluster.commits) if c.error is not None]
    assert refused and cluster.commits[refused[0]].error.code() == KafkaError.OFFSET_METADATA_TOO_LARGE
    after = [c.metadata[P0] for c in cluster.commits[refused[0] + 1:] if P0 in c.metadata]
    assert after and all(meta == "" for meta in after)  # offsets alone from then on
    recorder.release.set()
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 10, "the end committed")
    assert run.stop().processed == 10


def test_the_offset_map_travels_with_the_commit_and_the_next_member_skips_what_finished(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 10})
    first = Recorder(block={(0, 2)})  # offset 2 never finishes under the first member
    run = start(first, SHUTDOWN_TIMEOUT=0.2)
    until(lambda: len(first.handled()) == 9 and (0, 2) in first.started, "every offset but 2")

    def carries_the_map() -> bool:
        done = [c for c in cluster.commits if c.error is None and c.offsets.get(P0) == 2 and c.metadata.get(P0)]
        return bool(done) and set(decode(done[-1].metadata[P0], 2) or ()) == set(range(3, 10))

    until(carries_the_map, "a commit at the unfinished offset 2 carrying 3..9 as finished")
    run.consumer.stop()
    run.join()
    assert cluster.committed(GROUP, TOPIC, 0) == 2

    second = Recorder()
    start(second, idle_exit=0.3).join()  # a new member of the same group on the same cluster
    assert dict(second.calls) == {(0, 2): 1}  # 3..9 finished under the first member: not run again
    assert cluster.committed(GROUP, TOPIC, 0) == 10


def test_a_stale_offset_map_left_by_another_tool_skips_nothing(
    cluster: FakeKafka, start: Callable[..., Run], caplog: pytest.LogCaptureFixture
) -> None:
    """Another tool moved the group back to offset 3 and kept our metadata, a map written at offset 5 that
    says 7 and 8 finished. Read against 3 it would skip two offsets that never ran: it is refused."""
    cluster.fill(TOPIC, {0: 10})
    stale = encode(5, [7, 8])
    assert stale is not None
    tool = cluster.factories().consumer({"group.id": GROUP})
    tool.commit(offsets=[TopicPartition(TOPIC, 0, 3, metadata=stale)], asynchronous=False)
    recorder = Recorder()
    run = start(recorder)
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 10, "the end committed")
    run.stop()
    assert recorder.calls == Counter({(0, o): 1 for o in range(3, 10)})  # every offset from 3 ran, once
    assert "orders[0]: ignoring the commit metadata at offset 3" in caplog.text


# -- failures after the last attempt ------------------------------------------------------------------------


def test_on_failure_stop_commits_exactly_up_to_the_failed_offset(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 10})
    recorder = Recorder(fail=lambda p, o, n: o == 4)
    run = start(recorder, ON_FAILURE="stop", MAX_ATTEMPTS=2)
    with pytest.raises(MessageFailed, match=r"orders\[0\]@4 failed 2 attempts \(ValueError: fails at \(0, 4\)"):
        run.join()
    assert recorder.calls[(0, 4)] == 2
    assert cluster.committed(GROUP, TOPIC, 0) == 4  # a restart begins with the failed message
    assert max(commits_of(cluster, P0)) == 4  # and no commit ever went past it


def test_on_failure_skip_counts_and_commits_past_the_failed_message(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 5})
    recorder = Recorder(fail=lambda p, o, n: o == 2)
    stats = start(recorder, ON_FAILURE="skip", MAX_ATTEMPTS=2, max_messages=5).join()
    assert (stats.processed, stats.failed, stats.skipped, stats.retried) == (5, 1, 1, 1)
    assert recorder.calls[(0, 2)] == 2
    assert cluster.committed(GROUP, TOPIC, 0) == 5


def test_on_failure_dlq_publishes_with_headers_and_commits_only_after_the_delivery(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 5})
    cluster.fail_deliveries(KafkaError(KafkaError._MSG_TIMED_OUT), count=1)  # first try times out: retried
    recorder = Recorder(fail=lambda p, o, n: o == 2)
    stats = start(recorder, ON_FAILURE="dlq", MAX_ATTEMPTS=2, RETRY_BACKOFF_MAX=0.05, max_messages=5).join()
    assert cluster.created_topics == ["orders.dlq"]
    [record] = cluster.messages("orders.dlq")  # exactly one record, although the first publish failed
    original = cluster.messages(TOPIC)[2]
    assert (record.key(), record.value()) == (original.key(), original.value())
    headers = dict(record.headers() or [])
    assert (headers[H_TOPIC], headers[H_PARTITION], headers[H_OFFSET], headers[H_ATTEMPTS]) == (
        b"orders", b"0", b"2", b"2")
    assert (stats.processed, stats.failed, stats.dead_lettered) == (5, 1, 1)
    assert cluster.committed(GROUP, TOPIC, 0) == 5


def test_a_dlq_record_too_large_is_sent_truncated_and_the_partition_moves_on(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 2})
    cluster.produce(TOPIC, 0, b"x" * (TRUNCATED_VALUE_BYTES + 10), key=b"big")
    cluster.fill(TOPIC, {0: 2})
    cluster.fail_deliveries(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), count=1)  # the full record does not fit
    recorder = Recorder(fail=lambda p, o, n: o == 2)
    stats = start(recorder, ON_FAILURE="dlq", max_messages=5).join()
    [record] = cluster.messages("orders.dlq")
    assert record.value() == b"x" * TRUNCATED_VALUE_BYTES and record.key() == b"big"
    headers = dict(record.headers() or [])
    assert (headers[H_OFFSET], headers[H_TRUNCATED]) == (b"2", str(TRUNCATED_VALUE_BYTES + 10).encode())
    assert (stats.processed, stats.dead_lettered) == (5, 1)
    assert cluster.committed(GROUP, TOPIC, 0) == 5


@pytest.mark.parametrize("error, count", [
    (KafkaError.MSG_SIZE_TOO_LARGE, 3),  # as is, value cut, bare: it fits no way
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, 1),  # a permanent error that is not about size
])
def test_a_record_the_dlq_refuses_stops_the_run_without_committing_past_it(
    cluster: FakeKafka, start: Callable[..., Run], error: int, count: int
) -> None:
    cluster.fill(TOPIC, {0: 5})
    cluster.fail_deliveries(KafkaError(error), count=count)  # can never succeed
    recorder = Recorder(fail=lambda p, o, n: o == 2)
    run = start(recorder, ON_FAILURE="dlq", SHUTDOWN_TIMEOUT=20.0)
    with pytest.raises(MessageFailed, match=r"cannot publish orders\[0\]@2 to dead-letter topic orders.dlq"):
        run.join(30)
    # Shutdown does not wait SHUTDOWN_TIMEOUT for a record that was given up.
    assert run.returned_at - cluster.consumer().created_at < 5.0
    assert cluster.messages("orders.dlq") == []
    assert cluster.committed(GROUP, TOPIC, 0) == 2


# -- shutdown -----------------------------------------------------------------------------------------------


def test_shutdown_with_a_handler_that_never_returns_is_bounded_and_commits_before_it(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 3})
    recorder = Recorder(block={(0, 1)})  # released only by the teardown, long after run() returned
    run = start(recorder, SHUTDOWN_TIMEOUT=0.3)
    until(lambda: recorder.handled() == {(0, 0), (0, 2)} and (0, 1) in recorder.started, "offsets 0 and 2")
    asked = time.monotonic()
    run.consumer.stop()
    stats = run.join()
    assert 0.3 <= run.returned_at - asked < 3.0  # waited SHUTDOWN_TIMEOUT for the handler, then gave up
    assert not recorder.release.is_set()  # the handler was still running when run() returned
    assert stats.abandoned == 1
    assert stats.processed == 2
    assert cluster.committed(GROUP, TOPIC, 0) == 1  # offset 1 will be delivered again
    assert cluster.consumer().closed


def test_max_messages_stops_admitting_at_n_so_exactly_n_are_handled_and_committed(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 400, 1: 400, 2: 400})
    recorder = Recorder()  # fast: runs form, and the backlog (MAX_BACKLOG 500) could take far more than 50
    stats = start(recorder, max_messages=50, MAX_BACKLOG=500).join()
    assert stats.processed == 50 and sum(recorder.calls.values()) == 50
    assert max(recorder.calls.values()) == 1
    committed = [cluster.committed(GROUP, TOPIC, p) or 0 for p in range(3)]
    assert sum(committed) == 50  # each partition's handled messages are its first ones: nothing skipped
    assert all((p, o) in recorder.calls for p in range(3) for o in range(committed[p]))


def test_a_spent_budget_waits_for_a_hung_handler_without_refetching_ten_times_a_second(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 50, 1: 50, 2: 50})
    recorder = Recorder(block={(0, 0), (1, 0), (2, 0)})  # the first of a partition hangs: the budget stays spent
    run = start(recorder, max_messages=5)
    until(lambda: len(recorder.handled()) == 4 and len(recorder.started) == 5, "four done, one hanging")
    consumer = cluster.consumer()
    seeks = sum(1 for kind, _ in consumer.calls if kind == "seek")
    time.sleep(2.0)  # real time on purpose: what is measured is how often the poll loop refetches meanwhile
    assert sum(1 for kind, _ in consumer.calls if kind == "seek") - seeks <= 3  # about one a second
    assert sum(recorder.calls.values()) == 5
    recorder.release.set()
    assert run.join().processed == 5


def test_idle_exit_ends_a_run_with_nothing_to_read(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    stats = start(Recorder(), idle_exit=0.2).join()
    assert stats.processed == 0
    assert cluster.consumer().closed


def test_idle_exit_waits_for_the_group_after_a_lost_assignment(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    """Membership expired (e.g. every broker down for longer than the session): until the group assigns again the
    member waits for the group, which is not idleness; messages produced meanwhile are read after the rejoin."""
    cluster.fill(TOPIC, {0: 2})
    recorder = Recorder()
    run = start(recorder, idle_exit=0.2)
    until(lambda: recorder.handled() == {(0, 0), (0, 1)}, "the first two handled")
    consumer = cluster.consumer()
    assert consumer.lose().wait(WAIT)
    cluster.fill(TOPIC, {0: 2})
    time.sleep(1.0)  # five idle_exit spells with nothing assigned (the engine's own clock: real time)
    assert run.alive, "the run ended while waiting for the group"
    assert consumer.rebalance(assign=[P0, P1, P2]).wait(WAIT)
    run.join()
    assert recorder.handled() == {(0, 0), (0, 1), (0, 2), (0, 3)}


# -- pause / resume -----------------------------------------------------------------------------------------


def test_saturated_pool_pauses_every_partition_bounds_the_fetch_then_resumes(
    cluster: FakeKafka, start: Callable[..., Run], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mtc75.engine.backpressure")
    cluster.fill(TOPIC, {0: 50, 1: 50, 2: 50})
    blocked = {(p, o) for p in range(3) for o in range(50)}
    recorder = Recorder(block=blocked)
    run = start(recorder, MAX_THREAD_COUNT=2, MAX_BACKLOG=4, PAUSE_INTERVAL=0.05)
    consumer = cluster.consumer()
    until(lambda: run.stats().paused and consumer.paused == {P0, P1, P2}, "every partition paused")
    fetched = consumer.fetched
    assert fetched <= 4 + 2  # at most MAX_BACKLOG waiting plus one message per thread
    assert run.stats().active_threads == 2 and run.stats().backlog <= 4
    recorder.release.set()
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 50 and cluster.committed(GROUP, TOPIC, 1) == 50
          and cluster.committed(GROUP, TOPIC, 2) == 50, "everything handled and committed")
    stats = run.stop()
    assert stats.processed == 150 and stats.pauses >= 1 and stats.max_active_threads == 2
    assert recorder.calls == Counter({tp: 1 for tp in blocked})
    kinds = [kind for kind, _ in consumer.calls]
    first_resume = kinds.index("resume", kinds.index("pause"))
    assert "seek" in kinds[first_resume:]  # the fetcher was woken at the resumed position
    # Pausing is normal operation: INFO, marked for the CLI's colours by its event, not its level.
    events = [(r.levelno, r.mtc75_event) for r in caplog.records if hasattr(r, "mtc75_event")]
    assert (logging.INFO, "pause") in events and (logging.INFO, "resume") in events
    assert {level for level, _ in events} == {logging.INFO}


# -- Kafka errors -------------------------------------------------------------------------------------------


def test_failed_async_commits_are_retried_until_they_succeed(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fail_commits(KafkaError(KafkaError.REBALANCE_IN_PROGRESS), count=2)
    cluster.fill(TOPIC, {0: 5})
    run = start(Recorder())
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 5, "the commit to get through")
    run.stop()
    tried = [(c.offsets.get(P0), c.error is None) for c in cluster.commits if P0 in c.offsets]
    assert [ok for _, ok in tried[:3]] == [False, False, True]
    assert all(not c.outside for c in cluster.commits)


def test_a_failed_commit_at_revoke_is_survived_and_the_work_is_delivered_again(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 3})
    recorder = Recorder()
    run = start(recorder, COMMIT_INTERVAL=300.0)  # only the revoke would commit
    until(lambda: len(recorder.handled()) == 3, "three messages")
    cluster.fail_commits(KafkaError(KafkaError._TIMED_OUT))
    consumer = cluster.consumer()
    assert consumer.rebalance(revoke=[P0]).wait(WAIT)
    assert cluster.committed(GROUP, TOPIC, 0) is None
    assert consumer.rebalance(assign=[P0]).wait(WAIT)
    until(lambda: sum(recorder.calls.values()) == 6, "the uncommitted messages delivered again")
    stats = run.stop()
    assert recorder.calls == Counter({(0, 0): 2, (0, 1): 2, (0, 2): 2})
    assert cluster.committed(GROUP, TOPIC, 0) == 3 and stats.processed == 6


def test_a_transient_fetch_error_is_logged_and_consumption_goes_on(
    cluster: FakeKafka, start: Callable[..., Run], caplog: pytest.LogCaptureFixture
) -> None:
    cluster.fail_fetch(KafkaError(KafkaError._TRANSPORT, "connection reset"))
    cluster.fill(TOPIC, {1: 4})
    stats = start(Recorder(), max_messages=4).join()
    assert stats.processed == 4 and cluster.committed(GROUP, TOPIC, 1) == 4
    assert "consumer error: connection reset" in caplog.text


def test_without_topic_ids_a_fetch_error_for_a_missing_topic_ends_the_run_after_committing_what_was_done(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.describe_error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)  # the topic watch is off
    cluster.fill(TOPIC, {0: 3})
    recorder = Recorder()
    run = start(recorder)
    until(lambda: len(recorder.handled()) == 3, "three messages")
    cluster.fail_fetch(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "topic deleted"))
    with pytest.raises(KafkaUnavailable, match="consumer error: topic deleted"):
        run.join()
    assert cluster.committed(GROUP, TOPIC, 0) == 3


def test_a_fatal_error_fails_the_run_and_nothing_is_committed_after_it(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 3})
    recorder = Recorder(block={(0, 2)})
    run = start(recorder, COMMIT_INTERVAL=300.0)
    until(lambda: recorder.handled() == {(0, 0), (0, 1)} and (0, 2) in recorder.started, "two messages")
    before = len(cluster.commits)
    cluster.client_error(KafkaError(KafkaError._FATAL, "fenced by a newer instance", fatal=True))
    until(lambda: cluster.consumer().fatal is not None, "the fatal error to be served")
    recorder.release.set()
    with pytest.raises(KafkaFatalError, match="fatal Kafka error: fenced by a newer instance"):
        run.join()
    assert commits_of(cluster, P0, since=before) == []
    assert cluster.committed(GROUP, TOPIC, 0) is None


def test_every_broker_down_longer_than_the_budget_fails_the_run(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    cluster.fill(TOPIC, {0: 2})
    recorder = Recorder()
    run = start(recorder, BROKER_DOWN_TIMEOUT=0.3, COMMIT_INTERVAL=300.0)
    until(lambda: len(recorder.handled()) == 2, "two messages")
    before = len(cluster.commits)
    cluster.unreachable = True
    cluster.client_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "all brokers down"))
    with pytest.raises(KafkaUnavailable, match=r"no broker reachable for 0.3s"):
        run.join()
    assert cluster.commits[before:] == []  # commits to no broker are not even tried


# -- start-up -----------------------------------------------------------------------------------------------


def test_a_missing_topic_or_an_unreachable_cluster_is_a_typed_error_without_cli_advice(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    with pytest.raises(TopicNotFound, match=r"topic 'missing' does not exist on 127\.0\.0\.1:9092$"):
        start(Recorder(), TOPIC="missing").join()
    cluster.unreachable = True
    with pytest.raises(BrokerUnreachable, match=r"^cannot reach Kafka at 127.0.0.1:9092 within 10s \(.*\)$"):
        start(Recorder()).join()


# -- hostile handlers ---------------------------------------------------------------------------------------


def test_a_handler_raising_system_exit_is_a_failure_like_any_other(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    def handler(message: Any) -> None:
        if message.offset() == 1 and not calls:
            calls.append(1)
            raise SystemExit("the handler called sys.exit()")

    calls: list[int] = []
    cluster.fill(TOPIC, {0: 3})
    stats = start(handler, MAX_ATTEMPTS=2, max_messages=3).join()
    assert (stats.processed, stats.retried, stats.failed) == (3, 1, 0)
    assert cluster.committed(GROUP, TOPIC, 0) == 3  # the partition did not stall behind offset 1


def test_an_async_generator_handler_is_refused_before_any_client_is_built(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    async def handler(message: Any) -> Any:
        yield message

    with pytest.raises(HandlerRefused, match="is an async generator"):
        start(handler)
    assert cluster.consumers == []


def test_an_async_handler_is_not_silently_counted_as_done(cluster: FakeKafka, start: Callable[..., Run]) -> None:
    async def work(message: Any) -> None:
        ran.append(message.offset())

    def handler(message: Any) -> Any:  # a plain function that hides a coroutine: caught at run time
        return work(message)

    ran: list[int] = []
    cluster.fill(TOPIC, {0: 2})
    stats = start(handler, ON_FAILURE="skip", max_messages=2).join()
    assert (stats.failed, stats.skipped) == (2, 2)  # each call returned an un-awaited coroutine: a failure
    assert ran == []


# -- the topic deleted or re-created (topic ids) ------------------------------------------------------------


def test_a_recreated_topic_is_read_from_the_start_and_no_offset_of_it_is_committed_unhandled(
    cluster: FakeKafka, start: Callable[..., Run]
) -> None:
    cluster.fill(TOPIC, {0: 5, 1: 5, 2: 5})
    seen: list[bytes] = []
    lock = threading.Lock()

    def handler(message: Any) -> None:
        with lock:
            seen.append(message.value())

    run = start(handler)
    until(lambda: [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [5, 5, 5], "the old topic committed")
    cluster.recreate_topic(TOPIC, 3)
    for p in range(3):
        for i in range(8):
            cluster.produce(TOPIC, p, b"new %d/%d" % (p, i))
    # librdkafka would go on at offset 5 and skip 0-4 of the new topic: the topic id check resets it.
    until(lambda: [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [8, 8, 8], "the new topic committed")
    run.stop()
    with lock:
        new = {v for v in seen if v.startswith(b"new")}
    # Every new message handled (at least once: what was fetched at the old positions before the check
    # noticed the new id is handled again after the reset, never committed from the old positions).
    assert new == {b"new %d/%d" % (p, i) for p in range(3) for i in range(8)}
    assert cluster.describes > 0


def test_a_deleted_topic_stops_the_run_after_the_grace_and_nothing_is_committed_meanwhile(
    cluster: FakeKafka, start: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topicguard_module, "TOPIC_GONE_GRACE", 0.3)
    cluster.fill(TOPIC, {0: 3})
    recorder = Recorder()
    run = start(recorder)
    until(lambda: cluster.committed(GROUP, TOPIC, 0) == 3, "three messages committed")
    cluster.delete_topic(TOPIC)
    before = len(cluster.commits)
    cluster.fail_fetch(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "topic deleted"))
    with pytest.raises(TopicGone, match=r"topic 'orders' was deleted while consuming and not re-created"):
        run.join()
    assert TopicGone.exit_code == 3
    assert [c for c in cluster.commits[before:] if c.error is None] == []


def test_retries_waiting_out_their_backoff_leave_the_pool_other_work_even_with_a_small_backlog_bound(
    cluster: FakeKafka, start: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One thread, a high watermark of two messages, offsets 1 and 2 fail once with a 1 s backoff: the
    messages after them run during the backoff; the two retries do not pause the consumer (a retry holds no
    thread, nor the room the pool needs). The watermarks are fixed and a saturated pool gets 10 s to drain,
    so only a pause the retries cause can count (a slow thread on a loaded machine cannot)."""
    from mtc75.core.gate import PauseGate
    from mtc75.engine import backpressure

    monkeypatch.setattr(PauseGate, "watermarks", lambda self, limit, unit=1: (1, 2))
    monkeypatch.setattr(backpressure, "SATURATION_GRACE", 10.0)
    cluster.fill(TOPIC, {0: 8})
    order: list[tuple[int, int]] = []  # (offset, attempt)
    attempts: Counter[int] = Counter()

    def handler(message: Any) -> None:
        offset = message.offset()
        attempts[offset] += 1
        order.append((offset, attempts[offset]))
        threading.Event().wait(0.05)
        if offset in (1, 2) and attempts[offset] == 1:
            raise ValueError("once")

    stats = start(handler, max_messages=8, MAX_THREAD_COUNT=1, MAX_ATTEMPTS=2, RETRY_BACKOFF=1.0,
                  RETRY_BACKOFF_MAX=1.0, PAUSE_INTERVAL=10.0).join()
    first_retry = order.index((1, 2))
    assert {offset for offset, attempt in order[:first_retry] if attempt == 1} >= {3, 4, 5}, order
    assert stats.processed == 8 and stats.retried == 2 and stats.pauses == 0


# -- a stalled poll thread --------------------------------------------------------------------------------


@pytest.mark.parametrize("held", [True, False])
def test_a_poll_loop_turn_that_lasts_is_said_with_where_the_poll_thread_is_and_a_turning_one_never(
    cluster: FakeKafka, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, held: bool,
) -> None:
    monkeypatch.setattr(faults_module, "STALL_SECONDS", 0.3)
    cluster.fill(TOPIC, {0: 5})
    once = threading.Event()

    def a_wait_nobody_bounded(_stats: Stats) -> None:  # on_status runs on the poll thread
        if held and not once.is_set():
            once.set()
            time.sleep(1.0)

    consumer = testing.from_settings(cluster.factories(), lambda _msg: None, fast_settings(),
                                     on_status=a_wait_nobody_bounded, status_interval=0.01)
    with caplog.at_level(logging.WARNING, logger="mtc75.engine.faults"):
        # held: ends at the 5th message, after the hold; turning: goes on idle for 0.8 s, past STALL_SECONDS
        stats = consumer.run(max_messages=5) if held else consumer.run(idle_exit=0.8)
    said = [r.getMessage() for r in caplog.records if "one loop turn" in r.getMessage()]
    assert stats.processed == 5
    if held:  # said while held (at 0.3 s, then again each 0.3 s), naming where
        assert 1 <= len(said) <= 4 and all("a_wait_nobody_bounded" in line for line in said), said
    else:
        assert said == []
