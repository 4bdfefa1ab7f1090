"""Fair intake: one partition's fetched run does not fill the backlog while another partition waits.

librdkafka's queue holds one partition's fetched messages before the next one's, and the poll loop
takes from its head only what the backlog has room for; with a backlog smaller than a fetch (the
demo: 4 threads, 0.1 s of work, 3 partitions, 600 messages) two partitions kept refilling it and the
third got no thread for 9.9 s. Round-robin in the scheduler cannot help a partition whose messages
never reach it. So before a batch is admitted, a partition whose messages in flight would pass its
share (:func:`mtc75.core.ordering.fair_share`) while another partition waits -- under half a share in
flight and messages on the broker past its position -- keeps only its share: the rest of its run is
dropped and the partition seeked back to the first dropped offset, so librdkafka fetches it again,
behind the waiting partitions' messages. Dropped messages were never admitted nor tracked, so no
commit can pass them; a seek that fails keeps its messages. A partition paused alone (the offset
window's hold) cannot take a turn and never counts as waiting.

Poll thread only (it calls the consumer).
"""

from __future__ import annotations

import logging
from collections.abc import Container
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from mtc75.core.offsets import OffsetTracker, Partition
from mtc75.core.ordering import fair_cuts, fair_share

logger = logging.getLogger(__name__)

# Seconds before a partition is cut again. A partition that only looks as if it waited (offsets the
# broker counts but never delivers: aborted transactions under read_committed) then costs one
# refetch of the cut partition per COOLDOWN, not one per loop turn. In the demo's shape a cut
# partition's refetch came back and was cut again 55 ms later (measured): 0.05 s keeps that.
COOLDOWN = 0.05


class FairIntake:
    """Cuts fetched batches so that every partition with messages gets its turn into the backlog."""

    def __init__(self, tracker: OffsetTracker) -> None:
        self._tracker = tracker
        self._last_cut: dict[Partition, float] = {}  # when each partition was last cut
        self.cuts = 0  # partition runs cut short (tests, logs)

    def cut(self, consumer: Any, messages: list[Any], high: int, limit: int, rate: float, now: float,
            held: Container[Partition] = ()) -> list[Any]:
        """``messages`` without the parts over their partition's share while another partition waits.

        ``held``: partitions paused alone (the offset window): they cannot take a turn, so they do not wait.
        """
        tracker = self._tracker
        parts = tracker.partitions()
        if len(parts) < 2 or not messages:
            return messages
        share = fair_share(high, limit, len(parts), rate)
        if len(messages) + tracker.in_flight() <= share:
            return messages  # the common case: no partition can pass its share
        in_flight = {tp: _in_flight(tracker, tp) for tp in parts}
        cuts = fair_cuts(in_flight, _runs(messages), share)
        last = self._last_cut
        cuts = {tp: o for tp, o in cuts.items() if now - last.get(tp, -COOLDOWN) >= COOLDOWN}
        if not cuts or not self._someone_waits(consumer, in_flight, share, cuts, held):
            return messages
        done: dict[Partition, int] = {}
        for (topic, partition), offset in cuts.items():
            last[(topic, partition)] = now
            try:
                consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as err:  # not cut: its messages are kept and run
                logger.debug("fair intake: seek %s[%d]@%d failed: %s", topic, partition, offset, err)
                continue
            done[(topic, partition)] = offset
        if not done:
            return messages
        self.cuts += len(done)
        logger.debug("fair intake: share %d, cut %s", share, done)
        return [m for m in messages if m.error() is not None or not _dropped(m, done)]

    def _someone_waits(self, consumer: Any, in_flight: dict[Partition, int], share: int, cuts: dict[Any, int],
                       held: Container[Partition]) -> bool:
        """A partition not cut nor held has under half a share in flight and messages on the broker past
        its next offset (more than one: a transaction's commit marker alone is no message).

        The next offset is the tracker's (one past the last one taken, else the watermark):
        ``consumer.position()`` reads -1001 after a pause dropped the partition's prefetched messages.
        A partition with neither (nothing taken since its assignment) is not known to wait.
        """
        for (topic, partition), count in in_flight.items():
            if count >= share // 2 or (topic, partition) in cuts or (topic, partition) in held:
                continue
            state = self._tracker.get((topic, partition))
            if state is None:
                continue
            following = state.pending[-1] + 1 if state.pending else state.position
            if following is None:
                continue
            try:
                _first, end = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            if end > following + 1:
                return True
        return False


def _dropped(message: Any, cuts: dict[Partition, int]) -> bool:
    cut = cuts.get((message.topic(), message.partition()))
    return cut is not None and message.offset() >= cut


def _in_flight(tracker: OffsetTracker, tp: Partition) -> int:
    state = tracker.get(tp)
    return 0 if state is None else len(state.pending) - len(state.done) - len(state.abandoned)


def _runs(messages: list[Any]) -> list[tuple[Partition, list[int]]]:
    """(partition, offsets) of each run of one partition, in fetch order; error events skipped."""
    runs: list[tuple[Partition, list[int]]] = []
    current: Partition | None = None
    for m in messages:
        if m.error() is not None:
            current = None
            continue
        tp = (m.topic(), m.partition())
        if tp != current:
            runs.append((tp, []))
            current = tp
        runs[-1][1].append(m.offset())
    return runs
