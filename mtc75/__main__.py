"""``python -m mtc75 <command> [options]``: the installed commands by sub-command (see :mod:`mtc75.commands`).

Main thread only.
"""

from __future__ import annotations

import sys

from mtc75.commands import COMMANDS, run

USAGE = """usage: python -m mtc75 <command> [options]

MTC75, a bounded-concurrency Kafka consumer. Commands (each has --help; installed also as mtc75-<command>):
  consumer      consume a topic, at most MAX_THREAD_COUNT handlers at once; pauses when every thread is busy
  produce       send Faker records (JSON) to a topic
  create-topic  create the topic (an existing one counts as success)
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in COMMANDS:
        return run(args[0], args[1:], via="module")
    if args[:1] == ["--version"]:
        from mtc75.app.cli import version_line

        print(version_line("python -m mtc75"))
        return 0
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE, end="")
        return 0
    what = f"unknown command {args[0]!r}" if args else "no command given"
    print(f"{USAGE}\npython -m mtc75: error: {what} (one of: {', '.join(COMMANDS)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
