"""Prometheus metrics and health without a broker: names and values from a snapshot, the handler histogram,
the endpoints (/metrics, /healthz, /readyz, 404), a service's own registry, liveness and readiness."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mtc75.core.health import HealthWatch
from mtc75.core.offsets import PartitionState
from mtc75.core.subscription import Subscription
from mtc75.core.work import Work
from mtc75.errors import ConfigError
from mtc75.kafka.client import LAG_QUERY_TIMEOUT, KafkaClient
from mtc75.observe.metrics import Metrics
from mtc75.observe.server import Endpoints
from mtc75.runtime.invoker import Invoker
from tests.fake_kafka import FakeMessage
from tests.stats_factory import make_stats


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return samples(response.read().decode())


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served() -> Iterator[tuple[Metrics, HealthWatch, Clock, int]]:
    watch, clock = HealthWatch(max_poll_interval=300.0), Clock()
    metrics = Metrics("billing", health=lambda: watch.judge(clock()))
    endpoints = Endpoints(metrics.registry, lambda: watch.judge(clock()))
    port = endpoints.serve(0)
    yield metrics, watch, clock, port
    endpoints.close()


def test_snapshot_values_are_served_over_http_and_move_with_the_next_snapshot(
    served: tuple[Metrics, HealthWatch, Clock, int]
) -> None:
    metrics, _, _, port = served
    metrics.update(make_stats(paused=True, assigned=5))
    first = scrape(port)
    assert first[("mtc75_active_threads", ())] == 3
    assert first[("mtc75_max_threads", ())] == 4
    assert first[("mtc75_paused", ())] == 1
    assert first[("mtc75_in_flight", ())] == 10
    assert first[("mtc75_backlog", ())] == 6
    assert first[("mtc75_assigned_partitions", ())] == 5
    assert first[("mtc75_processed_total", ())] == 215
    assert first[("mtc75_failed_total", ())] == 1
    assert first[("mtc75_retried_total", ())] == 2
    assert first[("mtc75_dead_lettered_total", ())] == 1
    assert first[("mtc75_pauses_total", ())] == 9
    assert first[("mtc75_lag", (("group", "billing"), ("partition", "0"), ("topic", "orders")))] == 12
    assert first[("mtc75_lag", (("group", "billing"), ("partition", "2"), ("topic", "orders")))] == 5
    assert ("process_resident_memory_bytes", ()) in first

    metrics.update(make_stats(processed=300, paused=False, active_threads=1, backlog=0, assigned=2,
                              lag={("orders", 0): 2}))
    second = scrape(port)
    assert second[("mtc75_processed_total", ())] == 300
    assert second[("mtc75_paused", ())] == 0
    assert second[("mtc75_active_threads", ())] == 1
    assert second[("mtc75_backlog", ())] == 0 and second[("mtc75_assigned_partitions", ())] == 2
    assert second[("mtc75_lag", (("group", "billing"), ("partition", "0"), ("topic", "orders")))] == 2
    assert ("mtc75_lag", (("group", "billing"), ("partition", "2"), ("topic", "orders"))) not in second  # revoked


def test_the_duration_histogram_observes_every_call_of_the_invoker_including_failures() -> None:
    clock = [100.0]  # the invoker's clock, moved by the handler: each call "takes" what it says
    metrics = Metrics()
    calls = []

    def handler(message: FakeMessage) -> None:
        calls.append(message.offset())
        clock[0] += 0.5 if message.offset() == 1 else 0.003
        if message.offset() == 1:
            raise ValueError("bad record")

    invoker = Invoker(handler, clock=lambda: clock[0])
    invoker.attach(metrics)
    state = PartitionState(("t", 0))
    assert invoker.invoke(Work(FakeMessage("t", 0, 0), state, 0)) is None
    assert isinstance(invoker.invoke(Work(FakeMessage("t", 0, 1), state, 1)), ValueError)
    values = samples(_exposition(metrics))
    assert values[("mtc75_handler_duration_seconds_count", ())] == 2
    assert values[("mtc75_handler_duration_seconds_sum", ())] == pytest.approx(0.503)  # 3 ms + 500 ms
    assert values[("mtc75_handler_duration_seconds_bucket", (("le", "0.005"),))] == 1  # the 3 ms call
    assert values[("mtc75_handler_duration_seconds_bucket", (("le", "0.25"),))] == 1
    assert values[("mtc75_handler_duration_seconds_bucket", (("le", "0.5"),))] == 2  # and the failed one
    assert calls == [0, 1]


def _exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_nothing_but_process_metrics_before_the_first_snapshot() -> None:
    names = {name for name, _ in samples(_exposition(Metrics()))}
    assert not any(n.startswith("mtc75_") and "handler_duration" not in n for n in names)


def test_two_instances_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.update(make_stats(processed=1))
    b.update(make_stats(processed=2))
    assert samples(_exposition(a))[("mtc75_processed_total", ())] == 1
    assert samples(_exposition(b))[("mtc75_processed_total", ())] == 2


def test_port_in_use_is_one_config_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics_port {port}: cannot listen on 127.0.0.1:{port}"):
            Endpoints(Metrics().registry, lambda: HealthWatch().judge(0)).serve(port)


def test_healthz_and_readyz_follow_the_poll_loop_and_the_assignment_and_other_paths_are_404(
    served: tuple[Metrics, HealthWatch, Clock, int]
) -> None:
    _, watch, clock, port = served
    status, body = get(port, "/healthz")
    assert status == 503 and json.loads(body)["reason"] == "not started"
    watch.started(clock.now)
    assert get(port, "/healthz")[0] == 200  # starting up: alive, not ready
    assert json.loads(get(port, "/readyz")[1]) == {"status": "unavailable", "reason": "starting",
                                                   "last_poll_age": None, "assigned": 0}
    clock.now += 1
    watch.update(clock.now, make_stats(assigned=0))
    assert get(port, "/readyz")[0] == 503 and "no partitions assigned" in get(port, "/readyz")[1]
    watch.update(clock.now, make_stats(assigned=3))
    assert get(port, "/readyz") == (200, json.dumps({"status": "ok", "reason": "ok", "last_poll_age": 0.0,
                                                      "assigned": 3}))
    watch.update(clock.now, make_stats(assigned=3, brokers_down=True))
    assert get(port, "/readyz")[0] == 503 and "no broker reachable" in get(port, "/readyz")[1]
    assert get(port, "/healthz")[0] == 200  # reachable again later: not a reason to restart
    assert scrape(port)[("mtc75_ready", ())] == 0 and scrape(port)[("mtc75_alive", ())] == 1
    clock.now += 300.5  # no turn of the poll loop for longer than max.poll.interval.ms
    status, body = get(port, "/healthz")
    assert status == 503 and "has not turned for 300.5s" in json.loads(body)["reason"]
    assert get(port, "/readyz")[0] == 503
    assert scrape(port)[("mtc75_alive", ())] == 0 and scrape(port)[("mtc75_poll_age_seconds", ())] == 300.5
    watch.update(clock.now, make_stats(assigned=3))
    assert get(port, "/healthz")[0] == 200
    watch.ended()
    assert get(port, "/healthz")[0] == 503 and "stopped" in get(port, "/healthz")[1]
    for path in ("/", "/metricsx", "/health", "/metrics/extra"):
        assert get(port, path)[0] == 404, path
    assert get(port, "/metrics")[0] == 200


def test_a_service_registry_gets_the_collectors_while_asked_and_a_second_consumer_is_refused() -> None:
    registry = CollectorRegistry()
    first = Metrics("billing", registry)
    assert "mtc75_processed_total" not in generate_latest(registry).decode()  # nothing until register()
    first.register()
    first.update(make_stats(processed=7))
    text = generate_latest(registry).decode()
    assert "mtc75_processed_total 7.0" in text and "mtc75_handler_duration_seconds_count 0.0" in text
    assert "process_cpu_seconds_total" not in text  # the service decides about process metrics
    second = Metrics("billing", registry)
    with pytest.raises(ConfigError, match="already has MTC75's metrics"):
        second.register()
    first.unregister()
    second.register()  # the first one's run ended: the next consumer's metrics take the names
    assert "mtc75_processed_total" not in generate_latest(registry).decode()  # no snapshot yet


class _NothingFetched:
    """A librdkafka consumer whose partitions were not fetched from yet: no cached end offset, no position."""

    def __init__(self, slow: bool = False) -> None:
        self.asked = 0
        self.timeouts: list[float] = []
        self.slow = slow
        self.consume = self.poll = None

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = -1, cached: bool = False) -> tuple[int, int]:
        if cached:
            return OFFSET_INVALID, OFFSET_INVALID
        self.asked += 1
        self.timeouts.append(timeout)
        if self.slow:
            time.sleep(timeout)  # a broker that does not answer: the call waits its whole timeout
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return 5, 40

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, OFFSET_INVALID) for tp in tps]

    def committed(self, tps: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 30 if tp.partition == 0 else OFFSET_INVALID) for tp in tps]


def test_lag_of_a_partition_not_fetched_yet_is_asked_of_the_broker_now_and_then() -> None:
    stub = _NothingFetched()
    client = KafkaClient(stub, Subscription(("t",)), cooperative=False)  # type: ignore[arg-type]
    bases: dict[tuple[str, int], int | None] = {("t", 0): None, ("t", 1): None}
    # p0: committed 30 of 40; p1: nothing committed, so from where AUTO_OFFSET_RESET starts
    assert client.lag(bases, "earliest", now=0.0) == {("t", 0): 10, ("t", 1): 35}
    assert stub.asked == 2
    assert client.lag(bases, "earliest", now=5.0) == {("t", 0): 10, ("t", 1): 35}  # kept: no request
    assert stub.asked == 2
    assert client.lag(bases, "latest", now=10.5) == {("t", 0): 10, ("t", 1): 0}
    assert stub.asked == 4
    client.note_brokers_down()
    client.lag(bases, "latest", now=30.0)
    assert stub.asked == 4  # no broker: no request


def test_asking_the_lag_of_many_partitions_of_a_silent_broker_holds_the_poll_thread_a_second_at_most() -> None:
    stub = _NothingFetched(slow=True)
    client = KafkaClient(stub, Subscription(("t",)), cooperative=False)  # type: ignore[arg-type]
    assert client.lag({("t", p): None for p in range(10)}, "earliest", now=0.0) == {}
    # one LAG_QUERY_TIMEOUT in all (each request gets what is left), not one per partition
    assert sum(stub.timeouts) <= LAG_QUERY_TIMEOUT + 0.05 and stub.asked < 10
