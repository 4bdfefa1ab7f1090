"""The consumer command (``mtc75-consumer``, ``python -m mtc75 consumer``, the repository's mtc75_consumer.py).

A bounded thread pool of MAX_THREAD_COUNT handlers, a live dashboard or status line, optional metrics,
report and live re-tuning from the config file. Main thread only: it is also the poll thread (it calls
``Consumer.run``); signal handlers only call ``Consumer.stop``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from mtc75.api import Consumer
from mtc75.app.cli import (
    INSTALLED,
    Front,
    StdoutLines,
    base_parser,
    check_writable,
    config_path,
    paint,
    resolve,
    run_main,
    setup_logging,
    use_color,
)
from mtc75.app.status import format_status, share_text
from mtc75.core.stats import Stats
from mtc75.errors import ConfigError
from mtc75.runtime.handlers import SimulatedWork, load_handler

DESCRIPTION = "MTC75 consumer: a thread pool of MAX_THREAD_COUNT behind a semaphore; pauses when every thread is busy."
COMMAND = "consumer"
SETTINGS = (
    "BOOTSTRAP_SERVERS", "TOPIC", "GROUP_ID", "GROUP_TYPE", "MAX_THREAD_COUNT", "MIN_THREAD_COUNT",
    "MAX_THREAD_LIMIT",
    "PAUSE_INTERVAL", "PROCESSING_SLEEP",
    "AUTO_OFFSET_RESET", "MAX_BACKLOG", "OFFSET_WINDOW", "COMMIT_INTERVAL", "REVOKE_TIMEOUT", "SHUTDOWN_TIMEOUT",
    "MAX_ATTEMPTS", "RETRY_BACKOFF", "RETRY_BACKOFF_MAX", "ON_FAILURE", "MAX_PAYLOAD_BYTES", "BROKER_DOWN_TIMEOUT",
    "REPLICATION_FACTOR", "ORDERING", "BATCH_SIZE", "BATCH_WAIT", "FETCH_SIZES", "KEY_FORMAT", "VALUE_FORMAT",
    "MAX_RATE", "KEY_RATE", "RATE_BURST", "RUNNER", "PROCESS_COUNT", "PROCESSING_GUARANTEE",
)
EPILOG = """examples:
  {cmd}                                   # settings from the config file, MTC75_* variables, flags
  {cmd} --topic orders --group-id billing --max-thread-count 4 --processing-sleep 0.2
  {cmd} --topic orders --topic payments   # several topics (or --topic orders,payments)
  {cmd} --topic '^orders-.*'              # a pattern: topics created later that match are consumed too
  {cmd} --max-thread-count auto          # the count that serves best, tuned while running
  {cmd} --handler myapp.jobs:handle       # fn(message) in a worker thread
  {cmd} --handler myapp.jobs:crunch --runner processes   # in one process per core
  {cmd} --max-messages 1000 --summary-json run.json
  {cmd} --metrics-port 9108 --report run-report/   # /metrics, /healthz, /readyz + CSV/PNG report
  {cmd} --max-rate 200 --key-rate 10      # at most 200 msg/s, 10 msg/s per key

On a terminal it shows a live dashboard (--no-dashboard: one status line a second). Saving the config file
with a new MAX_THREAD_COUNT, PAUSE_INTERVAL, MAX_RATE, KEY_RATE, RATE_BURST or PROCESSING_SLEEP applies it
within 2 seconds (--no-reload).

