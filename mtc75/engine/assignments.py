"""Assignments: the rebalance callbacks -- taking partitions (with their offset maps) and giving them up.

On assign, the offset maps committed with the group's offsets are read (bounded), so offsets an earlier owner
finished above its commit are not run again, and each partition starts with a fresh assignment state. On
revoke, the partitions are *retired* in one dispatcher step (their unstarted Works dropped, no retry or
put-back of theirs from then on), running handlers get up to REVOKE_TIMEOUT (capped at half of
``max.poll.interval.ms``: this wait happens inside ``poll()``) to finish, what finished is committed, and the
assignment ends: late completions are dropped, running coroutines cancelled. A lost assignment (the group
expired this member) commits nothing. A topic deleted and re-created gets fresh states read from
AUTO_OFFSET_RESET (:meth:`Assignments.reset`), topic by topic. An aborted transaction (exactly-once) reads
partitions again from their last commit, with fresh states (:meth:`Assignments.rewind`).

Threads: the poll thread only; librdkafka calls the callbacks from inside the poll thread's ``poll``,
``consume`` and ``close``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaException, TopicPartition

from mtc75.core.offsetmap import FinishedOffsets, OffsetMapError, decode
from mtc75.core.offsets import Partition
from mtc75.engine.backpressure import Backpressure, fmt
from mtc75.engine.checkpoint import CONFIRM_TIMEOUT, Checkpoint
from mtc75.engine.ledger import Ledger
from mtc75.errors import KafkaUnavailable
from mtc75.kafka.client import KafkaClient
from mtc75.runtime.dispatcher import Dispatcher

logger = logging.getLogger(__name__)

COMMITTED_TIMEOUT = 5.0  # longest an assignment waits to read the committed offset maps (then: no map)
REVOKE_POLL = 0.01  # completion polling step while a revoke waits for handlers
# A revoke waits for running handlers inside the rebalance callback, where the consumer does not poll:
# past max.poll.interval.ms the member is evicted. So the wait is capped at this share of the interval.
REVOKE_SHARE_OF_POLL_INTERVAL = 0.5
RESET_OFFSETS = {
    "earliest": OFFSET_BEGINNING, "smallest": OFFSET_BEGINNING, "beginning": OFFSET_BEGINNING,
    "latest": OFFSET_END, "largest": OFFSET_END, "end": OFFSET_END,
}


class Assignments:
    """Takes and gives up partitions for one consumer (see the module notes)."""

    def __init__(
        self,
        client: KafkaClient,
        ledger: Ledger,
        dispatcher: Dispatcher,
        backpressure: Backpressure,
        checkpoint: Checkpoint,
        revoke_wait: float,
        on_first: Callable[[], None],
    ) -> None:
        self._client = client
        self._ledger = ledger
        self._tracker = ledger.tracker
        self._dispatcher = dispatcher
        self._backpressure = backpressure
        self._checkpoint = checkpoint
        self._revoke_wait = revoke_wait  # REVOKE_TIMEOUT, capped below max.poll.interval.ms
        self._on_first = on_first  # the first assignment (idle_exit counts from there)
        self.closing = False  # set at shutdown: close()'s revoke commits what is done without waiting again
        self.halted = False  # a fatal error: nothing is committed
        # From a lost assignment to the group's next one: the member is waiting for the group (idle_exit does
        # not count it; after a long outage the rejoin can take longer than IDLE_EXIT, messages waiting meanwhile)
        self.rejoining = False
        self.abandoned = 0  # handlers still running when a revoke stopped waiting for them
        self.reset_to = "earliest"  # AUTO_OFFSET_RESET: where a rewound partition without a commit starts
        # exactly-once: how long the committed offsets may take (a predecessor's open transaction holds them
        # until it ends), and that an assignment whose offset maps cannot be read stops the run (running
        # finished work again would write its outputs twice)
        self.committed_timeout = COMMITTED_TIMEOUT
        self.strict_maps = False

    # -- librdkafka's callbacks -------------------------------------------------------------------------

    def on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        self.rejoining = False
        self._on_first()
        self._checkpoint.assigned({tp.topic for tp in partitions})  # topic ids learned before anything is fetched
        self._tracker.assign(tps, self._read_maps(partitions))
        self._client.assign(partitions)  # first: pausing a partition not yet assigned has no effect
        if partitions:
            self._backpressure.assigned(tps)
        paused = self._backpressure.paused
        logger.info("assigned %s%s", fmt(tps), " (paused: consumer is saturated)" if paused else "")

    def on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._give_up(partitions, commit=True)
        logger.info("revoked %s", fmt([(tp.topic, tp.partition) for tp in partitions]))

    def on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        logger.warning("lost %s (group membership expired): their uncommitted work will be redelivered", fmt(tps))
        self._give_up(partitions, commit=False)
        self.rejoining = True

    # -- the engine's ---------------------------------------------------------------------------------

    def reset(self, reset: str, topic: str) -> bool:
        """``topic`` was deleted and created again: drop every Work of the old one and read the new one from
        ``reset`` (AUTO_OFFSET_RESET); other topics are left as they are. False when ``reset`` names no
        position (the engine then stops)."""
        logical = RESET_OFFSETS.get(reset)
        if logical is None:
            return False
        tps = [tp for tp in self._tracker.partitions() if tp[0] == topic]
        if not tps:
            return True
        states = [self._tracker.state(tp) for tp in tps]
        self._ledger.abandon(self._dispatcher.retire(states))
        self._tracker.assign(tps)  # fresh states: the old ones are dead, their completions dropped
        self._checkpoint.forget(states)
        self._backpressure.reset(tps)
        for tp in tps:
            self._client.seek(tp, logical)  # also drops what librdkafka prefetched
        return True

    def rewind(self, tps: list[Partition]) -> None:
        """A transaction was aborted: drop every Work of ``tps`` and read them again from their last commit
        (offset and offset map), with fresh states, so late completions of the aborted work are dropped.
        Raises ``KafkaException`` when the committed offsets cannot be read (the caller halts)."""
        tps = [tp for tp in tps if tp in self._tracker]
        if not tps:
            return
        states = [self._tracker.state(tp) for tp in tps]
        self._ledger.abandon(self._dispatcher.retire(states))
        committed = self._client.committed([TopicPartition(t, p) for t, p in tps], timeout=self.committed_timeout)
        self._tracker.assign(tps, self._decode_maps(committed))
        self._checkpoint.forget(states)
        self._backpressure.reset(tps)
        for tp in committed:
            logical = RESET_OFFSETS.get(self.reset_to, OFFSET_BEGINNING)
            self._client.seek((tp.topic, tp.partition), tp.offset if tp.offset >= 0 else logical)

    # -- internals ------------------------------------------------------------------------------------

    def _read_maps(self, partitions: list[TopicPartition]) -> dict[Partition, FinishedOffsets]:
        """The offset maps committed with the group's offsets: work an earlier owner already finished.

        Bounded (COMMITTED_TIMEOUT); on error the partitions are read without a map (more repeats, never
        a loss). Metadata that is not our map (another tool's, garbled, stale) is ignored with a warning.
        """
        if not partitions:
            return {}
        try:
            committed = self._client.committed(partitions, timeout=self.committed_timeout)
        except KafkaException as err:
            if self.strict_maps:
                tps = fmt([(tp.topic, tp.partition) for tp in partitions])
                raise KafkaUnavailable(f"could not read the committed offsets and offset maps of {tps} "
                                       f"({err.args[0].str()}): with exactly_once a partition is not read "
                                       "without them") from None
            logger.warning("could not read the committed offset maps (%s): finished work above the committed "
                           "offsets may run again", err.args[0].str())
            return {}
        return self._decode_maps(committed)

    def _decode_maps(self, committed: list[TopicPartition]) -> dict[Partition, FinishedOffsets]:
        maps: dict[Partition, FinishedOffsets] = {}
        for tp in committed:
            if tp.error is not None or not tp.metadata:
                continue
            # the end offset, so a map claiming offsets not written yet is refused (None: unknown)
            high = self._client.end_offset((tp.topic, tp.partition))
            try:
                finished = decode(tp.metadata, tp.offset, high)
            except OffsetMapError as err:
                logger.warning("%s[%d]: ignoring the commit metadata at offset %d (%s): not an MTC75 offset map",
                               tp.topic, tp.partition, tp.offset, err)
                continue
            if finished:
                maps[(tp.topic, tp.partition)] = finished
                logger.info("%s[%d]: %d offsets above the committed %d finished before (offset map): not run again",
                            tp.topic, tp.partition, finished.count, tp.offset)
        return maps

    def _give_up(self, partitions: list[TopicPartition], commit: bool) -> None:
        """Retire partitions, wait (bounded) for their running handlers, commit what finished, unassign."""
        tracker = self._tracker
        tps = [(tp.topic, tp.partition) for tp in partitions]
        owned = [tp for tp in tps if tp in tracker]
        states = [tracker.state(tp) for tp in owned]
        self._ledger.abandon(self._dispatcher.retire(states))
        if commit and owned and not self.halted:
            self._wait_for(owned)
            self._checkpoint.commit_now(owned, time.monotonic() + CONFIRM_TIMEOUT)
        tracker.revoke(owned)
        self._checkpoint.forget(states)
        self._dispatcher.cancel_running(states)  # coroutines still running are cancelled: never committed
        self._backpressure.released(tps)
        self._client.unassign(partitions)

    def _wait_for(self, owned: list[Partition]) -> None:
        """Let the running handlers of ``owned`` finish, for at most the revoke wait (none at close: shutdown
        has already waited its SHUTDOWN_TIMEOUT, and counted and said what it abandoned)."""
        tracker = self._tracker
        started = time.monotonic()
        deadline = started + (0.0 if self.closing else self._revoke_wait)
        while True:
            self._ledger.settle(self._dispatcher.completions)
            running = sum(len(tracker.outstanding(tp)) for tp in owned)
            if not running or time.monotonic() >= deadline:
                break
            time.sleep(REVOKE_POLL)
        if running and not self.closing:
            self.abandoned += running
            logger.warning(
                "revoke: abandoned %d handlers still running after %.1fs (REVOKE_TIMEOUT capped at half of "
                "max.poll.interval.ms: %.1fs); their messages will be delivered again",
                running, time.monotonic() - started, self._revoke_wait,
            )


def revoke_wait(revoke_timeout: float, conf: Mapping[str, Any]) -> float:
    """REVOKE_TIMEOUT, capped at REVOKE_SHARE_OF_POLL_INTERVAL of max.poll.interval.ms (default 300 s)."""
    try:
        poll_interval = float(conf.get("max.poll.interval.ms", 300_000)) / 1000.0
    except (TypeError, ValueError):
        poll_interval = 300.0  # an invalid value is reported when the consumer is created
    return min(revoke_timeout, REVOKE_SHARE_OF_POLL_INTERVAL * poll_interval)

