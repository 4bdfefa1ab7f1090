"""The topic guard: what the engine does when the topic-id check says the topic is gone or re-created.

Gone (deleted): nothing is committed until it is back (the checkpoint sends nothing unconfirmed); one
warning; not back within TOPIC_GONE_GRACE: the run halts with TopicGone (exit 3). Re-created (the same name,
a new id): every Work of the old topic is dropped and the new one is read from AUTO_OFFSET_RESET, with a
warning -- nothing fetched from the old topic is ever committed (:meth:`mtc75.engine.assignments.Assignments.reset`).
There again (same id after a "gone"): one line.

Threads: the poll thread only (the checkpoint reports changes from its commit turns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mtc75.errors import Mtc75Error, TopicGone
from mtc75.kafka.topicwatch import Change, TopicWatch

logger = logging.getLogger(__name__)

# A topic that disappears is given this long to come back (a delete + create) before the run ends with exit 3.
TOPIC_GONE_GRACE = 10.0


class TopicGuard:
    """Acts on the answers of one topic's id checks (see the module notes)."""

    def __init__(self, watch: TopicWatch, reset: Callable[[str], bool], where: str,
                 halt: Callable[[Mtc75Error], None]) -> None:
        self._watch = watch
        self._reset = reset  # the assignments' reset: False when ``where`` names no position
        self._where = where  # auto.offset.reset: where a re-created topic is read from
        self._halt = halt
        self._gone_reported = False

    def changed(self, change: Change, now: float) -> None:
        watch, topic = self._watch, self._watch.topic
        if change is Change.SAME and self._gone_reported:
            logger.warning("topic %s is there again (same topic id)", topic)
            self._gone_reported = False
        elif change is Change.GONE:
            if not self._gone_reported:
                self._gone_reported = True
                logger.warning("topic %s not found (deleted?): nothing is committed until it is back; stopping "
                               "if it is not re-created within %.0fs", topic, TOPIC_GONE_GRACE)
            if watch.gone_since is not None and now - watch.gone_since >= TOPIC_GONE_GRACE:
                self._halt(TopicGone(
                    f"topic {topic!r} was deleted while consuming and not re-created within {TOPIC_GONE_GRACE:.0f}s"
                ))
        elif change is Change.RECREATED:
            self._gone_reported = False
            if not self._reset(self._where):
                self._halt(TopicGone(f"topic {topic!r} was deleted and re-created while consuming, and "
                                     f"auto.offset.reset={self._where} does not say where to start the new one"))
                return
            logger.warning("topic %s was deleted and re-created (new topic id %s): reading the new topic from "
                           "AUTO_OFFSET_RESET=%s; nothing fetched from the old one is committed",
                           topic, watch.topic_id, self._where)
