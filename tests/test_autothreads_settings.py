"""MAX_THREAD_COUNT = "auto" as a setting: config.py, environment, flag, library keyword, live re-tune.

No broker: the library and engine tests run against the in-memory fake (tests/fake_kafka.py).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mtc75
from mtc75 import testing
from mtc75.app.dashboard import render
from mtc75.app.reload import ConfigWatcher, diff, retuner
from mtc75.app.report import plot, read_rows, row_of
from mtc75.app.status import format_status
from mtc75.core.autotune import Decision, Sample
from mtc75.engine import autothreads as autothreads_module
from mtc75.errors import ConfigError
from mtc75.observe.metrics import StatsCollector
from mtc75.settings import Settings, load_settings
from tests.fake_kafka import FakeKafka
from tests.kafka_helpers import ROOT, wait_until
from tests.stats_factory import make_stats

pytestmark = pytest.mark.timeout(60)

TOPIC, GROUP = "orders", "billing"
WAIT = 10.0


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.py"
    path.write_text(body)
    return path


def test_auto_from_config_env_and_flag(tmp_path: Path) -> None:
    path = _config(tmp_path, "MAX_THREAD_COUNT = 'auto'\nMIN_THREAD_COUNT = 2\nMAX_THREAD_LIMIT = 40\n")
    s = load_settings(path, env={})
    assert s.MAX_THREAD_COUNT == "auto" and s.auto_threads and s.initial_threads() == 2
    assert s.MIN_THREAD_COUNT == 2 and s.MAX_THREAD_LIMIT == 40
    s = load_settings(path, env={"MTC75_MAX_THREAD_COUNT": "12"})
    assert s.MAX_THREAD_COUNT == 12 and not s.auto_threads and s.initial_threads() == 12
    s = load_settings(None, env={"MTC75_MAX_THREAD_COUNT": " Auto "})
    assert s.MAX_THREAD_COUNT == "auto"
    s = load_settings(path, env={"MTC75_MAX_THREAD_COUNT": "12"}, flags={"MAX_THREAD_COUNT": "AUTO"})
    assert s.auto_threads
    defaults = Settings()
    assert (defaults.MAX_THREAD_COUNT, defaults.MIN_THREAD_COUNT, defaults.MAX_THREAD_LIMIT) == (75, 1, 256)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        ({"MAX_THREAD_COUNT": "automatic"}, 'invalid MAX_THREAD_COUNT=\'automatic\' (from --max-thread-count): '
                                            'must be an integer or "auto"'),
        ({"MIN_THREAD_COUNT": "0"}, "invalid MIN_THREAD_COUNT='0' (from --min-thread-count): must be >= 1"),
        ({"MAX_THREAD_LIMIT": "x"}, "invalid MAX_THREAD_LIMIT='x' (from --max-thread-limit): must be an integer"),
        ({"MIN_THREAD_COUNT": "10", "MAX_THREAD_LIMIT": "5"}, "invalid MIN_THREAD_COUNT=10: must be <= "
                                                              "MAX_THREAD_LIMIT=5"),
    ],
)
def test_bad_values_are_one_line_config_errors(flags: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={}, flags=flags)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert info.value.exit_code == 2


def test_the_flag_and_its_error_in_the_script() -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    result = subprocess.run(
        [sys.executable, "mtc75_consumer.py", "--max-thread-count", "sometimes"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert 'invalid MAX_THREAD_COUNT=\'sometimes\' (from --max-thread-count): must be an integer or "auto"' \
        in result.stderr
    helptext = subprocess.run([sys.executable, "mtc75_consumer.py", "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60).stdout
    assert "--min-thread-count" in helptext and "--max-thread-limit" in helptext and '"auto"' in helptext


def test_reload_switches_between_a_number_and_auto(tmp_path: Path) -> None:
    path = _config(tmp_path, "MAX_THREAD_COUNT = 4\n")
    applied: list[dict[str, Any]] = []

    def load(values: Any) -> Settings:
        return load_settings(path, env={}, file_values=values)

    watcher = ConfigWatcher(path, load_settings(path, env={}), load, applied.append)
    for body, expect in (("'auto'", "auto"), ("7", 7)):
        stamp = path.stat().st_mtime_ns + 10_000_000
        path.write_text(f"MAX_THREAD_COUNT = {body}\n")
        os.utime(path, ns=(stamp, stamp))
        assert watcher.check() or watcher.check()  # written just now: read at the next check at the latest
        assert applied[-1] == {"MAX_THREAD_COUNT": expect}
    assert diff(Settings(), Settings().replace(MIN_THREAD_COUNT=3)) == ({}, ["MIN_THREAD_COUNT"])  # restart


@pytest.fixture
def cluster() -> FakeKafka:
    fake = FakeKafka()
    fake.create_topic(TOPIC, 2)
    return fake


def test_library_keyword_auto_starts_at_min_and_tunes(cluster: FakeKafka) -> None:
    consumer = testing.consumer(cluster.factories(), lambda m: None, topic=TOPIC, group_id=GROUP,
                                max_thread_count="auto", min_thread_count=3, max_thread_limit=9, commit_interval=0.02)
    assert consumer.stats().thread_mode == "auto" and consumer.stats().max_thread_count == 3
    with pytest.raises(ConfigError, match="max_thread_limit"):
        mtc75.Consumer(lambda m: None, topic=TOPIC, group_id=GROUP, max_thread_limit=0)
    consumer.start()
    try:
        wait_until(lambda: consumer.stats().elapsed_seconds > 0, WAIT, step=0.01, what="a running snapshot")
        assert consumer.stats().thread_mode == "auto" and 3 <= consumer.stats().max_thread_count <= 9
    finally:
        consumer.close(timeout=WAIT)


class DoublingTuner:
    """Stands in for :class:`mtc75.core.autotune.AutoTuner` in the engine: keeps every sample the glue built
    and doubles the count (up to its maximum) on each one that shows work finished with messages waiting.

    Whether a real tuner would double depends on throughput measured in real time, which a loaded machine
    skews; the tuner's decisions are tested on simulated time (tests/test_autotune.py, tests/test_autothreads.py)
    and on a real broker (tests/test_autothreads_e2e.py, ``make bench``). Here: the engine's wiring.
    """

    calls: Callable[[], int] = staticmethod(lambda: 0)  # the handler's calls so far (set by the test)

    def __init__(self, min_threads: int, max_threads: int, initial: int | None = None, **_: Any) -> None:
        self.limit = min_threads if initial is None else initial
        self.max_threads = max_threads
        self.trend = 0
        self.gil_verdicts = 0  # as AutoTuner: times it found the GIL to be the limit
        self.samples: list[Sample] = []
        self.calls_at: list[int] = []  # the handler's calls when each sample came
        tuners.append(self)

    def step(self, sample: Sample) -> Decision:
        self.samples.append(sample)
        self.calls_at.append(self.calls())
        if not (sample.completed and sample.waiting) or self.limit >= self.max_threads:
            return Decision(self.limit, False, "holding")
        old, self.limit = self.limit, min(self.max_threads, 2 * self.limit)
        self.trend = 1
        return Decision(self.limit, True, f"{old} -> {self.limit}: doubled by the test's tuner")


tuners: list[DoublingTuner] = []


def test_auto_in_the_engine_samples_the_pool_and_applies_the_tuners_counts(
    cluster: FakeKafka, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The whole path without a broker: timed handler, processed count, samples, resize, Stats and the log."""
    tuners.clear()
    monkeypatch.setattr(autothreads_module, "AutoTuner", DoublingTuner)
    caplog.set_level(logging.DEBUG, logger="mtc75.engine.autothreads")
    seen: list[mtc75.Stats] = []
    calls = [0]
    lock = threading.Lock()

    def handler(_m: Any) -> None:
        with lock:
            calls[0] += 1
        threading.Event().wait(0.01)

    monkeypatch.setattr(DoublingTuner, "calls", staticmethod(lambda: calls[0]))
    consumer = testing.consumer(cluster.factories(), handler, topic=TOPIC, group_id=GROUP,
                                max_thread_count="auto", max_thread_limit=8,
                                commit_interval=0.05, on_status=seen.append, status_interval=0.05)
    cluster.fill(TOPIC, {0: 4000, 1: 4000})
    consumer.start()
    try:
        wait_until(lambda: consumer.stats().max_thread_count == 8, 30, step=0.05, what="auto at its limit of 8")
        wait_until(lambda: seen[-1].max_thread_count == 8, WAIT, step=0.01, what="8 in a status snapshot")
    finally:
        consumer.close(timeout=WAIT)
    [tuner] = tuners
    counts = [s.max_thread_count for s in seen]
    assert counts[0] == 1 and max(counts) == 8 and {s.thread_mode for s in seen} == {"auto"}
    assert sorted(set(counts)) == [1, 2, 4, 8]  # every count the tuner chose was applied, and only those
    assert any(s.thread_trend == 1 for s in seen)
    ramp = [r.getMessage() for r in caplog.records if r.name == "mtc75.engine.autothreads"]
    assert ramp[:3] == [f"auto threads {n} -> {2 * n}: doubled by the test's tuner" for n in (1, 2, 4)]
    # The samples come from the engine: its processed count, its pool, the timed handler's latency.
    working = [s for s in tuner.samples if s.completed]
    assert len(working) >= 3 and all(1 <= s.busy <= 8 and s.waiting > 0 for s in working[:3])
    assert all(s.latency >= 0.01 for s in working)  # each call waited 10 ms
    # completions since the previous sample: all of them together never more than the handler's calls so far
    assert sum(s.completed for s in tuner.samples) <= tuner.calls_at[-1]
    assert all(b.now > a.now for a, b in zip(tuner.samples, tuner.samples[1:], strict=False))


