"""Stats snapshots for tests of the observers (dashboard, metrics, report) without a broker."""

from __future__ import annotations

from typing import Any

from mtc75.core.stats import Stats


def make_stats(**changes: Any) -> Stats:
    values: dict[str, Any] = {
        "active_threads": 3, "max_thread_count": 4, "paused": False, "paused_for": 0.0, "next_check_in": 0.0,
        "processed": 215, "failed": 1, "rate": 71.0, "in_flight": 10, "backlog": 6, "pauses": 9,
        "paused_seconds": 3.5, "elapsed_seconds": 12.0, "max_active_threads": 4, "assigned": 3,
        "retried": 2, "dead_lettered": 1, "lag": {("orders", 0): 12, ("orders", 1): 0, ("orders", 2): 5},
    }
    values.update(changes)
    return Stats(**values)
