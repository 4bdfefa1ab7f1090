"""Watching and re-tuning a real run: dashboard on a terminal, /metrics, the report, live config changes."""

from __future__ import annotations

import csv
import itertools
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mtc75.app.reload import ConfigWatcher, retuner
from mtc75.core.stats import Stats
from mtc75.runtime.handlers import SimulatedWork
from mtc75.settings import load_settings
from tests.kafka_helpers import (
    BoundConsumer,
    Lines,
    committed_offsets,
    end_offsets,
    produce_numbered,
    run_script,
    script_env,
    start_script,
    stop_process,
    wait_until,
    write_touched,
)
from tests.pty_helpers import run_in_pty, strip_ansi
from tests.test_metrics import samples
from tests.test_report import count_panels

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def test_dashboard_on_a_terminal_and_plain_lines_with_no_dashboard(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str]
) -> None:
    topic = make_topic(partitions=3)
    produce_numbered(bootstrap, topic, 150)
    common = ("--topic", topic, "--max-thread-count", "3", "--processing-sleep", "0.02", "--max-messages", "150",
              "--no-reload")
    code, raw = run_in_pty("mtc75_consumer.py", *common, "--group-id", unique("g1"), env=script_env(bootstrap))
    text = strip_ansi(raw)
    assert code == 0, text[-2000:]
    assert "\x1b[" in raw  # drawn with terminal control sequences, in place
    assert "╭" in text and f"MTC75  {topic}" in text
    assert "/3 busy" in text and "MAX_THREAD_COUNT 3" in text
    for label in ("state", "messages", "in-flight", "lag", "failures", "process"):
        assert label in text
    assert "retried 0" in text and "dead-lettered 0" in text and "CPU" in text and "RSS" in text
    assert "total " in text  # per-partition lag with its total
    assert "summary: processed 150" in text

    code, raw = run_in_pty("mtc75_consumer.py", *common, "--group-id", unique("g2"), "--no-dashboard",
                           env=script_env(bootstrap))
    text = strip_ansi(raw)
    assert code == 0, text[-2000:]
    assert "╭" not in text and "threads " in text and "/3" in text and "summary: processed 150" in text


