"""The engine's librdkafka ``Consumer``, wrapped: pause set, fetch wake-up, lag, broker probe, error kinds.

What the engine needs from Kafka besides fetching and committing, and what librdkafka gets wrong or
leaves to us, lives here: the set of partitions *we* paused (librdkafka's pause flags survive some
rebalances, so they are not trusted), the seek that wakes the fetcher after a resume, lag from the
cached watermarks (no broker request), "every broker is down" tracking with a cheap probe, the
classification of librdkafka errors, and warnings limited to one per kind and ERROR_REPEAT_SECONDS.
The broker-down tracking, the rare warnings and the bounded close (:class:`ClientLink`) are shared with
the share-group client (:mod:`mtc75.kafka.share`).

Threads: the poll thread only -- every method, and the callbacks librdkafka runs from ``poll``,
``consume`` and ``commit`` (``error_cb``, ``on_commit``, the rebalance callbacks). The one exception is
:meth:`KafkaClient.close`, which runs ``Consumer.close()`` on a helper thread while the poll thread waits
for it and makes no other call (see there). No lock: nothing here is shared with the workers.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from mtc75.core.offsets import Partition
from mtc75.core.subscription import Subscription
from mtc75.errors import ConfigError

logger = logging.getLogger(__name__)

ERROR_REPEAT_SECONDS = 10.0  # the same client error is logged at most once per this many seconds
PROBE_INTERVAL = 1.0  # while no broker is reachable, check this often whether one is back
PROBE_TIMEOUT = 0.5
CLOSE_TIMEOUT = 10.0  # longest shutdown waits for librdkafka's close() (see KafkaClient.close)
CLOSE_TIMEOUT_DOWN = 2.0  # the same while no broker is reachable: there is no group left to leave
WATERMARK_TIMEOUT = 5.0  # longest a (non-cached) end-offset query waits
# Partitions not fetched from since their assignment (e.g. paused at once) have no cached end offset: their
# lag is asked of the broker, at most this often, all the requests of one asking within LAG_QUERY_TIMEOUT.
LAG_QUERY_INTERVAL = 10.0
LAG_QUERY_TIMEOUT = 1.0
TOPIC_MISSING_CODES = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.UNKNOWN_TOPIC_ID)
# librdkafka's WARNING when AUTO_OFFSET_RESET moved a position that was out of range (librdkafka 2.x wording):
# "<topic> [<partition>]: offset reset (at offset 5 (leader epoch 0), broker 1) to offset BEGINNING (...)".
# A reset of a group without a committed offset is only debug-logged, so only real resets match.
OFFSET_RESET = re.compile(
    r"(?P<topic>\S+) \[(?P<partition>\d+)\]: offset reset \(at offset (?P<at>-?\d+).*?\) to "
    r"(?:cached BEGINNING offset )?offset (?P<to>-?\d+|BEGINNING|END)"
)


class ErrorKind(Enum):
    """What a librdkafka error means for the engine."""

    FATAL = "fatal"  # e.g. a fenced static member: stop at once, nothing after it is safe
    END_OF_PARTITION = "eof"  # not an error: the fetcher reached the end of a partition
    TOPIC_MISSING = "topic missing"  # deleted (maybe being re-created) or never there
    REFUSED = "refused"  # not authorized for the topic: retrying will not help
    BROKERS_DOWN = "brokers down"  # no broker reachable: librdkafka keeps retrying
    # AUTO_OFFSET_RESET=error and the position is out of range (or there is none): the partition's fetcher
    # stopped for good, so going on would leave it behind silently
    OUT_OF_RANGE = "offset out of range"
    TRANSIENT = "transient"  # anything else: librdkafka retries it


def classify(err: KafkaError) -> ErrorKind:
    """Pure: the kind of a librdkafka error.

    A fatal error reaches ``error_cb`` with the code ``_FATAL`` (and ``fatal()`` is not always set on
    that object), or shows as ``fatal()`` on the error of a later call: both count.
    """
    code = err.code()
    if err.fatal() or code == KafkaError._FATAL:
        return ErrorKind.FATAL
    if code == KafkaError._PARTITION_EOF:
        return ErrorKind.END_OF_PARTITION
    if code in TOPIC_MISSING_CODES:
        return ErrorKind.TOPIC_MISSING
    if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
        return ErrorKind.REFUSED
    if code == KafkaError._ALL_BROKERS_DOWN:
        return ErrorKind.BROKERS_DOWN
    if code == KafkaError._AUTO_OFFSET_RESET:
        return ErrorKind.OUT_OF_RANGE
    return ErrorKind.TRANSIENT


@dataclass(frozen=True)
class OffsetReset:
    """AUTO_OFFSET_RESET moved a partition's position ``at`` (out of range) to ``to``: an offset, or
    "BEGINNING" / "END" when librdkafka asks the broker for it."""

    tp: Partition
    at: int
    to: str


class ResetLog:
    """The engine consumer's ``logger``: passes librdkafka's log on to ``logger`` unchanged, and notes each
    offset reset it reports (:attr:`resets`), which librdkafka only logs, at WARNING, and which the CLI's
    default level hides. confluent-kafka serves the log from ``poll``/``consume``: the poll thread (and the
    ``mtc75-close`` thread during close)."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger
        self.resets: list[OffsetReset] = []

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if self._logger is not None:
            self._logger.log(level, fmt, *args)
        if level >= logging.WARNING and len(args) == 3 and args[0] == "OFFSET":
            found = OFFSET_RESET.search(str(args[2]))
            if found is not None:
                tp = (found["topic"], int(found["partition"]))
                self.resets.append(OffsetReset(tp, int(found["at"]), found["to"]))


