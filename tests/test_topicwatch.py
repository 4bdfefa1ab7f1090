"""The topic-id watch without a broker: a check that gets no answer is never asked again on the same client.

librdkafka sends DescribeTopics to the controller the client last heard of and waits for it; a node killed
while named keeps every later request of that client waiting (issue 22). These tests give the watch admin
clients whose requests never answer, time out or answer, and check which client each check goes to.
Clock: ``poll(now)`` takes the time, so nothing here sleeps.
"""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from mtc75.kafka.topicwatch import REQUEST_TIMEOUT, Change, Known, TopicWatch

TOPIC = "t"


class Admin:
    """An admin client whose DescribeTopics futures the test completes (or never does)."""

    def __init__(self, built: list[Admin]) -> None:
        built.append(self)
        self.futures: list[Future[Any]] = []

    def describe_topics(self, topics: Any, **_: Any) -> dict[str, Future[Any]]:
        out: dict[str, Future[Any]] = {}
        for name in topics.topic_names:
            future: Future[Any] = Future()
            self.futures.append(future)
            out[name] = future
        return out


def _answer(future: Future[Any], topic_id: str = "id-1") -> None:
    future.set_result(SimpleNamespace(topic_id=topic_id))


def _watch() -> tuple[TopicWatch, list[Admin]]:
    built: list[Admin] = []
    return TopicWatch(lambda: Admin(built), [TOPIC]), built


def _known(watch: TopicWatch) -> Known:
    known = watch.known(TOPIC)
    assert known is not None
    return known


def test_a_check_that_never_answers_is_asked_again_on_a_fresh_client() -> None:
    watch, built = _watch()
    assert watch.poll(0.0) is None  # asks
    assert len(built) == 1 and len(built[0].futures) == 1
    assert watch.poll(REQUEST_TIMEOUT - 0.1) is None and watch.busy  # still waiting
    assert watch.poll(REQUEST_TIMEOUT + 0.1) is None and not watch.busy  # given up
    watch.poll(REQUEST_TIMEOUT + 0.2)  # the next check
    assert len(built) == 2 and len(built[1].futures) == 1, "the next check went to the client that never answered"
    _answer(built[1].futures[0])
    assert watch.poll(REQUEST_TIMEOUT + 0.3) == {TOPIC: Change.SAME}
    assert _known(watch).confirmed_at == REQUEST_TIMEOUT + 0.2


def test_a_timed_out_answer_sends_the_next_check_to_a_fresh_client() -> None:
    watch, built = _watch()
    watch.poll(0.0)
    built[0].futures[0].set_exception(KafkaException(KafkaError(KafkaError._TIMED_OUT, "waiting for controller")))
    assert watch.poll(1.0) == {TOPIC: Change.UNKNOWN}
    watch.poll(2.0)
    assert len(built) == 2 and len(built[1].futures) == 1
    assert watch.enabled  # a timeout says nothing about the topic ids: still watching


def test_answered_checks_keep_their_client() -> None:
    watch, built = _watch()
    for step in range(5):
        watch.poll(float(step))
        _answer(built[0].futures[-1])
        assert watch.poll(step + 0.5) == {TOPIC: Change.SAME}
    assert len(built) == 1 and len(built[0].futures) == 5


def test_a_blocking_check_without_an_answer_moves_to_a_fresh_client_too() -> None:
    watch, built = _watch()
    assert watch.confirm_now([TOPIC], 0.01) == {TOPIC: Change.UNKNOWN}  # the future never completes: TimeoutError
    assert watch.poll(0.0) is None
    assert len(built) == 2 and len(built[1].futures) == 1
