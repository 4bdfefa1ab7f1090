"""Backpressure: what the poll thread fetches, and when partitions pause -- the gate, the window and fair intake.

Four policies decide together, and this is the one place that acts on them:

- the pause gate (:mod:`mtc75.core.gate`): every assigned partition pauses while the backlog is full and the
  workers cannot take from it, and resumes at the low watermark (``PAUSED`` / ``RESUMED`` in the log);
- the offset window (:mod:`mtc75.core.window`): a partition whose span from its oldest unfinished offset
  reaches OFFSET_WINDOW pauses alone (``HELD``) until its watermark moves;
- fair intake (:mod:`mtc75.kafka.fairness`): a partition's fetched messages over its share are sent back to
  Kafka while another partition waits;
- key holds (:class:`mtc75.core.ratelimit.KeyHolds`, KEY_RATE): a partition whose messages wait for their
  keys' tokens (and behind them, in an ordered mode) reach a bound pauses alone (``HELD``) until they drain
  to half of it. The gate does not count those messages, so a throttled hot key never pauses the others.

:meth:`Backpressure.fetch` takes at most the room left below the high watermark; while paused it sleeps on
the pool (waking when the backlog drains or a thread runs dry) and only serves the group with ``poll(0)``.
Either wait ends by the time the next delayed message is due (a retry, or a message waiting for its rate
tokens), so that the loop's ``release_due`` starts it on time rather than up to ``POLL_TIMEOUT`` late.
A pause that rate limits caused (most of the backlog waits for tokens) says so in its ``PAUSED`` line.

Threads: the poll thread only (it calls the Kafka client). No lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container
from typing import Any

from mtc75.core.gate import Load, PauseGate, Verdict
from mtc75.core.offsets import OffsetTracker, Partition
from mtc75.core.ratelimit import RATE_RESERVE_SECONDS, KeyHolds, key_hold_bound
from mtc75.core.window import WindowHolds
from mtc75.kafka.client import KafkaClient
from mtc75.kafka.fairness import FairIntake
from mtc75.runtime.dispatcher import Dispatcher

logger = logging.getLogger(__name__)

POLL_TIMEOUT = 0.1  # longest a single poll blocks, so stop requests and timers stay responsive
MIN_WAIT = 0.001  # shortest wait for a due message: the loop does not spin on a due time just ahead
# Messages taken per consume(): the poll thread holds the GIL while it admits them, and workers waking
# from I/O wait for it, so batches stay small enough to keep that stall well under a millisecond.
MAX_BATCH = 500
SATURATION_GRACE = 0.05  # seconds a saturated pool gets to catch up before the partitions pause
# With the max_messages budget spent, the loop only waits for what runs; it serves the group this often (each
# message that poll() still returns is sent back with a seek, which refetches: not ten times a second).
SPENT_POLL_INTERVAL = 1.0
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
        self._spent_poll_at = 0.0  # when the loop last served the group with the budget spent
        self.key_holds = KeyHolds()  # partitions paused alone: too many messages wait for their keys' tokens
        self._aside = 0  # this turn: waiting messages the key holds bound, not the gate
        self._retrying = 0  # this turn: retries waiting out a backoff (nor the gate's either, up to MAX_BACKLOG)
        self._held = _Either(self.holds, self.key_holds)  # held alone, by the window or a key hold

    @property
    def paused(self) -> bool:
        return self.gate.paused

    def turn(self, now: float, processed: int) -> None:
        """One loop turn: feed the throughput, then pause or resume every partition as the gate says."""
        gate, dispatcher = self.gate, self._dispatcher
        throttle = dispatcher.throttle
        gate.observe(now, processed)
        limit, unit = dispatcher.max_thread_count, dispatcher.unit
        # While MAX_RATE is what holds messages back, a resume keeps RATE_RESERVE_SECONDS of its tokens' work
        gate.reserve = int(throttle.limits[0] * RATE_RESERVE_SECONDS) if throttle.rate_parked else 0
        key_waiting = throttle.key_waiting()
        self._aside = aside = sum(key_waiting.values()) if key_waiting else 0
        # retries waiting out a backoff hold no thread: the pool gets other messages meanwhile (the gate)
        self._retrying = retrying = max(0, dispatcher.delayed - throttle.throttled)
        if gate.paused:
            if gate.should_resume(now, limit, dispatcher.backlog - aside - retrying, unit):
                self._resume(now)
            return
        load = Load(dispatcher.active_thread_count, limit, dispatcher.backlog - aside, dispatcher.ready,
                    dispatcher.delayed - throttle.key_parked, unit, retrying)
        verdict = gate.verdict(load)
        if verdict is Verdict.RUN:
            return
        low = gate.watermarks(limit, unit)[0] + self._behind_keys()  # those wait in the scheduler, not for a thread
        if verdict is Verdict.PAUSE or not dispatcher.wait_backlog_at_most(
                low, min(SATURATION_GRACE, gate.pause_interval)):
            self._pause(time.monotonic())

    def fetch(self, budget: int | None = None) -> list[Any]:
        """This turn's messages: as many as there is room for, or only the group's events while paused.

        ``budget``: at most this many messages more (``max_messages`` less what is finished or in flight);
        at 0 the loop only serves the group, and a message that still arrives goes back to Kafka.
        """
        client, dispatcher, gate = self._client, self._dispatcher, self.gate
        limit, unit = dispatcher.max_thread_count, dispatcher.unit
        low, high = gate.watermarks(limit, unit)
        if gate.paused or budget == 0:
            if gate.paused:
                # retries waiting out a backoff and messages waiting for their keys do not drain
                behind = self._behind_keys()
                ready = dispatcher.backlog - dispatcher.delayed - behind
                wait = self._wait(max(gate.next_check_in(time.monotonic()), MIN_WAIT))
                dispatcher.wait_backlog_at_most(low + behind if ready > low else -1, wait)
            else:  # the budget is spent: nothing to fetch, only completions to wait for (a worker going idle)
                dispatcher.wait_backlog_at_most(-1, self._wait(POLL_TIMEOUT))
                now = time.monotonic()
                if now - self._spent_poll_at < SPENT_POLL_INTERVAL:
                    return []
                self._spent_poll_at = now
            message = client.poll(0)
            return [] if message is None else self._within([message], budget)
        waiting = dispatcher.backlog - self._aside - self._retrying
        room = high - waiting + (limit - dispatcher.active_thread_count) * unit
        room = min(room, gate.max_backlog - dispatcher.backlog)  # MAX_BACKLOG bounds the retries with the rest
        if budget is not None:
            room = min(room, budget)
        # consume() waits for a full batch until its timeout: take what is there without waiting, and block
        # (in poll, which returns on the first message) only when idle.
        messages = client.consume(num_messages=max(1, min(room, MAX_BATCH)), timeout=0)
        if not messages:
            message = client.poll(self._wait(POLL_TIMEOUT))
            messages = [] if message is None else [message]
        return self._fair.cut(client.consumer, messages, high, max(limit, unit), gate.rate, time.monotonic(),
                              self._held)

    def _behind_keys(self) -> int:
        """This turn's messages waiting in the scheduler behind a key that waits for its tokens."""
        return max(0, self._aside - self._dispatcher.throttle.key_parked)

    def _wait(self, longest: float) -> float:
        """At most ``longest`` (and POLL_TIMEOUT) seconds, ending when the next delayed message is due."""
        wait = min(longest, POLL_TIMEOUT)
        due = self._dispatcher.due_in()
        return wait if due is None else max(MIN_WAIT, min(wait, due))

    def _within(self, messages: list[Any], budget: int | None) -> list[Any]:
        """``messages`` up to ``budget``; each partition's rest is sent back (a seek to its first one), so no
        commit can pass it if the budget opens again (a revoke gave in-flight work up)."""
        if budget is None:
            return messages
        kept: list[Any] = []
        back: dict[Partition, int] = {}
        for message in messages:
            tp = (message.topic(), message.partition())
            if message.error() is not None:
                kept.append(message)  # an event, not a message: the ledger reports it
            elif tp in back:
                continue
            elif self._finished_before(tp, message.offset()):
                kept.append(message)  # completes without a handler (the offset map): not counted
            elif budget > 0:
                budget -= 1
                kept.append(message)
            else:
                back[tp] = message.offset()
        for tp, offset in back.items():
            if not self._client.seek(tp, offset):
                logger.debug("max_messages: %s[%d]@%d kept (the seek back failed)", tp[0], tp[1], offset)
                kept.extend(m for m in messages if (m.topic(), m.partition()) == tp and m.offset() >= offset)
        return kept

    def update_holds(self, touched: set[Partition]) -> None:
        """Hold a partition whose window is full (a stuck message); release it once its watermark moved.
        Hold a partition whose messages waiting for their keys' tokens reached the bound; release it at half."""
        client, tracker = self._client, self._tracker
        to_pause, to_resume = self.holds.update(tracker, client.paused, touched)
        to_resume = [tp for tp in to_resume if tp not in self.key_holds]
        touched.clear()
        self._update_key_holds()
        if to_pause:
            client.pause(to_pause, track=False)
            for t, p in to_pause:
                low, high = tracker.span(tracker.state((t, p)))
                logger.warning("HELD %s[%d]: %d offsets from its oldest unfinished one (%d) reached OFFSET_WINDOW "
                               "%d; other partitions go on", t, p, high - low, low, self.holds.bound)
        if to_resume:
            client.resume(to_resume)
            logger.info("released %s: its watermark moved", fmt(to_resume))

    def _update_key_holds(self) -> None:
        dispatcher, client, key_holds = self._dispatcher, self._client, self.key_holds
        waiting = dispatcher.throttle.key_waiting()
        if not waiting and not key_holds:
            return
        bound = key_hold_bound(dispatcher.throttle.limits[1], self.gate.watermarks(dispatcher.max_thread_count)[1])
        to_hold, to_release = key_holds.update(waiting, bound)
        # paused already by the gate (it resumes them) or the window (it releases them): nothing to call
        hold = [tp for tp in to_hold if tp not in client.paused and tp not in self.holds]
        release = [tp for tp in to_release if tp not in client.paused and tp not in self.holds]
        if hold:
            client.pause(hold, track=False)
        if to_hold:
            logger.info("HELD %s: %s messages wait for their keys' KEY_RATE tokens (bound %d); other partitions "
                        "go on", fmt(to_hold), "/".join(str(waiting[tp]) for tp in to_hold), bound)
        if release:
            client.resume(release)
        if to_release:
            logger.info("released %s: its messages waiting for KEY_RATE tokens are down to %s", fmt(to_release),
                        "/".join(str(waiting.get(tp, 0)) for tp in to_release))

    def assigned(self, tps: list[Partition]) -> None:
        """New assignments: fresh holds, and paused at once while the consumer is (assign comes first)."""
        self.holds.forget(tps)
        self.key_holds.forget(tps)
        if self.gate.paused:
            self._client.pause(tps)
        else:
            # librdkafka may keep a pause flag from an earlier assignment of the same partition (it does on
            # some eager-rebalance paths): clear it, or the partition never fetches.
            self._client.resume(tps, wake=False)

    def released(self, tps: list[Partition]) -> None:
        """Assignments given up: resume what we paused, so no stale flag outlives the assignment."""
        client = self._client
        held = set(self.holds.forget(tps)) | set(self.key_holds.forget(tps))
        client.resume([tp for tp in tps if tp in client.paused or tp in held], wake=False)

    def reset(self, tps: list[Partition]) -> None:
        """The topic was re-created: its partitions start with an empty window."""
        client = self._client
        held = set(self.holds.forget(tps)) | set(self.key_holds.forget(tps))
        client.resume([tp for tp in held if tp not in client.paused], wake=False)

    def _finished_before(self, tp: Partition, offset: int) -> bool:
        """The offset map read at assignment says ``offset`` finished under an earlier owner."""
        state = self._tracker.get(tp)
        finished = state.finished if state is not None else None
        return finished is not None and offset < finished.end and offset in finished

    def end(self) -> None:
        """At shutdown: a pause in progress ends (its time counts)."""
        if self.gate.paused:
            self.gate.end_pause(time.monotonic())

    def _pause(self, now: float) -> None:
        client, dispatcher = self._client, self._dispatcher
        self.gate.start_pause(now)
        client.pause(self._tracker.partitions())
        if dispatcher.throttle.throttled * 2 >= max(1, dispatcher.backlog):  # the pause the rate limits meant
            logger.info(
                "PAUSED %d partitions: %d messages waiting, %d of them for rate tokens (re-check in %.2fs)",
                len(client.paused), dispatcher.backlog, dispatcher.throttle.throttled, self.gate.pause_interval,
                extra=PAUSE_EVENT,
            )
            return
        logger.info(
            "PAUSED %d partitions: all %d %s busy, %d messages waiting (re-check in %.2fs)",
            len(client.paused), dispatcher.max_thread_count, dispatcher.workers, dispatcher.backlog,
            self.gate.pause_interval, extra=PAUSE_EVENT,
        )

    def _resume(self, now: float) -> None:
        client, dispatcher = self._client, self._dispatcher
        lasted = self.gate.end_pause(now)
        mine = [tp for tp in client.paused if tp in self._tracker and tp not in self._held]
        client.resume(mine)
        client.paused.clear()  # the held ones stay paused by the window, the others are no longer ours
        logger.info(
            "RESUMED %d partitions after %.2fs paused: %d/%d %s busy, %d waiting",
            len(mine), lasted, dispatcher.active_thread_count, dispatcher.max_thread_count,
            dispatcher.workers, dispatcher.backlog, extra=RESUME_EVENT,
        )


class _Either:
    """Partitions held alone by either the window or a key hold (for fair intake and the gate's resume)."""

    def __init__(self, first: Container[Partition], second: Container[Partition]) -> None:
        self._first, self._second = first, second

    def __contains__(self, tp: object) -> bool:
        return tp in self._first or tp in self._second


def fmt(tps: list[Partition]) -> str:
    """``topic[0,1,2]`` for log lines; several topics: ``orders[0,1] payments[0]``."""
    if not tps:
        return "no partitions"
    by_topic: dict[str, list[int]] = {}
    for topic, partition in sorted(tps):
        by_topic.setdefault(topic, []).append(partition)
    return " ".join(f"{topic}[{','.join(str(p) for p in parts)}]" for topic, parts in by_topic.items())
