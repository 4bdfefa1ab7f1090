"""Metrics and health for the library (no broker: the in-memory fake): ``metrics_port``, ``metrics_registry``,
``health()``."""

from __future__ import annotations

import json
import socket
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import mtc75
from tests.api_helpers import TOPIC, WAIT, make, new_cluster
from tests.fake_kafka import FakeKafka
from tests.kafka_helpers import wait_until
from tests.test_metrics import get

pytestmark = pytest.mark.timeout(60)

cluster = pytest.fixture(name="cluster")(new_cluster)


def test_metrics_port_serves_metrics_and_health_while_it_runs(cluster: FakeKafka) -> None:
    release = threading.Event()
    consumer = make(cluster, handler=lambda m: release.wait(WAIT), metrics_port=0)
    assert consumer.metrics_port is None and consumer.health().reason == "not started"
    consumer.start()
    try:
        port = consumer.metrics_port
        assert port
        cluster.fill(TOPIC, {0: 2, 1: 1})
        wait_until(lambda: get(port, "/readyz")[0] == 200, WAIT, step=0.02, what="/readyz 200 once assigned")
        assert json.loads(get(port, "/healthz")[1])["status"] == "ok"
        release.set()
        wait_until(lambda: "mtc75_processed_total 3.0" in get(port, "/metrics")[1], WAIT, step=0.02,
                   what="three processed in /metrics")
        text = get(port, "/metrics")[1]
        assert "mtc75_handler_duration_seconds_count 3.0" in text  # the histogram observes the invoker
        assert 'mtc75_lag{group="billing",partition="0",topic="orders"}' in text
        assert "mtc75_ready 1.0" in text and "process_resident_memory_bytes" in text
        assert get(port, "/nothing")[0] == 404
    finally:
        release.set()
        consumer.close(timeout=WAIT)
    assert consumer.metrics_port is None and consumer.health().reason == "stopped"
    with pytest.raises(urllib.error.URLError) as refused:  # closed with the run: no answer at all
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert not isinstance(refused.value, urllib.error.HTTPError)


def test_a_service_registry_carries_the_metrics_of_the_consumer_that_runs(cluster: FakeKafka) -> None:
    registry = CollectorRegistry()
    first = make(cluster, metrics_registry=registry)
    second = make(cluster, metrics_registry=registry)
    assert "mtc75_" not in generate_latest(registry).decode()  # registered while it runs, not before
    cluster.fill(TOPIC, {0: 4})
    first.start()
    try:
        wait_until(lambda: "mtc75_processed_total 4.0" in generate_latest(registry).decode(), WAIT, step=0.02,
                   what="the first consumer's count on the service's registry")
        with pytest.raises(mtc75.ConfigError, match="already has MTC75's metrics"):
            second.start()
    finally:
        first.close(timeout=WAIT)
    assert "mtc75_processed_total" not in generate_latest(registry).decode()  # given back
    second.start()  # refused before it ran: it may run now
    second.close(timeout=WAIT)


def test_a_taken_port_is_a_config_error_at_start_and_the_consumer_may_run_later(cluster: FakeKafka) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        consumer = make(cluster, metrics_port=busy.getsockname()[1])
        with pytest.raises(mtc75.ConfigError, match=r"metrics_port \d+: cannot listen on 127.0.0.1"):
            consumer.run(idle_exit=0.2)
        assert consumer.health().reason == "not started"
    consumer.run(idle_exit=0.2)


@pytest.mark.parametrize(("kw", "what"), [
    ({"metrics_port": -1}, "metrics_port"), ({"metrics_port": 70000}, "metrics_port"),
    ({"metrics_port": "9108"}, "metrics_port"), ({"metrics_port": True}, "metrics_port"),
    ({"metrics_port": 0, "metrics_addr": None}, "metrics_addr"), ({"metrics_registry": {}}, "metrics_registry"),
])
def test_bad_metrics_arguments_are_refused_before_anything_runs(cluster: FakeKafka, kw: dict[str, Any],
                                                                what: str) -> None:
    with pytest.raises(mtc75.ConfigError, match=f"invalid {what}="):
        make(cluster, **kw)


def test_without_prometheus_client_metrics_are_a_config_error_and_health_still_answers(
    cluster: FakeKafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "mtc75.observe.metrics", raising=False)
    with pytest.raises(mtc75.ConfigError, match=r"need prometheus-client .*pip install 'mtc75\[metrics\]'"):
        make(cluster, metrics_port=0)
    consumer = make(cluster)
    consumer.start()
    try:
        wait_until(lambda: consumer.health().ready, WAIT, step=0.02, what="ready once assigned")
    finally:
        consumer.close(timeout=WAIT)
