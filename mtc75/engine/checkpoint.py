"""The checkpoint: the one owner of the commit path -- what is committed, when, and only for the same topic.

A commit point is a partition's first unfinished offset (:meth:`mtc75.core.offsets.OffsetTracker.watermark`)
with, as its metadata, the offset map of the finished offsets above it (:mod:`mtc75.core.offsetmap`). A point
is sent only once a topic-id check that *started after* its messages were fetched confirmed its topic
(:mod:`mtc75.kafka.topicwatch`): every COMMIT_INTERVAL :meth:`OffsetCheckpoint.tick` snapshots the points and
sends those of each topic the next check says is the "same" (never blocking the poll thread);
:meth:`OffsetCheckpoint.commit_now` (revoke, shutdown) waits for a check, bounded by its deadline. Topics are
judged one by one: a topic found gone or re-created is reported to ``on_change`` -- stopping or resetting is
the engine's decision, nothing of the old topic is sent -- and the other topics' points are sent as usual.
The watch covers the named topics and every topic with an assigned partition: a topic's id is learned when
it is first assigned (:meth:`OffsetCheckpoint.assigned`), before anything of it is fetched.

:class:`Checkpoint` is the protocol the engine commits through; :class:`OffsetCheckpoint` commits with the
consumer's ``commit()``. A transactional checkpoint (exactly-once) is a second implementation: the same
points, sent with ``send_offsets_to_transaction`` inside the producer's transaction.

Threads: the poll thread only, including :meth:`OffsetCheckpoint.on_commit` (librdkafka's ``on_commit``
runs inside the poll thread's ``poll``/``consume``). No lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from confluent_kafka import KafkaError, TopicPartition

from mtc75.core.offsetmap import DEFAULT_LIMIT as MAP_LIMIT
from mtc75.core.offsetmap import encode
from mtc75.core.offsets import OffsetTracker, Partition, PartitionState
from mtc75.kafka.client import KafkaClient
from mtc75.kafka.topicwatch import Change, TopicWatch

logger = logging.getLogger(__name__)

CONFIRM_TIMEOUT = 5.0  # longest a synchronous commit (revoke, shutdown) waits to confirm the topic id

# (partition state, position, offset map, the state's version when the map was encoded)
Point = tuple[PartitionState, int, str, int]


def step_over_skipped(tracker: OffsetTracker, client: KafkaClient) -> None:
    """Partitions with nothing in flight move their commit position to the client's position when that is
    past the last offset handed out: the records between are ones no handler gets (a transactional topic
    ends with a marker, so without this the commit stays one below the end and lag never reaches 0).

    Only in the periodic commit, on the poll thread between two fetches: every record the client returned
    so far was handed out or sought back (the fair intake's cut clears the position). Not at shutdown,
    whose poll drops what it returns."""
    idle = [tp for tp in tracker.partitions() if not tracker.state(tp).pending]
    if idle:
        for tp, position in client.positions(idle).items():
            tracker.step_over(tracker.state(tp), position)


def lag_bases(tracker: OffsetTracker, committed: Callable[[PartitionState], int | None]
              ) -> dict[Partition, int | None]:
    """Where each partition's lag counts from: ``committed(state)``, else its oldest offset in flight (None:
    nothing yet, the client's fetch position)."""
    bases: dict[Partition, int | None] = {}
    for tp in tracker.partitions():
        state = tracker.state(tp)
        offset = committed(state)
        bases[tp] = offset if offset is not None else state.pending[0] if state.pending else None
    return bases


class Checkpoint(Protocol):
    """How the engine commits (poll thread only)."""

    def tick(self, now: float) -> None:
        """Every loop turn: commit what finished, when it is due (never blocks)."""

    def commit_now(self, partitions: list[Partition] | None, deadline: float, asynchronous: bool = False) -> None:
        """Commit what finished in ``partitions`` (all: None), its topic-id check ending by ``deadline``.
        Synchronous (a revoke: the next owner reads what this sends), or only sent (``asynchronous``: a
        shutdown, whose bounded close() delivers it)."""

    def committed(self, state: PartitionState) -> int | None:
        """The position last committed for this assignment (None: nothing yet)."""

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's ``on_commit`` callback."""

    def forget(self, states: Iterable[PartitionState]) -> None:
        """These assignments ended: nothing more of theirs is sent."""

    def assigned(self, topics: set[str]) -> None:
        """Partitions of ``topics`` are being assigned: learn the ids of those not known yet (bounded)."""

    def halt(self) -> None:
        """A fatal error: nothing is ever committed again."""


class OffsetCheckpoint:
    """Commits offsets and offset maps with the consumer's ``commit()`` (see the module notes)."""

    def __init__(
        self,
        client: KafkaClient,
        tracker: OffsetTracker,
        interval: float,
        is_fatal: Callable[[KafkaError], bool],
        on_change: Callable[[str, Change, float], None],
        keep: tuple[str, ...] = (),
    ) -> None:
        self._client = client
        self._tracker = tracker
        self._interval = interval
        self._is_fatal = is_fatal  # the engine's check: True (and halted) for a fatal error
        self._on_change = on_change  # (topic, change, now): gone or re-created (and "there again"): the engine decides
        self._keep = keep  # topics watched even with no partition assigned (the named ones)
        self.watch: TopicWatch | None = None  # the topics' ids, so a re-created topic is noticed
        self._halted = False
        self._due = 0.0
        self._snapshot: list[Point] = []  # points waiting for the topic-id check
        self._sent: dict[PartitionState, tuple[int, int]] = {}  # state -> (position, version) last committed
        self._map_limit = MAP_LIMIT  # the broker's offset.metadata.max.bytes (0 once it refused a map)

    def tick(self, now: float) -> None:
        watch = self.watch
        if now >= self._due and self._client.down_since is None:  # commits to no broker only pile up
            self._due = now + self._interval
            self._commit_due(now)
        elif watch is not None and watch.busy:
            self._watch_turn(now)

    def _commit_due(self, now: float) -> None:
        if self._halted:
            return
        watch = self.watch
        if watch is None or not watch.busy:
            self._step_over_skipped()
        elif watch.busy:
            self._watch_turn(now)
            return
        points = self.points()
        # Topics whose ids are not checked (no watch, or the cluster cannot tell them) are sent at once.
        ungated = points if watch is None else [p for p in points if not watch.gates(p[0].tp[0])]
        if ungated:
            self._send(ungated, asynchronous=True)
        if watch is None or not watch.enabled:
            return
        # Everything in the snapshot was fetched before the check starts: a "same" answer confirms it.
        self._snapshot = [p for p in points if watch.gates(p[0].tp[0])]
        watch.poll(now)

    def _watch_turn(self, now: float) -> None:
        """Act on a finished topic-id check: send the snapshot's points of each topic found the SAME; report every
        other answer but UNKNOWN."""
        assert self.watch is not None
        changes = self.watch.poll(now)
        if changes is None:
            return
        snapshot, self._snapshot = self._snapshot, []
        same = {topic for topic, change in changes.items() if change is Change.SAME}
        if same and not self._halted and self._client.down_since is None:
            tracker = self._tracker
            current = [p for p in snapshot if p[0].tp[0] in same and p[0].alive and tracker.get(p[0].tp) is p[0]
                       and self._moved(p)]
            if current:
                self._send(current, asynchronous=True)
        for topic, change in changes.items():
            if change is not Change.UNKNOWN:
                self._on_change(topic, change, now)

    def commit_now(self, partitions: list[Partition] | None, deadline: float, asynchronous: bool = False) -> None:
        if self._halted:
            return
        if self._client.down_since is not None:
            logger.warning("Kafka unreachable: not committing; uncommitted messages will be redelivered")
            return
        pending = self.points(partitions)
        if not pending:
            return
        watch = self.watch
        if watch is not None:
            timeout = max(0.0, min(CONFIRM_TIMEOUT, deadline - time.monotonic()))
            changes = watch.confirm_now(sorted({p[0].tp[0] for p in pending}), timeout)
            for topic, change in sorted(changes.items()):
                if change is Change.RECREATED:
                    self._on_change(topic, change, time.monotonic())
                elif change is not Change.SAME:
                    logger.warning("topic %s %s: not committing it; its uncommitted messages will be delivered "
                                   "again", topic, "not found" if change is Change.GONE else "id not confirmed")
            pending = [p for p in pending if changes.get(p[0].tp[0]) is Change.SAME]
        if pending:
            self._send(pending, asynchronous=asynchronous)

    def _step_over_skipped(self) -> None:
        step_over_skipped(self._tracker, self._client)

    def committed(self, state: PartitionState) -> int | None:
        sent = self._sent.get(state)
        return sent[0] if sent is not None and sent[0] >= 0 else None

    def lag_bases(self) -> dict[Partition, int | None]:
        """Where each partition's lag counts from: its last commit, else its oldest offset in flight (None:
        nothing yet, the client's fetch position)."""
        return lag_bases(self._tracker, self.committed)

    def forget(self, states: Iterable[PartitionState]) -> None:
        for state in states:
            self._sent.pop(state, None)
        self._snapshot = [p for p in self._snapshot if p[0].alive]
        if self.watch is not None:  # a topic none of whose partitions is ours any more: not ours to watch
            self.watch.retain({*self._keep, *(tp[0] for tp in self._tracker.partitions())})

    def assigned(self, topics: set[str]) -> None:
        if self.watch is not None:
            self.watch.learn(sorted(topics), CONFIRM_TIMEOUT)

    def halt(self) -> None:
        self._halted = True
        self._snapshot = []

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """A failed asynchronous commit is retried with the next one."""
        if err is None or self._is_fatal(err):
            return
        self._map_refused(err)
        self._client.warn_rarely(err, f"commit failed: {err.str()} (will retry)")
        for tp in partitions:
            state = self._tracker.get((tp.topic, tp.partition))
            if state is not None:
                self._sent[state] = (-1, -1)  # forces a retry next time

    def points(self, partitions: list[Partition] | None = None) -> list[Point]:
        """``(state, position, offset map, version)`` of each partition with something new to commit."""
        tracker = self._tracker
        points = []
        for tp in tracker.partitions() if partitions is None else partitions:
            state = tracker.get(tp)
            if state is None:
                continue
            position = tracker.watermark(state)
            if position is None:
                continue
            point = (state, position, "", state.version)
            if self._moved(point):
                points.append((state, position, self._offset_map(state, position), state.version))
        return points

    def _moved(self, point: Point) -> bool:
        """The watermark moved, or the finished set grew, since the last commit of this assignment."""
        state, position, _, version = point
        return self._sent.get(state) != (position, version)

    def _offset_map(self, state: PartitionState, position: int) -> str:
        """The commit metadata: the finished offsets above ``position`` (see mtc75.core.offsetmap)."""
        if not state.done:
            return ""
        try:
            text = encode(position, state.done, self._map_limit)
        except ValueError as err:  # a finished offset not above the position: never seen; commit the offset alone
            logger.warning("%s[%d]: no offset map at %d (%s)", state.tp[0], state.tp[1], position, err)
            return ""
        if text is None:  # too many gaps for offset.metadata.max.bytes: the offset alone, as before the map
            logger.debug("%s[%d]: offset map of %d finished offsets above %d does not fit %d bytes; "
                         "committing the offset alone", state.tp[0], state.tp[1], len(state.done), position,
                         self._map_limit)
            return ""
        return text

    def _send(self, pending: list[Point], asynchronous: bool) -> None:
        offsets = [TopicPartition(state.tp[0], state.tp[1], pos, metadata=meta) for state, pos, meta, _ in pending]
        err = self._client.commit(offsets, asynchronous)
        if err is not None:
            if not self._is_fatal(err):
                self._map_refused(err)
                self._client.warn_rarely(err, f"commit of {len(offsets)} partitions failed: {err.str()}")
            return
        for state, pos, _, version in pending:
            self._sent[state] = (pos, version)

    def _map_refused(self, err: KafkaError) -> None:
        """A broker with a smaller offset.metadata.max.bytes refuses the map: commit offsets alone from now on."""
        if err.code() == KafkaError.OFFSET_METADATA_TOO_LARGE and self._map_limit:
            self._map_limit = 0
            logger.warning("the broker refused the offset map (offset.metadata.max.bytes below %d?): "
                           "committing offsets without it from now on", MAP_LIMIT)