def test_live_switch_between_a_number_and_auto_within_two_seconds(cluster: FakeKafka) -> None:
    release = threading.Event()
    consumer = testing.consumer(cluster.factories(), lambda m: release.wait(WAIT), topic=TOPIC, group_id=GROUP,
                                max_thread_count=6, max_thread_limit=4, commit_interval=0.02, pause_interval=0.05,
                                shutdown_timeout=5.0)
    consumer.start()
    try:
        cluster.fill(TOPIC, {0: 20})
        wait_until(lambda: consumer.stats().active_threads == 6, WAIT, step=0.01, what="six threads busy")
        apply = retuner(consumer._engine, object())  # type: ignore[arg-type]  # what config.py's watcher calls
        apply({"MAX_THREAD_COUNT": "auto"})
        # "auto" takes over from the current count, clamped to MAX_THREAD_LIMIT
        wait_until(lambda: consumer.stats().thread_mode == "auto" and consumer.stats().max_thread_count == 4,
                   2.0, step=0.01, what="auto within 2 s")
        apply({"MAX_THREAD_COUNT": 5})
        wait_until(lambda: consumer.stats().thread_mode == "fixed" and consumer.stats().max_thread_count == 5,
                   2.0, step=0.01, what="a fixed 5 within 2 s")
        consumer.retune(max_thread_count="auto")  # the library's retune too
        wait_until(lambda: consumer.stats().thread_mode == "auto", 2.0, step=0.01, what="auto again")
        with pytest.raises(ConfigError, match="MAX_THREAD_COUNT"):
            consumer.retune(max_thread_count="sometimes")
    finally:
        release.set()
        stats = consumer.close(timeout=WAIT)
    assert stats.summary()["thread_mode"] == "auto"


