"""What the scale-out tests check in the handler's records (tests/interval_handler.py): pure functions."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import NamedTuple


class Handled(NamedTuple):
    pid: int
    partition: int
    offset: int
    start: float
    end: float


def read_handled(folder: Path) -> list[Handled]:
    """Every complete line of every process's record file (a line cut by kill -9 is skipped)."""
    out = []
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:
                out.append(Handled(int(parts[0]), int(parts[1]), int(parts[2]), float(parts[3]), float(parts[4])))
    return out


def overlaps(handled: list[Handled]) -> list[tuple[Handled, int]]:
    """Records that started while another process was still handling the same partition.

    Returns ``(record, other pid)`` pairs: empty when each partition was handled by one process at a time.
    """
    by_partition: dict[int, list[Handled]] = defaultdict(list)
    for h in handled:
        by_partition[h.partition].append(h)
    found = []
    for records in by_partition.values():
        records.sort(key=lambda h: h.start)
        busy_until: dict[int, float] = {}  # pid -> latest end of its records that started earlier
        for h in records:
            for pid, until in busy_until.items():
                if pid != h.pid and until > h.start:
                    found.append((h, pid))
            busy_until[h.pid] = max(busy_until.get(h.pid, 0.0), h.end)
    return found


def owners(handled: list[Handled]) -> dict[int, set[int]]:
    """partition -> the processes that handled some of it."""
    out: dict[int, set[int]] = defaultdict(set)
    for h in handled:
        out[h.partition].add(h.pid)
    return dict(out)
