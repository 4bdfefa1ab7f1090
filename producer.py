#!/usr/bin/env python3
"""Send Faker records (JSON, keyed by id) to the MTC75 topic: "tons of messages" for the consumer.

The repository's front of ``mtc75-produce`` (mtc75/commands/produce.py): the same command, with this
folder's config.py as its default settings file and advice that names the Makefile and these scripts.
"""

from __future__ import annotations

import mtc75._startup  # noqa: F401 - first: Ctrl-C during the imports is exit 130, not a traceback

import sys
from pathlib import Path

from mtc75.app.cli import scripts
from mtc75.commands import produce as command


def main(argv: list[str] | None = None) -> int:
    return command.main(argv, front=scripts(Path(__file__).resolve().parent))


if __name__ == "__main__":
    sys.exit(main())
