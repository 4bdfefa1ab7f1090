"""MAX_THREAD_COUNT = "auto" against the real broker: it beats the default 75 threads on the issue-14 service,
and saving config.py switches a running consumer script between a number and "auto" within 2 s.

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
from pathlib import Path

import pytest

from mtc75.core.stats import Stats
from mtc75.settings import Settings
from mtc75.tools.simservice import AsyncDegradingService, DegradingService
from tests.kafka_helpers import (
    BoundConsumer,
    Lines,
    produce_numbered,
    report_figures,
    script_env,
    start_script,
    stop_process,
    wait_until,
    write_touched,
)

pytestmark = pytest.mark.timeout(180)

FIXED_SECONDS = 10.0  # 75 threads are at their steady rate from the start
AUTO_SECONDS = 25.0  # auto starts at 1 thread: its ramp (slow start, ~2 s a doubling) is counted too
MESSAGES = 25_000  # more than auto handles in AUTO_SECONDS (~600/s on average with its ramp)


def _measure(
    bootstrap: str, topic: str, group: str, threads: int | str, seconds: float, coroutines: bool = False
) -> tuple[list[float], Stats, list[Stats]]:
    """Completion times (seconds from the first one) over ``seconds``, the final Stats and the snapshots."""
    done: list[float] = []
    handler: Callable[[object], object]
    if coroutines:
        aservice = AsyncDegradingService(slots=20, latency=0.02)

        async def handler(message: object) -> None:
            await aservice.handler(message)
            done.append(time.monotonic())
    else:
        service = DegradingService(slots=20, latency=0.02)

        def handler(message: object) -> None:
            service.handler(message)
            done.append(time.monotonic())

    snapshots: list[Stats] = []
    settings = Settings().replace(
        BOOTSTRAP_SERVERS=bootstrap, TOPIC=topic, GROUP_ID=group, MAX_THREAD_COUNT=threads, COMMIT_INTERVAL=0.5,
        SHUTDOWN_TIMEOUT=10.0,
    )
    engine = BoundConsumer(settings, handler, on_status=snapshots.append, status_interval=0.5)
    result: list[Stats] = []
    runner = threading.Thread(target=lambda: result.append(engine.run()), name=f"poll-{threads}", daemon=True)
    runner.start()
    try:
        wait_until(lambda: bool(done), 60, what=f"a first completion with {threads} threads")
        time.sleep(max(0.0, done[0] + seconds - time.monotonic()))
    finally:
        engine.stop()
        runner.join(30)
    assert not runner.is_alive() and result, "run() did not return"
    return [t - done[0] for t in done if t - done[0] <= seconds], result[0], snapshots


@pytest.mark.alone  # a throughput ratio: beside the parallel session's cluster tests, auto's ramp slows
@pytest.mark.parametrize("workers", ["threads", "coroutines"])
def test_auto_beats_the_default_75_on_the_degrading_service(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], caplog: pytest.LogCaptureFixture,
    workers: str,
) -> None:
    """The same for a plain handler on threads and an ``async def`` one on the event loop (75 coroutines)."""
    coroutines = workers == "coroutines"
    topic = make_topic(partitions=6)
    produce_numbered(bootstrap, topic, MESSAGES)
    fixed_done, fixed_stats, _ = _measure(bootstrap, topic, unique("fixed"), 75, FIXED_SECONDS, coroutines)
    with caplog.at_level(logging.DEBUG, logger="mtc75.engine.autothreads"):
        auto_done, auto_stats, snapshots = _measure(bootstrap, topic, unique("auto"), "auto", AUTO_SECONDS, coroutines)
    fixed = len(fixed_done) / FIXED_SECONDS
    auto = len(auto_done) / AUTO_SECONDS
    auto_late = sum(1 for t in auto_done if t >= AUTO_SECONDS - 10) / 10
    counts = [s.max_thread_count for s in snapshots]
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto threads")]
    report_figures(f"auto_vs_75_degrading_service_{workers}", fixed_75_rate=round(fixed), auto_rate=round(auto),
                   auto_last_10s_rate=round(auto_late), final_count=auto_stats.max_thread_count,
                   peak_count=max(counts), changes=len(changes))
    assert fixed_stats.thread_mode == "fixed" and fixed_stats.max_thread_count == 75
    assert fixed_stats.workers == auto_stats.workers == workers
    assert auto_stats.thread_mode == "auto" and {s.thread_mode for s in snapshots} == {"auto"}
    # 75 threads: ~266/s. Auto from 1 thread ramps up within ~12 s and holds near 20 (~1000/s).
    assert auto >= 1.5 * fixed, f"auto {auto:.0f}/s vs 75 threads {fixed:.0f}/s; counts {counts}"
    assert auto_late >= 2 * fixed, f"auto's last 10 s {auto_late:.0f}/s vs 75 threads {fixed:.0f}/s; {counts}"
    assert 8 <= auto_stats.max_thread_count <= 40, counts
    assert max(counts) <= 64  # it probed, but never ran away towards the limit
    assert changes and all(": " in line for line in changes)  # each change logged with its reason


def test_saving_config_py_switches_between_a_number_and_auto_within_2_s(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic = make_topic(partitions=2)
    produce_numbered(bootstrap, topic, 3000)
    config = tmp_path / "config.py"
    write_touched(config, "MAX_THREAD_COUNT = 3\nPROCESSING_SLEEP = 0.05\n")
    proc = start_script("mtc75_consumer.py", "--config", str(config), "--topic", topic, "--group-id", unique("g"),
                        env=script_env(bootstrap))
    lines = Lines(proc)
    seen: dict[str, float] = {}

    def status_with(fragment: str) -> bool:
        if any(line.startswith("threads") and fragment in line for line in list(lines.out)):
            seen.setdefault(fragment, time.monotonic())
            return True
        return False

    try:
        wait_until(lambda: status_with("/3 "), timeout=60, what="a status line with 3 threads")
        to_auto = write_touched(config, "MAX_THREAD_COUNT = 'auto'\nPROCESSING_SLEEP = 0.05\n")
        wait_until(lambda: status_with("/auto "), timeout=5, what='a status line with "auto"')
        to_fixed = write_touched(config, "MAX_THREAD_COUNT = 4\nPROCESSING_SLEEP = 0.05\n")
        wait_until(lambda: status_with("/4 "), timeout=5, what="a status line with 4 threads")
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    finally:
        stop_process(proc)
    lines.join()
    # a status line a second: seen within 2 s of the save means applied within 2 s, at the latest
    assert seen["/auto "] - to_auto <= 2.0 + 1.0 and seen["/4 "] - to_fixed <= 2.0 + 1.0, seen
    reloaded = [line for line in lines.err if "reloaded" in line]
    assert "MAX_THREAD_COUNT 3 -> 'auto'" in reloaded[0] and "MAX_THREAD_COUNT 'auto' -> 4" in reloaded[1], reloaded
