"""The MTC75 consumer: one poll thread, a bounded pool, pause on saturation, at-least-once commits.

The thread that calls :meth:`Mtc75Consumer.run` is the poll thread and makes every ``Consumer`` call:
fetching, pause/resume, rebalance callbacks and commits. Worker threads only run handlers and report
completions on a queue. A message is committed only after its handler finished, and only as part of
its partition's contiguous completed prefix (see :mod:`mtc75.core.offsets`), and only once the topic's id
was confirmed after the message was fetched (see :mod:`mtc75.kafka.topicwatch`). Each commit carries the
offsets finished above that prefix as an offset map (:mod:`mtc75.core.offsetmap`), read back at assignment
so they do not run again; a partition whose span reaches OFFSET_WINDOW is paused alone
(:mod:`mtc75.core.window`). The one exception to "the poll thread makes every Consumer call" is the final
``close()``, run on a helper thread while the poll thread waits for it (bounded, see ``Mtc75Consumer._close``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from itertools import repeat
from types import MappingProxyType
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from mtc75.core.gate import PauseGate
from mtc75.core.offsetmap import DEFAULT_LIMIT as MAP_LIMIT
from mtc75.core.offsetmap import FinishedOffsets, OffsetMapError, decode, encode
from mtc75.core.offsets import OffsetTracker, Partition, PartitionState
from mtc75.core.ordering import new_scheduler
from mtc75.core.retry import RetryPolicy
from mtc75.core.window import WindowHolds
from mtc75.errors import KafkaFatal, KafkaUnavailable, MessageFailed, Mtc75Error, TopicGone
from mtc75.kafka.clients import REAL_CLIENTS, KafkaClients, new_client
from mtc75.kafka.deadletter import DeadLetters
from mtc75.kafka.fairness import FairIntake
from mtc75.kafka.topics import METADATA_TIMEOUT, require_topic
from mtc75.kafka.topicwatch import Change, TopicWatch
from mtc75.runtime.dispatcher import Dispatcher, Handler, Work
from mtc75.runtime.handlers import prepare_handler
from mtc75.settings import Settings

logger = logging.getLogger(__name__)

POLL_TIMEOUT = 0.1  # longest a single poll blocks, so stop requests and timers stay responsive
# Messages taken per consume(): the poll thread holds the GIL while it files a batch, and workers
# waking from I/O wait for it, so batches stay small enough to keep that stall well under a millisecond.
MAX_BATCH = 500
SATURATION_GRACE = 0.05  # seconds a saturated pool gets to catch up before the partitions pause
REBALANCE_POLL = 0.01  # completion polling step while a revoke waits for handlers
ERROR_REPEAT_SECONDS = 10.0  # the same client error is logged at most once per this many seconds
PROBE_INTERVAL = 1.0  # while no broker is reachable, check this often whether one is back
PROBE_TIMEOUT = 0.5
# A revoke waits for running handlers inside the rebalance callback, where the consumer does not poll:
# past max.poll.interval.ms the member is evicted. So the wait is capped at this share of the interval.
REVOKE_SHARE_OF_POLL_INTERVAL = 0.5
# A topic that disappears is given this long to come back (a delete + create) before the run ends with exit 3.
TOPIC_GONE_GRACE = 10.0
CONFIRM_TIMEOUT = 5.0  # longest a synchronous commit (revoke, shutdown) waits to confirm the topic id
CLOSE_TIMEOUT = 10.0  # longest shutdown waits for librdkafka's close() (see _close)
CLOSE_TIMEOUT_DOWN = 2.0  # the same while no broker is reachable: there is no group left to leave
COMMITTED_TIMEOUT = 5.0  # longest an assignment waits to read the committed offset maps (then: no map)
# -X properties that describe the connection, so the dead-letter producer reaches the same cluster.
CONNECTION_PREFIXES = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.address.")


@dataclass(frozen=True)
class Stats:
    """A snapshot for status lines and summaries (taken on the poll thread)."""

    active_threads: int
    max_thread_count: int
    paused: bool
    paused_for: float
    next_check_in: float
    processed: int
    failed: int
    rate: float
    in_flight: int
    backlog: int
    pauses: int
    paused_seconds: float
    elapsed_seconds: float
    max_active_threads: int
    assigned: int
    retried: int = 0  # retries scheduled after a handler raised
    dead_lettered: int = 0  # messages confirmed on <topic>.dlq after their last attempt
    skipped: int = 0  # messages given up after their last attempt (ON_FAILURE=skip)
    dropped_late: int = 0  # completions after their partition was revoked or lost: not counted, not committed
    abandoned: int = 0  # handlers still running when a revoke or shutdown stopped waiting for them
    # end offset minus committed offset per assigned partition (refreshed with each status snapshot)
    lag: Mapping[Partition, int] = field(default_factory=dict)
    ordering: str = "unordered"  # ORDERING: unordered, partition or key
    blocked: int = 0  # waiting messages that must wait for an earlier one of their key or partition

    def summary(self) -> dict[str, Any]:
        """The ``--summary-json`` document."""
        keys = (
            "processed", "failed", "retried", "dead_lettered", "skipped", "pauses", "paused_seconds",
            "elapsed_seconds", "max_active_threads", "abandoned",
        )
        data = asdict(self)
        out = {k: data[k] for k in keys}
        out["paused_seconds"] = round(out["paused_seconds"], 3)
        out["elapsed_seconds"] = round(out["elapsed_seconds"], 3)
        out["max_thread_count"] = self.max_thread_count
        out["ordering"] = self.ordering
        return out


class Mtc75Consumer:
    """Consumes ``settings.TOPIC`` with at most ``settings.MAX_THREAD_COUNT`` handlers at once.

    No network I/O happens before :meth:`run`. :meth:`stop` may be called from any thread or a
    signal handler; ``run`` then finishes in-flight work (bounded), commits and closes.
    """

    def __init__(
        self,
        settings: Settings,
        handler: Handler,
        *,
        overrides: Mapping[str, str] = MappingProxyType({}),
        max_messages: int | None = None,
        idle_exit: float | None = None,
        on_status: Callable[[Stats], None] | None = None,
        status_interval: float = 1.0,
        clients: KafkaClients = REAL_CLIENTS,
    ) -> None:
        if max_messages is not None and max_messages < 1:
            raise ValueError(f"max_messages must be >= 1, got {max_messages}")
        if idle_exit is not None and idle_exit <= 0:
            raise ValueError(f"idle_exit must be > 0, got {idle_exit}")
        self._settings = settings
        self._conf = settings.consumer_config(overrides)
        self._cooperative = _is_incremental(self._conf)
        self._handler = prepare_handler(handler)  # refuses what the workers cannot run (async handlers)
        self._max_messages = max_messages
        self._idle_exit = idle_exit
        self._on_status = on_status
        self._status_interval = status_interval
        # Every Kafka client is built through this (tests pass in-memory fakes: tests/fake_kafka.py).
        self._clients = clients
        self._stop = threading.Event()
        self._consumer: Consumer | None = None
        self._dispatcher: Dispatcher | None = None
        self._tracker = OffsetTracker()
        self._gate = PauseGate(settings.PAUSE_INTERVAL, settings.MAX_BACKLOG)
        self._paused: set[Partition] = set()  # partitions *we* paused; librdkafka's flag is not trusted
        self._fair = FairIntake(self._tracker)  # a partition's long run does not starve the others
        self._holds = WindowHolds(settings.offset_window())  # partitions paused alone: span over OFFSET_WINDOW
        self._retry = RetryPolicy(settings.MAX_ATTEMPTS, settings.RETRY_BACKOFF, settings.RETRY_BACKOFF_MAX)
        self._dead_letters: DeadLetters | None = None
        self._fatal: Mtc75Error | None = None  # why run() must fail once it has shut down cleanly
        self._down_since: float | None = None  # when librdkafka reported every broker down
        self._next_probe = 0.0
        self._processed = 0
        self._failed = 0
        self._skipped = 0
        self._dropped_late = 0
        self._started = 0.0
        self._last_message_at = 0.0
        self._last_progress_at = 0.0  # last time a handler finished (see _finished)
        self._assigned_once = False  # --idle-exit counts from the first assignment
        self._revoke_wait = _revoke_budget(settings.REVOKE_TIMEOUT, self._conf)
        self._halted = False  # a fatal error: nothing more is handled or committed
        self._watch: TopicWatch | None = None  # the topic's id, so a re-created topic is noticed
        self._commit_snapshot: list[tuple[PartitionState, int, str, int]] = []  # waiting for the topic id check
        self._map_limit = MAP_LIMIT  # the broker's offset.metadata.max.bytes (0 once it refused a map)
        self._gone_reported = False
        self._rate = 0.0
        self._rate_mark = (0.0, 0)
        self._error_quiet_until: dict[int, float] = {}
        self._connected = False  # set once the start-up metadata check passed
        self._closing = False  # set by shutdown before close(), whose revoke must not wait again
        self._lag: dict[Partition, int] = {}
        self._retune_lock = threading.Lock()
        self._retune: dict[str, Any] = {}  # live changes waiting for the poll thread
        self.abandoned = 0  # handlers still running when shutdown gave up waiting
        self.abandoned_at_revoke = 0  # handlers still running when a revoke gave up waiting
        self.close_timed_out = False  # the Kafka client did not close in time: the process must not wait for it

    # -- public -------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish: stop fetching, drain in-flight work, commit, close."""
        self._stop.set()

    def retune(self, *, max_thread_count: int | None = None, pause_interval: float | None = None) -> None:
        """Change the thread bound and the pause interval of a running consumer; any thread may call.

        The poll thread applies the change within one loop turn (at most ``POLL_TIMEOUT`` later).
        """
        if max_thread_count is not None and max_thread_count < 1:
            raise ValueError(f"max_thread_count must be >= 1, got {max_thread_count}")
        if pause_interval is not None and pause_interval <= 0:
            raise ValueError(f"pause_interval must be > 0, got {pause_interval}")
        with self._retune_lock:
            if max_thread_count is not None:
                self._retune["MAX_THREAD_COUNT"] = max_thread_count
            if pause_interval is not None:
                self._retune["PAUSE_INTERVAL"] = pause_interval

    def run(self) -> Stats:
        """Consume until stopped, ``max_messages`` handled, or ``idle_exit`` seconds without messages."""
        self._started = self._last_message_at = time.monotonic()
        self._rate_mark = (self._started, 0)
        conf = dict(self._conf)
        conf.setdefault("error_cb", self._on_error)
        conf["on_commit"] = self._on_commit
        consumer = new_client(self._clients.consumer, conf, "librdkafka consumer")
        self._consumer = consumer
        self._dispatcher = Dispatcher(self._handler, self._settings.MAX_THREAD_COUNT, self._retry,
                                      scheduler=new_scheduler(self._settings.ORDERING))
        try:
            partitions = self._check_topic()
            self._start_watch()
            if self._settings.ON_FAILURE == "dlq":
                self._start_dead_letters(partitions)
            self._connected = True
            consumer.subscribe(
                [self._settings.TOPIC], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
            logger.info(
                "consuming %s as group %s with %d threads (pause interval %.2fs, %s assignment)",
                self._settings.TOPIC, self._settings.GROUP_ID, self._settings.MAX_THREAD_COUNT,
                self._settings.PAUSE_INTERVAL, "incremental" if self._cooperative else "eager",
            )
            self._loop()
        except KafkaException as err:
            raise KafkaUnavailable(f"Kafka error: {err.args[0].str()}") from None
        finally:
            self._shutdown()
        if self._fatal is not None:
            raise self._fatal
        return self.stats()

    def stats(self) -> Stats:
        now = time.monotonic()
        d = self._dispatcher
        gate = self._gate
        return Stats(
            active_threads=d.active_thread_count if d else 0,
            max_thread_count=self._settings.MAX_THREAD_COUNT,
            paused=gate.paused,
            paused_for=gate.paused_for(now),
            next_check_in=gate.next_check_in(now),
            processed=self._processed,
            failed=self._failed,
            rate=self._rate,
            in_flight=self._tracker.in_flight(),
            backlog=d.backlog if d else 0,
            pauses=gate.pauses,
            paused_seconds=gate.paused_seconds + gate.paused_for(now),
            elapsed_seconds=now - self._started if self._started else 0.0,
            max_active_threads=d.max_active_threads if d else 0,
            assigned=len(self._tracker.partitions()),
            retried=d.retried if d else 0,
            dead_lettered=self._dead_letters.delivered if self._dead_letters else 0,
            skipped=self._skipped,
            dropped_late=self._dropped_late,
            abandoned=self.abandoned + self.abandoned_at_revoke,
            lag=dict(self._lag),
            ordering=self._settings.ORDERING,
            blocked=d.blocked if d else 0,
        )

    # -- poll loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        consumer = self._consumer
        dispatcher = self._dispatcher
        assert consumer is not None and dispatcher is not None
        gate = self._gate
        commit_every = self._settings.COMMIT_INTERVAL
        next_commit = next_status = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if self._retune:
                self._apply_retune()
            limit = dispatcher.max_thread_count
            dispatcher.release_due()
            self._drain_completions()
            if self._down_since is not None and self._broker_gone(now):
                break
            gate.observe(now, self._processed)
            backlog = dispatcher.backlog  # includes messages waiting for a retry: they count against the bound
            active = dispatcher.active_thread_count
            low, high = gate.watermarks(limit)
            if dispatcher.delayed >= high:
                # Retries alone fill the backlog: threads are idle only because everything is waiting
                # for its backoff, so stop fetching rather than pile up more failures.
                active = limit
            elif backlog >= high and dispatcher.ready <= limit - active:
                # Ordered modes: the free threads have nothing they may start (the rest waits behind its
                # key or partition); fetching on would grow the backlog past its bound: pause.
                active = limit
            if gate.paused:
                if gate.should_resume(now, limit, backlog):
                    self._resume(now)
            elif gate.should_pause(active, limit, backlog) and (
                dispatcher.delayed >= high
                or not dispatcher.wait_backlog_at_most(low, min(SATURATION_GRACE, gate.pause_interval))
            ):
                # Saturated, and the pool did not catch up within the grace period (a fast pool does,
                # and pausing it would only throw away prefetched messages): pause.
                self._pause(time.monotonic())

            if gate.paused:
                # Sleep on the pool rather than in poll(): wake when the backlog drains to the low
                # watermark, or a thread runs dry, or the interval ends; then serve the group with
                # poll(0) (heartbeat-driven callbacks, rebalances, commit results).
                ready = dispatcher.backlog - dispatcher.delayed  # retries waiting out a backoff do not drain
                wait = min(POLL_TIMEOUT, max(gate.next_check_in(time.monotonic()), 0.001))
                dispatcher.wait_backlog_at_most(low if ready > low else -1, wait)
                messages = _as_list(consumer.poll(0))
            else:
                room = high - dispatcher.backlog + (limit - dispatcher.active_thread_count)
                # consume() waits for a full batch until its timeout; take what is there without
                # waiting, and block (in poll, which returns on the first message) only when idle.
                messages = consumer.consume(num_messages=max(1, min(room, MAX_BATCH)), timeout=0)
                if not messages:
                    messages = _as_list(consumer.poll(POLL_TIMEOUT))
            if messages:
                # every partition its turn (not one partition's long run while another waits)
                messages = self._fair.cut(consumer, messages, high, limit, gate.rate, time.monotonic(), self._holds)
                self._accept(messages)
                # Only a real message proves a broker answered: poll() also returns error events, and
                # those arrive while every broker is down (a 10 s budget never ran out: they reset it).
                if self._down_since is not None and any(m.error() is None for m in messages):
                    self._down_since = None
            self._update_holds()

            now = time.monotonic()
            if now >= next_commit and self._down_since is None:  # commits to no broker only pile up
                self._commit_tick(now)
                next_commit = now + commit_every
            elif self._watch is not None and self._watch.busy:
                self._watch_turn(now)
            if now >= next_status:
                self._update_rate(now)
                self._refresh_lag()
                if self._on_status is not None:
                    self._on_status(self.stats())
                next_status = now + self._status_interval
            if self._finished(now):
                break

    def _accept(self, messages: list[Any]) -> None:
        """Hand fetched messages to the pool. Every returned message is kept: none is dropped here.

        Runs on the poll thread for every message, so it works per partition run (consume() returns
        runs of one partition): one state lookup and one tracker step per run, not per message.
        """
        batch: list[Work] = []
        run: list[Any] = []
        topic: str | None = None
        partition = -1
        if self._halted:
            return  # a fatal error: nothing more is handled (these stay uncommitted)
        for msg in messages:
            if msg.error() is not None:
                self._admit(run, batch)
                run, topic, partition = [], None, -1
                self._on_message_error(msg.error())
                continue
            if msg.partition() != partition or msg.topic() != topic:
                self._admit(run, batch)
                run = [msg]
                topic, partition = msg.topic(), msg.partition()
            else:
                run.append(msg)
        self._admit(run, batch)
        if batch:
            self._last_message_at = time.monotonic()
            assert self._dispatcher is not None
            self._dispatcher.put(batch)

    def _admit(self, run: list[Any], batch: list[Work]) -> None:
        """Record one partition run in the tracker and append its admitted messages to ``batch``."""
        if not run:
            return
        head = run[0]
        topic, partition = head.topic(), head.partition()
        state = self._tracker.get((topic, partition))
        offsets = [msg.offset() for msg in run]
        # Not ours any more (revoked between fetch and now), or a redelivery of an offset already in
        # flight: the current owner / the running handler covers it.
        admitted = None if state is None else self._tracker.admit_run(state, offsets)
        if admitted is None and state is not None:
            if state.finished is None:  # the common case: no offset map from an earlier owner
                batch.extend(map(Work, run, repeat(state), offsets))
                return
            admitted = [True] * len(offsets)
        skip = self._tracker.skip_finished
        for msg, offset, ok in zip(run, offsets, admitted or repeat(False), strict=False):
            if not ok:
                logger.debug("skipping %s[%d]@%d: not owned or already in flight", topic, partition, offset)
            elif not skip(state, offset):  # else finished under an earlier owner: completed without a handler
                assert state is not None
                batch.append(Work(msg, state, offset))

    def _drain_completions(self) -> int:
        """Apply finished handlers to the watermarks (poll thread only).

        A message that failed its last attempt is done only once ON_FAILURE has dealt with it: its
        dead-letter record confirmed (``dlq``), counted (``skip``), or never (``stop``).
        """
        assert self._dispatcher is not None
        completions = self._dispatcher.completions
        complete = self._tracker.complete
        count = 0
        if completions:
            self._last_progress_at = time.monotonic()
        while completions:
            work = completions.popleft()
            if not work.failed:  # the hot path, inlined (bench/noop_path.py): the handler returned
                if complete(work.state, work.offset):
                    self._processed += 1
                    count += 1
                else:
                    self._dropped_late += 1
                continue
            if work.failed:
                self._failed += 1
            if work.failed and work.state.alive:
                mode = self._settings.ON_FAILURE
                if mode == "dlq":
                    assert self._dead_letters is not None
                    try:
                        self._dead_letters.publish(work)
                    except MessageFailed as err:  # can never be dead-lettered: stop, commit below it
                        self._tracker.abandon(work.state, work.offset)
                        self._fatal = self._fatal or err
                        self.stop()
                    continue
                if mode == "stop":
                    # never completes: abandon it so revoke and shutdown do not wait for it
                    self._tracker.abandon(work.state, work.offset)
                    if self._fatal is None:
                        msg = work.message
                        self._fatal = MessageFailed(
                            f"{msg.topic()}[{msg.partition()}]@{work.offset} failed {work.attempts} attempts "
                            # Another failure below it in the partition (one still waiting for a retry)
                            # may hold the commit lower: say what holds for every partition.
                            f"({work.error}); ON_FAILURE=stop: each partition committed up to its first "
                            "unfinished message"
                        )
                        self.stop()
                    continue
                self._skipped += 1
            count += self._finish(work)
        if self._dead_letters is not None and self._dead_letters.pending:
            try:
                confirmed = self._dead_letters.poll()
            except MessageFailed as err:
                if self._fatal is None:
                    self._fatal = err
                self.stop()
                confirmed = []
            for work in confirmed:
                count += self._finish(work)
        return count

    def _finish(self, work: Work) -> int:
        """Count a finished message, unless its assignment is gone (a late completion, dropped)."""
        if self._tracker.complete(work.state, work.offset):
            self._processed += 1
            return 1
        self._dropped_late += 1
        return 0

    def _finished(self, now: float) -> bool:
        if self._max_messages is not None and self._processed >= self._max_messages:
            logger.info("handled %d messages (--max-messages reached); stopping", self._processed)
            return True
        if self._idle_exit is not None and self._assigned_once and now - self._last_message_at >= self._idle_exit:
            # Idle counts from the first assignment (a start that waits on a rebalance has read nothing
            # yet), and needs nothing in flight -- or, when handlers still run, none finished for as long
            # (a hung handler must not keep --idle-exit from firing; shutdown then bounds the wait).
            # Retries waiting out a backoff keep the run alive: they will finish.
            assert self._dispatcher is not None
            if self._tracker.in_flight() == 0 or (
                self._dispatcher.delayed == 0 and now - self._last_progress_at >= self._idle_exit
            ):
                logger.info("no new message for %.1fs (--idle-exit); stopping", self._idle_exit)
                return True
        return False

    def _apply_retune(self) -> None:
        assert self._dispatcher is not None
        with self._retune_lock:
            changes, self._retune = self._retune, {}
        self._settings = self._settings.replace(**changes)
        if "MAX_THREAD_COUNT" in changes:
            self._dispatcher.resize(changes["MAX_THREAD_COUNT"])
        if "PAUSE_INTERVAL" in changes:
            self._gate.pause_interval = changes["PAUSE_INTERVAL"]
        logger.debug("retuned: %s", changes)

    def _refresh_lag(self) -> None:
        """Per-partition lag from librdkafka's cached high watermarks: no request to the broker."""
        consumer = self._consumer
        assert consumer is not None
        lag: dict[Partition, int] = {}
        unknown: list[TopicPartition] = []
        for tp in self._tracker.partitions():
            base = self._tracker.lag_base(tp)
            if base is None:
                unknown.append(TopicPartition(*tp))
                continue
            high = _cached_high(consumer, TopicPartition(*tp))
            if high is not None:
                lag[tp] = max(0, high - base)
        if unknown:  # nothing handled since the assignment: count from the local fetch position
            try:
                positions = consumer.position(unknown)
            except KafkaException:
                positions = []
            for pos in positions:
                high = _cached_high(consumer, pos)
                if pos.offset >= 0 and high is not None:
                    lag[(pos.topic, pos.partition)] = max(0, high - pos.offset)
        self._lag = lag

    def _update_rate(self, now: float) -> None:
        mark_at, mark_count = self._rate_mark
        if now > mark_at:
            self._rate = (self._processed - mark_count) / (now - mark_at)
        self._rate_mark = (now, self._processed)

    # -- pause / resume -----------------------------------------------------------------------------

    def _pause(self, now: float) -> None:
        assert self._consumer is not None and self._dispatcher is not None
        self._gate.start_pause(now)
        to_pause = [tp for tp in self._tracker.partitions() if tp not in self._paused]
        if to_pause:
            self._consumer.pause([TopicPartition(t, p) for t, p in to_pause])
            self._paused.update(to_pause)
        logger.warning(
            "PAUSED %d partitions: all %d threads busy, %d messages waiting (re-check in %.2fs)",
            len(self._paused), self._dispatcher.max_thread_count, self._dispatcher.backlog,
            self._gate.pause_interval,
        )

    def _resume(self, now: float) -> None:
        assert self._consumer is not None and self._dispatcher is not None
        lasted = self._gate.end_pause(now)
        mine = [TopicPartition(t, p) for t, p in self._paused if (t, p) in self._tracker and (t, p) not in self._holds]
        if mine:
            self._consumer.resume(mine)
            self._wake_fetcher(mine)
        self._paused.clear()
        logger.warning(
            "RESUMED %d partitions after %.2fs paused: %d/%d threads busy, %d waiting",
            len(mine), lasted, self._dispatcher.active_thread_count, self._dispatcher.max_thread_count,
            self._dispatcher.backlog,
        )

    def _update_holds(self) -> None:
        """Pause alone a partition whose window is full (a stuck message), resume it once its watermark moved."""
        assert self._consumer is not None
        to_pause, to_resume = self._holds.update(self._tracker, self._paused)
        if to_pause:
            self._consumer.pause([TopicPartition(t, p) for t, p in to_pause])
            for t, p in to_pause:
                low, high = self._tracker.span(self._tracker.state((t, p)))
                logger.warning("HELD %s[%d]: %d offsets from its oldest unfinished one (%d) reached OFFSET_WINDOW "
                               "%d; other partitions go on", t, p, high - low, low, self._holds.bound)
        if to_resume:
            resumed = [TopicPartition(t, p) for t, p in to_resume]
            self._consumer.resume(resumed)
            self._wake_fetcher(resumed)
            logger.info("released %s: its watermark moved", _fmt(to_resume))

    def _wake_fetcher(self, partitions: list[TopicPartition]) -> None:
        """Make the resumed partitions fetch now rather than at the broker thread's next wake-up.

        With every partition paused, librdkafka's broker thread sleeps up to a second, and resume()
        does not wake it: measured here, the first message after a resume came 0.7-1.0 s later,
        time the pool spends idle. A seek to the current position (where resume would continue
        anyway) does wake it: 2-4 ms, together with a short ``fetch.wait.max.ms`` (see settings.py).
        Partitions with no position yet are left to resume() alone.
        """
        assert self._consumer is not None
        try:
            positions = self._consumer.position(partitions)
        except KafkaException as err:
            logger.debug("position after resume: %s", err)
            return
        for tp in positions:
            if tp.offset >= 0:
                try:
                    self._consumer.seek(tp)
                except KafkaException as err:
                    logger.debug("seek %s[%d]@%d after resume: %s", tp.topic, tp.partition, tp.offset, err)

    # -- commits ------------------------------------------------------------------------------------

    def _commit(self, asynchronous: bool, partitions: list[Partition] | None = None) -> None:
        """Commit each partition's contiguous completed watermark that moved since the last commit.

        Synchronous commits (revoke, shutdown) first confirm the topic id (see :mod:`mtc75.kafka.topicwatch`);
        the periodic ones go through :meth:`_commit_tick`, which confirms it without blocking.
        """
        assert self._consumer is not None
        if self._halted:
            return  # after a fatal error nothing is committed
        if self._down_since is not None and not asynchronous:
            logger.warning("Kafka unreachable: not committing; uncommitted messages will be redelivered")
            return
        pending = self._commit_points(partitions)
        if not pending:
            return
        if not asynchronous and not self._topic_confirmed():
            return
        self._send_commit([(state.tp, pos, meta, version) for state, pos, meta, version in pending], asynchronous)

    def _commit_points(self, partitions: list[Partition] | None = None) -> list[tuple[PartitionState, int, str, int]]:
        """``(state, position, offset map, version)`` of each partition with something new to commit."""
        tracker = self._tracker
        points = []
        for tp, pos in tracker.uncommitted(partitions):
            state = tracker.state(tp)
            points.append((state, pos, self._offset_map(state, pos), state.version))
        return points

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

    def _send_commit(self, pending: list[tuple[Partition, int, str, int]], asynchronous: bool) -> None:
        assert self._consumer is not None
        offsets = [TopicPartition(t, p, pos, metadata=meta) for (t, p), pos, meta, _ in pending]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as err:
            if not self._check_fatal(err.args[0]):
                self._map_refused(err.args[0])
                self._warn_rarely(err.args[0], f"commit of {len(offsets)} partitions failed: {err.args[0].str()}")
            return
        for tp, pos, _, version in pending:
            self._tracker.mark_committed(tp, pos, version)

    def _map_refused(self, err: KafkaError) -> None:
        """A broker with a smaller offset.metadata.max.bytes refuses the map: commit offsets alone from now on."""
        if err.code() == KafkaError.OFFSET_METADATA_TOO_LARGE and self._map_limit:
            self._map_limit = 0
            logger.warning("the broker refused the offset map (offset.metadata.max.bytes below %d?): "
                           "committing offsets without it from now on", MAP_LIMIT)

    def _commit_tick(self, now: float) -> None:
        """The periodic commit. With the topic watch on, it snapshots what is finished now and commits it
        once a topic-id check started after this moment confirmed the topic (:meth:`_watch_turn`): every
        message in the snapshot was fetched before the check, so it came from the confirmed topic.
        Costs one DescribeTopics round trip of delay per commit, and never blocks the poll thread.
        """
        watch = self._watch
        if watch is None or not watch.enabled:
            self._commit(asynchronous=True)
            return
        if watch.busy:
            self._watch_turn(now)
            return
        self._commit_snapshot = self._commit_points()
        watch.poll(now)  # starts the check

    def _watch_turn(self, now: float) -> None:
        """Act on a finished topic-id check: commit the snapshot, or handle a topic gone or re-created."""
        assert self._watch is not None
        change = self._watch.poll(now)
        if change is None or change is Change.UNKNOWN:
            return
        snapshot, self._commit_snapshot = self._commit_snapshot, []
        if change is Change.SAME:
            if self._gone_reported:
                logger.warning("topic %s is there again (same topic id)", self._settings.TOPIC)
                self._gone_reported = False
            current = [
                (state.tp, pos, meta, version) for state, pos, meta, version in snapshot
                if state.alive and (pos != state.committed or version != state.committed_version)
                and self._tracker.get(state.tp) is state
            ]
            if current and not self._halted and self._down_since is None:
                self._send_commit(current, asynchronous=True)
        elif change is Change.GONE:
            self._topic_gone(now)
        else:
            self._topic_recreated()

    def _topic_confirmed(self) -> bool:
        """Before a synchronous commit: is the topic still the one we fetched from? (bounded wait)"""
        watch = self._watch
        if watch is None or not watch.enabled:
            return True
        change = watch.confirm_now(CONFIRM_TIMEOUT)
        if change is Change.SAME:
            return True
        if change is Change.RECREATED:
            self._topic_recreated()
        else:
            logger.warning("topic %s %s: not committing; uncommitted messages will be delivered again",
                           self._settings.TOPIC, "not found" if change is Change.GONE else "id not confirmed")
        return False

    def _topic_gone(self, now: float) -> None:
        """The topic does not exist: commit nothing; stop (exit 3) unless it is back within the grace."""
        assert self._watch is not None and self._watch.gone_since is not None
        topic = self._settings.TOPIC
        if not self._gone_reported:
            self._gone_reported = True
            logger.warning("topic %s not found (deleted?): nothing is committed until it is back; stopping "
                           "if it is not re-created within %.0fs", topic, TOPIC_GONE_GRACE)
        gone_for = now - self._watch.gone_since
        if gone_for >= TOPIC_GONE_GRACE:
            self._halt(TopicGone(
                f"topic {topic!r} was deleted while consuming and not re-created within {TOPIC_GONE_GRACE:.0f}s"
            ))

    def _topic_recreated(self) -> None:
        """The topic was deleted and created again: drop all work of the old one and read the new one
        from AUTO_OFFSET_RESET. Nothing fetched before this moment is ever committed (its partition
        states are replaced, so late completions are dropped)."""
        assert self._consumer is not None and self._watch is not None
        topic = self._settings.TOPIC
        reset = str(self._conf.get("auto.offset.reset", "earliest")).lower()
        logical = RESET_OFFSETS.get(reset)
        if logical is None:
            self._halt(TopicGone(f"topic {topic!r} was deleted and re-created while consuming, and "
                                 f"auto.offset.reset={reset} does not say where to start the new one"))
            return
        logger.warning("topic %s was deleted and re-created (new topic id %s): reading the new topic from "
                       "AUTO_OFFSET_RESET=%s; nothing fetched from the old one is committed",
                       topic, self._watch.topic_id, reset)
        self._gone_reported = False
        self._commit_snapshot = []
        tps = self._tracker.partitions()
        self._drop_unstarted([self._tracker.state(tp) for tp in tps])
        self._tracker.assign(tps)  # fresh states: the old ones are dead, their completions dropped
        held = [TopicPartition(t, p) for t, p in self._holds.forget(tps) if (t, p) not in self._paused]
        if held:  # the new topic starts with an empty window
            self._consumer.resume(held)
        for t, p in tps:
            try:
                self._consumer.seek(TopicPartition(t, p, logical))  # also drops what librdkafka prefetched
            except KafkaException as err:
                logger.debug("seek %s[%d] to %s after re-creation: %s", t, p, reset, err)

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is None:
            return
        if self._check_fatal(err):
            return
        self._map_refused(err)
        self._warn_rarely(err, f"commit failed: {err.str()} (will retry)")
        for tp in partitions:
            self._tracker.mark_committed((tp.topic, tp.partition), -1)  # forces a retry next time

    # -- rebalance ----------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        if not self._assigned_once:  # --idle-exit counts from here: waiting for the group is not idleness
            self._assigned_once = True
            self._last_message_at = self._last_progress_at = time.monotonic()
        self._tracker.assign(tps, self._read_maps(consumer, partitions))
        self._holds.forget(tps)  # fresh states: a hold of an earlier assignment does not carry over
        # Assign first, then pause: pausing a partition that is not yet assigned has no effect.
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        if partitions and self._gate.paused:
            consumer.pause([TopicPartition(t, p) for t, p in tps])
            self._paused.update(tps)
        elif partitions:
            # librdkafka may keep a pause flag from an earlier assignment of the same partition
            # (it does on some eager-rebalance paths): clear it, or the partition never fetches.
            consumer.resume([TopicPartition(t, p) for t, p in tps])
        logger.info("assigned %s%s", _fmt(tps), " (paused: consumer is saturated)" if self._gate.paused else "")

    def _read_maps(self, consumer: Consumer, partitions: list[TopicPartition]) -> dict[Partition, FinishedOffsets]:
        """The offset maps committed with the group's offsets: work an earlier owner already finished.

        Bounded (COMMITTED_TIMEOUT); on error the partitions are read without a map (more repeats, never
        a loss). Metadata that is not our map (another tool's, garbled, stale) is ignored with a warning.
        """
        if not partitions:
            return {}
        try:
            committed = consumer.committed([TopicPartition(tp.topic, tp.partition) for tp in partitions],
                                           timeout=COMMITTED_TIMEOUT)
        except KafkaException as err:
            logger.warning("could not read the committed offset maps (%s): finished work above the committed "
                           "offsets may run again", err.args[0].str())
            return {}
        maps: dict[Partition, FinishedOffsets] = {}
        for tp in committed:
            if tp.error is not None or not tp.metadata:
                continue
            high = self._end_offset(consumer, tp)
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

    @staticmethod
    def _end_offset(consumer: Consumer, tp: TopicPartition) -> int | None:
        """The partition's end offset, so a map claiming offsets not written yet is refused (None: unknown)."""
        try:
            offsets = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=COMMITTED_TIMEOUT)
        except KafkaException:
            return None
        return offsets[1] if offsets is not None and offsets[1] >= 0 else None

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_up(consumer, partitions, commit=True)
        logger.info("revoked %s", _fmt([(tp.topic, tp.partition) for tp in partitions]))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        logger.warning("lost %s (group membership expired): their uncommitted work will be redelivered", _fmt(tps))
        self._give_up(consumer, partitions, commit=False)

    def _give_up(self, consumer: Consumer, partitions: list[TopicPartition], commit: bool) -> None:
        """Release partitions (committing their finished work if still allowed), then unassign them."""
        tps = [(tp.topic, tp.partition) for tp in partitions]
        self._release(tps, commit=commit)
        self._unpause(consumer, tps)
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _unpause(self, consumer: Consumer, tps: list[Partition]) -> None:
        """Resume partitions we paused before giving them up, so no stale flag outlives the assignment."""
        held = set(self._holds.forget(tps))
        mine = [TopicPartition(t, p) for t, p in tps if (t, p) in self._paused or (t, p) in held]
        if mine:
            consumer.resume(mine)
            self._paused.difference_update(tps)

    def _release(self, tps: list[Partition], commit: bool) -> None:
        """Give partitions up: drop their unstarted messages, wait (bounded) for running ones, commit."""
        tracker = self._tracker
        owned = [tp for tp in tps if tp in tracker]
        states = [tracker.state(tp) for tp in owned]
        self._drop_unstarted(states)
        if commit and owned and not self._halted:
            # At close, shutdown has already waited its SHUTDOWN_TIMEOUT: commit what is done, no second wait.
            # Otherwise wait at most _revoke_wait: REVOKE_TIMEOUT capped below max.poll.interval.ms, as
            # this callback runs inside poll() and a longer stay there gets the member evicted.
            started = time.monotonic()
            deadline = started + (0.0 if self._closing else self._revoke_wait)
            while True:
                self._drop_unstarted(states)  # a handler failing meanwhile may have queued a retry
                self._drain_completions()
                running = sum(len(tracker.outstanding(tp)) for tp in owned)
                if not running or time.monotonic() >= deadline:
                    break
                time.sleep(REBALANCE_POLL)
            if running and not self._closing:  # at close, shutdown already counted and said them
                self.abandoned_at_revoke += running
                logger.warning(
                    "revoke: abandoned %d handlers still running after %.1fs (REVOKE_TIMEOUT %.1fs, at most "
                    "half of max.poll.interval.ms); their messages will be delivered again",
                    running, time.monotonic() - started, self._settings.REVOKE_TIMEOUT,
                )
            self._commit(asynchronous=False, partitions=owned)
        tracker.revoke(owned)

    def _drop_unstarted(self, states: list[PartitionState] | None = None) -> int:
        """Take not-yet-started messages out of the backlog; they stay uncommitted, for redelivery."""
        assert self._dispatcher is not None
        dropped = self._dispatcher.purge(states)
        for work in dropped:
            self._tracker.abandon(work.state, work.offset)
        return len(dropped)

    # -- errors and shutdown ------------------------------------------------------------------------

    def _start_dead_letters(self, partitions: int) -> None:
        """Make sure ``<topic>.dlq`` exists before any message can need it."""
        settings = self._settings
        connection = {k: v for k, v in self._conf.items() if k.startswith(CONNECTION_PREFIXES)}
        for key in ("logger", "error_cb"):
            connection.pop(key, None)
        self._dead_letters = DeadLetters(
            settings.producer_config(connection), settings.TOPIC, settings.RETRY_BACKOFF_MAX or 1.0, self._on_error,
            clients=self._clients,
        )
        self._dead_letters.ensure_topic(partitions, settings.REPLICATION_FACTOR, settings.admin_config(connection))

    def _broker_gone(self, now: float) -> bool:
        """While every broker is down: probe now and then; give up after BROKER_DOWN_TIMEOUT."""
        assert self._consumer is not None and self._down_since is not None
        if now >= self._next_probe:
            self._next_probe = now + PROBE_INTERVAL
            try:
                self._consumer.list_topics(self._settings.TOPIC, timeout=PROBE_TIMEOUT)
            except KafkaException:
                pass
            else:
                logger.warning("Kafka reachable again after %.1fs", time.monotonic() - self._down_since)
                self._down_since = None
                return False
        limit = self._settings.BROKER_DOWN_TIMEOUT
        if now - self._down_since < limit:
            return False
        self._fatal = KafkaUnavailable(
            f"lost Kafka at {self._settings.BOOTSTRAP_SERVERS}: no broker reachable for {limit:g}s "
            "(BROKER_DOWN_TIMEOUT); what was handled since the last commit will be delivered again"
        )
        return True

    def _check_topic(self) -> int:
        """Fail fast, with one line, when the cluster is unreachable or the topic does not exist.

        Returns the topic's partition count."""
        assert self._consumer is not None
        return require_topic(self._consumer, self._settings.BOOTSTRAP_SERVERS, self._settings.TOPIC)

    def _start_watch(self) -> None:
        """Learn the topic's id now, so a delete + re-create while running is noticed (topicwatch.py)."""
        connection = {k: v for k, v in self._conf.items() if k.startswith(CONNECTION_PREFIXES)}
        connection.pop("error_cb", None)
        admin = new_client(self._clients.admin, self._settings.admin_config(connection), "librdkafka admin")
        self._watch = TopicWatch(admin, self._settings.TOPIC)
        self._watch.start(METADATA_TIMEOUT)

    def _halt(self, error: Mtc75Error) -> None:
        """Stop at once: nothing more is handled or committed; running handlers are not waited for."""
        if not self._halted:
            self._halted = True
            self._fatal = error
            if self._dispatcher is not None:
                self._dispatcher.close_intake()
                self._drop_unstarted()
        self.stop()

    def _check_fatal(self, err: KafkaError) -> bool:
        """A fatal librdkafka error (e.g. a fenced static member) halts the consumer; True if it was one.

        librdkafka reports it to error_cb with the code ``_FATAL`` (and ``fatal()`` is not always set on
        that object), or as ``fatal()`` on the error of a later call: both count.
        """
        if not (err.fatal() or err.code() == KafkaError._FATAL):
            return False
        self._halt(KafkaFatal(
            f"fatal Kafka error: {err.str()}; stopped at once, nothing more handled or committed "
            "(uncommitted messages will be delivered again)"
        ))
        return True

    def _warn_rarely(self, err: KafkaError, text: str) -> None:
        """librdkafka repeats the same error on every retry: say each kind once per ERROR_REPEAT_SECONDS."""
        now = time.monotonic()
        if now >= self._error_quiet_until.get(err.code(), 0.0):
            self._error_quiet_until[err.code()] = now + ERROR_REPEAT_SECONDS
            logger.warning("%s", text)

    def _on_error(self, err: KafkaError) -> None:
        if self._check_fatal(err):
            return
        if not self._connected:
            logger.debug("Kafka: %s", err.str())  # the start-up check reports this as one error line
            return
        if err.code() == KafkaError._ALL_BROKERS_DOWN and self._down_since is None:
            self._down_since = time.monotonic()
            self._next_probe = self._down_since + PROBE_INTERVAL
        self._warn_rarely(err, f"Kafka: {err.str()} (retrying)")

    def _on_message_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if self._check_fatal(err):
            return
        if err.code() in TOPIC_MISSING_CODES and self._watch is not None and self._watch.enabled:
            # Deleted, maybe being re-created: the topic watch decides (grace, then exit 3, or a reset).
            self._warn_rarely(err, f"consumer error: {err.str()}")
            return
        if err.code() in (*TOPIC_MISSING_CODES, KafkaError.TOPIC_AUTHORIZATION_FAILED):
            raise KafkaUnavailable(f"consumer error: {err.str()}")
        self._warn_rarely(err, f"consumer error: {err.str()}")

    def _shutdown(self) -> None:
        """Stop fetching, wait (bounded) for running handlers, commit, close. Always runs."""
        consumer, dispatcher = self._consumer, self._dispatcher
        if consumer is None:
            return
        # After a fatal error nothing can be committed: waiting for handlers would only delay the exit.
        budget = 0.0 if self._halted else self._settings.SHUTDOWN_TIMEOUT
        deadline = time.monotonic() + budget
        try:
            if dispatcher is not None:
                dispatcher.close_intake()  # nothing new starts: not a retry, not a late-promoted message
                dropped = self._drop_unstarted()
                if dropped:
                    logger.info("shutdown: %d fetched messages not started; they stay uncommitted", dropped)
                if dispatcher.active_thread_count and budget:
                    logger.info("shutdown: waiting up to %.0fs for %d running handlers",
                                budget, dispatcher.active_thread_count)
                while dispatcher.active_thread_count and time.monotonic() < deadline:
                    # keep serving the group (heartbeats, rebalances) while handlers finish
                    consumer.poll(0)
                    dispatcher.wait_idle(min(POLL_TIMEOUT, max(0.0, deadline - time.monotonic())))
                self._drain_completions()
                self.abandoned = dispatcher.active_thread_count
                if self.abandoned:
                    logger.warning(
                        "shutdown: abandoned %d handlers still running after %.1fs (SHUTDOWN_TIMEOUT %.0fs); "
                        "their messages stay uncommitted and will be delivered again",
                        self.abandoned, budget, self._settings.SHUTDOWN_TIMEOUT,
                    )
            if (
                self._dead_letters is not None and self._dead_letters.pending and self._down_since is None
                and not self._halted
            ):
                try:
                    for work in self._dead_letters.flush(max(1.0, deadline - time.monotonic())):
                        self._finish(work)
                except MessageFailed as err:
                    self._fatal = self._fatal or err
            self._commit(asynchronous=False)
        finally:
            if self._dead_letters is not None:
                self._dead_letters.close()
            if self._gate.paused:
                self._gate.end_pause(time.monotonic())
            self._closing = True
            self._close(consumer)
            if dispatcher is not None:
                dispatcher.shutdown(wait=False)


    def _close(self, consumer: Consumer) -> None:
        """``consumer.close()``, bounded by CLOSE_TIMEOUT (CLOSE_TIMEOUT_DOWN while no broker is reachable).

        With no broker left, librdkafka's close() can wait for ever for a commit queued "waiting for
        coordinator" (seen in 1 of 3 runs of the broker-gone test). So it runs on a helper thread while
        this one waits; the poll thread makes no other Consumer call meanwhile, so the rebalance callback
        close() triggers on the helper thread still has the consumer to itself. Past the timeout the
        close is left behind and :attr:`close_timed_out` tells the script to exit without waiting.
        """
        finished = threading.Event()

        def close() -> None:
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as err:
                logger.warning("close: %s", err)
            finally:
                finished.set()

        # With no broker reachable there is no group to leave and no commit that can land: waiting the
        # full CLOSE_TIMEOUT would only push the exit past BROKER_DOWN_TIMEOUT + a few seconds.
        timeout = CLOSE_TIMEOUT_DOWN if self._down_since is not None else CLOSE_TIMEOUT
        threading.Thread(target=close, name="mtc75-close", daemon=True).start()
        if not finished.wait(timeout):
            self.close_timed_out = True
            logger.warning("close: the Kafka client did not close within %.0fs (no broker?); leaving it", timeout)


