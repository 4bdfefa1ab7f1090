"""The produce command (``mtc75-produce``, ``python -m mtc75 produce``, the repository's producer.py).

Faker records (JSON, keyed by id) to the topic, with a progress bar on a terminal. Main thread only; the
signal handlers only set an Event.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mtc75.app.cli import INSTALLED, Front, base_parser, paint, resolve, run_main, setup_logging, use_color
from mtc75.tools.produce import PROGRESS_INTERVAL, ProducerStats, produce

DESCRIPTION = 'Send Faker records (JSON, keyed by id) to the MTC75 topic: "tons of messages" for the consumer.'
COMMAND = "produce"
SETTINGS = ("BOOTSTRAP_SERVERS", "TOPIC", "PRODUCER_MESSAGE_COUNT", "PRODUCER_SLEEP", "PRODUCER_RATE")
EPILOG = """examples:
  {cmd}                      # PRODUCER_MESSAGE_COUNT records, as fast as possible
  {cmd} --topic orders --count 5000 --rate 200   # 200 records/s, with a progress bar and ETA
  {cmd} --count 0 --producer-sleep 0.01   # about 100 records/s until Ctrl-C
"""
BAR_REFRESH = 0.1  # seconds between progress-bar updates


def _line(stats: ProducerStats, final: bool) -> str:
    head = "done:" if final else "producing:"
    return (
        f"{head} sent {stats.sent} delivered {stats.delivered} failed {stats.failed} "
        f"({stats.rate:,.0f} msg/s, {stats.elapsed:.1f}s)"
    )


class _Bar:
    """A rich progress bar over delivered records with the rate and the time left."""

    def __init__(self, total: int) -> None:
        self._progress = Progress(
            TextColumn("producing"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>8,.0f} msg/s"), TextColumn("ETA"), TimeRemainingColumn(),
        )
        self._task = self._progress.add_task("produce", total=total, rate=0.0)
        self._progress.start()

    def update(self, stats: ProducerStats) -> None:
        self._progress.update(self._task, completed=stats.delivered, rate=stats.rate)

    def close(self) -> None:
        self._progress.stop()


def main(argv: list[str] | None = None, front: Front = INSTALLED) -> int:
    """The produce command, reached through ``front``; returns its exit code."""
    prog = front.prog(COMMAND)
    parser = base_parser(COMMAND, DESCRIPTION, EPILOG, SETTINGS, front)
    parser.add_argument("--count", dest="PRODUCER_MESSAGE_COUNT", metavar="N", help="alias of --producer-message-count")
    parser.add_argument("--rate", dest="PRODUCER_RATE", metavar="PER_SECOND",
                        help="alias of --producer-rate: messages per second instead of --producer-sleep")
    args = parser.parse_args(argv)

    def run() -> int:
        setup_logging(args.verbose, args.quiet)
        settings, props = resolve(args, SETTINGS)
        topic = settings.one_topic(prog)
        color = use_color()
        stop = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            stop.set()  # produce() stops and flushes what is queued

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

        def progress(stats: ProducerStats) -> None:
            print(paint(_line(stats, final=False), "cyan", color), flush=True)

        count = settings.PRODUCER_MESSAGE_COUNT
        bar = _Bar(count) if count and sys.stdout.isatty() else None
        try:
            stats = produce(
                settings.producer_config(props), topic, count, settings.PRODUCER_SLEEP, stop,
                bar.update if bar is not None else progress, rate=settings.PRODUCER_RATE,
                progress_interval=BAR_REFRESH if bar is not None else PROGRESS_INTERVAL,
            )
            if bar is not None:
                bar.update(stats)
        finally:
            if bar is not None:
                bar.close()
        ok = stats.failed == 0
        print(paint(_line(stats, final=True), "green" if ok else "red", color, bold=True), flush=True)
        if not ok and stats.last_error:
            print(f"{prog}: error: {stats.failed} messages failed, last: {stats.last_error}", file=sys.stderr)
        return 0 if ok else 1

    return run_main(run, prog, front.advice())


