"""TOPIC as names and patterns, without a broker: the written forms (keyword, config file, MTC75_TOPIC, --topic
repeated or comma-separated), what is refused and how the error names it, the dead-letter exclusion, the
commands that take one topic, the topic-id watch and guard per topic, lag per topic on screen and in metrics."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from rich.console import Console

from mtc75 import api
from mtc75.app.cli import base_parser, resolve
from mtc75.app.dashboard import render
from mtc75.commands import create_topic as create_topic_command
from mtc75.commands import produce as produce_command
from mtc75.core.subscription import Subscription, parse_topics
from mtc75.engine.topicguard import TOPIC_GONE_GRACE, TopicGuard
from mtc75.errors import ConfigError, Mtc75Error, TopicGone, TopicNotFound
from mtc75.kafka.topics import require_topics
from mtc75.kafka.topicwatch import Change, TopicWatch
from mtc75.settings import Settings, load_settings
from tests.fake_kafka import FakeKafka
from tests.stats_factory import make_stats

# -- written forms ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "entries"), [
    ("orders", ("orders",)),
    (" orders , payments,", ("orders", "payments")),
    (["orders", "payments,refunds"], ("orders", "payments", "refunds")),
    (("orders", "orders"), ("orders",)),  # a repeat counts once
    ("^orders-.*", ("^orders-.*",)),
    ("audit,^orders-[a-z]{1,3}$", ("audit", "^orders-[a-z]{1,3}$")),  # a pattern runs to the end: commas kept
    (["^a.*", "^b.*"], ("^a.*", "^b.*")),
])
def test_the_written_forms(raw: object, entries: tuple[str, ...]) -> None:
    assert parse_topics(raw) == entries


@pytest.mark.parametrize(("raw", "fragment"), [
    ("", "must not be empty"),
    (" , ", "must not be empty"),
    ("orders payments", "'orders payments' is not a topic name"),
    ("a" * 250, "is not a topic name"),
    ("^orders-(", "pattern '^orders-(' is not a regular expression"),
    ("^orders-\\d+", "have no \\d (write [0-9])"),
    ("^(?!x)orders", "have no (?...) groups"),
    (["orders", 3], "each topic must be a string, got int 3"),
    (7, "must be a topic name, a list of them, or a pattern"),
])
def test_what_is_refused_names_the_entry(raw: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings().replace(TOPIC=raw)
    assert fragment in str(info.value) and "invalid TOPIC=" in str(info.value)


def test_every_source_takes_the_forms(tmp_path: Path) -> None:
    path = tmp_path / "config.py"
    path.write_text('TOPIC = ["orders", "payments"]\n')
    assert load_settings(path, env={}).TOPIC == ("orders", "payments")
    assert load_settings(path, env={"MTC75_TOPIC": "a,^b-.*"}).TOPIC == ("a", "^b-.*")
    assert load_settings(None, env={"MTC75_TOPIC": "solo"}).TOPIC == "solo"  # one topic: a string, as before
    assert api.settings_from_keywords({"topic": ["x", "y"], "group_id": "g"}).TOPIC == ("x", "y")
    assert api.settings_from_keywords({"topic": "^x.*", "group_id": "g"}).subscription.patterns == ("^x.*",)
    parser = base_parser("consumer", "", "", ("TOPIC",))
    args = parser.parse_args(["--topic", "a", "--topic", "b,c", "--topic", "^d{1,2}"])
    assert resolve(args, ("TOPIC",))[0].TOPIC == ("a", "b", "c", "^d{1,2}")
    with pytest.raises(ConfigError, match=r"invalid TOPIC=\['a b'\] \(from --topic\)"):
        resolve(parser.parse_args(["--topic", "a b"]), ("TOPIC",))


def test_help_documents_lists_and_patterns(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        base_parser("consumer", "", "", ("TOPIC",)).parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "several (a list, comma-separated, or the flag repeated)" in text and "a pattern starting with ^" in text


@pytest.mark.parametrize("command", [produce_command, create_topic_command])
def test_the_producer_and_create_topic_take_one_topic(command: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert command.main(["--topic", "a,b", "--bootstrap-servers", "127.0.0.1:1"]) == 2
    assert "takes one topic name; TOPIC is 'a, b'" in capsys.readouterr().err
    assert command.main(["--topic", "^a.*", "--bootstrap-servers", "127.0.0.1:1"]) == 2


def test_dead_letter_topics_are_hidden_from_patterns_only_where_they_could_loop() -> None:
    def blacklist(**changes: Any) -> Any:
        return Settings().replace(**changes).consumer_config().get("topic.blacklist")

    assert blacklist(TOPIC="^orders.*", ON_FAILURE="dlq") == r"\.dlq$,^__"
    assert blacklist(TOPIC="orders,payments", ON_FAILURE="dlq") is None  # names only: nothing to hide
    assert blacklist(TOPIC="^orders.*", ON_FAILURE="skip") == "^__"  # no dead letters written: no loop
    assert blacklist(TOPIC="^orders.*", CONSUMER_CONFIG={"topic.blacklist": "^x$"}) == "^x$"  # the user's wins
    assert blacklist(TOPIC="orders.dlq,^orders.*") == "^__"  # it would hide a named topic
    assert blacklist(TOPIC="__consumer_offsets,^orders.*", ON_FAILURE="skip") is None
    seen = Subscription.of("^.*orders.*", r"\.dlq$,^__")
    assert seen.select(["orders", "orders.dlq", "orders-eu", "other", "__orders"]) == ["orders", "orders-eu"]
    assert Subscription.of("orders.dlq,^x", r"\.dlq$").covers("orders.dlq")  # named: never hidden


def test_posix_classes_match_as_librdkafka_matches_them() -> None:
    """librdkafka's POSIX regular expressions have [[:digit:]]; Python's re would read it as a set of characters
    (and warn): the logs and the fetch probe must see what librdkafka subscribes to."""
    digits = Subscription.of("^w-[[:digit:]]+$")
    assert digits.select(["w-12", "w-1a", "w-:"]) == ["w-12"]
    assert Subscription.of("^w-[[:alnum:]_]+$").select(["w-ab_9", "w-a.b"]) == ["w-ab_9"]
    assert Subscription.of("^w-\\w+$").select(["w-ab_9"]) == ["w-ab_9"]  # GNU \w: librdkafka has it too


# -- the start-up check -----------------------------------------------------------------------------------------


def test_require_topics_names_every_missing_one_and_lists_what_patterns_match() -> None:
    cluster = FakeKafka()
    for topic in ("orders", "shop-a", "shop-b", "shop-a.dlq"):
        cluster.create_topic(topic, 2)
    admin = cluster.factories().admin({})
    assert require_topics(admin, "b", Subscription.of("orders")) == {"orders": 2}
    assert require_topics(admin, "b", Subscription.of("orders,^shop-.*", r"\.dlq$")) == {
        "orders": 2, "shop-a": 2, "shop-b": 2}
    assert require_topics(admin, "b", Subscription.of("^nothing-.*")) == {}  # no error: none needs to exist
    with pytest.raises(TopicNotFound, match=r"^topics 'x', 'y' do not exist on b$"):
        require_topics(admin, "b", Subscription.of("x,orders,y,^shop.*"))


# -- the topic-id watch and the guard, topic by topic -----------------------------------------------------------


class Admin:
    """DescribeTopics answered from ``ids`` (a missing topic: UNKNOWN_TOPIC_OR_PART), one future per topic."""

    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids
        self.asked: list[list[str]] = []

    def describe_topics(self, topics: Any, **_: Any) -> dict[str, Future[Any]]:
        self.asked.append(list(topics.topic_names))
        out: dict[str, Future[Any]] = {}
        for name in topics.topic_names:
            future: Future[Any] = Future()
            if name in self.ids:
                future.set_result(SimpleNamespace(topic_id=self.ids[name]))
            else:
                future.set_exception(KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)))
            out[name] = future
        return out


def test_one_check_asks_every_topic_and_each_answer_is_its_own() -> None:
    admin = Admin({"a": "id-a", "b": "id-b", "c": "id-c"})
    watch = TopicWatch(lambda: admin, ["a", "b"])
    watch.start(1.0)
    watch.learn(["c"], 1.0)  # assigned later: learned at once
    del admin.ids["b"]
    admin.ids["c"] = "id-c2"
    assert watch.poll(0.0) is None and admin.asked[-1] == ["a", "b", "c"]  # one request for all
    assert watch.poll(0.1) == {"a": Change.SAME, "b": Change.GONE, "c": Change.RECREATED}
    watch.retain(["a"])
    watch.poll(0.2)
    assert admin.asked[-1] == ["a"] and watch.poll(0.3) == {"a": Change.SAME}
    assert watch.confirm_now(["a", "not-watched"], 1.0) == {"a": Change.SAME, "not-watched": Change.SAME}


def test_the_guard_ends_the_run_for_a_named_topic_only_and_resets_one_topic() -> None:
    admin = Admin({"orders": "1", "payments": "2", "shop-x": "3"})
    watch = TopicWatch(lambda: admin, ["orders", "payments"])
    watch.start(1.0)
    watch.learn(["shop-x"], 1.0)
    halted: list[Mtc75Error] = []
    ended: list[Mtc75Error] = []
    resets: list[str] = []
    guard = TopicGuard(watch, Subscription.of("orders,payments,^shop-.*"),
                       lambda where, topic: resets.append(topic) is None, "earliest", halted.append, ended.append)
    del admin.ids["payments"], admin.ids["shop-x"]
    admin.ids["orders"] = "1b"
    watch.poll(0.0)
    for topic, change in (watch.poll(0.1) or {}).items():
        guard.changed(topic, change, 0.1)
    assert resets == ["orders"] and halted == ended == []  # re-created: that topic alone is read again
    watch.poll(TOPIC_GONE_GRACE + 1)
    for topic, change in (watch.poll(TOPIC_GONE_GRACE + 1) or {}).items():
        guard.changed(topic, change, TOPIC_GONE_GRACE + 1)
    assert [str(e) for e in ended] == [  # the named one ends the run; the pattern's match just went away
        f"topic 'payments' was deleted while consuming and not re-created within {TOPIC_GONE_GRACE:.0f}s"]
    assert isinstance(ended[0], TopicGone) and halted == []  # ended, committing what is safe: not halted
    assert guard.decides("shop-x") is True  # a missing pattern topic is not the run's end
    assert guard.decides("payments") is True  # watched: the guard's
    watch.retain([])
    assert guard.decides("payments") is False and guard.decides("shop-y") is True


# -- lag per topic ------------------------------------------------------------------------------------------------


def _text(renderable: object) -> str:
    console = Console(record=True, width=160, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def test_lag_per_topic_on_the_dashboard_and_in_metrics() -> None:
    lag = {("orders", 0): 12, ("orders", 1): 3, ("payments", 0): 7}
    text = _text(render(make_stats(lag=lag), []))
    assert "total 22" in text and "orders 15" in text and "payments 7" in text
    from prometheus_client import generate_latest

    from mtc75.observe.metrics import Metrics

    metrics = Metrics("billing")
    metrics.update(make_stats(lag=lag))
    body = generate_latest(metrics.registry).decode()
    assert 'mtc75_lag{group="billing",partition="0",topic="payments"} 7.0' in body
    assert 'mtc75_lag{group="billing",partition="1",topic="orders"} 3.0' in body


def test_start_up_says_what_a_pattern_matches(caplog: pytest.LogCaptureFixture) -> None:
    from mtc75.engine.startup import say_subscription

    with caplog.at_level(logging.INFO):
        say_subscription(Subscription.of("^shop-.*"), {"shop-a": 1, "shop-a.dlq": 1}, {})
    assert "pattern ^shop-.* matches 2 topics now: shop-a, shop-a.dlq" in caplog.text
    assert "matches dead-letter topics (shop-a.dlq)" in caplog.text


def test_log_lines_name_each_topic_with_its_partitions() -> None:
    from mtc75.engine.backpressure import fmt

    assert fmt([("orders", 1), ("payments", 0), ("orders", 0)]) == "orders[0,1] payments[0]"
    assert fmt([("orders", 2)]) == "orders[2]"
