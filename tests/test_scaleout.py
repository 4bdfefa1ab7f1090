"""Many consumer processes in one group: every offset handled, each partition by one process at a time.

Three ``mtc75_consumer.py`` processes join one group on a 12-partition topic, one after another; the
second is killed with -9 and a fourth joins while they run. Each handled message is recorded outside
the processes as ``(pid, partition, offset, start, end)`` (tests/interval_handler.py), and checked for
coverage (every offset at least once) and exclusivity (no partition handled by two processes at once),
for the eager ``range`` and the incremental ``cooperative-sticky`` assignors.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kafka_helpers import (
    ROOT,
    all_offsets,
    committed_offsets,
    end_offsets,
    produce_numbered,
    report_figures,
    script_env,
)
from tests.scaleout_checks import Handled, overlaps, owners, read_handled

PARTITIONS, MESSAGES, WORK_S, THREADS = 12, 9_000, 0.02, 4  # about 200 messages/s per process


def _consumer(topic: str, group: str, assignor: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    args = ["--topic", topic, "--group-id", group, "--max-thread-count", str(THREADS), "--max-backlog", "100",
            "--handler", "tests.interval_handler:handle", "-q",
            "-X", f"partition.assignment.strategy={assignor}",
            # The killed member's partitions move after its session expires: 6 s (the broker's minimum).
            "-X", "session.timeout.ms=6000", "-X", "heartbeat.interval.ms=1000"]
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "mtc75_consumer.py"), *args], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait(condition: Callable[[], bool], timeout: float, what: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"a consumer exited by itself (code {proc.returncode}) waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.1)


def _count_by(folder: Path, pid: int) -> int:
    path = folder / f"{pid}.txt"
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.timeout(240)
@pytest.mark.parametrize("assignor", ["range", "cooperative-sticky"])
def test_processes_join_and_die_every_offset_handled_one_process_per_partition_at_a_time(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path, assignor: str
) -> None:
    topic, group = make_topic(partitions=PARTITIONS), unique("g")
    produce_numbered(bootstrap, topic, MESSAGES)
    ends = end_offsets(bootstrap, topic)
    folder, log = tmp_path / "handled", tmp_path / "consumers.log"
    folder.mkdir()
    env = script_env(bootstrap, MTC75_TEST_INTERVALS=str(folder), MTC75_TEST_SLEEP=str(WORK_S))
    procs: list[subprocess.Popen[bytes]] = []  # every process started, in order
    try:
        for _ in range(3):  # staggered: each joins once the one before it is handling messages
            procs.append(_consumer(topic, group, assignor, env, log))
            pid = procs[-1].pid
            _wait(lambda pid=pid: _count_by(folder, pid) >= 100, 90, f"process {len(procs)} handling", procs)
        victim = procs[1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        killed_after = _count_by(folder, victim.pid)
        procs.append(_consumer(topic, group, assignor, env, log))
        live, late = [procs[0], procs[2], procs[3]], procs[3].pid
        _wait(lambda: _count_by(folder, late) >= 100, 90, "the fourth process handling", live)
        wanted = all_offsets(ends)
        _wait(lambda: wanted <= {(h.partition, h.offset) for h in read_handled(folder)}, 150,
              "every offset handled", live)
        _wait(lambda: committed_offsets(bootstrap, group, topic) == ends, 60, "commits to reach the end", live)
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc in live]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    handled = read_handled(folder)
    assert codes == [0, 0, 0], log.read_text()[-3000:]
    counts = Counter((h.partition, h.offset) for h in handled)
    assert set(counts) == all_offsets(ends)  # every offset at least once, and nothing else
    clash = overlaps(handled)
    assert not clash, f"{len(clash)} records overlap another process on their partition, e.g. {clash[:3]}"
    by_pid = Counter(h.pid for h in handled)
    assert len(by_pid) == 4 and min(by_pid.values()) >= 100  # all four really took part
    assert by_pid[victim.pid] == killed_after  # nothing recorded by the killed one after the kill
    moved = sum(1 for pids in owners(handled).values() if len(pids) > 1)
    assert moved >= 4, "partitions hardly moved between processes: the exclusivity check saw no handoff"
    duplicates = sum(c - 1 for c in counts.values())
    report_figures(f"scaleout_{assignor}", messages=MESSAGES, handled=len(handled),
                   lost=len(all_offsets(ends) - set(counts)), duplicates=duplicates,
                   per_process=sorted(by_pid.values()), partitions_moved=moved, overlaps=len(clash))


# -- the checks themselves, on made-up records ------------------------------------------------------


def test_overlap_check_finds_two_processes_on_one_partition_and_passes_a_clean_handoff() -> None:
    clean = [Handled(1, 0, 0, 0.0, 1.0), Handled(1, 0, 1, 0.5, 2.0), Handled(2, 0, 2, 2.0, 3.0),
             Handled(2, 1, 0, 0.0, 5.0), Handled(1, 1, 1, 5.5, 6.0), Handled(3, 2, 0, 0.0, 9.0)]
    assert overlaps(clean) == []
    clashing = [*clean, Handled(3, 0, 3, 2.5, 2.6)]  # process 3 starts while process 2 handles partition 0
    assert overlaps(clashing) == [(Handled(3, 0, 3, 2.5, 2.6), 2)]
    assert overlaps([Handled(1, 4, 0, 0.0, 3.0), Handled(2, 4, 1, 1.0, 1.5)]) == [(Handled(2, 4, 1, 1.0, 1.5), 1)]
    assert owners(clean) == {0: {1, 2}, 1: {1, 2}, 2: {3}}
