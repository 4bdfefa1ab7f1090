"""An in-memory, deterministic stand-in for the confluent-kafka clients the engine uses.

:class:`FakeKafka` is the cluster: topics of partitions holding messages, committed offsets per group,
and the faults a test injects. ``FakeKafka.factories()`` is what ``mtc75.testing.consumer(factories, ...)`` takes; the
engine then builds a :class:`FakeConsumer` (and, for ``ON_FAILURE=dlq``, a :class:`FakeProducer` and a
:class:`FakeAdmin`) from it. Nothing here sleeps or reads a clock except ``consume``/``poll`` waiting,
bounded by their timeout (and by ``FakeKafka.poll_wait``), for something to deliver.

Surface of FakeConsumer (what the engine calls): subscribe (on_assign / on_revoke / on_lost), consume,
poll, assign / unassign, incremental_assign / incremental_unassign, assignment, pause / resume, seek
(logical offsets too), position, commit (sync and async, with ``on_commit``; each partition's
``metadata`` -- the offset map -- is stored and ``committed()`` returns it), committed,
get_watermark_offsets, list_topics, consumer_group_metadata, close; ``error_cb`` from the config. FakeAdmin:
list_topics, create_topics, describe_topics (the topic id the engine's topic watch asks for; a test may hold the
answers, :meth:`FakeKafka.hold_describes`, to act while a check is in flight). Every ``commit()`` is kept,
in order, in ``FakeKafka.commits`` (the whole commit history a test asserts on).

Transactions: a FakeProducer with ``transactional.id`` has init_transactions, begin_transaction,
send_offsets_to_transaction, commit_transaction and abort_transaction. Its records are held until the
transaction commits and dropped when it aborts (the log holds only what a read_committed reader sees), and
its offsets are the group's commit once it commits. A second producer with the same transactional.id fences
the first at init_transactions (its next call raises a fatal error). :meth:`FakeKafka.fail_transactions`
makes the next commits fail; ``FakeKafka.transactions`` counts what happened.
Like librdkafka, every callback runs on the thread that calls
consume / poll / close, never on the test's thread; rebalances are queued by the test
(:meth:`FakeConsumer.rebalance`, :meth:`FakeConsumer.lose`) and served by the next consume / poll.
With an eager assignor a rebalance revokes the whole assignment and assigns the new one, with a
cooperative one only the difference; assign() under a cooperative assignor (and the reverse) raises,
as librdkafka does. A pause flag survives unassign, the worst case librdkafka shows.

Statistics: a consumer configured with ``statistics.interval.ms`` gets ``stats_cb`` called at every
consume / poll (no clock) with librdkafka's top-level ``rx_bytes``, ``rxmsg_bytes`` and ``rxmsgs`` for what
it fetched so far; a topic's bytes on the wire are its payload divided by :meth:`FakeKafka.compress`'s
ratio (1: uncompressed). Such a consumer is the engine's fetch probe (mtc75.kafka.fetchprobe): it is kept
in ``FakeKafka.probes``, not ``consumers``, so :meth:`FakeKafka.consumer` still finds the engine's, and
injected fetch and client errors are left for the engine's consumer.

Topics carry an id, as in Kafka 4: :meth:`FakeKafka.delete_topic` and :meth:`FakeKafka.recreate_topic`
do what an administrator does while a consumer runs. Like librdkafka, a consumer goes on fetching a
re-created topic at its old positions (it does not notice the new id by itself); a deleted topic's
partitions deliver nothing.

Subscriptions: a list of names and patterns (librdkafka's form: an entry starting with ``^`` is a regular
expression; ``topic.blacklist`` in the config hides topics from patterns). Like librdkafka's metadata
refresh, but at every consume / poll (no clock): a topic created later that a pattern matches is assigned
(a rebalance), and one a pattern matched that is deleted is revoked. A deleted *named* topic stays
assigned unless ``FakeKafka.revoke_deleted_names`` is set (librdkafka revokes it at its next refresh; the
older scenarios were written without that). :meth:`FakeKafka.recreate_topic` is atomic for a refresh.

Threads: the test thread calls FakeKafka and the rebalance / injection methods; one thread (the
engine's poll thread) calls the client methods. One lock guards all state; callbacks run without it.
A client call from a second thread is recorded in ``FakeKafka.violations`` (the engine promises one).
The one handover allowed is ``close()``: the engine runs it on a helper thread while the poll thread
waits for it (bounded), so from then on that thread owns the consumer (close's revoke callback runs there).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, OFFSET_INVALID, KafkaError, KafkaException, TopicPartition

from mtc75.kafka.clients import ClientFactories
from mtc75.runtime.procworker import PlainMessage

Partition = tuple[str, int]


class FakeMessage(PlainMessage):
    """What ``Consumer.poll`` returns: the accessor methods of confluent_kafka.Message (a worker process's
    PlainMessage, plus ``error()``)."""

    __slots__ = ("_error",)

    def __init__(
        self, topic: str, partition: int, offset: int, value: bytes | None = None, key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None, error: KafkaError | None = None,
    ) -> None:
        super().__init__(topic, partition, offset, key, value, headers)
        self._error = error

    def error(self) -> KafkaError | None:  # type: ignore[override]
        return self._error

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return FakeMessage, (self._topic, self._partition, self._offset, self._value, self._key, self._headers,
                             self._error)

    def __repr__(self) -> str:
        return f"FakeMessage({self._topic}[{self._partition}]@{self._offset})"


@dataclass
class CommitCall:
    """One ``commit()`` as the engine made it, and what became of it."""

    offsets: dict[Partition, int]
    asynchronous: bool
    error: KafkaError | None  # the injected failure, None when it succeeded
    outside: list[Partition]  # partitions committed while not assigned to the committer
    metadata: dict[Partition, str] = field(default_factory=dict)  # TopicPartition.metadata of each (the offset map)


@dataclass
class _TopicMeta:
    topic: str
    partitions: dict[int, Any]
    error: KafkaError | None = None


@dataclass
class _TopicDescription:
    name: str
    topic_id: str  # confluent-kafka's is a Uuid; the engine only compares its str()
    partitions: list[int]


@dataclass
class _Metadata:
    topics: dict[str, _TopicMeta] = field(default_factory=dict)
    brokers: dict[int, object] = field(default_factory=lambda: {1: object()})  # one broker, as ClusterMetadata


class FakeKafka:
    """The in-memory cluster. Test thread: produce, inject faults, read committed offsets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified on produce and on queued events
        self._logs: dict[str, list[list[FakeMessage]]] = {}
        self._committed: dict[tuple[str, Partition], int] = {}  # (group, partition) -> next offset to read
        self._commit_metadata: dict[tuple[str, Partition], str] = {}  # (group, partition) -> the commit's metadata
        self.commits: list[CommitCall] = []  # every commit() call, in order
        self.consumers: list[FakeConsumer] = []
        self.probes: list[FakeConsumer] = []  # consumers with statistics: the fetch probe's
        self._ratios: dict[str, float] = {}  # topic -> payload bytes per byte on the wire
        self.producers: list[FakeProducer] = []
        self.created_topics: list[str] = []  # by FakeAdmin.create_topics
        self._topic_ids: dict[str, str] = {}  # topic -> id of its current incarnation
        self._next_id = 0
        self.describes = 0  # describe_topics requests served (the topic watch's checks)
        self.describe_error: KafkaError | None = None  # describe_topics fails with this while set
        self._held_describes: list[tuple[str, Future[Any]]] | None = None  # set by hold_describes
        self.violations: list[str] = []  # broken promises of the engine (e.g. a call from a second thread)
        self.unreachable = False  # list_topics / metadata fail with _TRANSPORT while set
        self.revoke_deleted_names = False  # a deleted named topic's partitions are revoked at the next refresh
        self.create_errors: deque[KafkaError] = deque()  # the next create_topics requests fail with these
        # While set and not yet set free: create_topics answers only once it is (a slow or stuck controller)
        self.create_hold: threading.Event | None = None
        self.create_requests = 0  # create_topics calls served
        # Longest a consume / poll with nothing to deliver blocks, whatever timeout it was given (None: the
        # whole timeout, as librdkafka). An empty poll that returns early only turns the engine's loop sooner,
        # which it must take in its stride; a scenario then steps on without waiting out the engine's
        # POLL_TIMEOUT (0.1 s) at each step (test_engine_unit.py and the like: 3x faster).
        self.poll_wait: float | None = 0.01
        self._commit_errors: deque[KafkaError] = deque()
        self._fetch_errors: deque[tuple[KafkaError, str | None]] = deque()
        self._client_errors: deque[KafkaError] = deque()
        self._delivery_errors: deque[KafkaError] = deque()
        self._txn_errors: deque[KafkaError] = deque()  # commit_transaction raises these, one per call
        self._txn_epochs: dict[str, int] = {}  # transactional.id -> epoch of its newest producer
        self.transactions = {"committed": 0, "aborted": 0}

    def factories(self) -> ClientFactories:
        return ClientFactories(consumer=self._new_consumer, producer=self._new_producer, admin=FakeAdmin.factory(self))

    # -- the test's side ----------------------------------------------------------------------------

    def create_topic(self, topic: str, partitions: int) -> None:
        with self._lock:
            if topic not in self._logs:
                self._logs[topic] = [[] for _ in range(partitions)]
                self._new_id(topic)

    def compress(self, topic: str, ratio: float) -> None:
        """``topic``'s payload takes 1/``ratio`` of its bytes on the wire (the fetch probe's statistics)."""
        with self._lock:
            self._ratios[topic] = ratio

    def delete_topic(self, topic: str) -> None:
        """The topic, its messages and its group offsets go away (as a delete does in Kafka)."""
        with self._changed:
            self._delete(topic)
            self._changed.notify_all()

    def _delete(self, topic: str) -> None:
        """Caller holds the lock."""
        del self._logs[topic]
        self._topic_ids.pop(topic)
        for key in [k for k in self._committed if k[1][0] == topic]:
            del self._committed[key]
            self._commit_metadata.pop(key, None)

    def recreate_topic(self, topic: str, partitions: int) -> None:
        """Delete ``topic`` (if it exists) and create it again, empty, with a new topic id; no consumer's
        refresh sees it missing in between."""
        with self._changed:
            if topic in self._logs:
                self._delete(topic)
            self._logs[topic] = [[] for _ in range(partitions)]
            self._new_id(topic)
            self._changed.notify_all()

    def topic_id(self, topic: str) -> str | None:
        with self._lock:
            return self._topic_ids.get(topic)

    def _new_id(self, topic: str) -> None:
        """Caller holds the lock."""
        self._next_id += 1
        self._topic_ids[topic] = f"fake-topic-id-{self._next_id}"

    def produce(self, topic: str, partition: int, value: bytes | None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None) -> int:
        """Append one message; returns its offset."""
        with self._changed:
            log = self._logs[topic][partition]
            log.append(FakeMessage(topic, partition, len(log), value, key, headers))
            self._changed.notify_all()
            return len(log) - 1

    def fill(self, topic: str, counts: dict[int, int]) -> None:
        """``counts[p]`` messages ``b'{"id": <offset>}'`` on each partition ``p``."""
        for partition, count in counts.items():
            for _ in range(count):
                offset = len(self._logs[topic][partition])
                self.produce(topic, partition, b'{"id": %d}' % offset, key=b"k%d" % offset)

    def messages(self, topic: str) -> list[FakeMessage]:
        with self._lock:
            return [m for log in self._logs.get(topic, []) for m in log]

    def committed(self, group: str, topic: str, partition: int) -> int | None:
        with self._lock:
            return self._committed.get((group, (topic, partition)))

    def fail_commits(self, error: KafkaError, count: int = 1) -> None:
        """The next ``count`` commits fail with ``error`` (sync: raised; async: via on_commit)."""
        with self._lock:
            self._commit_errors.extend([error] * count)

    def fail_fetch(self, error: KafkaError, topic: str | None = None) -> None:
        """The next consume/poll returns a message whose ``error()`` is ``error`` (of ``topic``: default, the
        subscription's first entry)."""
        with self._changed:
            self._fetch_errors.append((error, topic))
            self._changed.notify_all()

    def client_error(self, error: KafkaError) -> None:
        """The next consume/poll calls the config's ``error_cb`` with ``error`` (fatal ones stick)."""
        with self._changed:
            self._client_errors.append(error)
            self._changed.notify_all()

    def fail_transactions(self, error: KafkaError, count: int = 1) -> None:
        """The next ``count`` commit_transaction calls raise ``error``."""
        with self._lock:
            self._txn_errors.extend([error] * count)

    def fail_deliveries(self, error: KafkaError, count: int = 1) -> None:
        """The next ``count`` produced records get ``error`` in their delivery report."""
        with self._lock:
            self._delivery_errors.extend([error] * count)

    def hold_describes(self) -> None:
        """From now on a describe_topics request stays unanswered (a topic-id check in flight) until
        :meth:`answer_describes`, which answers with the cluster as it is then, as a broker would."""
        with self._lock:
            if self._held_describes is None:
                self._held_describes = []

    @property
    def held_describes(self) -> int:
        """describe_topics requests waiting for :meth:`answer_describes`."""
        with self._lock:
            return len(self._held_describes or ())

    def wait_held_describes(self, count: int, timeout: float = 5.0) -> None:
        """Wait (bounded) until ``count`` describe_topics requests are held."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._held_describes or ()) < count:
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"{len(self._held_describes or ())} describe requests held after "
                                         f"{timeout}s, not {count}")

    def answer_describes(self, hold: bool = True) -> int:
        """Answer every held describe_topics request now (in the order they came); with ``hold=False``
        stop holding, so later ones are answered at once again. Returns how many were answered."""
        with self._lock:
            held = self._held_describes or []
            self._held_describes = [] if hold else None
        for topic, future in held:
            self._answer(topic, future)
        return len(held)

    def consumer(self, timeout: float = 5.0) -> FakeConsumer:
        """The consumer the engine built (waits, bounded, for it to exist)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self.consumers:
                if not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"no consumer was created within {timeout}s")
            return self.consumers[-1]

    # -- shared by the fake clients (caller holds no lock) ------------------------------------------

    def _new_consumer(self, conf: dict[str, Any]) -> FakeConsumer:
        consumer = FakeConsumer(self, conf)
        with self._changed:
            (self.probes if consumer.stats_cb is not None else self.consumers).append(consumer)
            self._changed.notify_all()
        return consumer

    def _new_producer(self, conf: dict[str, Any]) -> FakeProducer:
        producer = FakeProducer(self, conf)
        with self._lock:
            self.producers.append(producer)
        return producer

    def _metadata(self, topic: str | None) -> _Metadata:
        if self.unreachable:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "fake: no broker reachable"))
        with self._lock:
            names = [topic] if topic is not None else list(self._logs)
            out = _Metadata()
            for name in names:
                log = self._logs.get(name)
                if log is None:
                    out.topics[name] = _TopicMeta(name, {}, KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
                else:
                    out.topics[name] = _TopicMeta(name, {p: object() for p in range(len(log))})
            return out

    def _describe(self, topic: str) -> Future[Any]:
        """What ``AdminClient.describe_topics`` returns for one topic: a future of its description
        (answered at once, or by :meth:`answer_describes` while :meth:`hold_describes` holds them)."""
        future: Future[Any] = Future()
        with self._changed:
            self.describes += 1
            if self._held_describes is not None:
                self._held_describes.append((topic, future))
                self._changed.notify_all()
                return future
        self._answer(topic, future)
        return future

    def _answer(self, topic: str, future: Future[Any]) -> None:
        """Settle one describe request with the cluster as it is now (caller holds no lock)."""
        with self._lock:
            topic_id = self._topic_ids.get(topic)
            partitions = len(self._logs.get(topic, []))
        if self.unreachable:
            future.set_exception(KafkaException(KafkaError(KafkaError._TRANSPORT, "fake: no broker reachable")))
        elif self.describe_error is not None:
            future.set_exception(KafkaException(self.describe_error))
        elif topic_id is None:
            future.set_exception(KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)))
        else:
            future.set_result(_TopicDescription(topic, topic_id, list(range(partitions))))


