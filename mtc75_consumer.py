#!/usr/bin/env python3
"""MTC75 consumer: a thread pool of MAX_THREAD_COUNT behind a semaphore; pauses when every thread is busy."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from mtc75.cli import base_parser, paint, resolve, run_main, setup_logging, use_color
from mtc75.engine import Mtc75Consumer, Stats
from mtc75.handlers import SimulatedWork, load_handler
from mtc75.status import format_status

PROG = "mtc75_consumer.py"
SETTINGS = (
    "BOOTSTRAP_SERVERS", "TOPIC", "GROUP_ID", "MAX_THREAD_COUNT", "PAUSE_INTERVAL", "PROCESSING_SLEEP",
    "AUTO_OFFSET_RESET", "MAX_BACKLOG", "COMMIT_INTERVAL", "REVOKE_TIMEOUT", "SHUTDOWN_TIMEOUT",
    "MAX_ATTEMPTS", "RETRY_BACKOFF", "RETRY_BACKOFF_MAX", "ON_FAILURE", "MAX_PAYLOAD_BYTES", "BROKER_DOWN_TIMEOUT",
    "REPLICATION_FACTOR",
)
EPILOG = """examples:
  python mtc75_consumer.py                                   # settings from config.py
  python mtc75_consumer.py --max-thread-count 4 --processing-sleep 0.2
  python mtc75_consumer.py --handler myapp.jobs:handle       # fn(message) in a worker thread
  python mtc75_consumer.py --max-messages 1000 --summary-json run.json

Ctrl-C (or SIGTERM) stops fetching, waits for running handlers, commits and exits 0;
a second Ctrl-C exits at once (uncommitted messages are then delivered again, never lost).
A handler that raises is retried (--max-attempts, --retry-backoff); then --on-failure decides:
dlq publishes it to <topic>.dlq, skip moves on, stop commits what is safe and exits 5.
"""
log = logging.getLogger(PROG)


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
        f"{stats.max_thread_count}, {stats.elapsed_seconds:.1f}s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(PROG, __doc__ or "", EPILOG, SETTINGS)
    parser.add_argument("--handler", metavar="MODULE:FUNCTION",
                        help="call FUNCTION(message) for each message instead of the simulated work")
    parser.add_argument("--max-messages", type=_positive_int, metavar="N",
                        help="exit 0 once N messages are handled and committed")
    parser.add_argument("--idle-exit", type=_positive_float, metavar="SECONDS",
                        help="exit 0 after SECONDS without a new message")
    parser.add_argument("--summary-json", type=Path, metavar="PATH", help="write the run summary as JSON")
    args = parser.parse_args(argv)

    def run() -> int:
        setup_logging(args.verbose, args.quiet)
        settings, props = resolve(args, SETTINGS)
        handler = load_handler(args.handler) if args.handler else SimulatedWork(
            settings.PROCESSING_SLEEP, max_payload_bytes=settings.MAX_PAYLOAD_BYTES
        )
        color = use_color()

        def on_status(stats: Stats) -> None:
            print(format_status(stats, color), flush=True)

        consumer = Mtc75Consumer(
            settings, handler, overrides=props, max_messages=args.max_messages, idle_exit=args.idle_exit,
            on_status=on_status,
        )
        signals = 0

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                # Second signal: leave now. Nothing more is committed, so unfinished work is redelivered.
                print(f"{PROG}: exiting at once", file=sys.stderr, flush=True)
                os._exit(128 + signum)
            log.warning("stopping: finishing in-flight messages (signal again to exit at once)")
            consumer.stop()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        stats = consumer.run()
        print(paint(_summary_line(stats), "cyan", color, bold=True), flush=True)
        if args.summary_json is not None:
            args.summary_json.write_text(json.dumps(stats.summary(), indent=2) + "\n")
        if consumer.abandoned:
            # Handlers still running would keep the interpreter alive; their work is uncommitted.
            sys.stderr.flush()
            os._exit(1)
        return 0

    return run_main(run, PROG)


if __name__ == "__main__":
    sys.exit(main())
