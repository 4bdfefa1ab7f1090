"""Faults: what a librdkafka error means for the run -- ignore it, say it (rarely), stop, or halt at once.

- A fatal error (``_FATAL``, e.g. a fenced static member) halts the consumer: nothing after it is safe, so
  nothing more is handled or committed (exit 6).
- Every broker down: librdkafka reconnects by itself; the engine commits nothing meanwhile, probes once a
  second, and ends the run after BROKER_DOWN_TIMEOUT (exit 3).
- A topic missing among fetched messages: the topic guard decides when the topic is watched (a delete +
  re-create gets a grace) or only a pattern matched it (it just stops matching); a named topic without a
  watch, or a topic we may not read, ends the run (exit 3).
- An offset out of range with AUTO_OFFSET_RESET=error: that partition's fetcher stopped for good, so the run
  ends (exit 1, committing what is safe) rather than leave the partition unread.
- Anything else is transient: said once per kind and ERROR_REPEAT_SECONDS (:meth:`KafkaClient.warn_rarely`).

- A poll-loop turn that lasts STALL_SECONDS (every step of a turn is bounded well below it) is said, with where
  the poll thread is (:class:`StallWatch`): commits, fetches and rebalances wait meanwhile, and the stack is
  what tells which wait nobody bounded.

Threads: the poll thread only; librdkafka's ``error_cb`` runs inside the poll thread's ``poll``/``consume``.
:class:`StallWatch` has a daemon thread of its own, which only reads the poll thread's beat and frame.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError

from mtc75.errors import KafkaFatal, KafkaUnavailable, Mtc75Error, OffsetOutOfRange
from mtc75.kafka.client import ClientLink, ErrorKind, classify

logger = logging.getLogger(__name__)

# A poll-loop turn this long is said with the poll thread's stack. The longest bounded step of a turn is a
# transaction commit's retries (30 s, COMMIT_TIMEOUT); a wait in on_revoke is bounded below max.poll.interval.ms
# (300 s), and one that long is worth a line too.
STALL_SECONDS = 60.0


class StallWatch:
    """Says (WARNING) where the poll thread is once one turn of its loop has lasted ``after`` seconds, and again
    each ``after`` seconds the turn goes on. The poll thread sets ``beat`` at each turn."""

    def __init__(self, after: float | None = None) -> None:
        self.after = STALL_SECONDS if after is None else after
        self.beat = 0.0  # when the poll thread last began a turn (written by it alone)
        self._ident = 0
        self._stop = threading.Event()

    def start(self) -> None:
        """On the poll thread, before its loop."""
        self._ident = threading.get_ident()
        self.beat = time.monotonic()
        threading.Thread(target=self._watch, name="mtc75-stall-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        said = 0.0
        while not self._stop.wait(min(5.0, self.after / 4)):
            beat, now = self.beat, time.monotonic()
            if now - max(said, beat) < self.after:  # turning, or said less than ``after`` ago
                continue
            said = now
            frame = sys._current_frames().get(self._ident)
            where = "".join(traceback.format_stack(frame, limit=12)).rstrip() if frame is not None else "(ended)"
            logger.warning("the poll thread has been in one loop turn for %.0fs; commits, fetches and rebalances "
                           "wait meanwhile. It is at:\n%s", now - beat, where)


class Faults:
    """Classifies the errors of one consumer's client and acts on them (see the module notes)."""

    def __init__(self, bootstrap: str, down_timeout: float, halt: Callable[[Mtc75Error], None],
                 fail: Callable[[Mtc75Error], None]) -> None:
        self._bootstrap = bootstrap
        self._down_timeout = down_timeout  # BROKER_DOWN_TIMEOUT
        self._halt = halt  # the engine's "stop at once, commit nothing"
        self._fail = fail  # the engine's "end the run with this error, committing what is safe"
        self.client: ClientLink | None = None  # set once built
        self.checked = False  # the start-up check passed: before it, errors are its to report, in one line
        # topic -> the topic guard decides about it missing (mtc75.engine.topicguard.TopicGuard.decides), and
        # whether that is expected, nothing to warn about (TopicGuard.expected)
        self.guarded: Callable[[str | None], bool] = lambda topic: False
        self.expected: Callable[[str | None], bool] = lambda topic: False

    def is_fatal(self, err: KafkaError) -> bool:
        """A fatal error halts the consumer; True if this was one."""
        if classify(err) is not ErrorKind.FATAL:
            return False
        self._halt(KafkaFatal(
            f"fatal Kafka error: {err.str()}; stopped at once, nothing more handled or committed "
            "(uncommitted messages will be delivered again)"
        ))
        return True

    def on_error(self, err: KafkaError) -> None:
        """librdkafka's ``error_cb``."""
        client = self.client
        if self.is_fatal(err) or client is None:
            return
        if not self.checked:
            logger.debug("Kafka: %s", err.str())  # the start-up check reports this as one error line
            return
        if classify(err) is ErrorKind.BROKERS_DOWN:
            client.note_brokers_down()
        client.warn_rarely(err, f"Kafka: {err.str()} (retrying)")

    def on_message_error(self, msg: Any) -> None:
        """An error event among the fetched messages; raises KafkaUnavailable when the run cannot go on."""
        client = self.client
        assert client is not None
        err = msg.error()
        kind = classify(err)
        if kind is ErrorKind.END_OF_PARTITION or self.is_fatal(err):
            return
        if kind is ErrorKind.OUT_OF_RANGE:
            self._fail(OffsetOutOfRange(client.out_of_range(msg.topic(), msg.partition(), msg.offset())))
            return
        if kind is ErrorKind.TOPIC_MISSING and self.guarded(msg.topic()):
            # Deleted, maybe being re-created: the topic guard decides (grace, then exit 3, a reset, or nothing).
            if self.expected(msg.topic()):
                logger.debug("Kafka: %s", err.str())
            else:
                client.warn_rarely(err, f"consumer error: {err.str()}")
            return
        if kind in (ErrorKind.TOPIC_MISSING, ErrorKind.REFUSED):
            raise KafkaUnavailable(f"consumer error: {err.str()}")
        client.warn_rarely(err, f"consumer error: {err.str()}")

    def brokers_gone(self, now: float) -> Mtc75Error | None:
        """While every broker is down: probe now and then; the error that ends the run after the budget."""
        client = self.client
        if client is None or client.down_since is None:
            return None
        down_since = client.down_since
        if client.probe(now) or now - down_since < self._down_timeout:
            return None
        return KafkaUnavailable(
            f"lost Kafka at {self._bootstrap}: no broker reachable for {self._down_timeout:g}s "
            "(BROKER_DOWN_TIMEOUT); what was handled since the last commit will be delivered again"
        )