TOPIC_MISSING_CODES = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.UNKNOWN_TOPIC_ID)
RESET_OFFSETS = {
    "earliest": OFFSET_BEGINNING, "smallest": OFFSET_BEGINNING, "beginning": OFFSET_BEGINNING,
    "latest": OFFSET_END, "largest": OFFSET_END, "end": OFFSET_END,
}


def _revoke_budget(revoke_timeout: float, conf: Mapping[str, Any]) -> float:
    """REVOKE_TIMEOUT, capped at REVOKE_SHARE_OF_POLL_INTERVAL of max.poll.interval.ms (default 300 s)."""
    try:
        poll_interval = float(conf.get("max.poll.interval.ms", 300_000)) / 1000.0
    except (TypeError, ValueError):
        poll_interval = 300.0  # an invalid value is reported when the consumer is created
    return min(revoke_timeout, REVOKE_SHARE_OF_POLL_INTERVAL * poll_interval)


def _is_incremental(conf: Mapping[str, Any]) -> bool:
    """Cooperative assignors and the KIP-848 protocol use incremental (un)assign."""
    strategy = str(conf.get("partition.assignment.strategy", ""))
    return "cooperative" in strategy or str(conf.get("group.protocol", "classic")).lower() == "consumer"


def _cached_high(consumer: Consumer, tp: TopicPartition) -> int | None:
    """The partition's end offset as of the last fetch response (None before the first one)."""
    try:
        offsets = consumer.get_watermark_offsets(tp, cached=True)
    except KafkaException:
        return None
    return offsets[1] if offsets is not None and offsets[1] >= 0 else None


def _as_list(message: Any) -> list[Any]:
    return [] if message is None else [message]


def _fmt(tps: list[Partition]) -> str:
    if not tps:
        return "no partitions"
    topics = sorted({t for t, _ in tps})
    parts = ",".join(str(p) for _, p in sorted(tps))
    return f"{'/'.join(topics)}[{parts}]"
