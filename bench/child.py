"""A consumer process for the memory and CPU figures: the engine with a no-op handler.

Prints one JSON line: processed messages and peak RSS (VmHWM), read by bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mtc75.engine import Mtc75Consumer
from mtc75.settings import load_settings


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
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
    args = parser.parse_args(argv)
    settings = load_settings(None, flags={"TOPIC": args.topic, "GROUP_ID": args.group_id})
    stats = Mtc75Consumer(settings, noop, max_messages=args.max_messages, idle_exit=20).run()
    print(json.dumps({"processed": stats.processed, "peak_rss_mb": peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
