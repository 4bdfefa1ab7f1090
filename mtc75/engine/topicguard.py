"""The topic guard: what the engine does when a topic-id check says a topic is gone or re-created.

Each topic on its own -- one deleted or re-created topic changes nothing for the others, which go on being
consumed and committed:

- Gone (deleted): nothing of it is committed (the checkpoint sends nothing unconfirmed); one warning. A topic
  TOPIC *names* is expected to exist: not back within TOPIC_GONE_GRACE, the run ends with TopicGone (exit 3),
  as with one topic -- a stop, not a halt: running handlers get SHUTDOWN_TIMEOUT and the other topics' finished
  work is committed (the gone topic's never is: its checks say GONE). A topic only a *pattern* matched just
  stops matching: not an error; librdkafka takes its partitions away at its next metadata refresh, and the
  watch forgets it then.
- Re-created (the same name, a new id): every Work of the old incarnation of that topic is dropped and the new
  one is read from AUTO_OFFSET_RESET, with a warning -- nothing fetched from the old one is ever committed
  (:meth:`mtc75.engine.assignments.Assignments.reset`).
- There again (same id after a "gone"): one line.

Threads: the poll thread only (the checkpoint reports changes from its commit turns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mtc75.core.subscription import Subscription
from mtc75.errors import Mtc75Error, TopicGone
from mtc75.kafka.topicwatch import Change, TopicWatch

logger = logging.getLogger(__name__)

# A named topic that disappears is given this long to come back (a delete + create) before the run ends (exit 3).
TOPIC_GONE_GRACE = 10.0


class TopicGuard:
    """Acts on the answers of the topic-id checks, topic by topic (see the module notes)."""

    def __init__(self, watch: TopicWatch, subscription: Subscription, reset: Callable[[str, str], bool], where: str,
                 halt: Callable[[Mtc75Error], None], fail: Callable[[Mtc75Error], None]) -> None:
        self._watch = watch
        self._subscription = subscription
        self._reset = reset  # the assignments' reset(where, topic): False when ``where`` names no position
        self._where = where  # auto.offset.reset: where a re-created topic is read from
        self._halt = halt  # stop at once, commit nothing: a re-created topic with nowhere to start
        self._fail = fail  # end the run, committing what is safe: a named topic gone for good
        self._gone_reported: set[str] = set()

    def decides(self, topic: str | None) -> bool:
        """A "topic missing" error of ``topic`` is this guard's to judge (True), not the end of the run: the
        topic is watched, or only a pattern matched it (a deleted one just stops matching)."""
        if topic is None:
            return self._watch.enabled or bool(self._subscription.patterns)
        return self._watch.gates(topic) or not self._subscription.named(topic)

    def expected(self, topic: str | None) -> bool:
        """A "topic missing" report of ``topic`` needs no warning of its own: a pattern that matches nothing
        yet (librdkafka reports the pattern itself; start-up said so), or a topic only a pattern matched
        (gone: this guard says so, once)."""
        return topic is not None and not self._subscription.named(topic)

    def changed(self, topic: str, change: Change, now: float) -> None:
        named = self._subscription.named(topic)
        if change is Change.SAME and topic in self._gone_reported:
            logger.warning("topic %s is there again (same topic id)", topic)
            self._gone_reported.discard(topic)
        elif change is Change.GONE:
            self._gone(topic, named, now)
        elif change is Change.RECREATED:
            self._gone_reported.discard(topic)
            if not self._reset(self._where, topic):
                self._halt(TopicGone(f"topic {topic!r} was deleted and re-created while consuming, and "
                                     f"auto.offset.reset={self._where} does not say where to start the new one"))
                return
            known = self._watch.known(topic)
            logger.warning("topic %s was deleted and re-created (new topic id %s): reading the new topic from "
                           "AUTO_OFFSET_RESET=%s; nothing fetched from the old one is committed",
                           topic, known.topic_id if known is not None else "?", self._where)

    def _gone(self, topic: str, named: bool, now: float) -> None:
        if topic not in self._gone_reported:
            self._gone_reported.add(topic)
            if named:
                logger.warning("topic %s not found (deleted?): nothing of it is committed until it is back; "
                               "stopping if it is not re-created within %.0fs", topic, TOPIC_GONE_GRACE)
            else:
                logger.warning("topic %s not found (deleted?): it no longer matches %s; nothing more of it is "
                               "committed", topic, self._subscription.matching(topic) or "the subscription")
        known = self._watch.known(topic)
        if named and known is not None and known.gone_since is not None and now - known.gone_since >= TOPIC_GONE_GRACE:
            self._fail(TopicGone(
                f"topic {topic!r} was deleted while consuming and not re-created within {TOPIC_GONE_GRACE:.0f}s"
            ))
