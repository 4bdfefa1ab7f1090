"""Prometheus metrics without a broker: names and values from a snapshot, the handler histogram, HTTP."""

from __future__ import annotations

import socket
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mtc75.app import metrics as metrics_module
from mtc75.app.metrics import Metrics
from mtc75.errors import ConfigError
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


def test_snapshot_values_are_served_over_http_and_move_with_the_next_snapshot() -> None:
    metrics = Metrics()
    port = metrics.serve(0)
    try:
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
        assert first[("mtc75_lag", (("partition", "0"), ("topic", "orders")))] == 12
        assert first[("mtc75_lag", (("partition", "2"), ("topic", "orders")))] == 5
        assert ("process_resident_memory_bytes", ()) in first

        metrics.update(make_stats(processed=300, paused=False, active_threads=1, backlog=0, assigned=2,
                                  lag={("orders", 0): 2}))
        second = scrape(port)
        assert second[("mtc75_processed_total", ())] == 300
        assert second[("mtc75_paused", ())] == 0
        assert second[("mtc75_active_threads", ())] == 1
        assert second[("mtc75_backlog", ())] == 0 and second[("mtc75_assigned_partitions", ())] == 2
        assert second[("mtc75_lag", (("partition", "0"), ("topic", "orders")))] == 2
        assert ("mtc75_lag", (("partition", "2"), ("topic", "orders"))) not in second  # revoked: gone
    finally:
        metrics.close()


def test_timed_handler_observes_every_call_including_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]  # the wrapper's clock, moved by the handler: each call "takes" what it says
    monkeypatch.setattr(metrics_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    metrics = Metrics()
    calls = []

    def handler(message: object) -> str:
        calls.append(message)
        clock[0] += 0.5 if message == "bad" else 0.003
        if message == "bad":
            raise ValueError("bad record")
        return "ok"

    timed = metrics.timed(handler)
    assert timed("a") == "ok"
    with pytest.raises(ValueError):
        timed("bad")
    values = samples(_exposition(metrics))
    assert values[("mtc75_handler_duration_seconds_count", ())] == 2
    assert values[("mtc75_handler_duration_seconds_sum", ())] == pytest.approx(0.503)  # 3 ms + 500 ms
    assert values[("mtc75_handler_duration_seconds_bucket", (("le", "0.005"),))] == 1  # the 3 ms call
    assert values[("mtc75_handler_duration_seconds_bucket", (("le", "0.25"),))] == 1
    assert values[("mtc75_handler_duration_seconds_bucket", (("le", "0.5"),))] == 2  # and the failed one
    assert calls == ["a", "bad"]


def _exposition(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

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
        with pytest.raises(ConfigError, match=f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}"):
            Metrics().serve(port)