class FakeConsumer:
    """confluent_kafka.Consumer in memory. Engine's poll thread: every method; test thread: rebalance, lose."""

    def __init__(self, cluster: FakeKafka, conf: dict[str, Any]) -> None:
        self._cluster = cluster
        self._lock = cluster._lock
        self.conf = conf
        self.group = str(conf["group.id"])
        self.cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self._reset = str(conf.get("auto.offset.reset", "latest"))
        self._error_cb: Callable[[KafkaError], None] | None = conf.get("error_cb")
        self._on_commit: Callable[[KafkaError | None, list[TopicPartition]], None] | None = conf.get("on_commit")
        self.stats_cb: Callable[[str], None] | None = (
            conf.get("stats_cb") if int(conf.get("statistics.interval.ms", 0)) > 0 else None)
        self._rx = {"rx_bytes": 0, "rxmsg_bytes": 0, "rxmsgs": 0}  # librdkafka's names (STATISTICS.md)
        self._topics: list[str] = []
        self._subscribed: set[str] = set()  # the topics the subscription covered at the last refresh
        self._callbacks: dict[str, Callable[..., None] | None] = {}
        self._assigned: dict[Partition, int] = {}  # partition -> next offset to fetch
        self._positions: dict[Partition, int] = {}  # partition -> last delivered + 1
        self.paused: set[Partition] = set()  # librdkafka's flag: survives unassign
        self._events: deque[tuple[str, list[Partition], list[Partition], threading.Event]] = deque()
        self._commit_reports: deque[tuple[KafkaError | None, list[TopicPartition]]] = deque()
        self._thread: int | None = None
        self._rotation = 0
        self.fatal: KafkaError | None = None
        self.closed = False
        self.calls: list[tuple[str, Any]] = []  # pause / resume / seek / assign calls, for assertions
        self.fetched = 0  # messages handed to the engine so far
        self.created_at = time.monotonic()
        self._in_rebalance = False

    # -- the test's side ----------------------------------------------------------------------------

    def rebalance(self, revoke: Iterable[Partition] = (), assign: Iterable[Partition] = ()) -> threading.Event:
        """Queue a rebalance; the returned event is set once its callbacks returned (on the poll thread)."""
        return self._queue("rebalance", list(revoke), list(assign))

    def lose(self) -> threading.Event:
        """Queue the loss of the whole assignment (membership expired): ``on_lost`` is called."""
        return self._queue("lost", [], [])

    def assignment_now(self) -> set[Partition]:
        with self._lock:
            return set(self._assigned)

    def _queue(self, kind: str, revoke: list[Partition], assign: list[Partition]) -> threading.Event:
        done = threading.Event()
        with self._cluster._changed:
            self._events.append((kind, revoke, assign, done))
            self._cluster._changed.notify_all()
        return done

    # -- confluent_kafka.Consumer -------------------------------------------------------------------

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None) -> None:
        self._enter("subscribe")
        for entry in topics:
            if entry.startswith("^"):
                try:
                    re.compile(entry)
                except re.error:
                    raise KafkaException(KafkaError(KafkaError._INVALID_ARG, "Failed to set subscription")) from None
        self._topics = list(topics)
        self._callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        with self._lock:
            self._subscribed = self._matching()
            everything = [(t, p) for t in sorted(self._subscribed) for p in range(len(self._cluster._logs[t]))]
        self._queue("rebalance", [], everything)  # the group's first assignment: all partitions

    def _matching(self) -> set[str]:
        """Caller holds the lock: the existing topics the subscription names or its patterns match."""
        logs = self._cluster._logs
        hidden = [x.strip() for x in str(self.conf.get("topic.blacklist", "")).split(",") if x.strip()]
        out = {t for t in self._topics if not t.startswith("^") and t in logs}
        for pattern in (t for t in self._topics if t.startswith("^")):
            out |= {t for t in logs if re.search(pattern, t) and not any(re.search(x, t) for x in hidden)}
        return out

    def _refresh(self) -> None:
        """librdkafka's metadata refresh: new matches assigned, deleted topics of patterns (and, if the cluster
        says so, of names) revoked, through a rebalance the next consume / poll serves."""
        if not self._topics or self.stats_cb is not None:
            return
        with self._lock:
            now = self._matching()
            named = {t for t in self._topics if not t.startswith("^")}
            added = now - self._subscribed
            gone = {t for t in self._subscribed - now
                    if t not in named or self._cluster.revoke_deleted_names}
            if not added and not gone:
                return
            self._subscribed = (self._subscribed | added) - gone
            assign = [(t, p) for t in sorted(added) for p in range(len(self._cluster._logs[t]))]
            revoke = [tp for tp in self._assigned if tp[0] in gone]
        self._queue("rebalance", revoke, assign)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        self._enter("consume")
        self._refresh()
        wait = max(0.0, timeout)
        if self._cluster.poll_wait is not None:
            wait = min(wait, self._cluster.poll_wait)
        deadline = time.monotonic() + wait
        while True:
            self._serve()
            with self._cluster._changed:
                out = self._fetch(num_messages)
                if out or self._events or (self._cluster._client_errors and self.stats_cb is None):
                    if out:
                        return out
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cluster._changed.wait(remaining)

    def poll(self, timeout: float = -1) -> FakeMessage | None:
        got = self.consume(1, timeout)
        return got[0] if got else None

    def assign(self, partitions: list[TopicPartition]) -> None:
        self._enter("assign")
        if self.cooperative:
            raise KafkaException(KafkaError(KafkaError._STATE, "fake: assign() with a cooperative assignor"))
        with self._lock:
            self._assigned.clear()
            self._add(partitions)
        self.calls.append(("assign", _tps(partitions)))

    def unassign(self) -> None:
        self._enter("unassign")
        if self.cooperative:
            raise KafkaException(KafkaError(KafkaError._STATE, "fake: unassign() with a cooperative assignor"))
        with self._lock:
            self._assigned.clear()
        self.calls.append(("unassign", []))

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        self._enter("incremental_assign")
        if not self.cooperative:
            raise KafkaException(KafkaError(KafkaError._STATE, "fake: incremental_assign() with an eager assignor"))
        with self._lock:
            self._add(partitions)
        self.calls.append(("incremental_assign", _tps(partitions)))

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        self._enter("incremental_unassign")
        if not self.cooperative:
            raise KafkaException(KafkaError(KafkaError._STATE, "fake: incremental_unassign() with an eager assignor"))
        with self._lock:
            for tp in _tps(partitions):
                self._assigned.pop(tp, None)
        self.calls.append(("incremental_unassign", _tps(partitions)))

    def assignment(self) -> list[TopicPartition]:
        self._enter("assignment")
        with self._lock:
            return [TopicPartition(t, p) for t, p in self._assigned]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self._enter("pause")
        with self._lock:
            self.paused.update(tp for tp in _tps(partitions) if tp in self._assigned)  # unassigned: no effect
        self.calls.append(("pause", _tps(partitions)))

    def resume(self, partitions: list[TopicPartition]) -> None:
        self._enter("resume")
        with self._cluster._changed:
            self.paused.difference_update(_tps(partitions))
            self._cluster._changed.notify_all()
        self.calls.append(("resume", _tps(partitions)))

    def seek(self, partition: TopicPartition) -> None:
        self._enter("seek")
        tp = (partition.topic, partition.partition)
        with self._lock:
            if tp not in self._assigned:
                raise KafkaException(KafkaError(KafkaError._STATE, f"fake: seek on unassigned {tp}"))
            offset = partition.offset
            if offset in (OFFSET_BEGINNING, OFFSET_END):
                logs = self._cluster._logs.get(tp[0])
                offset = 0 if offset == OFFSET_BEGINNING or logs is None else len(logs[tp[1]])
            self._assigned[tp] = offset
            # as librdkafka (rd_kafka_toppar_op_seek, #3567): a seek resets the application position, so
            # position() says nothing until the next delivery (a stale one would undo the seek on resume)
            self._positions.pop(tp, None)
        self.calls.append(("seek", [(tp[0], tp[1], partition.offset)]))

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        self._enter("position")
        with self._lock:
            return [TopicPartition(tp.topic, tp.partition, self._positions.get((tp.topic, tp.partition),
                                                                                OFFSET_INVALID))
                    for tp in partitions]

    def commit(self, message: Any = None, offsets: list[TopicPartition] | None = None,
               asynchronous: bool = True) -> list[TopicPartition] | None:
        self._enter("commit")
        if self.fatal is not None:
            raise KafkaException(self.fatal)
        if offsets is None:
            raise KafkaException(KafkaError(KafkaError._NO_OFFSET, "fake: commit() needs offsets here"))
        cluster = self._cluster
        with self._lock:
            error = cluster._commit_errors.popleft() if cluster._commit_errors else None
            wanted = {(tp.topic, tp.partition): tp.offset for tp in offsets}
            metadata = {(tp.topic, tp.partition): tp.metadata or "" for tp in offsets}
            outside = [tp for tp in wanted if tp not in self._assigned]
            cluster.commits.append(CommitCall(dict(wanted), asynchronous, error, outside, metadata))
            if error is None:
                for tp, offset in wanted.items():
                    cluster._committed[(self.group, tp)] = offset
                    cluster._commit_metadata[(self.group, tp)] = metadata[tp]
        result = [TopicPartition(t, p, o) for (t, p), o in wanted.items()]
        if asynchronous:
            self._commit_reports.append((error, result))  # reported by the next consume / poll
            return None
        if error is not None:
            raise KafkaException(error)
        return result

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        self._enter("committed")
        with self._lock:
            out = []
            for tp in partitions:
                key = (self.group, (tp.topic, tp.partition))
                offset = self._cluster._committed.get(key, OFFSET_INVALID)
                meta = self._cluster._commit_metadata.get(key)  # like librdkafka: what the commit carried
                out.append(TopicPartition(tp.topic, tp.partition, offset, metadata=meta) if meta
                           else TopicPartition(tp.topic, tp.partition, offset))
            return out

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]:
        self._enter("get_watermark_offsets")
        with self._lock:
            logs = self._cluster._logs.get(partition.topic)
            if logs is None:
                raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
            return 0, len(logs[partition.partition])

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> _Metadata:
        self._enter("list_topics")
        return self._cluster._metadata(topic)

    def consumer_group_metadata(self) -> tuple[str, int]:
        self._enter("consumer_group_metadata")
        return (self.group, id(self))

    def close(self) -> None:
        self._enter("close", handover=True)
        if self._topics and self._assigned and self.fatal is None:
            revoke = self._callbacks.get("revoke")
            tps = [TopicPartition(t, p) for t, p in self._assigned]
            if revoke is not None:
                revoke(self, tps)  # librdkafka revokes the assignment inside close()
            with self._lock:
                self._assigned.clear()
        self.closed = True

    # -- internals ------------------------------------------------------------------------------------

    def _enter(self, name: str, handover: bool = False) -> None:
        if self.closed:
            raise RuntimeError("Consumer closed")
        me = threading.get_ident()
        if self._thread is None or handover:
            self._thread = me
        elif self._thread != me:
            self._cluster.violations.append(f"{name}() from a second thread")

    def _add(self, partitions: list[TopicPartition]) -> None:
        """Caller holds the lock: start each partition at its committed offset, else per auto.offset.reset."""
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if tp.offset >= 0:
                self._assigned[key] = tp.offset
                continue
            committed = self._cluster._committed.get((self.group, key))
            if committed is None:
                logs = self._cluster._logs.get(tp.topic)
                end = len(logs[tp.partition]) if logs is not None else 0
                committed = 0 if self._reset == "earliest" else end
            self._assigned[key] = committed
            self._positions.pop(key, None)

    def _fetch(self, limit: int) -> list[FakeMessage]:
        """Caller holds the lock: an injected error first, else runs of one partition, rotating."""
        cluster = self._cluster
        if self.fatal is not None:
            return []
        if cluster._fetch_errors and self.stats_cb is None:  # injected faults are for the engine's consumer
            err, topic = cluster._fetch_errors.popleft()
            topic = topic if topic is not None else self._topics[0] if self._topics else ""
            return [FakeMessage(topic, -1, OFFSET_INVALID, error=err)]
        order = sorted(self._assigned)
        if not order:
            return []
        self._rotation = (self._rotation + 1) % len(order)
        order = order[self._rotation:] + order[:self._rotation]
        out: list[FakeMessage] = []
        for tp in order:
            if tp in self.paused or tp[0] not in cluster._logs:  # a deleted topic delivers nothing
                continue
            log = cluster._logs[tp[0]][tp[1]]
            while len(out) < limit and self._assigned[tp] < len(log):
                out.append(log[self._assigned[tp]])
                self._count(out[-1])
                self.fetched += 1
                self._assigned[tp] += 1
                self._positions[tp] = self._assigned[tp]
            if len(out) >= limit:
                break
        return out

    def _count(self, message: FakeMessage) -> None:
        """Caller holds the lock: the statistics of one fetched message."""
        payload = len(message.key() or b"") + len(message.value() or b"")
        self._rx["rxmsgs"] += 1
        self._rx["rxmsg_bytes"] += payload
        self._rx["rx_bytes"] += round(payload / self._cluster._ratios.get(message.topic(), 1.0))

    def _serve(self) -> None:
        """Run what librdkafka would serve from its queue: statistics, errors, commit results, rebalances."""
        cluster = self._cluster
        if self.stats_cb is not None:
            with self._lock:
                stats = json.dumps(self._rx)
            self.stats_cb(stats)
        while True:
            with self._lock:
                error = cluster._client_errors.popleft() if cluster._client_errors and self.stats_cb is None else None
                report = self._commit_reports.popleft() if self._commit_reports else None
                event = self._events.popleft() if (error is None and report is None and self._events) else None
            if error is None and report is None and event is None:
                return
            if error is not None:
                if error.fatal():
                    self.fatal = error
                if self._error_cb is not None:
                    self._error_cb(error)
            if report is not None and self._on_commit is not None:
                self._on_commit(*report)
            if event is not None:
                self._rebalance(*event)

    def _rebalance(self, kind: str, revoke: list[Partition], assign: list[Partition], done: threading.Event) -> None:
        with self._lock:
            current = sorted(self._assigned)
        if kind == "lost":
            self._call("lost", current, unassign=True)
        elif self.cooperative:
            gone = [tp for tp in revoke if tp in current]
            if gone:
                self._call("revoke", gone, unassign=True)
            added = [tp for tp in assign if tp not in current]
            if added:
                self._call("assign", added, unassign=False)
        else:  # eager: everything is revoked, then the new assignment given
            if current:
                self._call("revoke", current, unassign=True)
            new = sorted({tp for tp in current if tp not in revoke} | set(assign))
            if new:
                self._call("assign", new, unassign=False)
        done.set()

    def _call(self, which: str, partitions: list[Partition], unassign: bool) -> None:
        """A rebalance callback; what it left undone is done after it, as confluent-kafka does."""
        callback = self._callbacks.get(which) or (self._callbacks.get("revoke") if which == "lost" else None)
        tps = [TopicPartition(t, p) for t, p in partitions]
        if callback is not None:
            callback(self, tps)
        with self._lock:
            if unassign:
                for tp in partitions:
                    self._assigned.pop(tp, None)
            elif not all(tp in self._assigned for tp in partitions):
                self._add([tp for tp in tps if (tp.topic, tp.partition) not in self._assigned])