def test_metrics_move_during_a_run_and_the_report_has_a_row_a_second_and_three_panels(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    # 600 messages at 0.03 s on 3 threads: about 6 s of work, 200 per partition, so every partition
    # still has a backlog at the first lag figure (about a second after the assignment).
    topic, group, n = make_topic(partitions=3), unique("g"), 600
    produce_numbered(bootstrap, topic, n)
    ends = end_offsets(bootstrap, topic)
    report = tmp_path / "report"
    proc = start_script(
        "mtc75_consumer.py", "--topic", topic, "--group-id", group, "--max-thread-count", "3",
        "--processing-sleep", "0.03", "--pause-interval", "0.3", "--metrics-addr", "127.0.0.1",
        "--metrics-port", "0", "--report", str(report), "--no-reload", env=script_env(bootstrap),
    )
    lines = Lines(proc)
    scrapes: list[dict[Any, float]] = []

    def lag(s: dict[Any, float]) -> dict[int, float]:
        return {int(dict(labels)["partition"]): v for (name, labels), v in s.items() if name == "mtc75_lag"}

    def scrape(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                values = samples(response.read().decode())
        except OSError:
            return False
        if ("mtc75_processed_total", ()) in values:
            scrapes.append(values)
        # the end: everything handled and every partition's lag back to 0
        return bool(scrapes) and scrapes[-1][("mtc75_processed_total", ())] == n and (
            lag(scrapes[-1]) == dict.fromkeys(ends, 0.0))

    try:
        # --metrics-port 0: the port the consumer bound, from its log line (no port picked ahead and lost)
        wait_until(lambda: any("metrics at http://127.0.0.1:" in line for line in lines.err), timeout=30,
                   what="the metrics address in the log")
        line = next(line for line in lines.err if "metrics at http://127.0.0.1:" in line)
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        wait_until(lambda: scrape(port), timeout=120, step=0.3, what="all handled and lag 0 in /metrics")
        assert committed_offsets(bootstrap, group, topic) == ends  # lag 0 means end - committed = 0
        proc.terminate()
        assert proc.wait(timeout=60) == 0, "".join(lines.err[-20:])
    finally:
        stop_process(proc)
    lines.join()
    out = "".join(lines.out)
    first, last = scrapes[0], scrapes[-1]
    assert last[("mtc75_processed_total", ())] > first[("mtc75_processed_total", ())]
    assert all(s[("mtc75_max_threads", ())] == 3 for s in scrapes)
    assert all(0 <= s[("mtc75_active_threads", ())] <= 3 for s in scrapes)
    assert max(s[("mtc75_active_threads", ())] for s in scrapes) >= 1
    assert last[("mtc75_handler_duration_seconds_count", ())] == n
    assert last[("mtc75_handler_duration_seconds_sum", ())] >= n * 0.03 * 0.9
    assert last[("mtc75_failed_total", ())] == 0 and last[("mtc75_dead_lettered_total", ())] == 0
    assert ("mtc75_pauses_total", ()) in last and ("mtc75_paused", ()) in last
    working = [s for s in scrapes if 0 < s[("mtc75_processed_total", ())] < n]
    assert working, "no scrape while the messages were being handled"
    assert all(s[("mtc75_assigned_partitions", ())] == 3 for s in working)
    # fetched messages wait in the backlog for the 3 busy threads (up to the pause watermark); part of in-flight
    assert max(s[("mtc75_backlog", ())] for s in working) > 0
    assert all(0 <= s[("mtc75_backlog", ())] <= s[("mtc75_in_flight", ())] for s in scrapes)
    assert last[("mtc75_backlog", ())] == 0 and last[("mtc75_in_flight", ())] == 0

    # lag per partition = end - committed. A partition's lag is unknown until its first fetch (the
    # consumer pauses with a full backlog, so some partitions wait seconds for it); from then on it
    # is at most the end offset, its first figure is > 0 (200 messages each, seconds of work), and at
    # the end every partition is at 0 (the loop above waited for that; the broker's commits agree).
    first_known = {p: next(lag(s)[p] for s in scrapes if p in lag(s)) for p in ends}
    assert all(0 < first_known[p] <= ends[p] for p in ends), (first_known, ends)
    assert all(0 <= v <= ends[p] for s in scrapes for p, v in lag(s).items())
    assert lag(last) == dict.fromkeys(ends, 0.0)

    with (report / "timeseries.csv").open() as f:
        rows = list(csv.DictReader(f))
    times = [float(r["elapsed_seconds"]) for r in rows]
    assert len(rows) >= 3
    # a row a second (status snapshots come every 1.0 s of the poll loop), then the final one
    assert all(0.85 <= b - a <= 1.5 for a, b in itertools.pairwise(times[:-1])), times
    assert 0 < times[-1] - times[-2] <= 1.5, times
    assert int(rows[-1]["processed"]) == n
    assert max(int(r["active_threads"]) for r in rows) <= 3
    assert count_panels(report / "report.png") == 3
    assert f"report: {report / 'timeseries.csv'} and {report / 'report.png'}" in out


class Probe:
    """Wraps the default handler: how many run at once, and which messages started and finished."""

    def __init__(self, work: SimulatedWork) -> None:
        self._work = work
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.running: set[tuple[int, int]] = set()
        self.finished: set[tuple[int, int]] = set()

    def __call__(self, msg: Any) -> None:
        key = (msg.partition(), msg.offset())
        with self._lock:
            self.current += 1
            self.peak = max(self.peak, self.current)
            self.running.add(key)
        try:
            self._work(msg)
        finally:
            with self._lock:
                self.current -= 1
                self.running.discard(key)
                self.finished.add(key)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.current


def test_live_retune_grows_shrinks_and_ignores_a_bad_edit(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = make_topic(partitions=3)
    produce_numbered(bootstrap, topic, 3000)
    config = tmp_path / "config.py"
    write_touched(config, "MAX_THREAD_COUNT = 2\nPROCESSING_SLEEP = 0.1\nPAUSE_INTERVAL = 0.3\n")
    flags = {"BOOTSTRAP_SERVERS": bootstrap, "TOPIC": topic, "GROUP_ID": unique("g"), "COMMIT_INTERVAL": "0.2"}

    def load(values: Any) -> Any:
        return load_settings(config, env={}, flags=flags, file_values=values)

    settings = load_settings(config, env={}, flags=flags)
    work = SimulatedWork(settings.PROCESSING_SLEEP, lines_per_second=0)
    probe = Probe(work)
    latest: list[Stats] = []
    consumer = BoundConsumer(settings, probe, on_status=latest.append, status_interval=0.1)
    watcher = ConfigWatcher(config, settings, load, retuner(consumer, work))
    runner = threading.Thread(target=consumer.run)
    caplog.set_level(logging.INFO, logger="mtc75.app.reload")
    runner.start()
    watcher.start()
    try:
        wait_until(lambda: probe.current == 2, timeout=60, what="both threads busy")
        assert probe.peak == 2

        # grow: new permits and workers at once, and the handler's sleep changes too
        write_touched(config, "MAX_THREAD_COUNT = 6\nPROCESSING_SLEEP = 0.2\nPAUSE_INTERVAL = 0.4\n")
        wait_until(lambda: latest[-1].max_thread_count == 6, timeout=2.0, what="MAX_THREAD_COUNT 6 within 2s")
        wait_until(lambda: probe.current == 6, timeout=20, what="six handlers running")
        assert work.processing_sleep == 0.2
        assert latest[-1].pause_interval == 0.4
        assert probe.peak <= 6

        # shrink: running handlers finish (none cancelled), new work stays within the new bound
        with probe._lock:
            running_at_shrink = set(probe.running)
        assert len(running_at_shrink) >= 3
        write_touched(config, "MAX_THREAD_COUNT = 2\nPROCESSING_SLEEP = 0.2\nPAUSE_INTERVAL = 0.4\n")
        wait_until(lambda: latest[-1].max_thread_count == 2, timeout=2.0, what="MAX_THREAD_COUNT 2 within 2s")
        wait_until(lambda: running_at_shrink <= probe.finished, timeout=20, what="running handlers finished")
        wait_until(lambda: probe.current <= 2, timeout=20, what="the excess drained")
        probe.reset_peak()
        started = len(probe.finished)
        wait_until(lambda: len(probe.finished) >= started + 20, timeout=60, what="20 more messages handled")
        assert probe.peak <= 2

        # a bad edit: one error line, the running values stay
        write_touched(config, "MAX_THREAD_COUNT = = 8\n")
        wait_until(lambda: "not reloaded" in caplog.text, timeout=5, what="the bad edit reported")
        errors = [r.getMessage() for r in caplog.records if "not reloaded" in r.getMessage()]
        assert len(errors) == 1 and "syntax error" in errors[0] and "keeping the running values" in errors[0]
        probe.reset_peak()
        started = len(probe.finished)
        wait_until(lambda: len(probe.finished) >= started + 10, timeout=60, what="10 more messages handled")
        assert probe.peak <= 2 and latest[-1].max_thread_count == 2 and work.processing_sleep == 0.2
    finally:
        watcher.close()
        consumer.stop()
        runner.join(timeout=60)
    assert not runner.is_alive()
    assert probe.current == 0


def test_consumer_script_reloads_config_py_and_reports_a_bad_edit_on_one_line(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic = make_topic(partitions=2)
    produce_numbered(bootstrap, topic, 2000)
    config = tmp_path / "config.py"
    write_touched(config, "MAX_THREAD_COUNT = 2\nPROCESSING_SLEEP = 0.1\n")
    proc = start_script("mtc75_consumer.py", "--config", str(config), "--topic", topic, "--group-id", unique("g"),
                        env=script_env(bootstrap))
    lines = Lines(proc)
    try:
        wait_until(lambda: any("threads   2/2" in line for line in lines.out), timeout=60, what="2/2 threads busy")
        write_touched(config, "MAX_THREAD_COUNT = 5\nPROCESSING_SLEEP = 0.1\n")
        wait_until(lambda: any("/5" in line for line in lines.out), timeout=5, what="a status line with /5")
        write_touched(config, "MAX_THREAD_COUNT = 'many'\nPROCESSING_SLEEP = 0.1\n")
        wait_until(lambda: any("not reloaded" in line for line in lines.err), timeout=5, what="the bad edit reported")
        seen = len(lines.out)
        wait_until(lambda: len(lines.out) >= seen + 2, timeout=10, what="two more status lines")
        assert all("/5" in line for line in lines.out[seen:] if line.startswith("threads"))
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    finally:
        stop_process(proc)
    lines.join()
    reloaded = [line for line in lines.err if "reloaded" in line]
    assert len(reloaded) == 2, lines.err
    assert "MAX_THREAD_COUNT 2 -> 5" in reloaded[0]
    assert "not reloaded" in reloaded[1] and "invalid MAX_THREAD_COUNT='many'" in reloaded[1]


def test_no_reload_leaves_a_changed_config_alone(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic = make_topic(partitions=1)
    produce_numbered(bootstrap, topic, 200)  # several seconds of work left after the edit
    config = tmp_path / "config.py"
    write_touched(config, "MAX_THREAD_COUNT = 2\nPROCESSING_SLEEP = 0.05\n")
    proc = start_script("mtc75_consumer.py", "--config", str(config), "--topic", topic, "--group-id", unique("g"),
                        "--no-reload", "--max-messages", "200", env=script_env(bootstrap))
    lines = Lines(proc)
    try:
        wait_until(lambda: any("threads   2/2" in line for line in lines.out), timeout=60, what="2/2 threads busy")
        write_touched(config, "MAX_THREAD_COUNT = 7\nPROCESSING_SLEEP = 0.05\n")
        assert proc.wait(timeout=120) == 0
    finally:
        stop_process(proc)
    lines.join()
    status = [line for line in lines.out if line.startswith("threads")]
    assert status and all("/2" in line for line in status)
    assert not any("reloaded" in line for line in lines.err)
    assert any("summary: processed 200" in line for line in lines.out)


def test_producer_rate_and_progress_bar(bootstrap: str, make_topic: Callable[..., str]) -> None:
    topic = make_topic(partitions=2)
    started = time.monotonic()
    result = run_script("producer.py", "--topic", topic, "--count", "60", "--rate", "40", env=script_env(bootstrap))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "sent 60 delivered 60 failed 0" in result.stdout
    assert elapsed >= 1.4  # 60 records at 40/s are due over 1.5 s; the rate is a ceiling

    code, raw = run_in_pty("producer.py", "--topic", topic, "--count", "120", "--rate", "60",
                           env=script_env(bootstrap))
    text = strip_ansi(raw)
    assert code == 0, text[-2000:]
    assert "producing" in text and "/120" in text and "msg/s" in text and "ETA" in text and "━" in text
    assert "done: sent 120 delivered 120 failed 0" in text
    assert sum(end_offsets(bootstrap, topic).values()) == 180
