"""MAX_THREAD_COUNT = "auto" against the real broker: it beats the default 75 threads on the issue-14 service.

The handler calls the simulated service of issue 14 (mtc75/tools/simservice.py: 20 slots of 20 ms,
slower for everyone beyond 20 outstanding calls), where 75 threads serve about 266 msg/s and 20
threads about 1000. Both runs consume the same backlog (own groups) for the same time, counted from
their first completed message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest

from mtc75.engine.consumer import Mtc75Consumer, Stats
from mtc75.settings import Settings
from mtc75.tools.simservice import DegradingService
from tests.kafka_helpers import produce_numbered, report_figures, wait_until

pytestmark = pytest.mark.timeout(180)

RUN_SECONDS = 20.0  # per contender, from its first completion
MESSAGES = 30_000  # more than auto handles in RUN_SECONDS (at most ~1000/s)


def _measure(bootstrap: str, topic: str, group: str, threads: int | str) -> tuple[int, Stats, list[Stats]]:
    service = DegradingService(slots=20, latency=0.02)
    snapshots: list[Stats] = []
    settings = Settings().replace(
        BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=group, MAX_THREAD_COUNT=threads, COMMIT_INTERVAL=0.5,
        SHUTDOWN_TIMEOUT=10.0,
    )
    engine = Mtc75Consumer(settings, service.handler, on_status=snapshots.append, status_interval=0.5)
    result: list[Stats] = []
    runner = threading.Thread(target=lambda: result.append(engine.run()), name=f"poll-{threads}", daemon=True)
    runner.start()
    try:
        wait_until(lambda: service.calls > 0, 60, what=f"a first completion with {threads} threads")
        start = service.calls
        time.sleep(RUN_SECONDS)
        done = service.calls - start
    finally:
        engine.stop()
        runner.join(30)
    assert not runner.is_alive() and result, "run() did not return"
    return done, result[0], snapshots


def test_auto_beats_the_default_75_threads_on_the_degrading_service(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    topic = make_topic(partitions=6)
    produce_numbered(bootstrap, topic, MESSAGES)
    fixed, fixed_stats, _ = _measure(bootstrap, topic, unique("fixed"), 75)
    with caplog.at_level(logging.DEBUG, logger="mtc75.engine.autothreads"):
        auto, auto_stats, snapshots = _measure(bootstrap, topic, unique("auto"), "auto")
    counts = [s.max_thread_count for s in snapshots]
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto threads")]
    report_figures("auto_vs_75_degrading_service", fixed_75=fixed, auto=auto, ratio=round(auto / max(1, fixed), 2),
                   final_count=auto_stats.max_thread_count, peak_count=max(counts), changes=len(changes))
    assert fixed_stats.thread_mode == "fixed" and fixed_stats.max_thread_count == 75
    assert auto_stats.thread_mode == "auto" and {s.thread_mode for s in snapshots} == {"auto"}
    # 75 threads: ~266/s. Auto from 1 thread ramps up within ~10 s and holds near 20 (~1000/s).
    assert auto >= 1.5 * fixed, f"auto {auto} vs 75 threads {fixed} in {RUN_SECONDS:.0f}s; counts {counts}"
    assert 8 <= auto_stats.max_thread_count <= 40, counts
    assert max(counts) <= 64  # it probed, but never ran away towards the limit
    assert changes and all(": " in line for line in changes)  # each change logged with its reason