Ctrl-C (or SIGTERM) stops fetching, waits up to SHUTDOWN_TIMEOUT for running handlers, commits and
exits 0 (handlers still running then are abandoned, counted and delivered again next time);
a second Ctrl-C exits at once (uncommitted messages are then delivered again, never lost).
A handler that raises is retried (--max-attempts, --retry-backoff); then --on-failure decides:
dlq publishes it to <topic>.dlq (of the message's own topic), skip moves on, stop commits what is safe and
exits 5. A named topic deleted while consuming ends the run (exit 3) unless re-created within 10 s; a topic
only a pattern matched just stops matching.
"""
log = logging.getLogger("mtc75.commands.consumer")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _summary_line(stats: Stats) -> str:
    return (
        f"summary: processed {stats.processed}, failed {stats.failed} (retried {stats.retried}, "
        f"dead-lettered {stats.dead_lettered}, skipped {stats.skipped}), pauses {stats.pauses} "
        f"({stats.paused_seconds:.1f}s paused), max threads busy {stats.max_active_threads}/"
        f"{stats.max_thread_count}{' (auto)' if stats.thread_mode == 'auto' else ''}, ordering {stats.ordering}, "
        + (f"fetch sizes {stats.fetch_sizes}, " if stats.fetch_sizes else "")
        + (f"{stats.batches} batches of {stats.mean_batch:.0f} on average (BATCH_SIZE {stats.batch_size}), "
           if stats.batch_size > 1 else "")
        + _limits(stats)
        + f"{stats.elapsed_seconds:.1f}s"
        + (f", abandoned {stats.abandoned} running handlers" if stats.abandoned else "")
        + (f"; share group: {share_text(stats)}" if stats.share is not None else "")
    )


def _limits(stats: Stats) -> str:
    """``"max rate 200/s (throttled 19.5s), "`` for the summary line; empty without a rate limit."""
    parts = []
    if stats.max_rate or stats.throttled_seconds:
        parts.append(f"max rate {stats.max_rate:g}/s (throttled {stats.throttled_seconds:.1f}s)")
    if stats.key_rate or stats.key_throttled_seconds:
        parts.append(f"key rate {stats.key_rate:g}/s (keys throttled {stats.key_throttled_seconds:.1f}s)")
    return "".join(part + ", " for part in parts)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


def main(argv: list[str] | None = None, front: Front = INSTALLED) -> int:
    """The consumer command, reached through ``front``; returns its exit code."""
    prog = front.prog(COMMAND)
    parser = base_parser(COMMAND, DESCRIPTION, EPILOG, SETTINGS, front)
    parser.add_argument("--handler", metavar="MODULE:FUNCTION",
                        help="call FUNCTION(message) for each message instead of the simulated work")
    parser.add_argument("--max-messages", type=_positive_int, metavar="N",
                        help="exit 0 once N messages are handled and committed (fetching stops at N: exactly N "
                             "are handled)")
    parser.add_argument("--idle-exit", type=_positive_float, metavar="SECONDS",
                        help="exit 0 after SECONDS without a new message, counted from the first assignment")
    parser.add_argument("--summary-json", type=Path, metavar="PATH", help="write the run summary as JSON")
    parser.add_argument("--no-dashboard", action="store_true",
                        help="print one status line a second even on a terminal")
    parser.add_argument("--metrics-port", type=_port, metavar="PORT",
                        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics, liveness at /healthz "
                             "and readiness at /readyz (200, or 503 with the reason)")
    parser.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                        help="address for --metrics-port (default: %(default)s; 0.0.0.0 for all interfaces)")
    parser.add_argument("--report", type=Path, metavar="DIR",
                        help="write DIR/timeseries.csv (a row a second) and, at exit, DIR/report.png")
    parser.add_argument("--no-reload", action="store_true",
                        help="do not apply changes to the config file while running")
    args = parser.parse_args(argv)
    out = StdoutLines()
    started: list[Consumer] = []  # the consumer, once built: what it left running decides how to exit

    def run() -> int:
        setup_logging(args.verbose, args.quiet)
        settings, props = resolve(args, SETTINGS)
        if args.summary_json is not None:
            check_writable(args.summary_json, "--summary-json")
        work = load_handler(args.handler) if args.handler else SimulatedWork(
            settings.PROCESSING_SLEEP, max_payload_bytes=settings.MAX_PAYLOAD_BYTES
        )
        color = use_color()
        views: list[Any] = []  # each has update(stats): the status snapshots go to them
        dashboard = report = watcher = None
        if args.report is not None:
            from mtc75.app.report import RunReport

            report = RunReport(args.report)
            try:
                report.open()
            except OSError as err:
                raise ConfigError(f"--report {args.report}: {err.strerror or err}") from None
            views.append(report)
        if sys.stdout.isatty() and not args.no_dashboard:
            from mtc75.app.dashboard import Dashboard

            dashboard = Dashboard(title=f"MTC75  {settings.subscription.describe()}  group {settings.GROUP_ID}")
            views.append(dashboard)

        def on_status(stats: Stats) -> None:
            if dashboard is None:
                out.say(format_status(stats, color))
            for view in views:
                view.update(stats)

        consumer = Consumer.from_settings(work, settings, librdkafka=props, on_status=on_status,
                                          metrics_port=args.metrics_port, metrics_addr=args.metrics_addr)
        started.append(consumer)

        path = config_path(args)
        if path is not None and not args.no_reload:
            from mtc75.app.reload import ConfigWatcher, retuner

            watcher = ConfigWatcher(path, settings, lambda values: resolve(args, SETTINGS, values)[0],
                                    retuner(consumer, work))
        signals = 0

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                # Second signal: leave now. Nothing more is committed, so unfinished work is redelivered.
                if dashboard is not None:
                    sys.__stdout__.write("\x1b[?25h\n")  # the live display hid the cursor
                    sys.__stdout__.flush()
                print(f"{prog}: exiting at once", file=sys.__stderr__, flush=True)
                os._exit(128 + signum)
            log.warning("stopping: finishing in-flight messages (signal again to exit at once)")
            consumer.stop()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            if watcher is not None:
                watcher.start()
            if dashboard is not None:
                dashboard.start()
            stats = consumer.run(max_messages=args.max_messages, idle_exit=args.idle_exit)
            for view in views:
                view.update(stats)  # the final snapshot, after shutdown committed
        finally:
            if watcher is not None:
                watcher.close()
            if dashboard is not None:
                dashboard.close()
        out.say(paint(_summary_line(stats), "cyan", color, bold=True))
        if report is not None:
            png = report.close()
            out.say(f"report: {report.csv_path} and {png}")
        if args.summary_json is not None:
            try:
                args.summary_json.write_text(json.dumps(stats.summary(), indent=2) + "\n")
            except OSError as err:
                raise ConfigError(f"--summary-json {args.summary_json}: {err.strerror or err}") from None
        return 0

    code = run_main(run, prog, front.advice())
    if started and started[0].lingering:
        # Abandoned handlers still run in worker threads (or the Kafka client is stuck closing), and the
        # interpreter would wait for them at exit for ever: leave now, with the code the run ended with.
        # Their messages are uncommitted.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


