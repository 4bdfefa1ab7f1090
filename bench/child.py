"""A consumer process for the memory and CPU figures: the engine with a no-op handler.

Prints one JSON line, read by bench/run.py: messages handled, peak RSS (VmHWM), and RSS at each
tenth of the run (to tell a plateau from growth).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mtc75.engine import Mtc75Consumer, Stats
from mtc75.settings import load_settings, parse_properties


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def noop(_msg: Any) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--max-messages", type=int, required=True)
    parser.add_argument("--handler", default="noop")
    parser.add_argument("-q", action="store_true")
    parser.add_argument("-X", dest="properties", action="append", default=[])
    args = parser.parse_args(argv)
    settings = load_settings(None, flags={"TOPIC": args.topic, "GROUP_ID": args.group_id})
    overrides = parse_properties(args.properties)
    samples: list[tuple[int, float]] = []  # (messages handled, RSS MB) at each tenth of the run

    def on_status(stats: Stats) -> None:
        if stats.processed >= (len(samples) + 1) * args.max_messages / 10:
            samples.append((stats.processed, round(_status_mb("VmRSS:"), 1)))

    stats = Mtc75Consumer(settings, noop, overrides=overrides, max_messages=args.max_messages, idle_exit=20,
                          on_status=on_status, status_interval=0.1).run()
    print(json.dumps({"processed": stats.processed, "peak_rss_mb": _status_mb("VmHWM:"), "rss_samples": samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
