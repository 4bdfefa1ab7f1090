"""The MTC75 engine: the poll loop, rebalances, commits and shutdown -- nothing else.

The thread that calls :meth:`Mtc75Consumer.run` is the poll thread and makes every Kafka call, through
:class:`mtc75.kafka.client.KafkaClient`: fetching, pause/resume, rebalance callbacks and commits.
Worker threads (:mod:`mtc75.runtime.dispatcher`) only run handlers and report completions on a queue,
which the poll thread drains. A message is committed only after its handler finished, only as part of
its partition's contiguous completed prefix (:mod:`mtc75.core.offsets`), and only once the topic's id
was confirmed after the message was fetched (:mod:`mtc75.engine.commits`). Each commit carries the
offsets finished above that prefix as an offset map (:mod:`mtc75.core.offsetmap`), read back at
assignment so they do not run again; a partition whose span reaches OFFSET_WINDOW is paused alone
(:mod:`mtc75.core.window`). A message that failed its last attempt goes to the ON_FAILURE policy
(:mod:`mtc75.engine.failure`).

Threads: construct, :meth:`~Mtc75Consumer.run` and everything private on one thread, the poll thread
(the one exception: the final ``close()`` on a helper thread while the poll thread waits, see
:meth:`mtc75.kafka.client.KafkaClient.close`). :meth:`~Mtc75Consumer.stop` from any thread or a
signal handler (it sets an Event); :meth:`~Mtc75Consumer.retune` from any thread (under a lock);
:meth:`~Mtc75Consumer.stats` on the poll thread (``on_status`` hands snapshots to the others).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from itertools import repeat
from types import MappingProxyType
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from mtc75.core.fetchsize import choose as choose_fetch_sizes
from mtc75.core.fetchsize import fixed as fixed_fetch_sizes
from mtc75.core.gate import PauseGate
from mtc75.core.offsetmap import FinishedOffsets, OffsetMapError, decode
from mtc75.core.offsets import OffsetTracker, Partition, PartitionState
from mtc75.core.ordering import new_scheduler
from mtc75.core.retry import RetryPolicy
from mtc75.core.stats import Stats
from mtc75.core.window import WindowHolds
from mtc75.core.work import Work
from mtc75.engine.autothreads import AutoThreads
from mtc75.engine.commits import Committer
from mtc75.engine.failure import DeadLetter, FailurePolicy, Skip, StopRun
from mtc75.errors import KafkaFatal, KafkaUnavailable, Mtc75Error, OffsetOutOfRange, TopicGone
from mtc75.kafka.client import ErrorKind, KafkaClient, ResetLog, classify, is_incremental
from mtc75.kafka.clients import REAL_CLIENTS, KafkaClients, new_client
from mtc75.kafka.deadletter import DeadLetters
from mtc75.kafka.fairness import FairIntake
from mtc75.kafka.fetchprobe import probe as probe_topic
from mtc75.kafka.topics import METADATA_TIMEOUT, require_topic
from mtc75.kafka.topicwatch import Change, TopicWatch
from mtc75.runtime.async_runner import pick_runner
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.handlers import Handler, prepare_handler
from mtc75.settings import AUTO, Settings

logger = logging.getLogger(__name__)

POLL_TIMEOUT = 0.1  # longest a single poll blocks, so stop requests and timers stay responsive
# Messages taken per consume(): the poll thread holds the GIL while it files a batch, and workers
# waking from I/O wait for it, so batches stay small enough to keep that stall well under a millisecond.
MAX_BATCH = 500
SATURATION_GRACE = 0.05  # seconds a saturated pool gets to catch up before the partitions pause
REBALANCE_POLL = 0.01  # completion polling step while a revoke waits for handlers
# A revoke waits for running handlers inside the rebalance callback, where the consumer does not poll:
# past max.poll.interval.ms the member is evicted. So the wait is capped at this share of the interval.
REVOKE_SHARE_OF_POLL_INTERVAL = 0.5
# A topic that disappears is given this long to come back (a delete + create) before the run ends with exit 3.
TOPIC_GONE_GRACE = 10.0
COMMITTED_TIMEOUT = 5.0  # longest an assignment waits to read the committed offset maps (then: no map)
# Shutdown: SHUTDOWN_TIMEOUT for running handlers, then at most this long for the rest (the last dead letters,
# the final topic-id check and commit, close()), all under one deadline: "SHUTDOWN_TIMEOUT + a few seconds".
SHUTDOWN_FINISH = 5.0
DEAD_LETTER_LAST = 1.0  # dead letters still unconfirmed after the handlers' wait get this much of SHUTDOWN_FINISH
CLOSE_AT_LEAST = 1.0  # close() is tried for this long even when the deadline has passed (leaving the group)
# -X properties that describe the connection, so the dead-letter producer reaches the same cluster.
CONNECTION_PREFIXES = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.address.")
# ``extra`` of the pause and resume log lines: how a log formatter tells them apart without reading the text
PAUSE_EVENT, RESUME_EVENT = {"mtc75_event": "pause"}, {"mtc75_event": "resume"}


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
        self._overrides = overrides
        self._conf = settings.consumer_config(overrides)
        self._fetch_sizes = ""  # which fetch sizes this run uses, for the summary (set by run())
        self._fetch_reason = ""  # why, for the INFO line once the topic is known to exist
        self._threads = AutoThreads(settings)  # MAX_THREAD_COUNT = "auto" (a fixed count: it only watches)
        prepared = prepare_handler(handler)  # refuses what no runner can run (an async generator)
        self._runner = pick_runner(prepared)  # async def: coroutines on one event loop; else threads
        self._handler = self._threads.timed(prepared)
        self._max_messages = max_messages
        self._idle_exit = idle_exit
        self._on_status = on_status
        self._status_interval = status_interval
        # Every Kafka client is built through this (tests pass in-memory fakes: tests/fake_kafka.py).
        self._clients = clients
        self._stop = threading.Event()
        self._client: KafkaClient | None = None
        self._committer: Committer | None = None
        self._dispatcher: Dispatcher | None = None
        self._tracker = OffsetTracker()
        self._gate = PauseGate(settings.PAUSE_INTERVAL, settings.MAX_BACKLOG)
        self._fair = FairIntake(self._tracker)  # a partition's long run does not starve the others
        self._holds = WindowHolds(settings.offset_window())  # partitions paused alone: span over OFFSET_WINDOW
        self._admitted: set[Partition] = set()  # partitions that took offsets since the last _update_holds
        self._retry = RetryPolicy(settings.MAX_ATTEMPTS, settings.RETRY_BACKOFF, settings.RETRY_BACKOFF_MAX)
        # ON_FAILURE; a dlq policy is built by run(), once the topic is known to exist
        self._failure: FailurePolicy = StopRun(self._tracker, self._fail) if settings.ON_FAILURE == "stop" else Skip()
        self._fatal: Mtc75Error | None = None  # why run() must fail once it has shut down cleanly
        self._processed = 0
        self._failed = 0
        self._dropped_late = 0
        self._started = 0.0
        self._last_message_at = 0.0
        self._last_progress_at = 0.0  # last time a handler finished (see _finished)
        self._assigned_once = False  # idle_exit counts from the first assignment
        self._revoke_wait = _revoke_budget(settings.REVOKE_TIMEOUT, self._conf)
        self._halted = False  # a fatal error: nothing more is handled or committed
        self._gone_reported = False
        self._connected = False  # set once the start-up metadata check passed
        self._closing = False  # set by shutdown before close(), whose revoke must not wait again
        self._lag: dict[Partition, int] = {}
        self._retune_lock = threading.Lock()
        self._retune: dict[str, Any] = {}  # live changes waiting for the poll thread
        self.abandoned = 0  # handlers still running when shutdown gave up waiting
        self.abandoned_at_revoke = 0  # handlers still running when a revoke gave up waiting

    # -- public -------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish: stop fetching, drain in-flight work, commit, close."""
        self._stop.set()

    def retune(self, *, max_thread_count: int | str | None = None, pause_interval: float | None = None) -> None:
        """Change the thread bound (a count, or "auto") and the pause interval of a running consumer; any thread.

        The poll thread applies the change within one loop turn (at most ``POLL_TIMEOUT`` later).
        """
        if max_thread_count is not None and max_thread_count != AUTO and int(max_thread_count) < 1:
            raise ValueError(f"max_thread_count must be >= 1, got {max_thread_count}")
        if pause_interval is not None and pause_interval <= 0:
            raise ValueError(f"pause_interval must be > 0, got {pause_interval}")
        with self._retune_lock:
            if max_thread_count is not None:
                self._retune["MAX_THREAD_COUNT"] = max_thread_count
            if pause_interval is not None:
                self._retune["PAUSE_INTERVAL"] = pause_interval

    @property
    def close_timed_out(self) -> bool:
        """The Kafka client did not close in time: the process must not wait for it."""
        return self._client is not None and self._client.close_timed_out

    def run(self) -> Stats:
        """Consume until stopped, ``max_messages`` handled, or ``idle_exit`` seconds without messages."""
        self._started = self._last_message_at = time.monotonic()
        conf = self._conf_with_fetch_sizes()
        conf.setdefault("error_cb", self._on_error)
        conf["on_commit"] = self._on_commit
        log = conf["logger"] = ResetLog(conf.get("logger"))  # librdkafka's log, watched for offset resets
        consumer = new_client(self._clients.consumer, conf, "librdkafka consumer")
        client = self._client = KafkaClient(consumer, self._settings.TOPIC, cooperative=is_incremental(self._conf),
                                            log=log)
        self._committer = Committer(client, self._tracker, self._settings.TOPIC, self._check_fatal)
        self._dispatcher = Dispatcher(self._handler, self._threads.initial, self._retry,
                                      scheduler=new_scheduler(self._settings.ORDERING), runner=self._runner)
        try:
            # Fail fast, with one line, when the cluster is unreachable or the topic does not exist.
            partitions = require_topic(consumer, self._settings.BOOTSTRAP_SERVERS, self._settings.TOPIC)
            self._start_watch()
            if self._settings.ON_FAILURE == "dlq":
                self._start_dead_letters(partitions)
            self._connected = True
            logger.info("fetch sizes %s: %s", self._fetch_sizes, self._fetch_reason)
            client.subscribe(self._on_assign, self._on_revoke, self._on_lost)
            logger.info(
                "consuming %s as group %s with %s %s (pause interval %.2fs, %s assignment)",
                self._settings.TOPIC, self._settings.GROUP_ID, self._settings.MAX_THREAD_COUNT,
                self._dispatcher.workers,
                self._settings.PAUSE_INTERVAL, "incremental" if is_incremental(self._conf) else "eager",
            )
            self._loop()
        except KafkaException as err:
            raise KafkaUnavailable(f"Kafka error: {err.args[0].str()}") from None
        finally:
            self._shutdown()
        if self._fatal is not None:
            raise self._fatal
        return self.stats()

    def _conf_with_fetch_sizes(self) -> dict[str, Any]:
        """The client's config with this run's fetch sizes: the user's, FETCH_SIZES', or a probe's choice."""
        settings = self._settings
        if settings.user_fetch_sizes(self._overrides):
            self._fetch_sizes = "set by the user"
            self._fetch_reason = (f"fetch.max.bytes={self._conf['fetch.max.bytes']}, "
                                  f"max.partition.fetch.bytes={self._conf['max.partition.fetch.bytes']}")
            return dict(self._conf)
        if settings.FETCH_SIZES == AUTO:
            choice = choose_fetch_sizes(probe_topic(self._clients, self._conf, settings.TOPIC))
        else:
            choice = fixed_fetch_sizes(settings.FETCH_SIZES)
        self._fetch_sizes = str(choice.sizes)
        self._fetch_reason = choice.reason
        return settings.consumer_config(self._overrides, choice.sizes)

    def stats(self) -> Stats:
        now = time.monotonic()
        d = self._dispatcher
        gate = self._gate
        return Stats(
            active_threads=d.active_thread_count if d else 0,
            max_thread_count=self._threads.limit,
            paused=gate.paused,
            paused_for=gate.paused_for(now),
            next_check_in=gate.next_check_in(now),
            processed=self._processed,
            failed=self._failed,
            rate=gate.rate,
            in_flight=self._tracker.in_flight(),
            backlog=d.backlog if d else 0,
            pauses=gate.pauses,
            paused_seconds=gate.paused_seconds + gate.paused_for(now),
            elapsed_seconds=now - self._started if self._started else 0.0,
            max_active_threads=d.max_active_threads if d else 0,
            workers=d.workers if d else "threads",
            assigned=len(self._tracker.partitions()),
            retried=d.retried if d else 0,
            dead_lettered=self._failure.dead_lettered,
            skipped=self._failure.skipped,
            dropped_late=self._dropped_late,
            abandoned=self.abandoned + self.abandoned_at_revoke,
            lag=dict(self._lag),
            thread_mode=self._threads.mode,
            thread_trend=self._threads.trend,
            ordering=self._settings.ORDERING,
            blocked=d.blocked if d else 0,
            fetch_sizes=self._fetch_sizes,
        )

    # -- poll loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        client, committer, dispatcher = self._client, self._committer, self._dispatcher
        assert client is not None and committer is not None and dispatcher is not None
        commit_every = self._settings.COMMIT_INTERVAL
        next_commit = next_status = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if self._retune:
                self._apply_retune()
            self._threads.tick(self._processed, dispatcher)
            dispatcher.release_due()
            self._drain_completions()
            if client.down_since is not None and self._broker_gone(now):
                break
            self._gate.observe(now, self._processed)
            self._pause_or_resume(now)
            messages = self._fetch()
            if messages:
                self._accept(messages)
                # Only a real message proves a broker answered: poll() also returns error events, and
                # those arrive while every broker is down (a 10 s budget never ran out: they reset it).
                if client.down_since is not None and any(m.error() is None for m in messages):
                    client.note_message()
            self._update_holds()

            now = time.monotonic()
            if now >= next_commit and client.down_since is None:  # commits to no broker only pile up
                self._on_topic_change(committer.tick(now), now)
                next_commit = now + commit_every
            elif committer.watch is not None and committer.watch.busy:
                self._on_topic_change(committer.watch_turn(now), now)
            if now >= next_status:
                self._lag = client.lag({tp: self._tracker.lag_base(tp) for tp in self._tracker.partitions()})
                client.report_resets()
                if self._on_status is not None:
                    self._on_status(self.stats())
                next_status = now + self._status_interval
            if self._finished(now):
                break

    def _pause_or_resume(self, now: float) -> None:
        """Ask the gate, and pause or resume every partition accordingly."""
        dispatcher, gate = self._dispatcher, self._gate
        assert dispatcher is not None
        limit = dispatcher.max_thread_count
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

    def _fetch(self) -> list[Any]:
        """This turn's messages: as many as there is room for, or only the group's events while paused."""
        client, dispatcher, gate = self._client, self._dispatcher, self._gate
        assert client is not None and dispatcher is not None
        limit = dispatcher.max_thread_count
        low, high = gate.watermarks(limit)
        if gate.paused:
            # Sleep on the pool rather than in poll(): wake when the backlog drains to the low
            # watermark, or a thread runs dry, or the interval ends; then serve the group with
            # poll(0) (heartbeat-driven callbacks, rebalances, commit results).
            ready = dispatcher.backlog - dispatcher.delayed  # retries waiting out a backoff do not drain
            wait = min(POLL_TIMEOUT, max(gate.next_check_in(time.monotonic()), 0.001))
            dispatcher.wait_backlog_at_most(low if ready > low else -1, wait)
            return _as_list(client.poll(0))
        room = high - dispatcher.backlog + (limit - dispatcher.active_thread_count)
        # consume() waits for a full batch until its timeout; take what is there without
        # waiting, and block (in poll, which returns on the first message) only when idle.
        messages = client.consume(num_messages=max(1, min(room, MAX_BATCH)), timeout=0)
        if not messages:
            messages = _as_list(client.poll(POLL_TIMEOUT))
        # every partition its turn (not one partition's long run while another waits)
        return self._fair.cut(client.consumer, messages, high, limit, gate.rate, time.monotonic(), self._holds)

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
                self._on_message_error(msg)
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
        self._admitted.add((topic, partition))
        offsets = [msg.offset() for msg in run]
        # Not ours any more (revoked between fetch and now), or a redelivery of an offset already in
        # flight: the current owner / the running handler covers it.
        admitted = None if state is None else self._tracker.admit_run(state, offsets)
        if admitted is None and state is not None:
            if state.finished is None:  # the common case: no offset map from an earlier owner
                batch.append(Work.run(run, state, offsets[0]))  # consecutive offsets: one run
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

        A message that failed its last attempt is done only once the ON_FAILURE policy says so
        (:mod:`mtc75.engine.failure`): at once (``skip``), once its dead-letter record is confirmed
        (``dlq``), or never (``stop``).
        """
        assert self._dispatcher is not None
        completions = self._dispatcher.completions
        complete_run = self._tracker.complete_run
        count = 0
        if completions:
            self._last_progress_at = time.monotonic()
        while completions:
            work = completions.popleft()
            if not work.failed:  # the hot path, inlined (bench/noop_path.py): the handler returned
                size = work.size
                if complete_run(work.state, work.offset, size):  # a single message is a run of 1
                    self._processed += size
                    count += size
                else:
                    self._dropped_late += size
                continue
            if not work.state.alive:
                # Its assignment was revoked (a coroutine cancelled at revoke, or a last attempt that
                # failed after it): not this consumer's failure -- the next owner runs it again.
                self._dropped_late += 1
                continue
            self._failed += 1
            if not self._failure.failed(work):
                continue  # finishes later (dead letter) or never (stop)
            count += self._finish(work)
        if self._failure.pending:
            for work in self._failure.confirmed():
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
            logger.info("handled %d messages (max_messages reached); stopping", self._processed)
            return True
        if self._idle_exit is not None and self._assigned_once and now - self._last_message_at >= self._idle_exit:
            assert self._client is not None
            if self._client.down_since is not None or len(self._holds):
                # Not idle: with every broker down, messages may wait where we cannot see them; a partition held
                # by OFFSET_WINDOW has messages we do not fetch yet. Idle counts again from now.
                self._last_message_at = now
                return False
            # Idle counts from the first assignment (a start that waits on a rebalance has read nothing
            # yet), and needs nothing in flight -- or, when handlers still run, none finished for as long
            # (a hung handler must not keep idle_exit from firing; shutdown then bounds the wait).
            # Retries waiting out a backoff keep the run alive: they will finish.
            assert self._dispatcher is not None
            if self._tracker.in_flight() == 0 or (
                self._dispatcher.delayed == 0 and now - self._last_progress_at >= self._idle_exit
            ):
                logger.info("no new message for %.1fs (idle_exit); stopping", self._idle_exit)
                return True
        return False

    def _apply_retune(self) -> None:
        assert self._dispatcher is not None
        with self._retune_lock:
            changes, self._retune = self._retune, {}
        self._settings = self._settings.replace(**changes)
        if "MAX_THREAD_COUNT" in changes:
            self._threads.retune(changes["MAX_THREAD_COUNT"], self._dispatcher)
        if "PAUSE_INTERVAL" in changes:
            self._gate.pause_interval = changes["PAUSE_INTERVAL"]
        logger.debug("retuned: %s", changes)

    # -- pause / resume -----------------------------------------------------------------------------

    def _pause(self, now: float) -> None:
        assert self._client is not None and self._dispatcher is not None
        self._gate.start_pause(now)
        self._client.pause(self._tracker.partitions())
        logger.warning(
            "PAUSED %d partitions: all %d %s busy, %d messages waiting (re-check in %.2fs)",
            len(self._client.paused), self._dispatcher.max_thread_count, self._dispatcher.workers,
            self._dispatcher.backlog,
            self._gate.pause_interval, extra=PAUSE_EVENT,
        )

    def _resume(self, now: float) -> None:
        client = self._client
        assert client is not None and self._dispatcher is not None
        lasted = self._gate.end_pause(now)
        mine = [tp for tp in client.paused if tp in self._tracker and tp not in self._holds]
        client.resume(mine)
        client.paused.clear()  # the held ones stay paused by the window, the others are no longer ours
        logger.warning(
            "RESUMED %d partitions after %.2fs paused: %d/%d %s busy, %d waiting",
            len(mine), lasted, self._dispatcher.active_thread_count, self._dispatcher.max_thread_count,
            self._dispatcher.workers, self._dispatcher.backlog, extra=RESUME_EVENT,
        )

    def _update_holds(self) -> None:
        """Pause alone a partition whose window is full (a stuck message), resume it once its watermark moved."""
        client = self._client
        assert client is not None
        admitted, self._admitted = self._admitted, set()
        to_pause, to_resume = self._holds.update(self._tracker, client.paused, admitted)
        if to_pause:
            client.pause(to_pause, track=False)
            for t, p in to_pause:
                low, high = self._tracker.span(self._tracker.state((t, p)))
                logger.warning("HELD %s[%d]: %d offsets from its oldest unfinished one (%d) reached OFFSET_WINDOW "
                               "%d; other partitions go on", t, p, high - low, low, self._holds.bound)
        if to_resume:
            client.resume(to_resume)
            logger.info("released %s: its watermark moved", _fmt(to_resume))

    # -- commits and the topic's identity -------------------------------------------------------------

    def _commit_now(self, partitions: list[Partition] | None = None, **how: Any) -> None:
        """Commit now (revoke, shutdown; ``how``: see Committer.commit_now); a re-created topic found
        meanwhile resets the consumer."""
        assert self._committer is not None
        if self._committer.commit_now(partitions, **how) is Change.RECREATED:
            self._topic_recreated()

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if self._committer is not None:
            self._committer.on_commit(err, partitions)

    def _on_topic_change(self, change: Change | None, now: float) -> None:
        """Act on an answer of the topic-id check: there again, gone, or re-created."""
        if change is Change.SAME and self._gone_reported:
            logger.warning("topic %s is there again (same topic id)", self._settings.TOPIC)
            self._gone_reported = False
        elif change is Change.GONE:
            self._topic_gone(now)
        elif change is Change.RECREATED:
            self._topic_recreated()

    def _topic_gone(self, now: float) -> None:
        """The topic does not exist: commit nothing; stop (exit 3) unless it is back within the grace."""
        assert self._committer is not None and self._committer.watch is not None
        gone_since = self._committer.watch.gone_since
        assert gone_since is not None
        topic = self._settings.TOPIC
        if not self._gone_reported:
            self._gone_reported = True
            logger.warning("topic %s not found (deleted?): nothing is committed until it is back; stopping "
                           "if it is not re-created within %.0fs", topic, TOPIC_GONE_GRACE)
        if now - gone_since >= TOPIC_GONE_GRACE:
            self._halt(TopicGone(
                f"topic {topic!r} was deleted while consuming and not re-created within {TOPIC_GONE_GRACE:.0f}s"
            ))

    def _topic_recreated(self) -> None:
        """The topic was deleted and created again: drop all work of the old one and read the new one
        from AUTO_OFFSET_RESET. Nothing fetched before this moment is ever committed (its partition
        states are replaced, so late completions are dropped)."""
        client, committer = self._client, self._committer
        assert client is not None and committer is not None and committer.watch is not None
        topic = self._settings.TOPIC
        reset = str(self._conf.get("auto.offset.reset", "earliest")).lower()
        logical = RESET_OFFSETS.get(reset)
        if logical is None:
            self._halt(TopicGone(f"topic {topic!r} was deleted and re-created while consuming, and "
                                 f"auto.offset.reset={reset} does not say where to start the new one"))
            return
        logger.warning("topic %s was deleted and re-created (new topic id %s): reading the new topic from "
                       "AUTO_OFFSET_RESET=%s; nothing fetched from the old one is committed",
                       topic, committer.watch.topic_id, reset)
        self._gone_reported = False
        committer.forget_snapshot()
        tps = self._tracker.partitions()
        self._drop_unstarted([self._tracker.state(tp) for tp in tps])
        self._tracker.assign(tps)  # fresh states: the old ones are dead, their completions dropped
        # the new topic starts with an empty window
        client.resume([tp for tp in self._holds.forget(tps) if tp not in client.paused], wake=False)
        for tp in tps:
            client.seek(tp, logical)  # also drops what librdkafka prefetched

    # -- rebalance ----------------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        client = self._client
        assert client is not None
        tps = [(tp.topic, tp.partition) for tp in partitions]
        if not self._assigned_once:  # idle_exit counts from here: waiting for the group is not idleness
            self._assigned_once = True
            self._last_message_at = self._last_progress_at = time.monotonic()
        self._tracker.assign(tps, self._read_maps(partitions))
        self._holds.forget(tps)  # fresh states: a hold of an earlier assignment does not carry over
        # Assign first, then pause: pausing a partition that is not yet assigned has no effect.
        client.assign(partitions)
        if partitions and self._gate.paused:
            client.pause(tps)
        elif partitions:
            # librdkafka may keep a pause flag from an earlier assignment of the same partition
            # (it does on some eager-rebalance paths): clear it, or the partition never fetches.
            client.resume(tps, wake=False)
        logger.info("assigned %s%s", _fmt(tps), " (paused: consumer is saturated)" if self._gate.paused else "")

    def _read_maps(self, partitions: list[TopicPartition]) -> dict[Partition, FinishedOffsets]:
        """The offset maps committed with the group's offsets: work an earlier owner already finished.

        Bounded (COMMITTED_TIMEOUT); on error the partitions are read without a map (more repeats, never
        a loss). Metadata that is not our map (another tool's, garbled, stale) is ignored with a warning.
        """
        client = self._client
        assert client is not None
        if not partitions:
            return {}
        try:
            committed = client.committed(partitions, timeout=COMMITTED_TIMEOUT)
        except KafkaException as err:
            logger.warning("could not read the committed offset maps (%s): finished work above the committed "
                           "offsets may run again", err.args[0].str())
            return {}
        maps: dict[Partition, FinishedOffsets] = {}
        for tp in committed:
            if tp.error is not None or not tp.metadata:
                continue
            # the end offset, so a map claiming offsets not written yet is refused (None: unknown)
            high = client.end_offset((tp.topic, tp.partition))
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

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_up(partitions, commit=True)
        logger.info("revoked %s", _fmt([(tp.topic, tp.partition) for tp in partitions]))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        logger.warning("lost %s (group membership expired): their uncommitted work will be redelivered", _fmt(tps))
        self._give_up(partitions, commit=False)

    def _give_up(self, partitions: list[TopicPartition], commit: bool) -> None:
        """Release partitions (committing their finished work if still allowed), then unassign them."""
        client = self._client
        assert client is not None
        tps = [(tp.topic, tp.partition) for tp in partitions]
        self._release(tps, commit=commit)
        # Resume what we paused before giving it up, so no stale flag outlives the assignment.
        held = set(self._holds.forget(tps))
        client.resume([tp for tp in tps if tp in client.paused or tp in held], wake=False)
        client.unassign(partitions)

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
            self._commit_now(owned)
        tracker.revoke(owned)
        # A handler that failed after the last purge above queued a retry while its partition was still
        # alive: drop it now (its state is dead, so no later failure queues another), or it would run
        # again for a partition the next owner is already reading.
        self._drop_unstarted(states)
        if owned and self._dispatcher is not None:  # coroutines still running are cancelled: never committed
            self._dispatcher.cancel_running(states)

    def _drop_unstarted(self, states: list[PartitionState] | None = None) -> int:
        """Take not-yet-started messages out of the backlog; they stay uncommitted, for redelivery."""
        assert self._dispatcher is not None
        dropped = self._dispatcher.purge(states)
        abandon = self._tracker.abandon
        for work in dropped:
            for offset in work.offsets:
                abandon(work.state, offset)
        return sum(work.size for work in dropped)

    # -- start-up, errors and shutdown ----------------------------------------------------------------

    def _connection(self) -> dict[str, Any]:
        """The -X properties that say how to reach the cluster, for the other clients."""
        connection = {k: v for k, v in self._conf.items() if k.startswith(CONNECTION_PREFIXES)}
        for key in ("logger", "error_cb"):
            connection.pop(key, None)
        return connection

    def _start_dead_letters(self, partitions: int) -> None:
        """Make sure ``<topic>.dlq`` exists before any message can need it."""
        settings, connection = self._settings, self._connection()
        letters = DeadLetters(
            settings.producer_config(connection), settings.TOPIC, settings.RETRY_BACKOFF_MAX or 1.0, self._on_error,
            clients=self._clients,
        )
        self._failure = DeadLetter(letters, self._tracker, self._fail)
        letters.ensure_topic(partitions, settings.REPLICATION_FACTOR, settings.admin_config(connection))

    def _start_watch(self) -> None:
        """Learn the topic's id now, so a delete + re-create while running is noticed (topicwatch.py)."""
        assert self._committer is not None
        conf = self._settings.admin_config(self._connection())
        watch = self._committer.watch = TopicWatch(
            lambda: new_client(self._clients.admin, conf, "librdkafka admin"), self._settings.TOPIC)
        watch.start(METADATA_TIMEOUT)

    def _broker_gone(self, now: float) -> bool:
        """While every broker is down: probe now and then; give up after BROKER_DOWN_TIMEOUT."""
        client = self._client
        assert client is not None and client.down_since is not None
        down_since = client.down_since
        if client.probe(now):
            return False
        limit = self._settings.BROKER_DOWN_TIMEOUT
        if now - down_since < limit:
            return False
        self._fatal = KafkaUnavailable(
            f"lost Kafka at {self._settings.BOOTSTRAP_SERVERS}: no broker reachable for {limit:g}s "
            "(BROKER_DOWN_TIMEOUT); what was handled since the last commit will be delivered again"
        )
        return True

    def _fail(self, error: Mtc75Error) -> None:
        """End the run with ``error`` (the first one wins): stop fetching, finish, commit what is safe."""
        if self._fatal is None:
            self._fatal = error
        self.stop()

    def _halt(self, error: Mtc75Error) -> None:
        """Stop at once: nothing more is handled or committed; running handlers are not waited for."""
        if not self._halted:
            self._halted = True
            if self._committer is not None:
                self._committer.halted = True
            self._fatal = error
            if self._dispatcher is not None:
                self._dispatcher.close_intake()
                self._drop_unstarted()
        self.stop()

    def _check_fatal(self, err: KafkaError) -> bool:
        """A fatal librdkafka error (e.g. a fenced static member) halts the consumer; True if it was one."""
        if classify(err) is not ErrorKind.FATAL:
            return False
        self._halt(KafkaFatal(
            f"fatal Kafka error: {err.str()}; stopped at once, nothing more handled or committed "
            "(uncommitted messages will be delivered again)"
        ))
        return True

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's ``error_cb`` (runs inside poll/consume, on the poll thread)."""
        client = self._client
        if self._check_fatal(err) or client is None:
            return
        if not self._connected:
            logger.debug("Kafka: %s", err.str())  # the start-up check reports this as one error line
            return
        if classify(err) is ErrorKind.BROKERS_DOWN:
            client.note_brokers_down()
        client.warn_rarely(err, f"Kafka: {err.str()} (retrying)")

    def _on_message_error(self, msg: Any) -> None:
        """An error event among the fetched messages."""
        client, committer = self._client, self._committer
        assert client is not None and committer is not None
        err = msg.error()
        kind = classify(err)
        if kind is ErrorKind.END_OF_PARTITION or self._check_fatal(err):
            return
        if kind is ErrorKind.OUT_OF_RANGE:  # the partition's fetcher stopped: end the run, never leave it unread
            self._fail(OffsetOutOfRange(client.out_of_range(msg.topic(), msg.partition(), msg.offset())))
            return
        if kind is ErrorKind.TOPIC_MISSING and committer.watch is not None and committer.watch.enabled:
            # Deleted, maybe being re-created: the topic watch decides (grace, then exit 3, or a reset).
            client.warn_rarely(err, f"consumer error: {err.str()}")
            return
        if kind in (ErrorKind.TOPIC_MISSING, ErrorKind.REFUSED):
            raise KafkaUnavailable(f"consumer error: {err.str()}")
        client.warn_rarely(err, f"consumer error: {err.str()}")

    def _shutdown(self) -> None:
        """Stop fetching, wait (bounded) for running handlers, commit, close. Always runs."""
        client, dispatcher = self._client, self._dispatcher
        if client is None:
            return
        # After a fatal error nothing can be committed: waiting for handlers would only delay the exit.
        budget = 0.0 if self._halted else self._settings.SHUTDOWN_TIMEOUT
        deadline = time.monotonic() + budget  # running handlers (and dead letters) are waited for until here
        end = deadline + SHUTDOWN_FINISH  # every other wait of the shutdown ends here too
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
                    client.poll(0)
                    dispatcher.wait_idle(min(POLL_TIMEOUT, max(0.0, deadline - time.monotonic())))
                self._drain_completions()
                self.abandoned = dispatcher.active_thread_count
                if self.abandoned:
                    logger.warning(
                        "shutdown: abandoned %d handlers still running after %.1fs (SHUTDOWN_TIMEOUT %.0fs); "
                        "their messages stay uncommitted and will be delivered again",
                        self.abandoned, budget, self._settings.SHUTDOWN_TIMEOUT,
                    )
            if self._failure.pending and client.down_since is None and not self._halted:
                for work in self._failure.flush(max(DEAD_LETTER_LAST, deadline - time.monotonic())):
                    self._finish(work)
            # Sent, not awaited: close() delivers it. The topic-id check gets at most half of what is left.
            self._commit_now(timeout=max(0.0, end - time.monotonic()) / 2, asynchronous=True)
        finally:
            self._failure.close()
            if self._gate.paused:
                self._gate.end_pause(time.monotonic())
            self._closing = True
            client.close(max(CLOSE_AT_LEAST, end - time.monotonic()))
            if dispatcher is not None:
                dispatcher.shutdown(wait=False)


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


def _as_list(message: Any) -> list[Any]:
    return [] if message is None else [message]


def _fmt(tps: list[Partition]) -> str:
    if not tps:
        return "no partitions"
    topics = sorted({t for t, _ in tps})
    parts = ",".join(str(p) for _, p in sorted(tps))
    return f"{'/'.join(topics)}[{parts}]"
