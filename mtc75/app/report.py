"""``--report DIR``: a CSV time series while the consumer runs, and a PNG of it at exit.

The CSV gets one row a second from the status snapshots (written and flushed as it goes, so a
crashed run still leaves its data); the PNG has three panels sharing the time axis: active threads
against MAX_THREAD_COUNT with the paused time shaded, throughput (with a batch handler also its calls per
second and the mean batch size), and total lag.

Threads: one thread at a time: the script's main thread opens and closes it, and ``update`` runs in the
status callback on the poll thread -- the same main thread in mtc75_consumer.py, which calls ``run()``.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import IO, Any

from mtc75.core.stats import Stats

logger = logging.getLogger(__name__)

CSV_NAME = "timeseries.csv"
PNG_NAME = "report.png"
COLUMNS = (
    "elapsed_seconds", "active_threads", "max_thread_count", "paused", "paused_seconds", "pauses",
    "processed", "rate", "in_flight", "backlog", "failed", "retried", "dead_lettered", "lag", "auto", "batches",
)
PANELS = 3


def row_of(stats: Stats) -> dict[str, Any]:
    return {
        "elapsed_seconds": round(stats.elapsed_seconds, 3),
        "active_threads": stats.active_threads,
        "max_thread_count": stats.max_thread_count,
        "paused": int(stats.paused),
        "paused_seconds": round(stats.paused_seconds, 3),
        "pauses": stats.pauses,
        "processed": stats.processed,
        "rate": round(stats.rate, 2),
        "in_flight": stats.in_flight,
        "backlog": stats.backlog,
        "failed": stats.failed,
        "retried": stats.retried,
        "dead_lettered": stats.dead_lettered,
        "lag": sum(stats.lag.values()) if stats.lag else "",  # empty: not known yet
        "auto": int(stats.thread_mode == "auto"),  # 1 while MAX_THREAD_COUNT = "auto" tunes max_thread_count
        "batches": stats.batches if stats.batch_size > 1 else "",  # a batch handler's completed calls
    }


class RunReport:
    """Writes ``DIR/timeseries.csv`` during the run and ``DIR/report.png`` on :meth:`close`."""

    def __init__(self, directory: Path, min_gap: float = 1.0) -> None:
        self.directory = directory
        self.csv_path = directory / CSV_NAME
        self.png_path = directory / PNG_NAME
        self._min_gap = min_gap * 0.9  # status snapshots come about once a second, not exactly
        self._file: IO[str] | None = None
        self._writer: csv.DictWriter[str] | None = None
        self._last_at: float | None = None
        self._last: Stats | None = None

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = self.csv_path.open("w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()

    def update(self, stats: Stats) -> None:
        """Record a snapshot; at most one row per ``min_gap`` seconds of run time."""
        self._last = stats
        if self._last_at is not None and stats.elapsed_seconds - self._last_at < self._min_gap:
            return
        self._write(stats)

    def _write(self, stats: Stats) -> None:
        assert self._writer is not None and self._file is not None, "open() first"
        self._writer.writerow(row_of(stats))
        self._file.flush()
        self._last_at = stats.elapsed_seconds

    def close(self, final: Stats | None = None) -> Path | None:
        """Write the final row and the plot; returns the PNG path (None if the report never opened)."""
        if self._file is None:
            return None
        try:
            last = final or self._last
            if last is not None and last.elapsed_seconds != self._last_at:
                self._write(last)
        finally:
            self._file.close()
            self._file = self._writer = None
        plot(read_rows(self.csv_path), self.png_path)
        return self.png_path


def read_rows(path: Path) -> list[dict[str, float]]:
    """The CSV as numbers (an unknown lag becomes NaN, which the plot leaves as a gap)."""
    with path.open(newline="") as f:
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def pause_spans(rows: list[dict[str, float]]) -> list[tuple[float, float]]:
    """Time spans to shade as paused: the paused seconds gained between two rows end at the later row.

    Rows are a second apart and a pause may be shorter, so the ``paused`` flag alone would miss
    pauses; the running total does not, and places each within a second.
    """
    spans: list[tuple[float, float]] = []
    prev_t, prev_paused = 0.0, 0.0
    for row in rows:
        t, gained = row["elapsed_seconds"], row["paused_seconds"] - prev_paused
        if gained > 0:
            start = max(prev_t, t - gained)
            if spans and start <= spans[-1][1] + 1e-6:
                spans[-1] = (spans[-1][0], t)
            else:
                spans.append((start, t))
        prev_t, prev_paused = t, row["paused_seconds"]
    return spans


def batch_calls(rows: list[dict[str, float]]) -> tuple[list[float], float] | None:
    """A batch handler's calls per second between rows, and the run's mean batch size (None: no batches)."""
    if not rows or math.isnan(rows[-1].get("batches", math.nan)):
        return None
    per_second, prev_t, prev_calls = [], 0.0, 0.0
    for row in rows:
        t, calls = row["elapsed_seconds"], row["batches"]
        per_second.append((calls - prev_calls) / (t - prev_t) if t > prev_t else 0.0)
        prev_t, prev_calls = t, calls
    last = rows[-1]
    return per_second, last["processed"] / last["batches"] if last["batches"] else 0.0


def plot(rows: list[dict[str, float]], path: Path) -> None:
    """Three panels: threads (pauses shaded), throughput, lag."""
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    threads, rate, lag = fig.subplots(PANELS, 1, sharex=True)
    t = [r["elapsed_seconds"] for r in rows]
    for start, end in pause_spans(rows):
        threads.axvspan(start, end, color="tab:red", alpha=0.2, linewidth=0)
    threads.step(t, [r["active_threads"] for r in rows], where="post", color="tab:blue", label="active threads")
    auto = any(r.get("auto", 0) == 1 for r in rows)
    threads.step(t, [r["max_thread_count"] for r in rows], where="post", color="black", linestyle="--",
                 label='MAX_THREAD_COUNT ("auto": the tuned count)' if auto else "MAX_THREAD_COUNT")
    threads.fill_between([], [], color="tab:red", alpha=0.2, label="paused")  # legend entry for the shading
    threads.set_ylabel("threads")
    threads.set_ylim(bottom=0)
    threads.legend(loc="upper right", fontsize="small")
    threads.set_title("active threads and thread count over time (paused time shaded)")
    rate.plot(t, [r["rate"] for r in rows], color="tab:green")
    rate.set_ylabel("messages/s")
    rate.set_ylim(bottom=0)
    rate.set_title("throughput")
    calls = batch_calls(rows)
    if calls:
        per_second, mean = calls
        twin = rate.twinx()
        twin.plot(t, per_second, color="tab:orange", linestyle=":")
        twin.set_ylabel("batch calls/s", color="tab:orange")
        twin.set_ylim(bottom=0)
        rate.set_title(f"throughput (dotted: batch calls/s; {mean:,.0f} messages per batch on average)")
    lag.plot(t, [r["lag"] for r in rows], color="tab:purple")
    lag.set_ylabel("messages")
    lag.set_ylim(bottom=0)
    lag.set_title("lag (end offset minus committed, all partitions of every topic)")
    lag.set_xlabel("seconds since start")
    for ax in (threads, rate, lag):
        ax.grid(alpha=0.3)
    fig.savefig(path)
    logger.debug("report: %s", path)