def test_what_the_user_sees_under_auto(tmp_path: Path) -> None:
    from rich.console import Console

    auto = make_stats(max_thread_count=20, active_threads=20, thread_mode="auto", thread_trend=1)
    assert "20/auto 20↑" in format_status(auto, color=False)
    assert "threads   3/4" in format_status(make_stats(), color=False)  # fixed: as before
    console = Console(record=True, width=140)
    console.print(render(auto, [1.0, 2.0]))
    assert "MAX_THREAD_COUNT auto 20↑" in console.export_text()
    console.print(render(make_stats(max_thread_count=9, thread_mode="auto", thread_trend=-1), []))
    assert "auto 9↓" in console.export_text()
    metrics = StatsCollector()
    metrics.update(auto)
    families = {m.name: m for m in metrics.collect()}
    assert families["mtc75_max_threads"].samples[0].value == 20
    assert {s.labels["mode"]: s.value for s in families["mtc75_thread_mode"].samples} == {"auto": 1.0, "fixed": 0.0}
    assert families["mtc75_thread_trend"].samples[0].value == 1
    assert row_of(auto)["auto"] == 1 and row_of(make_stats())["auto"] == 0
    csv = tmp_path / "t.csv"
    csv.write_text("elapsed_seconds,active_threads,max_thread_count,paused,paused_seconds,rate,lag,auto\n"
                   "0,1,1,0,0,10,,1\n1,2,2,0,0,20,,1\n2,4,4,0,0,40,,1\n")
    plot(read_rows(csv), tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000
