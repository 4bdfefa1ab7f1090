"""Backpressure: what the poll thread fetches, and when partitions pause -- the gate, the window and fair intake.

Three policies decide together, and this is the one place that acts on them:

- the pause gate (:mod:`mtc75.core.gate`): every assigned partition pauses while the backlog is full and the
  workers cannot take from it, and resumes at the low watermark (``PAUSED`` / ``RESUMED`` in the log);
- the offset window (:mod:`mtc75.core.window`): a partition whose span from its oldest unfinished offset
  reaches OFFSET_WINDOW pauses alone (``HELD``) until its watermark moves;
- fair intake (:mod:`mtc75.kafka.fairness`): a partition's fetched messages over its share are sent back to
  Kafka while another partition waits.

:meth:`Backpressure.fetch` takes at most the room left below the high watermark; while paused it sleeps on
the pool (waking when the backlog drains or a thread runs dry) and only serves the group with ``poll(0)``.

Threads: the poll thread only (it calls the Kafka client). No lock.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mtc75.core.gate import Load, PauseGate, Verdict
from mtc75.core.offsets import OffsetTracker, Partition
from mtc75.core.window import WindowHolds
from mtc75.kafka.client import KafkaClient
from mtc75.kafka.fairness import FairIntake
from mtc75.runtime.dispatcher import Dispatcher

logger = logging.getLogger(__name__)

POLL_TIMEOUT = 0.1  # longest a single poll blocks, so stop requests and timers stay responsive
# Messages taken per consume(): the poll thread holds the GIL while it admits them, and workers waking
# from I/O wait for it, so batches stay small enough to keep that stall well under a millisecond.
MAX_BATCH = 500
SATURATION_GRACE = 0.05  # seconds a saturated pool gets to catch up before the partitions pause
# ``extra`` of the pause and resume log lines: how a log formatter tells them apart without reading the text
PAUSE_EVENT, RESUME_EVENT = {"mtc75_event": "pause"}, {"mtc75_event": "resume"}


class Backpressure:
    """Pauses, holds and fetches for one consumer (see the module notes)."""

    def __init__(
        self, client: KafkaClient, tracker: OffsetTracker, dispatcher: Dispatcher, gate: PauseGate, window: int
    ) -> None:
        self._client = client
        self._tracker = tracker
        self._dispatcher = dispatcher
        self.gate = gate
        self.holds = WindowHolds(window)  # partitions paused alone: span over OFFSET_WINDOW
        self._fair = FairIntake(tracker)

    @property
    def paused(self) -> bool:
        return self.gate.paused

    def turn(self, now: float, processed: int) -> None:
        """One loop turn: feed the throughput, then pause or resume every partition as the gate says."""
        gate, dispatcher = self.gate, self._dispatcher
        gate.observe(now, processed)
        limit, unit = dispatcher.max_thread_count, dispatcher.unit
        if gate.paused:
            if gate.should_resume(now, limit, dispatcher.backlog, unit):
                self._resume(now)
            return
        load = Load(dispatcher.active_thread_count, limit, dispatcher.backlog, dispatcher.ready, dispatcher.delayed,
                    unit)
        verdict = gate.verdict(load)
        if verdict is Verdict.RUN:
            return
        low = gate.watermarks(limit, unit)[0]
        if verdict is Verdict.PAUSE or not dispatcher.wait_backlog_at_most(
                low, min(SATURATION_GRACE, gate.pause_interval)):
            self._pause(time.monotonic())

    def fetch(self) -> list[Any]:
        """This turn's messages: as many as there is room for, or only the group's events while paused."""
        client, dispatcher, gate = self._client, self._dispatcher, self.gate
        limit, unit = dispatcher.max_thread_count, dispatcher.unit
        low, high = gate.watermarks(limit, unit)
        if gate.paused:
            ready = dispatcher.backlog - dispatcher.delayed  # retries waiting out a backoff do not drain
            wait = min(self._wait_at_most(), max(gate.next_check_in(time.monotonic()), 0.001))
            dispatcher.wait_backlog_at_most(low if ready > low else -1, wait)
            message = client.poll(0)
            return [] if message is None else [message]
        room = high - dispatcher.backlog + (limit - dispatcher.active_thread_count) * unit
        # consume() waits for a full batch until its timeout: take what is there without waiting, and block
        # (in poll, which returns on the first message) only when idle.
        messages = client.consume(num_messages=max(1, min(room, MAX_BATCH)), timeout=0)
        if not messages:
            message = client.poll(self._wait_at_most())
            messages = [] if message is None else [message]
        return self._fair.cut(client.consumer, messages, high, max(limit, unit), gate.rate, time.monotonic(),
                              self.holds)

    def _wait_at_most(self) -> float:
        """How long the poll thread may block now: POLL_TIMEOUT, or less when a retry or a batch is due sooner."""
        due = self._dispatcher.next_due()
        return POLL_TIMEOUT if due is None else min(POLL_TIMEOUT, max(0.0, due - time.monotonic()))

    def update_holds(self, touched: set[Partition]) -> None:
        """Hold a partition whose window is full (a stuck message); release it once its watermark moved."""
        client, tracker = self._client, self._tracker
        to_pause, to_resume = self.holds.update(tracker, client.paused, touched)
        touched.clear()
        if to_pause:
            client.pause(to_pause, track=False)
            for t, p in to_pause:
                low, high = tracker.span(tracker.state((t, p)))
                logger.warning("HELD %s[%d]: %d offsets from its oldest unfinished one (%d) reached OFFSET_WINDOW "
                               "%d; other partitions go on", t, p, high - low, low, self.holds.bound)
        if to_resume:
            client.resume(to_resume)
            logger.info("released %s: its watermark moved", fmt(to_resume))

    def assigned(self, tps: list[Partition]) -> None:
        """New assignments: fresh holds, and paused at once while the consumer is (assign comes first)."""
        self.holds.forget(tps)
        if self.gate.paused:
            self._client.pause(tps)
        else:
            # librdkafka may keep a pause flag from an earlier assignment of the same partition (it does on
            # some eager-rebalance paths): clear it, or the partition never fetches.
            self._client.resume(tps, wake=False)

    def released(self, tps: list[Partition]) -> None:
        """Assignments given up: resume what we paused, so no stale flag outlives the assignment."""
        client = self._client
        held = set(self.holds.forget(tps))
        client.resume([tp for tp in tps if tp in client.paused or tp in held], wake=False)

    def reset(self, tps: list[Partition]) -> None:
        """The topic was re-created: its partitions start with an empty window."""
        client = self._client
        client.resume([tp for tp in self.holds.forget(tps) if tp not in client.paused], wake=False)

    def end(self) -> None:
        """At shutdown: a pause in progress ends (its time counts)."""
        if self.gate.paused:
            self.gate.end_pause(time.monotonic())

    def _pause(self, now: float) -> None:
        client, dispatcher = self._client, self._dispatcher
        self.gate.start_pause(now)
        client.pause(self._tracker.partitions())
        logger.warning(
            "PAUSED %d partitions: all %d %s busy, %d messages waiting (re-check in %.2fs)",
            len(client.paused), dispatcher.max_thread_count, dispatcher.workers, dispatcher.backlog,
            self.gate.pause_interval, extra=PAUSE_EVENT,
        )

    def _resume(self, now: float) -> None:
        client, dispatcher = self._client, self._dispatcher
        lasted = self.gate.end_pause(now)
        mine = [tp for tp in client.paused if tp in self._tracker and tp not in self.holds]
        client.resume(mine)
        client.paused.clear()  # the held ones stay paused by the window, the others are no longer ours
        logger.warning(
            "RESUMED %d partitions after %.2fs paused: %d/%d %s busy, %d waiting",
            len(mine), lasted, dispatcher.active_thread_count, dispatcher.max_thread_count,
            dispatcher.workers, dispatcher.backlog, extra=RESUME_EVENT,
        )


def fmt(tps: list[Partition]) -> str:
    """``topic[0,1,2]`` for log lines."""
    if not tps:
        return "no partitions"
    topics = sorted({t for t, _ in tps})
    parts = ",".join(str(p) for _, p in sorted(tps))
    return f"{'/'.join(topics)}[{parts}]"
