"""What a service relies on, against the real broker: a tight max_messages bound, health and metrics endpoints,
and the shipped Grafana dashboard and alert rules naming only metrics a running consumer exposes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mtc75
from mtc75.tools.demo import remove_topics
from tests.kafka_helpers import ROOT, committed_offsets, produce_numbered, run_script, script_env, wait_until
from tests.test_metrics import get

pytestmark = pytest.mark.timeout(120)


def _counting() -> tuple[Counter[tuple[int, int]], Callable[[Any], None]]:
    calls: Counter[tuple[int, int]] = Counter()
    lock = threading.Lock()

    def handle(message: Any) -> None:  # fast: runs form, and the backlog could take every message at once
        with lock:
            calls[(message.partition(), message.offset())] += 1

    return calls, handle


def test_max_messages_handles_exactly_n_and_commits_exactly_those(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group = make_topic(3, "bound"), unique("bound")
    produce_numbered(bootstrap, topic, 3000)
    calls, handle = _counting()
    stats = mtc75.Consumer(handle, topic=topic, group_id=group, bootstrap_servers=bootstrap,
                           max_thread_count=8).run(max_messages=500, idle_exit=30)
    assert stats.processed == 500 and sum(calls.values()) == 500 and max(calls.values()) == 1
    committed = committed_offsets(bootstrap, group, topic)
    assert sum(max(end, 0) for end in committed.values()) == 500  # each partition's first ones, no gap
    assert set(calls) == {(p, o) for p, end in committed.items() for o in range(max(end, 0))}


def test_max_messages_flag_handles_exactly_n(bootstrap: str, make_topic: Callable[..., str],
                                             unique: Callable[[str], str], tmp_path: Path) -> None:
    topic = make_topic(3, "bound-cli")
    produce_numbered(bootstrap, topic, 2000)
    summary = tmp_path / "summary.json"
    result = run_script("mtc75_consumer.py", "--topic", topic, "--group-id", unique("bound-cli"),
                        "--processing-sleep", "0.0001", "--max-messages", "100", "--idle-exit", "30",
                        "--summary-json", str(summary), "--no-reload", "--no-dashboard",
                        env=script_env(bootstrap), timeout=90)
    assert result.returncode == 0, result.stderr
    assert json.loads(summary.read_text())["processed"] == 100


def test_the_demo_removes_its_topic_and_the_dead_letter_topic(bootstrap: str, make_topic: Callable[..., str]) -> None:
    from confluent_kafka.admin import AdminClient

    topic = make_topic(1, "demo")
    dead = make_topic(1, "demo-dlq")  # stands for <topic>.dlq, which the consumer creates
    assert remove_topics(bootstrap, [topic, dead, topic, f"{topic}.never-made"]) == []  # one name twice, one missing
    listed = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    assert topic not in listed and dead not in listed


def test_the_demo_cleanup_writes_no_raw_librdkafka_line_when_kafka_is_gone() -> None:
    code = ("from mtc75.tools.demo import remove_topics; "
            "print(remove_topics('127.0.0.1:1', ['t'], timeout=2)[0].split(':')[0])")  # nothing listens on port 1
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "t\n", result.stderr
    assert result.stderr == ""  # librdkafka's "Connect to ... failed" goes to the mtc75.librdkafka logger


# -- health, metrics, and the shipped dashboard and alert rules --------------------------------------------------

MONITORING = ROOT / "monitoring"
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                "bool", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers that are not functions, keywords or labels."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"(?<![\w.])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?", "0", text)  # numbers (1e9 is no name)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(), text[match.end():].lstrip()
        if word.lower() in PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def shipped_expressions() -> dict[str, str]:
    """Every PromQL expression of the alert rules and the Grafana dashboard, by where it is."""
    found: dict[str, str] = {}
    rules = (MONITORING / "prometheus-alerts.yml").read_text()
    alerts = re.findall(r"^\s*- alert: (\S+)$", rules, re.M)
    exprs = re.findall(r"^\s*expr: (.+)$", rules, re.M)
    assert alerts and len(alerts) == len(exprs)  # one single-line expression per rule: none read past
    found.update({f"alert {a}": e for a, e in zip(alerts, exprs, strict=True)})
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = re.fullmatch(r"label_values\((.*), \w+\)", variable["query"]["query"])
            assert query is not None, variable
            found[f"variable {variable['name']}"] = query.group(1)
    return found


def test_the_promql_reader_finds_metric_names_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.95, sum by (le) (rate(mtc75_x_bucket{job=~"a|b", le!="+Inf"}[5m]))) > 0 and '
            'on (instance) absent(up) or sum without (topic) (delta(mtc75_lag[10m:1m])) > bool 3 or mtc75_y / 1e9')
    assert promql_metrics(expr) == {"mtc75_x_bucket", "up", "mtc75_lag", "mtc75_y"}


def test_dashboard_and_alert_rules_name_only_metrics_a_running_consumer_serves(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic, group = make_topic(3, "observed"), unique("observed")
    produce_numbered(bootstrap, topic, 60)

    def handle(message: Any) -> None:
        if message.offset() == 3:
            raise ValueError("poison")  # one failure, retried, then dead-lettered: the failure metrics move

    consumer = mtc75.Consumer(handle, topic=topic, group_id=group, bootstrap_servers=bootstrap, metrics_port=0,
                              max_attempts=2, retry_backoff=0.01)
    consumer.start()
    try:
        port = consumer.metrics_port
        assert port
        wait_until(lambda: consumer.stats().processed == 60, 60, step=0.05, what="60 processed")
        wait_until(lambda: get(port, "/readyz")[0] == 200, 30, step=0.05, what="/readyz 200")
        assert json.loads(get(port, "/healthz")[1])["status"] == "ok"
        wait_until(lambda: consumer.stats().dead_lettered == 3, 30, step=0.05,
                   what="the three poison messages dead-lettered")
        text = get(port, "/metrics")[1]  # names are checked, not values: any snapshot since start will do
    finally:
        consumer.close(timeout=60)
    served = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    lags = {(s.labels["group"], s.labels["topic"], s.labels["partition"])
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == "mtc75_lag"}
    assert lags == {(group, topic, str(p)) for p in range(3)}  # every assigned partition, with its group
    expressions = shipped_expressions()
    assert len(expressions) >= 10
    for where, expr in expressions.items():
        names = promql_metrics(expr)
        assert names, (where, expr)
        assert names <= served, f"{where}: {sorted(names - served)} not served by /metrics ({expr})"


