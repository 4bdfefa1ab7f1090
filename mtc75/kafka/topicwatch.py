"""Notices the consumed topic being deleted or deleted and re-created, by its Kafka topic id.

A topic deleted and re-created under the same name is a new topic (a new id, offsets from 0), but
librdkafka goes on fetching at the old positions and an old commit lands on the new topic: in the run
that found it, 149 of 300 new messages were skipped and their offsets committed. So the engine commits
an offset only after a check of the topic id that *started after* the message was fetched confirmed
the same id (ids never come back, so the message came from that topic), and resets or stops when the
id changes or the topic stays gone.

Used only by the poll thread. The id is asked with the admin client's DescribeTopics, whose answer
arrives on a future: :meth:`TopicWatch.poll` never blocks, :meth:`TopicWatch.confirm_now` does
(bounded; for the synchronous commits at revoke and shutdown).

A check that got no answer is never asked again on the same admin client: the next one builds a fresh
client. librdkafka sends DescribeTopics to the controller its last metadata response named (on KRaft a
random live broker, named anew by each response) and waits for that node to be up; a node killed while
named stays named, because no response comes to replace it, so every later request on that client timed
out until its metadata refresh 5 min later (issue 22: 103 s without a commit, while a fresh client
answered in 10 ms). A fresh client starts from the bootstrap list and asks a node that is up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # seconds one DescribeTopics may take before it counts as "no answer"
# Errors that mean "this topic does not exist (now)": anything else (timeouts, broker down) says nothing.
GONE_CODES = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.UNKNOWN_TOPIC_ID, KafkaError._UNKNOWN_TOPIC)


class Change(Enum):
    SAME = "same"  # the topic still has the id we consume: work fetched before the check is safe to commit
    GONE = "gone"  # the topic does not exist
    RECREATED = "recreated"  # the topic exists with another id
    UNKNOWN = "unknown"  # no answer (timeout, broker down): neither confirms nor condemns


def classify(known_id: str | None, answer: str | BaseException) -> Change:
    """Pure decision: what an answer (a topic id, or the error of the request) means for ``known_id``."""
    if isinstance(answer, BaseException):
        err = answer.args[0] if isinstance(answer, KafkaException) and answer.args else None
        if isinstance(err, KafkaError) and err.code() in GONE_CODES:
            return Change.GONE
        return Change.UNKNOWN
    if known_id is None or answer == known_id:
        return Change.SAME
    return Change.RECREATED


class TopicWatch:
    """Asks the topic's id every ``interval`` seconds; remembers when the id was last confirmed."""

    def __init__(self, new_admin: Callable[[], Any], topic: str) -> None:
        """``new_admin()`` builds an ``AdminClient`` (or the in-memory fake; the engine's goes through its
        :class:`~mtc75.kafka.clients.ClientFactories`): once at the first check, then after each check that
        got no answer. The watch owns the clients it built."""
        self.topic = topic
        self._new_admin = new_admin
        self._admin: Any = new_admin()  # a refused configuration raises here, at start-up
        self.topic_id: str | None = None  # the incarnation being consumed
        self.confirmed_at = float("-inf")  # start time of the latest check that confirmed topic_id
        self.gone_since: float | None = None  # start time of the first check that found no topic
        self.enabled = True  # False when the cluster cannot tell topic ids (commits are then not gated)
        self._future: Future[Any] | None = None
        self._asked_at = 0.0

    # -- the two ways to ask --------------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Learn the id of the topic at start-up (the run consumes this incarnation)."""
        answer = self._ask_blocking(timeout)
        if isinstance(answer, BaseException):
            if classify(None, answer) is Change.UNKNOWN and not _transient(answer):
                self._disable(answer)
            else:
                self._admin = None  # no answer: the next check on a fresh client
            return
        self.topic_id = answer

    def poll(self, now: float) -> Change | None:
        """Start a check when none is running; return what a finished check found (None: none finished)."""
        if not self.enabled:
            return None
        if self._future is None:
            self._asked_at = now
            try:
                self._future = self._request()
            except Exception as err:  # a fresh client could not be built (e.g. no thread left): no answer
                logger.debug("topic id check of %s not sent: %s", self.topic, err)
            return None
        if not self._future.done():
            if now - self._asked_at > REQUEST_TIMEOUT:
                self._future = None  # lost in an outage: ask again, on a fresh client
                self._admin = None
            return None
        future, self._future = self._future, None
        try:
            answer: str | BaseException = _id_of(future.result())
        except Exception as err:
            answer = err
        return self._record(answer, self._asked_at)

    def confirm_now(self, timeout: float) -> Change:
        """Check at once and wait (bounded): used before a synchronous commit."""
        if not self.enabled:
            return Change.SAME
        asked_at = time.monotonic()
        return self._record(self._ask_blocking(timeout), asked_at)

    @property
    def busy(self) -> bool:
        """A check is running: its answer will confirm (or not) what was fetched before it started."""
        return self._future is not None

    # -- internals ------------------------------------------------------------------------------------

    def _record(self, answer: str | BaseException, asked_at: float) -> Change:
        change = classify(self.topic_id, answer)
        if change is Change.SAME:
            self.topic_id = answer if isinstance(answer, str) else self.topic_id
            self.confirmed_at = max(self.confirmed_at, asked_at)
            self.gone_since = None
        elif change is Change.GONE:
            if self.gone_since is None:
                self.gone_since = asked_at
        elif change is Change.RECREATED:
            assert isinstance(answer, str)
            self.topic_id = answer
            self.confirmed_at = asked_at
            self.gone_since = None
        elif isinstance(answer, BaseException) and not _transient(answer):
            self._disable(answer)
            return Change.SAME
        elif isinstance(answer, BaseException):
            self._admin = None  # no answer (e.g. waiting for a dead controller): the next check on a fresh client
        return change

    def _request(self) -> Future[Any]:
        if self._admin is None:
            self._admin = self._new_admin()
        futures = self._admin.describe_topics(TopicCollection([self.topic]), request_timeout=REQUEST_TIMEOUT)
        return futures[self.topic]

    def _ask_blocking(self, timeout: float) -> str | BaseException:
        try:
            return _id_of(self._request().result(timeout=timeout))
        except Exception as err:  # a KafkaException, TimeoutError from the future, or no fresh client
            return err

    def _disable(self, err: BaseException) -> None:
        self.enabled = False
        logger.warning(
            "cannot read the id of topic %s (%s): a deleted and re-created topic will not be noticed", self.topic, err
        )


def _id_of(description: Any) -> str:
    return str(description.topic_id)


def _transient(err: BaseException) -> bool:
    """Timeouts and outages: the next check may succeed. Anything else (e.g. not authorized) will not."""
    if not isinstance(err, KafkaException) or not err.args or not isinstance(err.args[0], KafkaError):
        return isinstance(err, TimeoutError)
    kerr = err.args[0]
    return kerr.retriable() or kerr.code() in (
        KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError.REQUEST_TIMED_OUT,
        KafkaError.LEADER_NOT_AVAILABLE, KafkaError.BROKER_NOT_AVAILABLE,
    ) or kerr.code() in GONE_CODES
