"""The MTC75 engine: one consumer's poll loop, start-up and shutdown, over parts that each own one concern.

A message's path (ARCHITECTURE.md): :class:`~mtc75.engine.backpressure.Backpressure` fetches what there is
room for; the :class:`~mtc75.engine.ledger.Ledger` admits it to the offset tracker as Works; the
:class:`~mtc75.runtime.dispatcher.Dispatcher` runs them on at most MAX_THREAD_COUNT workers through the
one handler path (:mod:`mtc75.runtime.invoker`); the ledger settles what finished (ON_FAILURE for the
last failures); the :class:`~mtc75.engine.checkpoint.Checkpoint` commits each partition's finished prefix
with its offset map, for a topic whose id it confirmed. :class:`~mtc75.engine.assignments.Assignments`
takes and gives up partitions; :class:`~mtc75.engine.faults.Faults` says what an error means.

Threads: construct, :meth:`Engine.run` and everything private on one thread, the poll thread (the final
``close()`` runs on a helper thread while the poll thread waits: :meth:`mtc75.kafka.client.KafkaClient.close`).
:meth:`Engine.stop` from any thread or a signal handler (it sets an Event); :meth:`Engine.retune` from any
thread (under a lock); :meth:`Engine.stats` on the poll thread (``on_status`` hands snapshots to the others);
:meth:`Engine.on_handler_thread` from any thread. ``on_error`` runs on a thread of its own, ``mtc75-on-error``
(:mod:`mtc75.runtime.failurehook`), from the run's start until its shutdown's deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from enum import Enum
from types import MappingProxyType
from typing import Any

from confluent_kafka import KafkaException

from mtc75.core.bounds import Progress, RunBounds
from mtc75.core.gate import PauseGate
from mtc75.core.offsets import Partition
from mtc75.core.stats import Stats
from mtc75.engine.autothreads import AutoThreads
from mtc75.engine.backpressure import POLL_TIMEOUT
from mtc75.engine.faults import Faults, StallWatch
from mtc75.engine.ledger import Ledger
from mtc75.engine.startup import Parts, Wiring, assemble
from mtc75.errors import KafkaUnavailable, Mtc75Error
from mtc75.kafka.clients import REAL_FACTORIES, ClientFactories
from mtc75.runtime.invoker import Invoker
from mtc75.runtime.runner import runs_handlers_for
from mtc75.settings import Settings, check_bounds, live_changes

logger = logging.getLogger(__name__)

# Shutdown: SHUTDOWN_TIMEOUT for running handlers, then at most this long for the rest (the last dead letters,
# the final topic-id check and commit, close()), all under one deadline: "SHUTDOWN_TIMEOUT + a few seconds".
SHUTDOWN_FINISH = 5.0
DEAD_LETTER_LAST = 1.0  # dead letters still unconfirmed after the handlers' wait get at least this much
CLOSE_AT_LEAST = 1.0  # close() is tried for this long even when the deadline has passed (leaving the group)


class Phase(Enum):
    """Where a run is; the poll thread alone moves it."""

    READY = "ready"  # built, run() not called
    STARTING = "starting"  # connecting, checking the topic
    RUNNING = "running"  # the poll loop
    STOPPING = "stopping"  # finishing in-flight work, committing, closing
    HALTED = "halted"  # a fatal error: nothing more is handled or committed
    CLOSED = "closed"  # run() returned


class Engine:
    """Consumes ``settings.TOPIC`` (names and patterns) with at most ``settings.MAX_THREAD_COUNT`` handlers at once.

    No network I/O happens before :meth:`run`. :meth:`stop` may be called from any thread or a signal
    handler; ``run`` then finishes in-flight work (bounded), commits and closes.
    """

    def __init__(
        self,
        settings: Settings,
        invoker: Invoker,
        *,
        overrides: Mapping[str, str] = MappingProxyType({}),
        max_messages: int | None = None,
        idle_exit: float | None = None,
        on_status: Callable[[Stats], None] | None = None,
        status_interval: float = 1.0,
        factories: ClientFactories = REAL_FACTORIES,
        on_error: Callable[[Any], object] | None = None,
    ) -> None:
        check_bounds(max_messages, idle_exit)
        self._settings = settings
        self._overrides = overrides
        self._invoker = invoker
        self._threads = AutoThreads(settings, invoker)  # MAX_THREAD_COUNT = "auto" (fixed: it only watches)
        self._bounds = RunBounds(max_messages, idle_exit, settings.SHUTDOWN_TIMEOUT)
        self._on_status = on_status
        self._status_interval = status_interval
        self._factories = factories  # every Kafka client is built through these (tests: in-memory fakes)
        self.phase = Phase.READY
        self._stop = threading.Event()
        self._fatal: Mtc75Error | None = None  # why run() must fail once it has shut down cleanly
        self._faults = Faults(settings.BOOTSTRAP_SERVERS, settings.BROKER_DOWN_TIMEOUT, self._halt, self._fail)
        self._stall = StallWatch()  # says where the poll thread is when one loop turn lasts a minute
        self._ledger = Ledger(self._faults.on_message_error, on_error)
        self._hook = self._ledger.hook  # on_error's thread, started and closed with the run
        self._gate = PauseGate(settings.PAUSE_INTERVAL, settings.MAX_BACKLOG)
        self._retune_lock = threading.Lock()
        self._retune: dict[str, Any] = {}  # live changes waiting for the poll thread
        self._started = 0.0
        self._lag: dict[Partition, int] = {}
        self.abandoned = 0  # handlers still running when shutdown gave up waiting
        self._parts: Parts | None = None

    # -- any thread ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish: stop fetching, drain in-flight work, commit, close."""
        self._stop.set()

    def retune(self, **changes: Any) -> None:
        """Change live settings (``mtc75.settings.LIVE``: keywords as retune()'s); applied within one loop turn."""
        validated = live_changes(**changes)
        with self._retune_lock:
            self._retune.update(validated)

    def on_handler_thread(self) -> bool:
        """True when called on a thread that runs this run's handlers (a worker, the event loop); any thread."""
        parts = self._parts
        return parts is not None and runs_handlers_for(parts.dispatcher)

    def on_error_thread(self) -> bool:
        """True when called on the thread that runs this run's ``on_error``; any thread."""
        return self._hook is not None and self._hook.on_thread()

    @property
    def lingering(self) -> bool:
        """After run(): handlers it stopped waiting for still run, or the Kafka client did not close in time."""
        parts = self._parts
        return self.abandoned > 0 or (parts is not None and parts.client.close_timed_out)

    # -- the poll thread ----------------------------------------------------------------------------

    def run(self) -> Stats:
        """Consume until stopped, ``max_messages`` handled, or ``idle_exit`` seconds idle; returns the final Stats."""
        self.phase = Phase.STARTING
        self._started = time.monotonic()
        if self._hook is not None:
            self._hook.start()
        try:
            self._start()
            self.phase = Phase.RUNNING
            self._stall.start()
            self._poll_loop()
        except KafkaException as err:
            raise KafkaUnavailable(f"Kafka error: {err.args[0].str()}") from None
        finally:
            self._stall.stop()  # the shutdown's waits are bounded and said on their own
            self._shutdown()
            self.phase = Phase.CLOSED
        if self._fatal is not None:
            raise self._fatal
        return self.stats()

    def _start(self) -> None:
        """Build the parts, check the cluster and the topic (one line when either is missing), subscribe."""
        wiring = Wiring(self._invoker, self._threads.initial, self._ledger, self._gate, self._faults, self._halt,
                        self._fail, lambda: self._bounds.assigned(time.monotonic()))

        def built(parts: Parts) -> None:
            self._parts = parts

        assemble(self._settings, self._overrides, self._factories, wiring, built)

    def _poll_loop(self) -> None:
        assert self._parts is not None
        parts = self._parts
        client, dispatcher, backpressure, checkpoint = parts.client, parts.dispatcher, parts.backpressure, \
            parts.checkpoint
        ledger, threads, bounds = self._ledger, self._threads, self._bounds
        next_status = time.monotonic()

        def lag_now() -> int | None:  # for MAX_THREAD_COUNT="auto": the backlog a burst is sized by
            lag = client.lag(checkpoint.lag_bases(), self._settings.AUTO_OFFSET_RESET, time.monotonic())
            return sum(lag.values()) if lag else None

        while not self._stop.is_set():
            self._stall.beat = now = time.monotonic()
            if self._retune:
                self._apply_retune()
            threads.tick(ledger.processed, dispatcher, lag_now)
            dispatcher.release_due()
            ledger.settle(dispatcher.completions)
            gone = self._faults.brokers_gone(now)
            if gone is not None:
                self._fail(gone)
                break
            backpressure.turn(now, ledger.processed)
            messages = backpressure.fetch(bounds.budget(ledger.processed, ledger.tracker.in_flight()))
            if messages:
                if self.phase is not Phase.HALTED:  # after a fatal error nothing more is handled
                    dispatcher.put(ledger.admit(messages))
                # Only a real message proves a broker answered: error events arrive while every broker is down.
                if client.down_since is not None and any(m.error() is None for m in messages):
                    client.note_message()
            backpressure.update_holds(ledger.touched)
            now = time.monotonic()
            checkpoint.tick(now)
            if now >= next_status:
                self._lag = client.lag(checkpoint.lag_bases(), self._settings.AUTO_OFFSET_RESET, now)
                client.report_resets()
                if self._on_status is not None:
                    self._on_status(self.stats())
                next_status = now + self._status_interval
            progress = Progress(ledger.processed, ledger.tracker.in_flight(), dispatcher.delayed, ledger.admitted_at,
                                ledger.progress_at, client.down_since is not None or bool(len(backpressure.holds))
                                or parts.assignments.rejoining)
            why = bounds.ended(now, progress)
            if why is not None:
                logger.info("%s; stopping", why)
                break

    def _apply_retune(self) -> None:
        assert self._parts is not None
        with self._retune_lock:
            changes, self._retune = self._retune, {}
        self._settings = self._settings.replace(**changes)
        if "MAX_THREAD_COUNT" in changes:
            self._threads.retune(changes["MAX_THREAD_COUNT"], self._parts.dispatcher)
        if "PAUSE_INTERVAL" in changes:
            self._gate.pause_interval = changes["PAUSE_INTERVAL"]
        settings, dispatcher = self._settings, self._parts.dispatcher
        if changes.keys() & {"MAX_RATE", "KEY_RATE", "RATE_BURST"}:
            dispatcher.limit_rates(settings.MAX_RATE, settings.KEY_RATE, settings.RATE_BURST)
        if changes.keys() & {"BATCH_SIZE", "BATCH_WAIT"}:
            if self._invoker.batches:
                dispatcher.retune_batches(settings.BATCH_SIZE, settings.BATCH_WAIT)
            elif settings.BATCH_SIZE > 1:
                logger.warning("BATCH_SIZE %d not applied: the handler takes one message (BATCH_SIZE was 1 at "
                               "start-up); restart to run a batch handler", settings.BATCH_SIZE)
        logger.debug("retuned: %s", changes)

    def _fail(self, error: Mtc75Error) -> None:
        """End the run with ``error`` (the first one wins): stop fetching, finish, commit what is safe."""
        if self._fatal is None:
            self._fatal = error
        self.stop()

    def _halt(self, error: Mtc75Error) -> None:
        """Stop at once: nothing more is handled or committed; running handlers are not waited for."""
        if self.phase is not Phase.HALTED:
            self.phase = Phase.HALTED
            self._fatal = error
            if self._parts is not None:
                parts = self._parts
                parts.checkpoint.halt()
                parts.assignments.halted = True
                parts.dispatcher.close_intake()
                self._ledger.abandon(parts.dispatcher.purge())
        self.stop()

    def _shutdown(self) -> None:
        """Stop fetching, wait (bounded) for running handlers, commit, close. Always runs."""
        if self._parts is None:
            if self._hook is not None:
                self._hook.close(SHUTDOWN_FINISH)  # nothing ran: nothing queued
            return
        parts = self._parts
        client, dispatcher = parts.client, parts.dispatcher
        halted = self.phase is Phase.HALTED
        if not halted:
            self.phase = Phase.STOPPING
        # After a fatal error nothing can be committed: waiting for handlers would only delay the exit.
        budget = 0.0 if halted else self._settings.SHUTDOWN_TIMEOUT
        deadline = time.monotonic() + budget  # running handlers (and dead letters) are waited for until here
        end = deadline + SHUTDOWN_FINISH  # every other wait of the shutdown ends here too
        try:
            dispatcher.close_intake()  # nothing new starts: not a retry, not a late-promoted message
            dropped = self._ledger.abandon(dispatcher.purge())
            if dropped:
                logger.info("shutdown: %d fetched messages not started; they stay uncommitted", dropped)
            if dispatcher.active_thread_count and budget:
                logger.info("shutdown: waiting up to %.0fs for %d running handlers",
                            budget, dispatcher.active_thread_count)
            while dispatcher.active_thread_count and time.monotonic() < deadline:
                client.poll(0)  # keep serving the group (heartbeats, rebalances) while handlers finish
                dispatcher.wait_idle(min(POLL_TIMEOUT, max(0.0, deadline - time.monotonic())))
            self._ledger.settle(dispatcher.completions)
            self.abandoned = dispatcher.active_thread_count
            if self.abandoned:
                logger.warning(
                    "shutdown: abandoned %d handlers still running after %.1fs (SHUTDOWN_TIMEOUT %.0fs); "
                    "their messages stay uncommitted and will be delivered again",
                    self.abandoned, budget, self._settings.SHUTDOWN_TIMEOUT,
                )
            if client.down_since is None and not halted:
                self._ledger.flush_failures(max(DEAD_LETTER_LAST, deadline - time.monotonic()))
            # Sent, not awaited: close() delivers it. The topic-id check gets at most half of what is left.
            now = time.monotonic()
            parts.checkpoint.commit_now(None, now + max(0.0, end - now) / 2, asynchronous=True)
        finally:
            self._ledger.close()
            parts.backpressure.end()
            parts.assignments.closing = True
            client.close(max(CLOSE_AT_LEAST, end - time.monotonic()))
            dispatcher.shutdown(wait=False)
            if self._hook is not None:  # the last reports (abandoned, dead-lettered) within the same deadline
                self._hook.close(end - time.monotonic())

    def stats(self) -> Stats:
        now = time.monotonic()
        parts, gate, ledger = self._parts, self._gate, self._ledger
        d = parts.dispatcher if parts is not None else None
        throttled_seconds, key_throttled_seconds = d.throttle.seconds() if d else (0.0, 0.0)
        return Stats(
            active_threads=d.active_thread_count if d else 0,
            max_thread_count=self._threads.limit,
            paused=gate.paused,
            paused_for=gate.paused_for(now),
            next_check_in=gate.next_check_in(now),
            processed=ledger.processed,
            failed=ledger.failed,
            rate=gate.rate,
            in_flight=ledger.tracker.in_flight(),
            backlog=d.backlog if d else 0,
            pauses=gate.pauses,
            paused_seconds=gate.paused_seconds + gate.paused_for(now),
            elapsed_seconds=now - self._started if self._started else 0.0,
            max_active_threads=d.max_active_threads if d else 0,
            workers=d.workers if d else "threads",
            assigned=len(ledger.tracker.partitions()),
            retried=d.retried if d else 0,
            dead_lettered=ledger.failure.dead_lettered,
            skipped=ledger.failure.skipped,
            dropped_late=ledger.dropped_late,
            abandoned=self.abandoned + (parts.assignments.abandoned if parts is not None else 0),
            lag=dict(self._lag),
            thread_mode=self._threads.mode,
            thread_trend=self._threads.trend,
            ordering=self._settings.ORDERING,
            blocked=d.blocked if d else 0,
            fetch_sizes=parts.fetch_sizes if parts is not None else "",
            pause_interval=gate.pause_interval,
            brokers_down=parts is not None and parts.client.down_since is not None,
            max_rate=self._settings.MAX_RATE,
            key_rate=self._settings.KEY_RATE,
            throttled=d.throttle.throttled if d else 0,
            throttled_seconds=throttled_seconds,
            key_throttled_seconds=key_throttled_seconds,
            batch_size=self._settings.BATCH_SIZE if self._invoker.batches else 1,
            batches=ledger.batches,
        )

