"""The live terminal dashboard: what the threads do, redrawn in place (the seed's "system monitor").

:func:`render` is pure -- a :class:`~mtc75.core.stats.Stats` snapshot, the recent throughput and a
process sample in, a rich renderable out -- so tests render it to a recording console. The
:class:`Dashboard` only keeps the latest snapshot: the engine hands it one per status interval on
the poll thread (a cheap append), and rich's own refresh thread does the drawing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import psutil
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mtc75.app.status import share_text, status_color, thread_bound
from mtc75.core.offsets import Partition
from mtc75.core.stats import Stats

HISTORY = 60  # throughput samples kept for the sparkline (one per status interval)
SPARKS = "▁▂▃▄▅▆▇█"
MAX_LAG_SHOWN = 12  # partitions (several topics: topics) listed by name; the rest are summed
BAR_WIDTH = 40


@dataclass(frozen=True)
class ProcessSample:
    cpu_percent: float  # of one core, like top
    rss_bytes: int


class ProcessSampler:
    """CPU and RSS of this process, sampled at most once a second (psutil reads /proc)."""

    def __init__(self, min_gap: float = 1.0) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only sets the reference point
        self._min_gap = min_gap
        self._last: ProcessSample | None = None
        self._last_at = 0.0

    def sample(self) -> ProcessSample:
        now = time.monotonic()
        if self._last is None or now - self._last_at >= self._min_gap:
            self._last = ProcessSample(self._process.cpu_percent(None), self._process.memory_info().rss)
            self._last_at = now
        return self._last


def sparkline(values: Sequence[float], width: int = HISTORY) -> str:
    """The last ``width`` values as block characters scaled to their maximum."""
    values = list(values)[-width:]
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return SPARKS[0] * len(values)
    last = len(SPARKS) - 1
    return "".join(SPARKS[min(last, round(v / top * last))] for v in values)


def _lag_text(lag: Mapping[Partition, int]) -> Text:
    items = sorted(lag.items())
    if not items:
        return Text("unknown (no fetch yet)", style="dim")
    total = sum(v for _, v in items)
    per_topic: dict[str, int] = {}
    for (topic, _), value in items:
        per_topic[topic] = per_topic.get(topic, 0) + value
    if len(per_topic) > 1:  # several topics: each topic's total (its partitions are in mtc75_lag)
        shown = [f"{t} {v}" for t, v in sorted(per_topic.items())]
    else:
        shown = [f"p{p} {v}" for (_, p), v in items]
    parts = shown[:MAX_LAG_SHOWN] + ([f"+{len(shown) - MAX_LAG_SHOWN} more"] if len(shown) > MAX_LAG_SHOWN else [])
    text = Text(f"total {total}", style="bold")
    text.append("   " + "  ".join(parts))
    return text


def _limit_text(stats: Stats) -> Text:
    """MAX_RATE / KEY_RATE, the messages waiting for a token now and the share of the run spent throttled."""
    elapsed = max(stats.elapsed_seconds, 1e-9)
    parts = []
    if stats.max_rate or stats.throttled_seconds:
        limit = f"{stats.max_rate:,g}/s" if stats.max_rate else "off"
        parts.append(f"MAX_RATE {limit} (throttled {stats.throttled_seconds:.1f}s, "
                     f"{stats.throttled_seconds / elapsed:.0%})")
    if stats.key_rate or stats.key_throttled_seconds:
        limit = f"{stats.key_rate:,g}/s per key" if stats.key_rate else "off"
        parts.append(f"KEY_RATE {limit} (a key throttled {stats.key_throttled_seconds:.1f}s, "
                     f"{stats.key_throttled_seconds / elapsed:.0%})")
    text = Text("   ".join(parts), style="bold" if stats.throttled else "")
    text.append(f"   {stats.throttled} waiting for a token", style="yellow" if stats.throttled else "dim")
    return text


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def render(
    stats: Stats, history: Sequence[float], process: ProcessSample | None = None, title: str = "MTC75"
) -> RenderableType:
    """One frame of the dashboard."""
    color = status_color(stats)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()

    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(1, stats.max_thread_count), completed=stats.active_threads, width=BAR_WIDTH,
                    complete_style=color, finished_style=color),
        Text(f"{stats.active_threads}/{stats.max_thread_count} busy", style=color),
        Text(f"(MAX_THREAD_COUNT {thread_bound(stats)}, peak {stats.max_active_threads})", style="dim"),
    )
    grid.add_row(stats.workers, bar)  # "threads", or "coroutines" for an async handler
    if stats.paused:
        state = Text(f"PAUSED {stats.paused_for:.1f}s", style="bold red")
        state.append(f"  re-check in {stats.next_check_in:.1f}s", style="red")
    else:
        state = Text("running", style="green")
    state.append(f"   pauses {stats.pauses} ({stats.paused_seconds:.1f}s paused)", style="dim")
    grid.add_row("state", state)
    rate = Text(f"{stats.rate:,.0f}/s  ", style="bold")
    rate.append(sparkline(history), style="cyan")
    rate.append(f"  (last {min(len(history), HISTORY)}s, peak {max(history, default=0.0):,.0f}/s)", style="dim")
    grid.add_row("messages", rate)
    processed = Text(f"{stats.processed:,}")
    if stats.batch_size > 1:
        processed.append(f"   in {stats.batches:,} batches of {stats.mean_batch:,.0f} on average "
                         f"(BATCH_SIZE {stats.batch_size})", style="dim")
    grid.add_row("processed", processed)
    waiting = f"waiting {stats.backlog}"
    if stats.ordering != "unordered":
        waiting += f", {stats.blocked} behind their {stats.ordering}"
    grid.add_row("in-flight", Text(f"{stats.in_flight} (running {stats.active_threads}, {waiting})"))
    grid.add_row("ordering", Text(stats.ordering, style="bold" if stats.ordering != "unordered" else "dim"))
    if stats.max_rate or stats.key_rate or stats.throttled_seconds or stats.key_throttled_seconds:
        grid.add_row("rate limit", _limit_text(stats))
    grid.add_row("lag", _lag_text(stats.lag))
    problems = Text(f"failed {stats.failed}   retried {stats.retried}   dead-lettered {stats.dead_lettered}",
                    style="red" if stats.failed or stats.dead_lettered else "")
    grid.add_row("failures", problems)
    if stats.share is not None:
        counts = "  ".join(f"{count}: {n}" for count, n in sorted(stats.share.deliveries.items()))
        grid.add_row("share", Text(share_text(stats) + (f"   by delivery count {counts}" if counts else "")))
    if process is not None:
        grid.add_row("process", Text(f"CPU {process.cpu_percent:.0f}%   RSS {_mib(process.rss_bytes)}"))
    where = "a share group member" if stats.share is not None else f"{stats.assigned} partitions assigned"
    footer = Text(f"{stats.elapsed_seconds:.0f}s elapsed, {where}", style="dim")
    return Panel(Group(grid, footer), title=title, border_style=color, expand=False)


class Dashboard:
    """Redraws :func:`render` in place on a terminal; log lines scroll above it."""

    def __init__(self, console: Console | None = None, title: str = "MTC75", refresh_per_second: float = 2.0) -> None:
        self._console = console or Console()
        self._title = title
        self._refresh = refresh_per_second
        self._history: deque[float] = deque(maxlen=HISTORY)  # touched only by update()
        self._latest: tuple[Stats, tuple[float, ...]] | None = None  # swapped whole: read by the refresh thread
        self._sampler: ProcessSampler | None = None
        self._live: Live | None = None
        self._moved: list[logging.StreamHandler] = []  # type: ignore[type-arg]
        self._original_stderr = sys.stderr

    def update(self, stats: Stats) -> None:
        """Take a new snapshot (any thread; cheap: the drawing happens on rich's refresh thread)."""
        self._history.append(stats.rate)
        self._latest = (stats, tuple(self._history))

    def _frame(self) -> RenderableType:
        latest = self._latest
        if latest is None:
            return Text("MTC75: connecting...", style="dim")
        sample = self._sampler.sample() if self._sampler is not None else None
        return render(latest[0], latest[1], sample, self._title)

    def start(self) -> None:
        self._sampler = ProcessSampler()
        redirect_stderr = sys.stderr.isatty()  # never pull a redirected stderr onto the terminal
        self._live = Live(
            console=self._console, get_renderable=self._frame, refresh_per_second=self._refresh,
            redirect_stdout=True, redirect_stderr=redirect_stderr,
        )
        original = self._original_stderr = sys.stderr
        self._live.start()
        if redirect_stderr:
            # Log handlers hold the real stderr; point them at rich's proxy so lines print above the panel.
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is original:
                    handler.setStream(sys.stderr)
                    self._moved.append(handler)

    def close(self) -> None:
        """Draw the last frame and give the terminal back (idempotent)."""
        live, self._live = self._live, None
        if live is None:
            return
        for handler in self._moved:
            handler.setStream(self._original_stderr)
        self._moved.clear()
        live.refresh()
        live.stop()

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()
