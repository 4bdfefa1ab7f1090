"""The once-a-second status line: threads busy, paused or running, throughput, in-flight, failures.

Pure formatting of a frozen :class:`~mtc75.core.stats.Stats`: any thread may call it (the CLI calls it
from its status callback, on the poll thread).
"""

from __future__ import annotations

from mtc75.app.cli import paint
from mtc75.core.stats import Stats

BUSY_WARN = 0.8  # fraction of threads busy from which the line turns yellow
TREND_ARROWS = {1: "↑", -1: "↓", 0: "→"}


def thread_bound(stats: Stats) -> str:
    """``"75"``, or ``"auto 20↑"`` while MAX_THREAD_COUNT = "auto" tunes the count (arrow: its last step)."""
    if stats.thread_mode != "auto":
        return str(stats.max_thread_count)
    return f"auto {stats.max_thread_count}{TREND_ARROWS.get(stats.thread_trend, '')}"


def share_text(stats: Stats) -> str:
    """A share-group run's acknowledgements, e.g. ``acquired 120: accepted 100, released 20, redelivered 20``."""
    share = stats.share
    if share is None:
        return ""
    text = (f"acquired {share.acquired}: accepted {share.accepted}, released {share.released}, "
            f"redelivered {share.redelivered}")
    if share.lock_expired or share.refused:
        text += f", lock expired {share.lock_expired} (rejoined {share.rejoined}), refused {share.refused}"
    return text


def status_color(stats: Stats) -> str:
    """Red while paused, yellow at 80 % of threads busy and more, green below."""
    if stats.paused:
        return "red"
    if stats.active_threads >= BUSY_WARN * stats.max_thread_count:
        return "yellow"
    return "green"


def format_status(stats: Stats, color: bool) -> str:
    if stats.paused:
        state = f"PAUSED {stats.paused_for:4.1f}s (re-check in {stats.next_check_in:.1f}s)"
    else:
        state = "running"
    line = (
        f"{stats.workers} {stats.active_threads:>3}/{thread_bound(stats):<3} {state} | "
        f"processed {stats.processed} ({stats.rate:,.0f}/s"
        + (f", {stats.batches} batches of {stats.mean_batch:.0f}" if stats.batch_size > 1 else "")
        + f") | in-flight {stats.in_flight} "
        f"(waiting {stats.backlog}) | pauses {stats.pauses} | failed {stats.failed}"
    )
    if stats.max_rate or stats.key_rate:
        line += f" | throttled {stats.throttled}"
    if stats.retried or stats.dead_lettered or stats.skipped:
        line += f" (retried {stats.retried}, dlq {stats.dead_lettered}, skipped {stats.skipped})"
    if stats.share is not None:
        line += " | " + share_text(stats)
    return paint(line, status_color(stats), color, bold=stats.paused)
