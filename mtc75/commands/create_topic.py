"""The create-topic command (``mtc75-create-topic``, ``python -m mtc75 create-topic``, the repository's
create_topic.py): create the topic once; an existing topic counts as success. Main thread only.
"""

from __future__ import annotations

import logging

from mtc75.app.cli import INSTALLED, Front, base_parser, resolve, run_main, setup_logging
from mtc75.kafka.topics import create_topic, replica_counts

DESCRIPTION = "Create the MTC75 topic (run once); an existing topic counts as success."
COMMAND = "create-topic"
SETTINGS = ("BOOTSTRAP_SERVERS", "TOPIC", "NUM_PARTITIONS", "REPLICATION_FACTOR")
EPILOG = """examples:
  {cmd}                          # TOPIC and NUM_PARTITIONS from the config file or MTC75_* variables
  {cmd} --topic orders --num-partitions 12
  {cmd} --replication-factor 2   # default 0: one replica per broker, at most 3
"""


def main(argv: list[str] | None = None, front: Front = INSTALLED) -> int:
    """The create-topic command, reached through ``front``; returns its exit code."""
    prog = front.prog(COMMAND)
    args = base_parser(COMMAND, DESCRIPTION, EPILOG, SETTINGS, front).parse_args(argv)

    def run() -> int:
        setup_logging(args.verbose, args.quiet)
        settings, props = resolve(args, SETTINGS)
        topic = settings.one_topic(prog)
        created = create_topic(
            settings.admin_config(props), topic, settings.NUM_PARTITIONS, settings.REPLICATION_FACTOR
        )
        verb = "created" if created else "already exists"
        partitions, replicas = replica_counts(settings.admin_config(props), topic)
        logging.getLogger("mtc75.commands.create_topic").info(
            "topic %s %s on %s: %d partitions, %d replica%s each", topic, verb, settings.BOOTSTRAP_SERVERS,
            partitions, replicas, "" if replicas == 1 else "s",
        )
        return 0

    return run_main(run, prog, front.advice())