class ClientLink:
    """What every consumer the engine drives needs besides fetching: error kinds said rarely, "every broker
    down" tracking with a cheap probe, and a bounded close. ``metadata`` answers the probe's ``list_topics``
    (the consumer itself; a share consumer has none, so an admin client)."""

    def __init__(self, consumer: Any, topic: str | None, metadata: Any) -> None:
        self.consumer = consumer
        self._topic = topic  # what the probe asks metadata of (None: the cluster's)
        self._metadata = metadata
        self.down_since: float | None = None  # when librdkafka reported every broker down
        self._next_probe = 0.0
        self._quiet_until: dict[int, float] = {}  # error code -> when it may be logged again
        self.close_timed_out = False  # close() did not return in time: the process must not wait for it

    # -- errors and broker probing ---------------------------------------------------------------------

    def warn_rarely(self, err: KafkaError, text: str) -> None:
        """librdkafka repeats the same error on every retry: say each kind once per ERROR_REPEAT_SECONDS."""
        now = time.monotonic()
        if now >= self._quiet_until.get(err.code(), 0.0):
            self._quiet_until[err.code()] = now + ERROR_REPEAT_SECONDS
            logger.warning("%s", text)

    def note_brokers_down(self) -> None:
        """librdkafka said every broker is down: start the clock (once) and probe from now on."""
        if self.down_since is None:
            self.down_since = time.monotonic()
            self._next_probe = self.down_since + PROBE_INTERVAL

    def note_message(self) -> None:
        """A real message arrived: a broker answered."""
        self.down_since = None

    def probe(self, now: float) -> bool:
        """While every broker is down, ask for the topic's metadata now and then; True once one answered."""
        if self.down_since is None:
            return True
        if now < self._next_probe:
            return False
        self._next_probe = now + PROBE_INTERVAL
        try:
            self._metadata.list_topics(self._topic, timeout=PROBE_TIMEOUT)
        except KafkaException:
            return False
        logger.warning("Kafka reachable again after %.1fs", time.monotonic() - self.down_since)
        self.down_since = None
        return True

    # -- close ---------------------------------------------------------------------------------------

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """``Consumer.close()``, bounded by ``timeout``, at most CLOSE_TIMEOUT (CLOSE_TIMEOUT_DOWN while no
        broker is reachable). It also delivers the commits still in flight (librdkafka waits for them).

        With no broker left, librdkafka's close() can wait for ever for a commit queued "waiting for
        coordinator" (seen in 1 of 3 runs of the broker-gone test). So it runs on a helper thread while
        this one waits; the poll thread makes no other Consumer call meanwhile, so the rebalance callback
        close() triggers on the helper thread still has the consumer to itself. Past the timeout the
        close is left behind and :attr:`close_timed_out` tells the script to exit without waiting.
        """
        finished = threading.Event()
        consumer = self.consumer

        def close() -> None:
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as err:
                logger.warning("close: %s", err)
            finally:
                finished.set()

        # With no broker reachable there is no group to leave and no commit that can land: waiting the
        # full CLOSE_TIMEOUT would only push the exit past BROKER_DOWN_TIMEOUT + a few seconds.
        timeout = min(timeout, CLOSE_TIMEOUT_DOWN if self.down_since is not None else CLOSE_TIMEOUT)
        threading.Thread(target=close, name="mtc75-close", daemon=True).start()
        if not finished.wait(timeout):
            self.close_timed_out = True
            logger.warning("close: the Kafka client did not close within %.1fs; leaving it", timeout)