class FakeProducer:
    """confluent_kafka.Producer in memory; delivery reports are served by poll / flush."""

    def __init__(self, cluster: FakeKafka, conf: dict[str, Any]) -> None:
        self._cluster = cluster
        self.conf = conf
        self._reports: deque[tuple[Callable[[KafkaError | None, Any], None] | None, KafkaError | None, Any]] = deque()
        self.txn_id: str | None = conf.get("transactional.id")
        self._epoch = -1  # set by init_transactions
        self._open = False
        self._staged: list[tuple[str, bytes | None, bytes | None, Any]] = []  # records of the open transaction
        self._offsets: tuple[str, dict[Partition, tuple[int, str]]] | None = None  # (group, offsets) to commit
        self._failed = False  # a record of the open transaction failed: the commit must fail

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None, on_delivery: Any = None, **_: Any) -> None:
        cluster = self._cluster
        if self.txn_id is not None:
            self._check()
            if not self._open:
                raise KafkaException(KafkaError(KafkaError._STATE, "fake: produce outside a transaction"))
        with cluster._lock:
            error = cluster._delivery_errors.popleft() if cluster._delivery_errors else None
            if error is None and topic not in cluster._logs:
                error = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
        record = None
        if error is None and self.txn_id is not None:
            self._staged.append((topic, value, key, headers))
        elif error is None:
            offset = cluster.produce(topic, 0, value, key, headers)
            record = cluster._logs[topic][0][offset]
        elif self.txn_id is not None:
            self._failed = True
        self._reports.append((on_delivery, error, record))

    # -- transactions -------------------------------------------------------------------------------------

    def init_transactions(self, timeout: float = -1) -> None:
        assert self.txn_id is not None, "fake: init_transactions without transactional.id"
        with self._cluster._lock:
            self._epoch = self._cluster._txn_epochs.get(self.txn_id, -1) + 1
            self._cluster._txn_epochs[self.txn_id] = self._epoch  # fences every older producer of this id

    def begin_transaction(self) -> None:
        self._check()
        if self._open:
            raise KafkaException(KafkaError(KafkaError._STATE, "fake: a transaction is already open"))
        self._open, self._staged, self._offsets, self._failed = True, [], None, False

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], group_metadata: Any,
                                    timeout: float = -1) -> None:
        self._check()
        if not self._open:
            raise KafkaException(KafkaError(KafkaError._STATE, "fake: send_offsets outside a transaction"))
        group = group_metadata[0]
        self._offsets = (group, {(tp.topic, tp.partition): (tp.offset, tp.metadata or "") for tp in offsets})

    def commit_transaction(self, timeout: float = -1) -> None:
        self._check()
        if not self._open:
            raise KafkaException(KafkaError(KafkaError._STATE, "fake: no transaction to commit"))
        self.poll(0)
        cluster = self._cluster
        with cluster._lock:
            error = cluster._txn_errors.popleft() if cluster._txn_errors else None
        if error is None and self._failed:
            error = KafkaError(KafkaError._INCONSISTENT, "fake: a record failed", txn_requires_abort=True)
        if error is not None:
            raise KafkaException(error)
        for topic, value, key, headers in self._staged:
            cluster.produce(topic, 0, value, key, headers)
        if self._offsets is not None:
            group, offsets = self._offsets
            with cluster._lock:
                for tp, (offset, meta) in offsets.items():
                    cluster._committed[(group, tp)] = offset
                    cluster._commit_metadata[(group, tp)] = meta
                cluster.commits.append(CommitCall({tp: o for tp, (o, _) in offsets.items()}, False, None, [],
                                                  {tp: m for tp, (_, m) in offsets.items()}))
        with cluster._lock:
            cluster.transactions["committed"] += 1
        self._open, self._staged, self._offsets = False, [], None

    def abort_transaction(self, timeout: float = -1) -> None:
        self._check()
        self.poll(0)
        with self._cluster._lock:
            self._cluster.transactions["aborted"] += 1
        self._open, self._staged, self._offsets = False, [], None

    def _check(self) -> None:
        with self._cluster._lock:
            newest = self._cluster._txn_epochs.get(self.txn_id or "", -1)
        if self._epoch < 0:
            raise KafkaException(KafkaError(KafkaError._STATE, "fake: init_transactions() not called"))
        if newest != self._epoch:
            raise KafkaException(KafkaError(KafkaError._FENCED, "fake: fenced by a newer producer", fatal=True))

    def poll(self, timeout: float = 0) -> int:
        if self.txn_id is not None and self._epoch >= 0:
            self._check()  # like librdkafka: a fenced producer's poll raises its fatal error
        served = 0
        while self._reports:
            callback, error, record = self._reports.popleft()
            if callback is not None:
                callback(error, record)
            served += 1
        return served

    def flush(self, timeout: float = -1) -> int:
        self.poll(0)
        return 0

    def __len__(self) -> int:
        return len(self._reports)


