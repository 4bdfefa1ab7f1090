"""Exactly-once: the transactional checkpoint -- outputs, dead letters and offsets committed in one Kafka transaction.

``PROCESSING_GUARANTEE="exactly_once"`` replaces :class:`~mtc75.engine.checkpoint.OffsetCheckpoint` with
:class:`TransactionalCheckpoint` (:func:`mtc75.engine.startup.assemble` picks it). The same commit points as
the plain checkpoint -- each partition's first unfinished offset with the offset map of the finished ones
above it -- are sent with ``send_offsets_to_transaction`` inside the producer's transaction, and so are the
records the finished messages returned (``mtc75.Output``) and their dead letters. Only the poll thread
produces and commits, so the offsets of one transaction say exactly which messages' records it holds:

- a message finishes (the ledger hands its outputs to :meth:`TransactionalCheckpoint.write`): its records
  are produced into the open transaction (begun at the first record) and the message is done at once;
- every COMMIT_INTERVAL, and before partitions are given up (revoke) or the run ends: a topic-id check
  started now confirms the topic (nothing fetched after it is in the transaction: the poll thread waits
  for the answer), then ``send_offsets_to_transaction(points, consumer_group_metadata())`` and
  ``commit_transaction``. A message finished above a stuck one is in the map: after a crash it is neither
  run again (its records are committed) nor lost (the commit stays below the stuck one);
- an abort (a delivery failed, the commit was refused, the group moved on) makes nothing of the
  transaction visible to ``read_committed`` readers; its partitions are read again from their last commit
  with fresh states (:meth:`mtc75.engine.assignments.Assignments.rewind`), so late completions of the
  aborted work are dropped and those messages run again;
- revoke commits before giving the partitions up (a failed commit aborts: the next owner runs them);
  a lost assignment aborts if the transaction holds its records; shutdown commits, and aborts on failure;
- fencing: ``transactional.id`` is ``mtc75-<group>-<member>`` (the member: ``group.instance.id``, else a
  random id per run), and offsets carry the consumer's group metadata (KIP-447): a zombie whose partitions
  moved on is refused by the group coordinator, and a restart with the same ``group.instance.id`` fences its
  predecessor's producer at ``init_transactions``. A fenced producer whose transactional.id another instance
  can own (``group.instance.id`` or a ``transactional.id`` set by the user) is a zombie: the run halts at once.
  Any other fatal producer error -- INVALID_TXN_STATE when the transaction coordinator dies during a commit,
  or a "fenced" that librdkafka reports after such a failover for an id no one else has -- makes a new
  producer with the same transactional.id (its ``init_transactions`` finishes or aborts what the old one
  left) and reads every partition again from what is committed (at most RECOVERIES times within
  RECOVERY_WINDOW; then it halts).
  Without static membership a killed member's open transaction holds its partitions' committed offsets
  until ``transaction.timeout.ms`` (10 s by default here) passes.
- a topic-id check that gets no answer commits nothing; a transaction left open that way for half of
  transaction.timeout.ms is aborted (before the broker aborts it and fences the producer);
- a record that can never be written (too large, not authorized) aborts and stops the run (exit 5);
  dead letters are not shrunk to fit as at least once does.

Threads: the poll thread only, like the plain checkpoint (delivery reports arrive in its ``poll``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from mtc75.core.failures import DEAD_LETTERED
from mtc75.core.offsetmap import encode
from mtc75.core.offsets import OffsetTracker, Partition, PartitionState
from mtc75.core.work import Work
from mtc75.engine.checkpoint import CONFIRM_TIMEOUT, lag_bases, step_over_skipped
from mtc75.engine.failure import FailurePolicy
from mtc75.errors import KafkaFatalError, KafkaUnavailable, MessageFailed, Mtc75Error
from mtc75.kafka.client import KafkaClient
from mtc75.kafka.deadletter import ENSURE_TIMEOUT, DeadLetterTopics, dlq_headers, dlq_topic
from mtc75.kafka.outputs import produce_args, where
from mtc75.kafka.topicwatch import Change, TopicWatch

logger = logging.getLogger(__name__)

TRANSACTION_TIMEOUT_MS = 10_000  # transaction.timeout.ms unless the user sets it: how long a dead one holds
COMMIT_TIMEOUT = 30.0  # longest a commit (or an abort) retries before the run halts: its outcome is unknown
MIN_COMMIT_WAIT = 10.0  # a synchronous commit (revoke, shutdown) gets at least this long
INIT_TIMEOUT = 30.0  # init_transactions: finds the coordinator, fences and aborts a predecessor's transaction
BUFFER_WAIT = 0.05  # the producer's queue is full: serve it this long, then try the record again
RECOVERIES = 5  # new producers a run may make within RECOVERY_WINDOW after fatal errors (then it halts)
RECOVERY_WINDOW = 60.0
# Fatal errors that say another producer owns the transactional.id now: never recovered from (a zombie's new
# producer would fence the live successor).
FENCED = (KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH)
PERMANENT = (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED,
             KafkaError.INVALID_RECORD, KafkaError.OFFSET_METADATA_TOO_LARGE)


def fatal(err: KafkaError) -> bool:
    """The producer is unusable: a fatal error, or the _FATAL a call reports once it is in that state."""
    return err.fatal() or err.code() == KafkaError._FATAL


def transactional_id(group: str, conf: Mapping[str, Any]) -> str:
    """``mtc75-<group>-<member>``: static membership keeps it across restarts (the restart fences the old)."""
    member = conf.get("group.instance.id") or uuid.uuid4().hex[:12]
    return f"mtc75-{group}-{member}"


def transactional_config(producer_conf: Mapping[str, Any], group: str, consumer_conf: Mapping[str, Any]
                         ) -> dict[str, Any]:
    """The producer's config with a transactional.id (the user's wins) and a short transaction timeout."""
    conf = dict(producer_conf)
    conf.setdefault("transactional.id", transactional_id(group, consumer_conf))
    conf.setdefault("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS)
    return conf


class TransactionalCheckpoint:
    """Commits offsets, offset maps and output records in one transaction (see the module notes)."""

    def __init__(
        self,
        client: KafkaClient,
        tracker: OffsetTracker,
        interval: float,
        new_producer: Callable[[Callable[[KafkaError], None]], Any],
        on_error: Callable[[KafkaError], None],
        on_change: Callable[[str, Change, float], None],
        halt: Callable[[Mtc75Error], None],
        rewind: Callable[[list[Partition]], None],
        transaction_timeout: float = TRANSACTION_TIMEOUT_MS / 1000.0,
        shared_id: bool = False,
        keep: tuple[str, ...] = (),
    ) -> None:
        self._client = client
        self._tracker = tracker
        self._interval = interval
        # builds the transactional producer with an error_cb (start, and after a fatal error)
        self._new_producer = new_producer
        self._on_error = on_error  # the engine's error_cb, for the producer's errors that are not fatal
        self._producer: Any = None  # transactional: init_transactions() ran (start)
        self._report: Callable[[KafkaError | None, Any], None] = self._reporter(0)
        self._broken: KafkaError | None = None  # a fatal error the producer reported (error_cb)
        self._shared_id = shared_id  # another instance may own the transactional.id: fenced means zombie
        self.recoveries = 0  # new producers made after fatal errors (also the current producer's generation)
        self._recovered_at: list[float] = []
        self._on_change = on_change  # (topic, change, now): gone or re-created: the engine decides
        self._keep = keep  # topics watched even with no partition assigned (the named ones)
        self._halt_run = halt
        self._rewind = rewind  # Assignments.rewind: read partitions again from their last commit
        self.watch: TopicWatch | None = None
        # How long reading the committed offsets may take: a dead member's open transaction holds them
        # until the broker aborts it (transaction.timeout.ms).
        self.committed_timeout = transaction_timeout + 5.0
        self._transaction_timeout = transaction_timeout
        self._opened_at = 0.0  # when the open transaction began
        self._halted = False
        self._due = 0.0
        self._open = False  # a transaction begun and neither committed nor aborted
        self._holds: set[PartitionState] = set()  # assignments with records in the open transaction
        self._failed: KafkaError | None = None  # the first delivery failure of the open transaction
        self._sent: dict[PartitionState, tuple[int, int]] = {}  # state -> (position, version) last committed
        self.commits = 0
        self.aborts = 0
        self.records = 0  # records produced into transactions (committed or not)
        self.pending = 0  # an output sink's count: records here are done when written, never pending

    # -- start ----------------------------------------------------------------------------------------

    def start(self, timeout: float = INIT_TIMEOUT) -> None:
        """``init_transactions``: fences a predecessor with the same transactional.id and ends its transaction."""
        generation = self.recoveries  # a replaced producer's late errors and reports are not this one's
        self._producer = self._new_producer(lambda err: self._producer_error(generation, err))
        self._report = self._reporter(generation)
        try:
            self._producer.init_transactions(timeout)
        except KafkaException as exc:
            err = exc.args[0]
            raise KafkaUnavailable(f"cannot start Kafka transactions ({err.str()}): exactly_once needs a cluster "
                                   "with a transaction state log (transaction.state.log.* settings)") from None

    def _producer_error(self, generation: int, err: KafkaError) -> None:
        """The producer's ``error_cb``: a fatal error is this checkpoint's (acted on at the next tick), any other
        the engine's. A replaced producer's errors (its in-flight records fenced by its successor) are ignored."""
        if generation != self.recoveries:
            logger.debug("replaced transactional producer: %s", err.str())
            return
        if fatal(err):
            if self._broken is None:
                self._broken = err
            return
        self._on_error(err)

    # -- the output sink (mtc75.kafka.outputs.OutputSink) --------------------------------------------

    def write(self, work: Work) -> bool:
        """Produce ``work``'s records into the open transaction; the message is done now."""
        assert work.outputs is not None
        if self._halted:
            return False
        return all(self._produce(work, output.topic, produce_args(output)) for _offset, output in work.outputs)

    def confirmed(self) -> list[Work]:
        return []

    def flush(self, timeout: float) -> list[Work]:
        return []

    def close(self) -> None:
        """The producer goes with the run; an open transaction was committed or aborted by shutdown."""

    # -- the checkpoint (mtc75.engine.checkpoint.Checkpoint) -----------------------------------------

    def tick(self, now: float) -> None:
        if self._halted:
            return
        if self._broken is not None:
            self._fatal(self._broken)
            return
        if self._open:
            if not self._serve(0):  # delivery reports: a failed record aborts the transaction now
                return
            if self._failed is not None:
                self._abort_failed()
                return
        if now < self._due or self._client.down_since is not None:
            return
        self._due = now + self._interval
        step_over_skipped(self._tracker, self._client)  # the markers of a transactional input (see there)
        self._commit(now + COMMIT_TIMEOUT, given_up=[])

    def commit_now(self, partitions: list[Partition] | None, deadline: float, asynchronous: bool = False) -> None:
        """Commit the whole transaction (one transaction holds every partition); on failure it is aborted and
        the partitions not in ``partitions`` (None: all) are read again. Always synchronous: a transaction's
        end is its commit (``asynchronous``, the plain checkpoint's shutdown mode, does not apply)."""
        if self._halted or self._producer is None:  # None: start-up failed before transactions began
            return
        if self._client.down_since is not None:
            logger.warning("Kafka unreachable: not committing the transaction; it is aborted by the broker after "
                           "transaction.timeout.ms and its messages are delivered again")
            return
        if not self._serve(0):
            return
        if self._failed is not None:
            self._abort_failed(partitions)
            return
        self._commit(max(deadline, time.monotonic() + MIN_COMMIT_WAIT), given_up=partitions)

    def committed(self, state: PartitionState) -> int | None:
        sent = self._sent.get(state)
        return sent[0] if sent is not None else None

    def lag_bases(self) -> dict[Partition, int | None]:
        """Where each partition's lag counts from: its last commit, else its oldest offset in flight."""
        return lag_bases(self._tracker, self.committed)

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The consumer never commits here: offsets go with the transaction."""

    def forget(self, states: Iterable[PartitionState]) -> None:
        """These assignments ended (revoked after the commit, lost, topic re-created): if the open transaction
        still holds their records it is aborted (their next owner writes them); the others are read again."""
        gone = set(states)
        for state in gone:
            self._sent.pop(state, None)
        if self.watch is not None:  # a topic none of whose partitions is ours any more: not ours to watch
            self.watch.retain({*self._keep, *(tp[0] for tp in self._tracker.partitions())})
        if self._open and not self._halted and gone & self._holds:
            self._abort("assignments ended with records not committed", given_up=[s.tp for s in gone])

    def assigned(self, topics: set[str]) -> None:
        """Partitions of ``topics`` are being assigned: learn the ids of those not known yet (bounded)."""
        if self.watch is not None:
            self.watch.learn(sorted(topics), CONFIRM_TIMEOUT)

    def halt(self) -> None:
        """A fatal error: nothing is committed again; an open transaction is aborted where the producer can."""
        if self._halted:
            return
        self._halted = True
        if self._open:
            try:
                self._producer.abort_transaction(2.0)
            except KafkaException:
                pass  # fenced or unreachable: the broker ends it (timeout, or the successor's init)
            self._open = False

    # -- dead letters ---------------------------------------------------------------------------------

    def dead_letter(self, work: Work, topic: str) -> bool:
        """Produce ``work``'s dead-letter record into the open transaction; True: the message is done now."""
        msg = work.message
        return self._produce(work, topic, {"key": msg.key(), "value": msg.value(), "headers": dlq_headers(work)})

    # -- internals ------------------------------------------------------------------------------------

    def _produce(self, work: Work, topic: str, args: dict[str, Any]) -> bool:
        """One record into the open transaction; False when it was refused for good (the run halts)."""
        if not self._begin():
            return False
        deadline = time.monotonic() + COMMIT_TIMEOUT
        while True:
            try:
                self._producer.produce(topic, on_delivery=self._report, **args)
                break
            except BufferError:  # the queue drains as the broker acknowledges; a queue that never does: halt
                if time.monotonic() >= deadline:
                    self._abort("the producer's queue stayed full", given_up=None)
                    self._halt(KafkaUnavailable(f"the transactional producer's queue stayed full for "
                                                f"{COMMIT_TIMEOUT:.0f}s (no broker takes its records)"))
                    return False
                if not self._serve(BUFFER_WAIT):
                    return False
            except KafkaException as exc:
                err = exc.args[0]
                if fatal(err):
                    self._fatal(err)
                else:
                    self._abort(f"{where(work)}: producing to {topic} failed: {err.str()}", given_up=None)
                    self._halt(MessageFailed(f"cannot write {where(work)}'s record to {topic}: {err.str()}"))
                return False
            except (TypeError, ValueError) as err:  # a header the client cannot encode
                self._abort(f"{where(work)}: {err}", given_up=None)
                self._halt(MessageFailed(f"cannot write {where(work)}'s record to {topic}: {err}"))
                return False
        self._holds.add(work.state)
        self.records += 1
        return True

    def _serve(self, timeout: float) -> bool:
        """The producer's ``poll``: delivery reports; False when it raised its fatal error (acted on here)."""
        try:
            self._producer.poll(timeout)
        except KafkaException as exc:
            self._fatal(exc.args[0])
            return False
        return True

    def _reporter(self, generation: int) -> Callable[[KafkaError | None, Any], None]:
        """The delivery report callback of one producer: a failed record of the current one fails the transaction."""

        def report(err: KafkaError | None, _record: Any) -> None:
            if err is not None and self._failed is None and generation == self.recoveries:
                self._failed = err

        return report

    def _begin(self) -> bool:
        """Open a transaction unless one is; False when the producer refused (fenced: the run halts)."""
        if not self._open:
            try:
                self._producer.begin_transaction()
                self._opened_at = time.monotonic()
            except KafkaException as exc:
                err = exc.args[0]
                if fatal(err):
                    self._fatal(err)
                else:
                    self._halt(KafkaUnavailable(f"cannot begin a transaction: {err.str()}"))
                return False
            self._open = True
        return True

    def points(self) -> list[tuple[PartitionState, int, str, int]]:
        """``(state, position, offset map, version)`` of each partition with something new to commit."""
        points = []
        for tp in self._tracker.partitions():
            state = self._tracker.state(tp)
            position = self._tracker.watermark(state)
            if position is None or self._sent.get(state) == (position, state.version):
                continue
            text = encode(position, state.done) if state.done else ""
            if text is None:  # cannot be: OFFSET_WINDOW is capped so that the map fits (settings.offset_window)
                raise ValueError(f"{tp[0]}[{tp[1]}]: offset map of {len(state.done)} offsets does not fit")
            points.append((state, position, text, state.version))
        return points

    def _commit(self, deadline: float, given_up: list[Partition] | None) -> None:
        """Confirm the topic, send the points, commit; on failure abort and read again all but ``given_up``."""
        points = self.points()
        if not self._open and not points:
            return
        watch = self.watch
        topics = sorted({p[0].tp[0] for p in points} | {s.tp[0] for s in self._holds})
        if watch is not None and watch.enabled and topics:
            # One transaction holds every topic's records and offsets: it commits only when each is the same.
            changes = watch.confirm_now(topics, max(0.0, min(CONFIRM_TIMEOUT, deadline - time.monotonic())))
            unsure = [t for t in topics if changes.get(t, Change.SAME) is not Change.SAME]
            if unsure:
                for topic in unsure:
                    if changes[topic] is not Change.UNKNOWN:  # re-created: the reset forgets (aborts) it all
                        self._on_change(topic, changes[topic], time.monotonic())
                if all(changes[t] is Change.UNKNOWN for t in unsure) and self._open \
                        and time.monotonic() - self._opened_at > self._transaction_timeout / 2:
                    # Left open, the broker would abort it at transaction.timeout.ms and fence this producer.
                    self._abort(f"the id of topic {', '.join(unsure)} could not be confirmed for "
                                f"{time.monotonic() - self._opened_at:.0f}s", given_up=given_up)
                return  # gone or no answer: nothing is committed now
        if not self._begin():
            return
        offsets = [TopicPartition(s.tp[0], s.tp[1], pos, metadata=text) for s, pos, text, _ in points]
        err = None
        if offsets:
            err = self._retrying(lambda t: self._producer.send_offsets_to_transaction(
                offsets, self._client.consumer.consumer_group_metadata(), t), deadline)
        if err is None:
            err = self._retrying(self._producer.commit_transaction, deadline)
        if err is not None:
            self._commit_failed(err, given_up)
            return
        self._open = False
        self._holds.clear()
        self.commits += 1
        for state, pos, _, version in points:
            self._sent[state] = (pos, version)

    def _retrying(self, call: Callable[[float], Any], deadline: float) -> KafkaError | None:
        """``call(timeout)`` again while it fails retriably and time is left; its last error, or None."""
        while True:
            try:
                call(max(0.1, deadline - time.monotonic()))
                return None
            except KafkaException as exc:
                err = exc.args[0]
                if fatal(err) or err.txn_requires_abort() or not err.retriable() or time.monotonic() >= deadline:
                    return err
                time.sleep(0.05)

    def _commit_failed(self, err: KafkaError, given_up: list[Partition] | None) -> None:
        if fatal(err):
            self._fatal(err)
        elif err.txn_requires_abort() or not err.retriable():
            if err.code() == KafkaError.OFFSET_METADATA_TOO_LARGE:
                self._abort(err.str(), given_up=None)
                self._halt(KafkaUnavailable("the broker refused the offset map (offset.metadata.max.bytes below "
                                            "4096?): exactly_once cannot commit without it"))
                return
            self._abort(f"commit refused: {err.str()}", given_up=given_up)
        else:  # retried until the deadline: committed or not, nobody can tell
            self._halt(KafkaUnavailable(f"transaction commit did not finish ({err.str()}): its outcome is unknown; "
                                        "a restart reads from what was committed"))

    def _abort_failed(self, given_up: list[Partition] | None = None) -> None:
        err, self._failed = self._failed, None
        assert err is not None
        if fatal(err):
            self._fatal(err)
            return
        if err.code() in PERMANENT:
            self._abort(f"a record was not delivered: {err.str()}", given_up=None)
            self._halt(MessageFailed(f"a record of the transaction can never be written ({err.str()}): stopping"))
            return
        self._abort(f"a record was not delivered: {err.str()}", given_up=[] if given_up is None else given_up)

    def _abort(self, why: str, given_up: list[Partition] | None) -> None:
        """Abort the open transaction; read every partition again but ``given_up`` (None: all are given up)."""
        self._failed = None
        self._holds.clear()
        if self._open:
            try:
                self._producer.abort_transaction(COMMIT_TIMEOUT)
            except KafkaException as exc:
                self._open = False
                err = exc.args[0]
                if fatal(err):
                    self._fatal(err)
                else:
                    self._halt(KafkaUnavailable(f"transaction abort did not finish ({err.str()})"))
                return
            self._open = False
        self.aborts += 1
        again = [] if given_up is None else [tp for tp in self._tracker.partitions() if tp not in given_up]
        logger.warning("transaction aborted (%s): nothing of it is visible to read_committed readers; %d "
                       "partitions read again from their last commit", why, len(again))
        if again:
            try:
                self._rewind(again)
            except KafkaException as exc:
                self._halt(KafkaUnavailable(f"cannot read the committed offsets after an abort "
                                            f"({exc.args[0].str()})"))

    def _fatal(self, err: KafkaError) -> None:
        """The producer is unusable: halt when it was fenced, else replace it and read everything again."""
        self._open = False  # a producer in a fatal state can neither commit nor abort
        self._holds.clear()
        self._failed = self._broken = None
        fenced = err.code() in FENCED or "fenced" in err.str().lower()  # error_cb says _FATAL, the text why
        now = time.monotonic()
        self._recovered_at = [t for t in self._recovered_at if now - t < RECOVERY_WINDOW]
        if (fenced and self._shared_id) or len(self._recovered_at) >= RECOVERIES:
            self._halt(KafkaFatalError(f"transactional producer stopped: {err.str()}" + (
                " (fenced: another instance of this member owns its transactional.id)" if fenced and self._shared_id
                else f" ({RECOVERIES} new producers made within {RECOVERY_WINDOW:.0f}s already)")))
            return
        self._recovered_at.append(now)
        self.recoveries += 1
        logger.warning("transactional producer failed (%s): making a new one; every partition is read again "
                       "from what is committed", err.str())
        try:
            self.start()
        except KafkaUnavailable as failed:
            self._halt(failed)
            return
        try:
            self._rewind(self._tracker.partitions())
        except KafkaException as exc:
            self._halt(KafkaUnavailable(f"cannot read the committed offsets after a new producer "
                                        f"({exc.args[0].str()})"))

    def _halt(self, error: Mtc75Error) -> None:
        self._halt_run(error)  # the engine calls halt() here in turn


class TransactionalDeadLetters(FailurePolicy):
    """``ON_FAILURE=dlq`` under exactly_once: the dead-letter record goes into the open transaction, and the
    message is done at once (the transaction's offsets and its record commit together)."""

    name = "dlq"

    def __init__(self, checkpoint: TransactionalCheckpoint, topics: DeadLetterTopics | None) -> None:
        super().__init__()
        self._checkpoint = checkpoint
        self._topics = topics  # makes a topic's dead-letter topic before its first record (None: they exist)
        self.produced = 0

    def failed(self, work: Work) -> bool:
        source = work.message.topic()
        if self._topics is not None:
            # waited for here (the record goes into the open transaction next); not made: the produce says why
            self._topics.make_for(source, work.message.partition(), wait=ENSURE_TIMEOUT)
        if not self._checkpoint.dead_letter(work, dlq_topic(source)):
            return False
        self.produced += 1
        # Told when produced into the transaction: an abort runs the message again, and tells again.
        self._tell(work, DEAD_LETTERED)
        return True

    @property
    def dead_lettered(self) -> int:
        return self.produced
