#!/usr/bin/env python3
"""Create the MTC75 topic (run once); an existing topic counts as success."""

from __future__ import annotations

import mtc75._startup  # noqa: F401 - first: Ctrl-C during the imports is exit 130, not a traceback

import logging
import sys

from mtc75.app.cli import base_parser, resolve, run_main, setup_logging
from mtc75.kafka.topics import create_topic, replica_counts

PROG = "create_topic.py"
SETTINGS = ("BOOTSTRAP_SERVERS", "TOPIC", "NUM_PARTITIONS", "REPLICATION_FACTOR")
EPILOG = """example:
  python create_topic.py                          # the topic and partitions named in config.py
  python create_topic.py --topic orders --num-partitions 12
  python create_topic.py --replication-factor 2   # default 0: one replica per broker, at most 3
"""


def main(argv: list[str] | None = None) -> int:
    args = base_parser(PROG, __doc__ or "", EPILOG, SETTINGS).parse_args(argv)

    def run() -> int:
        setup_logging(args.verbose, args.quiet)
        settings, props = resolve(args, SETTINGS)
        created = create_topic(
            settings.admin_config(props), settings.TOPIC, settings.NUM_PARTITIONS, settings.REPLICATION_FACTOR
        )
        verb = "created" if created else "already exists"
        partitions, replicas = replica_counts(settings.admin_config(props), settings.TOPIC)
        logging.getLogger(PROG).info(
            "topic %s %s on %s: %d partitions, %d replica%s each", settings.TOPIC, verb, settings.BOOTSTRAP_SERVERS,
            partitions, replicas, "" if replicas == 1 else "s",
        )
        return 0

    return run_main(run, PROG)


if __name__ == "__main__":
    sys.exit(main())
