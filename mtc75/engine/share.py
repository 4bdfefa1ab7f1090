"""The share engine (GROUP_TYPE="share"): one share-group member's poll loop, start-up and shutdown.

A share group (KIP-932) has no partitions to own, offsets to commit, pauses or rebalances: every member
polls records of every partition, each locked to it until it is acknowledged or the group's lock
duration ends. So this is its own small loop over the same parts as the consumer-group engine
(:mod:`mtc75.engine.engine`, whose control surface -- stop, retune, run, lingering -- it inherits): the
:class:`~mtc75.runtime.dispatcher.Dispatcher` runs the handler through the one handler path on at most
MAX_THREAD_COUNT workers (fixed or auto), with its retries and failure policies; the
:class:`~mtc75.engine.shareledger.ShareLedger` turns outcomes into acknowledgements.

The loop, one batch at a time (the share consumer polls again only once every record of its previous
poll is acknowledged):

- **Poll** when the batch is done and a thread is free; keep what the free threads can finish in time,
  release the rest at once (:mod:`mtc75.core.lease`). No thread free (every one on a handler that outlived
  its lock): no poll -- what it acquired could only be released again.
- **Acknowledge** as handlers finish; the acknowledgements go out every COMMIT_INTERVAL, at once when the
  batch's locks are within LOCK_MARGIN of their end, and with the next poll.
- **Never hold a record past its lock**: at the batch's point of no return its unstarted records are
  released; at its deadline whatever is still held is released and counted.
- A failure is retried here while its retry ends before the point of no return (:class:`LeaseRetry`),
  else released for another delivery; attempts count deliveries; the last one goes to ON_FAILURE.

Threads: as for the consumer-group engine: everything here on the poll thread, except
:meth:`LeaseRetry.next_delay` (workers, under the dispatcher's lock: it reads two references).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from mtc75.core.lease import LOCK_MARGIN, HandlerTime, Lease
from mtc75.core.offsets import OffsetTracker
from mtc75.core.retry import RetryPolicy
from mtc75.core.stats import Stats
from mtc75.core.work import Work
from mtc75.engine.backpressure import POLL_TIMEOUT
from mtc75.engine.engine import Engine, Phase
from mtc75.engine.failure import DeadLetterPolicy, Fail, FailurePolicy
from mtc75.engine.shareledger import ShareLedger
from mtc75.engine.startup import connection, open_dead_letters
from mtc75.errors import MessageFailed, Mtc75Error
from mtc75.kafka.clients import new_client
from mtc75.kafka.outputs import OutputProducer
from mtc75.kafka.share import DEFAULT_DELIVERY_LIMIT, DEFAULT_LOCK_MS, ShareClient, group_config
from mtc75.kafka.topics import require_topics
from mtc75.runtime.dispatcher import Dispatcher

logger = logging.getLogger(__name__)

# A new share member gets its first records 1-2 s after subscribing, the first share group on a broker some
# seconds later (docs/share-groups.md): idle_exit counts from the first record, or from this long after the
# subscription when none came.
JOIN_WAIT = 10.0
FLUSH_TIMEOUT = 5.0  # longest shutdown waits for the broker's answer to the last acknowledgements
DLQ_POLL = 0.01  # the loop's wait while dead letters or output records await confirmation (so do their records)


class LeaseRetry(RetryPolicy):
    """RETRY_BACKOFF as in a consumer group, but a retry must end before its batch's point of no return:
    otherwise the record is released for another delivery (the dispatcher hands it back failed)."""

    def __init__(self, max_attempts: int, base: float, cap: float, handler: HandlerTime) -> None:
        super().__init__(max_attempts, base, cap)
        self.lease: Lease | None = None  # the current batch's: swapped whole by the poll thread
        self._handler = handler

    def next_delay(self, work: Work, now: float) -> float | None:
        delay = super().next_delay(work, now)
        lease = self.lease
        if delay is None or lease is None or lease.retry_fits(now + delay, self._handler.seconds):
            return delay
        return None


class ShareStopPolicy(FailurePolicy):
    """``ON_FAILURE=stop`` in a share group: the record stays held until shutdown releases it; exit 5."""

    name = "stop"

    def __init__(self, fail: Fail) -> None:
        super().__init__()
        self._fail = fail

    def failed(self, work: Work) -> bool:
        msg = work.message
        self._fail(MessageFailed(
            f"{msg.topic()}[{msg.partition()}]@{msg.offset()} failed {work.attempts} attempts ({work.error}); "
            "ON_FAILURE=stop: released for another delivery"
        ))
        return False


@dataclass(frozen=True)
class ShareParts:
    """What the share loop drives (the attribute names the inherited control surface reads)."""

    client: ShareClient
    dispatcher: Dispatcher


class ShareEngine(Engine):
    """Consumes ``settings.TOPIC`` as a member of share group ``settings.GROUP_ID`` (see the module notes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self._settings
        self._handler_time = HandlerTime()
        self._share = ShareLedger(self._acknowledge, settings.MAX_ATTEMPTS, DEFAULT_DELIVERY_LIMIT,
                                  self._faults.on_message_error)
        self._retry = LeaseRetry(settings.MAX_ATTEMPTS, settings.RETRY_BACKOFF, settings.RETRY_BACKOFF_MAX,
                                 self._handler_time)
        self._lock_seconds = DEFAULT_LOCK_MS / 1000.0
        self._subscribed_at: float | None = None
        self._acquired_at = 0.0  # when a record was last acquired (monotonic)
        self._progress_at = 0.0  # when a completion last arrived
        self._retired = False  # the current batch passed its point of no return
        self._next_send = 0.0

    def _acknowledge(self, msg: Any, kind: Any) -> None:
        assert self._parts is not None
        self._parts.client.acknowledge(msg, kind)

    # -- start-up ---------------------------------------------------------------------------------------

    def _start(self) -> None:
        """Build the share consumer, check the topic, read (and set) the group's configs, subscribe."""
        settings, faults, factories, ledger = self._settings, self._faults, self._factories, self._share
        conf = settings.share_consumer_config(self._overrides)
        conf.setdefault("error_cb", faults.on_error)
        consumer = new_client(factories.share_consumer, conf, "librdkafka share consumer")
        admin = new_client(factories.admin, settings.admin_config(connection(conf)), "librdkafka admin")
        subscription = settings.subscription  # names only (settings refuse patterns in a share group)
        client = ShareClient(consumer, subscription.names, admin, faults.on_error, ledger.on_acks)
        faults.client = client
        self._invoker.attach(self._handler_time)
        dispatcher = Dispatcher(self._invoker, self._threads.initial, self._retry, failure_hook=self._hook)
        dispatcher.limit_rates(settings.MAX_RATE, settings.KEY_RATE, settings.RATE_BURST)
        self._parts = ShareParts(client, dispatcher)  # type: ignore[assignment]  # shutdown closes what was built
        ledger.outputs = outputs = OutputProducer(
            settings.producer_config(connection(conf)), settings.RETRY_BACKOFF_MAX or 1.0,
            lambda _work, error: self._fail(error), faults.on_error, factories=factories)
        outputs.check()
        partitions = require_topics(admin, settings.BOOTSTRAP_SERVERS, subscription)
        group = group_config(admin, settings.GROUP_ID, settings.AUTO_OFFSET_RESET)
        self._lock_seconds = group.lock_seconds
        ledger.delivery_limit = group.delivery_limit
        if settings.ON_FAILURE == "dlq":
            letters = open_dead_letters(settings, conf, factories, partitions, faults.on_error)
            ledger.failure = DeadLetterPolicy(letters, OffsetTracker(), self._fail)
        elif settings.ON_FAILURE == "stop":
            ledger.failure = ShareStopPolicy(self._fail)
        ledger.failure.hook = self._hook  # on_error hears each record's outcome, as in a consumer group
        faults.checked = True
        client.subscribe()
        self._subscribed_at = time.monotonic()
        logger.info("consuming %s as share group %s with %s %s (lock %.0fs, %d deliveries, starts at %s)",
                    subscription.describe(), settings.GROUP_ID, settings.MAX_THREAD_COUNT, dispatcher.workers,
                    group.lock_seconds, group.delivery_limit, group.reset)

    # -- the loop ---------------------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        assert self._parts is not None
        client, dispatcher = self._parts.client, self._parts.dispatcher
        ledger, threads, gate = self._share, self._threads, self._gate
        next_status = time.monotonic()
        while not self._stop.is_set():
            self._stall.beat = now = time.monotonic()
            if self._retune:
                self._apply_retune()
            threads.tick(ledger.processed, dispatcher)
            dispatcher.release_due()
            self._settle(dispatcher)
            gone = self._faults.brokers_gone(now)
            if gone is not None:
                self._fail(gone)
                break
            gate.observe(now, ledger.processed)
            self._timers(now, dispatcher)
            if ledger.done:
                self._poll(client, dispatcher)
            else:
                self._send(now, client)
                dispatcher.wait_backlog_at_most(0 if dispatcher.ready else -1, self._wait(now))
            now = time.monotonic()
            if now >= next_status:
                if self._on_status is not None:
                    self._on_status(self.stats())
                next_status = now + self._status_interval
            if self._ended(now):
                break

    def _settle(self, dispatcher: Dispatcher) -> None:
        """Acknowledge what finished; run the redeliveries whose first handler failed meanwhile."""
        if dispatcher.completions:
            self._progress_at = time.monotonic()
        again = self._share.settle(dispatcher.completions)
        if again and self.phase is Phase.RUNNING:
            dispatcher.put(again)

    def _timers(self, now: float, dispatcher: Dispatcher) -> None:
        """The batch's point of no return (release what did not start) and deadline (release the rest);
        a batch whose locks are gone (an acceptance refused before its deadline) is dropped at once."""
        ledger = self._share
        lease = ledger.lease
        if lease is None or ledger.done:
            ledger.lost = None
            return
        if ledger.lost is not None:  # an acceptance of this batch was refused: its locks are gone
            ledger.lose(dispatcher.retire(ledger.states))
            return
        if not self._retired and now >= lease.release_at(self._handler_time.seconds):
            self._retired = True
            ledger.retire(dispatcher.retire(ledger.states))
        if now >= lease.deadline:
            ledger.expire()

    def _poll(self, client: ShareClient, dispatcher: Dispatcher) -> None:
        """The next batch, when a thread is free for it (the previous one is all acknowledged)."""
        free = dispatcher.max_thread_count - dispatcher.active_thread_count
        if free <= 0 or self.phase is not Phase.RUNNING:
            if self._share.unsent:
                self._send(time.monotonic(), client, at_once=True)
            dispatcher.wait_backlog_at_most(-1, POLL_TIMEOUT)  # a thread comes free
            return
        started = time.monotonic()  # the broker locks what it hands out during the call: never earlier
        messages = client.poll(POLL_TIMEOUT)
        self._share.unsent = 0  # the poll carried them
        if not messages:
            return
        now = time.monotonic()
        if client.down_since is not None and any(m.error() is None for m in messages):
            client.note_message()  # only a real record proves a broker answered
        lease = Lease(started, self._lock_seconds)
        works = self._share.admit(messages, lease, now, free, self._handler_time.seconds)
        self._retry.lease, self._retired = lease, False
        if works:
            self._acquired_at = now
            dispatcher.put(works)
        if self._share.unsent:  # released at once: another member (or the next poll) takes them now
            self._send(now, client, at_once=True)

    def _send(self, now: float, client: ShareClient, at_once: bool = False) -> None:
        """Send the recorded acknowledgements every COMMIT_INTERVAL, or at once near the locks' end."""
        ledger = self._share
        if not ledger.unsent:
            return
        lease = ledger.lease
        urgent = lease is not None and lease.deadline - now < 2 * LOCK_MARGIN
        if at_once or urgent or now >= self._next_send:
            client.send()
            ledger.unsent = 0
            self._next_send = now + self._settings.COMMIT_INTERVAL

    def _wait(self, now: float) -> float:
        """How long the loop may sleep on the pool: until the next timer, never over POLL_TIMEOUT."""
        if self._share.failure.pending or (self._share.outputs is not None and self._share.outputs.pending):
            return DLQ_POLL
        lease = self._share.lease
        wait = POLL_TIMEOUT
        if lease is not None:
            due = lease.deadline if self._retired else lease.release_at(self._handler_time.seconds)
            wait = min(wait, due - now)
        if self._share.unsent:
            wait = min(wait, self._next_send - now)
        return max(0.0, wait)

    def _ended(self, now: float) -> bool:
        """``max_messages`` handled, or ``idle_exit`` seconds without a new record (docs/share-groups.md)."""
        ledger = self._share
        if self._bounds.max_messages is not None and ledger.processed >= self._bounds.max_messages:
            logger.info("handled %d records (max_messages reached); stopping", ledger.processed)
            return True
        if self._bounds.idle_exit is None or self._subscribed_at is None:
            return False
        since = self._acquired_at or self._subscribed_at + JOIN_WAIT
        if now - since < self._bounds.idle_exit:
            return False
        assert self._parts is not None
        dispatcher = self._parts.dispatcher
        if ledger.done or (dispatcher.delayed == 0 and now - max(self._progress_at, since) >= self._bounds.idle_exit):
            logger.info("no new record for %.1fs (idle_exit); stopping", self._bounds.idle_exit)
            return True
        return False

    # -- the end ----------------------------------------------------------------------------------------

    def _halt(self, error: Mtc75Error) -> None:
        """Stop at once (a fatal Kafka error): nothing more is handled or acknowledged."""
        if self.phase is not Phase.HALTED:
            self.phase = Phase.HALTED
            self._fatal = error
            if self._parts is not None:
                self._parts.dispatcher.close_intake()
                self._parts.dispatcher.purge()
        self.stop()

    def _shutdown(self) -> None:
        """Release what did not start, wait (bounded) for running handlers and acknowledge them, release
        the rest, send, close. Always runs."""
        parts = self._parts
        if parts is None:
            if self._hook is not None:
                self._hook.close(FLUSH_TIMEOUT)  # nothing ran: nothing queued
            return
        client, dispatcher, ledger = parts.client, parts.dispatcher, self._share
        halted = self.phase is Phase.HALTED
        if not halted:
            self.phase = Phase.STOPPING
        budget = 0.0 if halted else self._settings.SHUTDOWN_TIMEOUT
        deadline = time.monotonic() + budget
        try:
            dispatcher.close_intake()
            if not halted:
                dropped = ledger.retire(dispatcher.purge(), waiting=False)
                if dropped:
                    logger.info("shutdown: %d acquired records not started; released", dropped)
                self._send(time.monotonic(), client, at_once=True)
            if dispatcher.active_thread_count and budget:
                logger.info("shutdown: waiting up to %.0fs for %d running handlers",
                            budget, dispatcher.active_thread_count)
            while dispatcher.active_thread_count and time.monotonic() < deadline:
                now = time.monotonic()
                self._settle(dispatcher)
                self._timers(now, dispatcher)
                self._send(now, client)
                dispatcher.wait_idle(min(POLL_TIMEOUT, max(0.0, deadline - time.monotonic())))
            self._settle(dispatcher)
            self.abandoned = dispatcher.active_thread_count
            if self.abandoned:
                logger.warning(
                    "shutdown: abandoned %d handlers still running after %.1fs (SHUTDOWN_TIMEOUT %.0fs); "
                    "their records are released and delivered again", self.abandoned, budget,
                    self._settings.SHUTDOWN_TIMEOUT,
                )
            if client.down_since is None and not halted and ledger.failure.pending:
                for work in ledger.failure.flush(max(1.0, deadline - time.monotonic())):
                    ledger.failure_confirmed(work)
            if client.down_since is None and not halted and ledger.outputs is not None and ledger.outputs.pending:
                for work in ledger.outputs.flush(max(1.0, deadline - time.monotonic())):
                    ledger.written(work)
            ledger.release_all()
            if not halted and client.down_since is None:
                client.flush(FLUSH_TIMEOUT)
        finally:
            ledger.failure.close()
            if ledger.outputs is not None:
                ledger.outputs.close()
            client.close()
            dispatcher.shutdown(wait=False)
            if self._hook is not None:  # the last reports within the shutdown's time
                self._hook.close(max(FLUSH_TIMEOUT, deadline - time.monotonic()))

    def stats(self) -> Stats:
        now = time.monotonic()
        parts, ledger = self._parts, self._share
        d = parts.dispatcher if parts is not None else None
        return Stats(
            active_threads=d.active_thread_count if d else 0, max_thread_count=self._threads.limit, paused=False,
            paused_for=0.0, next_check_in=0.0, processed=ledger.processed, failed=ledger.failed,
            rate=self._gate.rate, in_flight=len(ledger.held), backlog=d.backlog if d else 0, pauses=0,
            paused_seconds=0.0, elapsed_seconds=now - self._started if self._started else 0.0,
            max_active_threads=d.max_active_threads if d else 0, assigned=0, retried=d.retried if d else 0,
            dead_lettered=ledger.failure.dead_lettered, skipped=ledger.failure.skipped,
            dropped_late=ledger.dropped_late, abandoned=self.abandoned, workers=d.workers if d else "threads",
            thread_mode=self._threads.mode, thread_trend=self._threads.trend,
            pause_interval=self._gate.pause_interval, share=ledger.counts(),
        )