class KafkaClient(ClientLink):
    """One librdkafka ``Consumer`` for the engine; ``consume`` and ``poll`` are the consumer's own methods."""

    def __init__(self, consumer: Consumer, subscription: Subscription, *, cooperative: bool,
                 log: ResetLog | None = None) -> None:
        names = subscription.names
        super().__init__(consumer, names[0] if names else None, consumer)  # the probe: a named topic, or all
        self.consume = consumer.consume  # the hot path: no wrapper call per fetch
        self.poll = consumer.poll
        self._subscription = subscription
        self._cooperative = cooperative  # incremental (un)assign: cooperative assignors and KIP-848
        self.paused: set[Partition] = set()  # partitions *we* paused; librdkafka's flag is not trusted
        self._log = log  # the consumer's logger, when it is a ResetLog: offset resets to report
        self._next_lag_query = 0.0
        self._asked_lag: dict[Partition, int] = {}  # the last broker answer for partitions not fetched yet

    # -- assignment ----------------------------------------------------------------------------------

    def subscribe(self, on_assign: Callable[..., None], on_revoke: Callable[..., None],
                  on_lost: Callable[..., None]) -> None:
        """Subscribe to TOPIC's names and patterns; ConfigError when librdkafka refuses them (a pattern it
        cannot compile: its regular expressions are POSIX extended ones)."""
        try:
            self.consumer.subscribe(list(self._subscription.entries), on_assign=on_assign, on_revoke=on_revoke,
                                    on_lost=on_lost)
        except KafkaException as err:
            raise ConfigError(f"invalid TOPIC={self._subscription.describe()!r}: librdkafka refused the subscription "
                              f"({err.args[0].str()}; a pattern must be a POSIX extended regular expression)"
                              ) from None

    def assign(self, partitions: list[TopicPartition]) -> None:
        if self._cooperative:
            self.consumer.incremental_assign(partitions)
        else:
            self.consumer.assign(partitions)

    def unassign(self, partitions: list[TopicPartition]) -> None:
        if self._cooperative:
            self.consumer.incremental_unassign(partitions)
        else:
            self.consumer.unassign()

    # -- pause / resume ------------------------------------------------------------------------------

    def pause(self, tps: Iterable[Partition], track: bool = True) -> list[Partition]:
        """Pause ``tps`` not paused yet; ``track=False`` for partitions held by someone else (the window)."""
        todo = [tp for tp in tps if tp not in self.paused] if track else list(tps)
        if todo:
            self.consumer.pause([TopicPartition(t, p) for t, p in todo])
            if track:
                self.paused.update(todo)
        return todo

    def resume(self, tps: Iterable[Partition], wake: bool = True) -> None:
        """Resume ``tps`` (and forget them as paused); ``wake``: fetch now (see :meth:`wake_fetcher`)."""
        partitions = [TopicPartition(t, p) for t, p in tps]
        if not partitions:
            return
        self.consumer.resume(partitions)
        self.paused.difference_update((tp.topic, tp.partition) for tp in partitions)
        if wake:
            self.wake_fetcher(partitions)

    def wake_fetcher(self, partitions: list[TopicPartition]) -> None:
        """Make the resumed partitions fetch now rather than at the broker thread's next wake-up.

        With every partition paused, librdkafka's broker thread sleeps up to a second, and resume()
        does not wake it: measured here, the first message after a resume came 0.7-1.0 s later,
        time the pool spends idle. A seek to the current position (where resume would continue
        anyway) does wake it: 2-4 ms, together with a short ``fetch.wait.max.ms`` (see settings.py).
        Partitions with no position yet are left to resume() alone.
        """
        try:
            positions = self.consumer.position(partitions)
        except KafkaException as err:
            logger.debug("position after resume: %s", err)
            return
        for tp in positions:
            if tp.offset >= 0:
                try:
                    self.consumer.seek(tp)
                except KafkaException as err:
                    logger.debug("seek %s[%d]@%d after resume: %s", tp.topic, tp.partition, tp.offset, err)

    def seek(self, tp: Partition, offset: int) -> bool:
        """Move the fetch position (also drops what librdkafka prefetched for the partition); False: it failed."""
        try:
            self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
        except KafkaException as err:
            logger.debug("seek %s[%d] to %d: %s", tp[0], tp[1], offset, err)
            return False
        return True

    # -- offsets -------------------------------------------------------------------------------------

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> KafkaError | None:
        """Send a commit; the error of a refused one (a synchronous one, or one the client refused at once)."""
        try:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as err:
            return err.args[0]
        return None

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        """The group's committed offsets with their metadata (raises ``KafkaException``)."""
        return self.consumer.committed([TopicPartition(tp.topic, tp.partition) for tp in partitions],
                                       timeout=timeout)

    def end_offset(self, tp: Partition, cached: bool = False) -> int | None:
        """The partition's end offset (None: unknown). ``cached``: as of the last fetch response, no request."""
        try:
            if cached:
                offsets = self.consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
            else:
                offsets = self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=WATERMARK_TIMEOUT)
        except KafkaException:
            return None
        return offsets[1] if offsets is not None and offsets[1] >= 0 else None

    def watermarks(self, tp: Partition) -> tuple[int, int] | None:
        """The partition's log start and end offsets, asked of its leader (bounded; None: no answer)."""
        try:
            low, high = self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=WATERMARK_TIMEOUT)
        except KafkaException:
            return None
        return (low, high) if low >= 0 and high >= 0 else None

    def out_of_range(self, topic: str | None, partition: int | None, offset: int | None) -> str:
        """The one-line reason for :class:`~mtc75.errors.OffsetOutOfRange`: where it stood, what the log holds.
        The error event's offset is None (or negative) when the group had no committed offset."""
        if topic is None or partition is None:
            topic, partition = self._subscription.describe(), -1
        where = f"{topic}[{partition}]" if partition >= 0 else topic
        if offset is None or offset < 0 or partition < 0:
            what = f"{where}: the group has no committed offset"
        else:
            marks = self.watermarks((topic, partition))
            holds = f"the log holds offsets {marks[0]} to {marks[1] - 1}" if marks else "the log's range is unknown"
            what = (f"{where}: offset {offset} is out of range ({holds}: records deleted or expired before "
                    "this group handled them?)")
        return (f"{what} and AUTO_OFFSET_RESET=error: stopped, so the partition is not left unread; reset the "
                "group's offsets (kafka-consumer-groups.sh --reset-offsets), or set AUTO_OFFSET_RESET to "
                "earliest or latest")

    def report_resets(self) -> None:
        """One WARNING line for each offset reset librdkafka made since the last call: from where to where,
        and how many offsets that skipped (never handled by this group) or will read again."""
        if self._log is None or not self._log.resets:
            return
        resets, self._log.resets = self._log.resets, []
        for reset in resets:
            (topic, partition), at = reset.tp, reset.at
            if reset.to.lstrip("-").isdigit():
                to: int | None = int(reset.to)
            else:
                marks = self.watermarks(reset.tp)
                to = None if marks is None else marks[0] if reset.to == "BEGINNING" else marks[1]
            side = "start" if reset.to != "END" else "end"
            if to is None:
                moved = f"to the log {side}"
            elif to >= at:
                moved = f"to the log {side}, offset {to} ({to - at} offsets skipped, never handled by this group)"
            else:
                moved = f"back to the log {side}, offset {to}"
            logger.warning("%s[%d]: offset %d was out of range (records deleted or expired, or the log truncated): "
                           "AUTO_OFFSET_RESET moved the position %s", topic, partition, at, moved)

    def positions(self, tps: list[Partition]) -> dict[Partition, int]:
        """librdkafka's position of each partition: past the last record it returned -- and past any record it
        never returns (transaction markers, aborted transactions) read after that. Local, no request; a
        partition with no position yet (nothing returned since its assignment or a seek) is left out."""
        try:
            found = self.consumer.position([TopicPartition(*tp) for tp in tps])
        except KafkaException:
            return {}
        return {(tp.topic, tp.partition): tp.offset for tp in found if tp.offset >= 0}

    def lag(self, bases: Mapping[Partition, int | None], reset: str = "earliest",
            now: float | None = None) -> dict[Partition, int]:
        """End offset minus ``bases[tp]`` per partition, from librdkafka's cached high watermarks (no request).

        A partition with no base (nothing handled since the assignment) counts from the local fetch position.
        One not fetched from yet has neither: its lag is the broker's end offset minus the group's committed
        offset (none committed: where ``reset``, AUTO_OFFSET_RESET, starts), asked at most every
        LAG_QUERY_INTERVAL (``now``: monotonic seconds) while every broker is not down.
        """
        lag: dict[Partition, int] = {}
        unknown: list[TopicPartition] = []
        for tp, base in bases.items():
            if base is None:
                unknown.append(TopicPartition(*tp))
                continue
            high = self.end_offset(tp, cached=True)
            if high is not None:
                lag[tp] = max(0, high - base)
        if unknown:
            try:
                positions = self.consumer.position(unknown)
            except KafkaException:
                positions = []
            for pos in positions:
                high = self.end_offset((pos.topic, pos.partition), cached=True)
                if pos.offset >= 0 and high is not None:
                    lag[(pos.topic, pos.partition)] = max(0, high - pos.offset)
        missing = [tp for tp in bases if tp not in lag]
        if missing:
            now = time.monotonic() if now is None else now
            if now >= self._next_lag_query and self.down_since is None:
                self._next_lag_query = now + LAG_QUERY_INTERVAL
                self._asked_lag = self._ask_lag(missing, reset)
            lag.update((tp, self._asked_lag[tp]) for tp in missing if tp in self._asked_lag)
        return lag

    def _ask_lag(self, tps: list[Partition], reset: str) -> dict[Partition, int]:
        """The broker's end offset minus the group's committed offset (or the reset position) per partition;
        all requests together take at most LAG_QUERY_TIMEOUT (the poll thread waits for them)."""
        deadline = time.monotonic() + LAG_QUERY_TIMEOUT
        try:
            committed = self.consumer.committed([TopicPartition(*tp) for tp in tps], timeout=LAG_QUERY_TIMEOUT)
        except KafkaException as err:
            logger.debug("lag of partitions not fetched yet: %s", err)
            return {}
        asked: dict[Partition, int] = {}
        for tp in committed:
            left = deadline - time.monotonic()
            if left <= 0:
                break  # the others next time
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=left)
            except KafkaException as err:
                logger.debug("lag of %s[%d]: %s", tp.topic, tp.partition, err)
                continue
            base = tp.offset if tp.offset >= 0 else low if reset == "earliest" else high
            asked[(tp.topic, tp.partition)] = max(0, high - base)
        return asked

class Relay:
    """A callback librdkafka must be given before its handler exists: calls go to ``to`` once it is set."""

    def __init__(self) -> None:
        self.to: Callable[..., None] | None = None

    def __call__(self, *args: Any) -> None:
        if self.to is not None:
            self.to(*args)


def is_incremental(conf: Mapping[str, Any]) -> bool:
    """Cooperative assignors and the KIP-848 protocol use incremental (un)assign."""
    strategy = str(conf.get("partition.assignment.strategy", ""))
    return "cooperative" in strategy or str(conf.get("group.protocol", "classic")).lower() == "consumer"
