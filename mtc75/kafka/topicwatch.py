"""Notices a consumed topic being deleted or deleted and re-created, by its Kafka topic id.

A topic deleted and re-created under the same name is a new topic (a new id, offsets from 0), but
librdkafka goes on fetching at the old positions and an old commit lands on the new topic: in the run
that found it, 149 of 300 new messages were skipped and their offsets committed. So the engine commits
an offset only after a check of the topic id that *started after* the message was fetched confirmed
the same id (ids never come back, so the message came from that topic), and resets or stops when the
id changes or the topic stays gone.

One watch covers every topic of the run (several with a list or a pattern): each check is one DescribeTopics
request with a future per topic, and each topic's answer is its own (:class:`Known`): one deleted or
re-created topic changes nothing for the others. Topics join when they are first assigned (their id learned
then, before anything of them is fetched: :meth:`TopicWatch.learn`) and leave when no partition of theirs is
assigned any more and they are not named (:meth:`TopicWatch.retain`).

Used only by the poll thread. The ids are asked with the admin client's DescribeTopics, whose answers
arrive on futures: :meth:`TopicWatch.poll` never blocks, :meth:`TopicWatch.confirm_now` and
:meth:`TopicWatch.learn` do (bounded; for the synchronous commits at revoke and shutdown, and assignments).

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
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
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


@dataclass
class Known:
    """What the watch knows of one topic."""

    topic: str
    topic_id: str | None = None  # the incarnation being consumed (None: not learned yet)
    confirmed_at: float = float("-inf")  # start time of the latest check that confirmed topic_id
    gone_since: float | None = None  # start time of the first check that found no topic
    enabled: bool = True  # False when the cluster cannot tell this topic's id (its commits are then not gated)

    def record(self, answer: str | BaseException, asked_at: float) -> Change:
        """What ``answer`` means, remembered; a permanent error disables the topic's checks (SAME)."""
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
            self.disable(answer)
            return Change.SAME
        return change

    def disable(self, err: BaseException) -> None:
        self.enabled = False
        logger.warning("cannot read the id of topic %s (%s): a deleted and re-created topic will not be noticed",
                       self.topic, err)


class TopicWatch:
    """Asks the ids of the watched topics every ``interval`` seconds, all in one DescribeTopics request."""

    def __init__(self, new_admin: Callable[[], Any], topics: Iterable[str] = ()) -> None:
        """``new_admin()`` builds an ``AdminClient`` (or the in-memory fake; the engine's goes through its
        :class:`~mtc75.kafka.clients.ClientFactories`): once at the first check, then after each check that
        got no answer. The watch owns the clients it built."""
        self._new_admin = new_admin
        self._admin: Any = new_admin()  # a refused configuration raises here, at start-up
        self._known: dict[str, Known] = {t: Known(t) for t in topics}
        self._futures: dict[str, Future[Any]] | None = None  # the check in flight, one future per topic
        self._asked_at = 0.0

    # -- which topics ---------------------------------------------------------------------------------

    @property
    def topics(self) -> list[str]:
        return list(self._known)

    def known(self, topic: str) -> Known | None:
        return self._known.get(topic)

    def gates(self, topic: str) -> bool:
        """Commits of ``topic`` wait for a check that confirms its id."""
        known = self._known.get(topic)
        return known is not None and known.enabled

    @property
    def enabled(self) -> bool:
        """Some watched topic is gated (a check has something to ask)."""
        return any(k.enabled for k in self._known.values())

    def learn(self, topics: Iterable[str], timeout: float) -> None:
        """Watch ``topics`` too, learning the ids of the new ones now (bounded): the incarnation read from here
        on. One that does not answer is learned by its first periodic check."""
        new = [t for t in dict.fromkeys(topics) if t not in self._known]
        if not new:
            return
        for topic in new:
            self._known[topic] = Known(topic)
        answers = self._ask_blocking(new, timeout)
        for topic in new:
            answer, known = answers[topic], self._known[topic]
            if isinstance(answer, str):
                known.topic_id = answer
            elif classify(None, answer) is Change.UNKNOWN and not _transient(answer):
                known.disable(answer)
            else:
                self._admin = None  # no answer: the next check on a fresh client

    def retain(self, topics: Iterable[str]) -> None:
        """Stop watching every topic not in ``topics`` (its commits are no longer ours to gate)."""
        keep = set(topics)
        for topic in [t for t in self._known if t not in keep]:
            del self._known[topic]

    # -- the two ways to ask --------------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Learn the ids of the watched topics at start-up (the run consumes these incarnations)."""
        topics = list(self._known)
        self._known = {}
        self.learn(topics, timeout)

    def poll(self, now: float) -> dict[str, Change] | None:
        """Start a check of every gated topic when none is running; return what a finished check found, per
        topic (None: none finished)."""
        if self._futures is None:
            topics = [t for t, k in self._known.items() if k.enabled]
            if not topics:
                return None
            self._asked_at = now
            try:
                self._futures = self._request(topics)
            except Exception as err:  # a fresh client could not be built (e.g. no thread left): no answer
                logger.debug("topic id check of %s not sent: %s", ", ".join(topics), err)
            return None
        futures = self._futures
        if not all(f.done() for f in futures.values()):
            if now - self._asked_at > REQUEST_TIMEOUT:
                self._futures = None  # lost in an outage: ask again, on a fresh client
                self._admin = None
            return None
        self._futures = None
        return self._record({t: _answer(f) for t, f in futures.items()}, self._asked_at)

    def confirm_now(self, topics: Iterable[str], timeout: float) -> dict[str, Change]:
        """Check ``topics`` at once and wait (bounded): used before a synchronous commit. A topic not gated
        counts as SAME."""
        wanted = list(dict.fromkeys(topics))
        asking = [t for t in wanted if self.gates(t)]
        changes = {t: Change.SAME for t in wanted if t not in asking}
        if asking:
            asked_at = time.monotonic()
            changes.update(self._record(self._ask_blocking(asking, timeout), asked_at))
        return changes

    @property
    def busy(self) -> bool:
        """A check is running: its answer will confirm (or not) what was fetched before it started."""
        return self._futures is not None

    # -- internals ------------------------------------------------------------------------------------

    def _record(self, answers: dict[str, str | BaseException], asked_at: float) -> dict[str, Change]:
        changes: dict[str, Change] = {}
        for topic, answer in answers.items():
            known = self._known.get(topic)
            if known is None:  # no longer watched (retained away while the check ran)
                continue
            changes[topic] = known.record(answer, asked_at)
            if changes[topic] is Change.UNKNOWN:
                self._admin = None  # no answer (e.g. waiting for a dead controller): the next check on a fresh client
        return changes

    def _request(self, topics: list[str]) -> dict[str, Future[Any]]:
        if self._admin is None:
            self._admin = self._new_admin()
        futures = self._admin.describe_topics(TopicCollection(topics), request_timeout=REQUEST_TIMEOUT)
        return {t: futures[t] for t in topics}

    def _ask_blocking(self, topics: list[str], timeout: float) -> dict[str, str | BaseException]:
        """One answer per topic: its id, or the error (a KafkaException, TimeoutError, or no fresh client)."""
        try:
            futures = self._request(topics)
        except Exception as err:
            return dict.fromkeys(topics, err)
        deadline = time.monotonic() + timeout
        answers: dict[str, str | BaseException] = {}
        for topic, future in futures.items():
            try:
                answers[topic] = _id_of(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except Exception as err:
                answers[topic] = err
        return answers


def _answer(future: Future[Any]) -> str | BaseException:
    try:
        return _id_of(future.result())
    except Exception as err:
        return err


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