class FakeAdmin:
    """confluent_kafka.admin.AdminClient in memory: list_topics, create_topics and describe_topics."""

    def __init__(self, cluster: FakeKafka, conf: dict[str, Any]) -> None:
        self._cluster = cluster
        self.conf = conf

    @staticmethod
    def factory(cluster: FakeKafka) -> Callable[[dict[str, Any]], FakeAdmin]:
        return lambda conf: FakeAdmin(cluster, conf)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> _Metadata:
        return self._cluster._metadata(topic)

    def describe_topics(self, topics: Any, **_: Any) -> dict[str, Future[Any]]:
        """``topics`` is a ``confluent_kafka.TopicCollection``; one future per topic name."""
        return {name: self._cluster._describe(name) for name in topics.topic_names}

    def create_topics(self, new_topics: list[Any], **_: Any) -> dict[str, Future[None]]:
        with self._cluster._lock:
            self._cluster.create_requests += 1
        hold = self._cluster.create_hold
        if hold is not None and not hold.is_set():  # answered once the hold is set free, like a broker's reply
            held: dict[str, Future[None]] = {new.topic: Future() for new in new_topics}

            def answer() -> None:
                hold.wait()
                for topic, done in self._serve_create(new_topics).items():
                    error = done.exception()
                    if error is not None:
                        held[topic].set_exception(error)
                    else:
                        held[topic].set_result(None)

            threading.Thread(target=answer, name="fake-create-topics", daemon=True).start()
            return held
        return self._serve_create(new_topics)

    def _serve_create(self, new_topics: list[Any]) -> dict[str, Future[None]]:
        out: dict[str, Future[None]] = {}
        for new in new_topics:
            future: Future[None] = Future()
            with self._cluster._lock:
                exists = new.topic in self._cluster._logs
                error = self._cluster.create_errors.popleft() if self._cluster.create_errors else None
            if error is not None:
                future.set_exception(KafkaException(error))
            elif exists:
                future.set_exception(KafkaException(KafkaError(KafkaError.TOPIC_ALREADY_EXISTS)))
            else:
                self._cluster.create_topic(new.topic, new.num_partitions)
                self._cluster.created_topics.append(new.topic)
                future.set_result(None)
            out[new.topic] = future
        return out


def _tps(partitions: Iterable[TopicPartition]) -> list[Partition]:
    return [(tp.topic, tp.partition) for tp in partitions]
