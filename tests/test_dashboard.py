"""The dashboard rendered to a recording console: every figure the issue asks for is on screen."""

from __future__ import annotations

import time

from rich.console import Console

from mtc75.app.dashboard import Dashboard, ProcessSample, ProcessSampler, render, sparkline
from tests.stats_factory import make_stats


def _text(renderable: object, width: int = 110) -> str:
    console = Console(record=True, width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def test_running_frame_shows_threads_rate_history_lag_failures_and_process() -> None:
    history = [10.0, 40.0, 80.0, 71.0]
    text = _text(render(make_stats(), history, ProcessSample(cpu_percent=12.4, rss_bytes=55 << 20), "MTC75 t"))
    assert "3/4 busy" in text and "MAX_THREAD_COUNT 4" in text and "peak 4" in text
    assert "running" in text and "PAUSED" not in text
    # 10, 40, 80, 71 of a peak of 80 on the 8 block levels: 0.9, 3.5, 7, 6.2 -> levels 1, 4, 7, 6
    assert "71/s" in text and "▂▅█▇" in text and "peak 80/s" in text
    assert "10 (running 3, waiting 6)" in text
    assert "total 17" in text and "p0 12" in text and "p1 0" in text and "p2 5" in text
    assert "failed 1" in text and "retried 2" in text and "dead-lettered 1" in text
    assert "CPU 12%" in text and "RSS 55.0 MiB" in text
    assert "pauses 9 (3.5s paused)" in text
    assert "MTC75 t" in text


def test_an_async_handler_s_bound_counts_coroutines_on_the_frame_and_the_status_line() -> None:
    from mtc75.app.status import format_status

    threads, coroutines = make_stats(), make_stats(workers="coroutines", active_threads=900, max_thread_count=1000)
    assert "threads" in _text(render(threads, [])) and "coroutines" not in _text(render(threads, []))
    text = _text(render(coroutines, []))
    assert "coroutines" in text and "threads " not in text and "900/1000 busy" in text
    assert format_status(coroutines, color=False).startswith("coroutines 900/1000 running")
    assert format_status(threads, color=False).startswith("threads   3/4   running")


def test_paused_frame_shows_the_countdown() -> None:
    stats = make_stats(paused=True, paused_for=0.7, next_check_in=0.3, active_threads=4)
    text = _text(render(stats, []))
    assert "4/4 busy" in text
    assert "PAUSED 0.7s" in text and "re-check in 0.3s" in text
    assert "CPU" not in text  # no process sample given, no process row


def test_lag_unknown_before_the_first_fetch_and_many_partitions_are_summed() -> None:
    assert "unknown" in _text(render(make_stats(lag={}), []))
    lag = {("t", p): p for p in range(20)}
    text = _text(render(make_stats(lag=lag), []), width=200)
    assert f"total {sum(range(20))}" in text and "+8 more" in text and "p11 11" in text and "p12 12" not in text


def test_sparkline_scales_to_the_maximum() -> None:
    assert sparkline([]) == ""
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([0, 50, 100]) == "▁▅█"  # 50 of 100 is level 3.5, rounded to 4
    assert sparkline([3, 6]) == "▅█"  # scaled to the maximum, not to a fixed range
    line = sparkline(list(range(100)), width=60)
    assert len(line) == 60 and line[0] == "▄" and line[-1] == "█"  # the last 60: 40..99; 40/99 -> level 3


def test_dashboard_keeps_the_history_and_draws_the_latest_snapshot() -> None:
    console = Console(record=True, width=110, color_system=None)
    dash = Dashboard(console=console, title="MTC75 test")
    assert "connecting" in _text(dash._frame())
    for rate in (5.0, 15.0, 25.0):
        dash.update(make_stats(rate=rate, processed=int(rate)))
    text = _text(dash._frame())
    assert "25/s" in text and "▂▅█" in text  # 5, 15, 25 of 25: levels 1.4, 4.2, 7 -> 1, 4, 7


def test_process_sampler_reads_this_process_and_at_most_once_per_gap() -> None:
    sampler = ProcessSampler(min_gap=3600.0)
    spent = time.process_time() + 0.05
    while time.process_time() < spent:  # 50 ms of this process's CPU since the sampler's reference point
        pass
    sample = sampler.sample()
    # psutil reads CPU over the wall time since the last reading: whatever the machine's load, 50 ms of CPU
    # in that time is above 0 (a sampler without its reference point reads 0.0 the first time)
    assert sample.cpu_percent > 0
    assert sample.rss_bytes > 1 << 20
    assert sampler.sample() is sample  # within min_gap: the same reading, /proc not read again
    fresh = ProcessSampler(min_gap=0.0)
    assert fresh.sample() is not fresh.sample()
