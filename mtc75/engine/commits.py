"""Commits: what to commit (each partition's watermark and offset map), when, and only for the same topic.

A commit point is a partition's first unfinished offset (:meth:`mtc75.core.offsets.OffsetTracker.watermark`)
with, as its metadata, the offset map of the finished offsets above it (:mod:`mtc75.core.offsetmap`).
A point is sent only once a topic-id check that *started after* its messages were fetched confirmed
the topic (:mod:`mtc75.kafka.topicwatch`): the periodic commit snapshots its points and sends them when
the next check says "same" (never blocking the poll thread); the synchronous ones (revoke, shutdown)
wait for a check, bounded. A topic found gone or re-created is handed back to the engine as a
:class:`~mtc75.kafka.topicwatch.Change` -- stopping or resetting is its decision, not ours.

Threads: the poll thread only, including :meth:`Committer.on_commit` (librdkafka's ``on_commit``
callback runs inside the poll thread's ``poll``/``consume``). No lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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


class Committer:
    """Builds commit points and sends them; ``halted`` (set by the engine) stops every commit for good."""

    def __init__(self, client: KafkaClient, tracker: OffsetTracker, topic: str,
                 is_fatal: Callable[[KafkaError], bool]) -> None:
        self._client = client
        self._tracker = tracker
        self._topic = topic
        self._is_fatal = is_fatal  # the engine's check: True (and halted) for a fatal error
        self.watch: TopicWatch | None = None  # the topic's id, so a re-created topic is noticed
        self.halted = False  # after a fatal error nothing is committed
        self._snapshot: list[Point] = []  # points waiting for the topic id check
        self._map_limit = MAP_LIMIT  # the broker's offset.metadata.max.bytes (0 once it refused a map)

    @property
    def _watching(self) -> bool:
        return self.watch is not None and self.watch.enabled

    def commit_now(self, partitions: list[Partition] | None = None, *, timeout: float = CONFIRM_TIMEOUT,
                   asynchronous: bool = False) -> Change | None:
        """Commit now (revoke, shutdown) the partitions whose watermark or map moved, after a topic-id
        check of at most ``timeout`` seconds.

        Synchronous by default (a revoke: the next owner reads what this sends). ``asynchronous``: only
        sent, for a shutdown whose close() delivers it within the shutdown's deadline -- librdkafka's
        synchronous commit has no timeout, and waits for a coordinator up to ``session.timeout.ms``.
        Returns ``Change.RECREATED`` when the topic-id check found the topic re-created (nothing was
        committed; the engine resets), else None.
        """
        if self.halted:
            return None
        if self._client.down_since is not None:
            logger.warning("Kafka unreachable: not committing; uncommitted messages will be redelivered")
            return None
        pending = self.points(partitions)
        if not pending:
            return None
        if self._watching:
            assert self.watch is not None
            change = self.watch.confirm_now(min(timeout, CONFIRM_TIMEOUT))
            if change is Change.RECREATED:
                return change
            if change is not Change.SAME:
                logger.warning("topic %s %s: not committing; uncommitted messages will be delivered again",
                               self._topic, "not found" if change is Change.GONE else "id not confirmed")
                return None
        self._send(pending, asynchronous=asynchronous)
        return None

    def tick(self, now: float) -> Change | None:
        """The periodic commit. With the topic watch on, it snapshots what is finished now and commits it
        once a topic-id check started after this moment confirmed the topic (:meth:`watch_turn`): every
        message in the snapshot was fetched before the check, so it came from the confirmed topic.
        Costs one DescribeTopics round trip of delay per commit, and never blocks the poll thread.
        """
        if self.halted:
            return None
        if not (self._watching and self.watch is not None and self.watch.busy):
            self._step_over_skipped()
        if not self._watching:
            pending = self.points()
            if pending:
                self._send(pending, asynchronous=True)
            return None
        assert self.watch is not None
        if self.watch.busy:
            return self.watch_turn(now)
        self._snapshot = self.points()
        self.watch.poll(now)  # starts the check
        return None

    def watch_turn(self, now: float) -> Change | None:
        """Act on a finished topic-id check: commit the snapshot on SAME; any answer but UNKNOWN is returned."""
        assert self.watch is not None
        change = self.watch.poll(now)
        if change is None or change is Change.UNKNOWN:
            return None
        snapshot, self._snapshot = self._snapshot, []
        if change is Change.SAME:
            tracker = self._tracker
            current = [
                point for point in snapshot
                if point[0].alive and (point[1] != point[0].committed or point[3] != point[0].committed_version)
                and tracker.get(point[0].tp) is point[0]
            ]
            if current and not self.halted and self._client.down_since is None:
                self._send(current, asynchronous=True)
        return change

    def _step_over_skipped(self) -> None:
        """Partitions with nothing in flight move their commit position to the client's position when that is
        past the last offset handed out: the records between are ones no handler gets (a transactional topic
        ends with a marker, so without this the commit stays one below the end and lag never reaches 0).

        Only here, on the poll thread between two fetches: every record the client returned so far was handed
        out or sought back (the fair intake's cut). Not at shutdown, whose poll drops what it returns.
        """
        tracker = self._tracker
        idle = [tp for tp in tracker.partitions() if not tracker.state(tp).pending]
        if not idle:
            return
        for tp, position in self._client.positions(idle).items():
            tracker.step_over(tracker.state(tp), position)

    def forget_snapshot(self) -> None:
        """The topic was re-created: nothing fetched before is ever committed."""
        self._snapshot = []

    def points(self, partitions: list[Partition] | None = None) -> list[Point]:
        """``(state, position, offset map, version)`` of each partition with something new to commit."""
        tracker = self._tracker
        points = []
        for tp, pos in tracker.uncommitted(partitions):
            state = tracker.state(tp)
            points.append((state, pos, self._offset_map(state, pos), state.version))
        return points

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's ``on_commit``: a failed asynchronous commit is retried with the next one."""
        if err is None or self._is_fatal(err):
            return
        self._map_refused(err)
        self._client.warn_rarely(err, f"commit failed: {err.str()} (will retry)")
        for tp in partitions:
            self._tracker.mark_committed((tp.topic, tp.partition), -1)  # forces a retry next time

    def _offset_map(self, state: PartitionState, position: int) -> str:
        """The commit metadata: the finished offsets above ``position`` (see mtc75.core.offsetmap)."""
        if not state.done:
            return ""
        try:
            text = encode(position, state.done, self._map_limit)
        except ValueError as err:  # a finished offset not above the position: never seen; commit the offset alone
            logger.warning("%s[%d]: no offset map at %d (%s)", state.tp[0], state.tp[1], position, err)
            return ""
        if text is None:
            # Too many gaps for offset.metadata.max.bytes: commit the offset alone, as before the map.
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
            self._tracker.mark_committed(state.tp, pos, version)

    def _map_refused(self, err: KafkaError) -> None:
        """A broker with a smaller offset.metadata.max.bytes refuses the map: commit offsets alone from now on."""
        if err.code() == KafkaError.OFFSET_METADATA_TOO_LARGE and self._map_limit:
            self._map_limit = 0
            logger.warning("the broker refused the offset map (offset.metadata.max.bytes below %d?): "
                           "committing offsets without it from now on", MAP_LIMIT)
